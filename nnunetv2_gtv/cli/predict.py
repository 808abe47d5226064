"""gtv-predict: segment CTs with the multi-scale ensemble and its uncertainty in one command.

Each CT is read and preprocessed once; every model of the ensemble (default: the paper's six, Local, Middle
and Global x folds 0 and 1) runs on the same tensor; the probabilities are averaged in memory and fused by
gtv-uncertainty's code; a model that ran in its sampling region is left out of the mean and the votes outside it.
Per case, on the input's own grid and in its format: <case> (fused labels, connected-component rule per label),
<case>_entropy (vote entropy), optionally <case>_probability; summary.json / summary.csv hold each model's volume
and the VVC, for the case and (with several labels) per label. A folder of DICOM files: each CT series under it
is a case (<PatientID>_<SeriesNumber>), with NIfTI outputs plus <case>_RTSTRUCT.dcm and <case>_SEG.dcm referring
to the CT, one ROI / segment per label (also for one NIfTI input with --dicom-reference SERIES_DIR).

Exit codes: 0 all cases done; 1 some cases failed (listed); 2 unusable models, inputs or output folder.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

# before torch starts OpenMP: idle threads sleep instead of spinning. On a CPU shared with other jobs spinning
# threads made inference 3-6x slower (README, gtv-predict); an explicit OMP_WAIT_POLICY is kept
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from nnunetv2_gtv.allocator import LARGEST_MMAP_THRESHOLD, keep_freed_memory
from nnunetv2_gtv.cli.common import add_fusion_arguments, add_resume_and_part_arguments, check_run_arguments, \
    fail, finish_run, fusion_settings_from_args, fusion_settings_record, open_output_folder
from nnunetv2_gtv.cli.review import review
from nnunetv2_gtv.dicom.outputs import write_run_outputs
from nnunetv2_gtv.ensemble.errors import FusionInputError
from nnunetv2_gtv.ensemble.folders import label_names, label_values
from nnunetv2_gtv.ensemble.postprocessing import POSTPROCESSING_FILE
from nnunetv2_gtv.io.folders import check_outside_inputs
from nnunetv2_gtv.inference.export import model_predictions_folder
from nnunetv2_gtv.inference.inputs import InputError, check_inputs, dicom_series_of_cases, find_cases
from nnunetv2_gtv.inference.models import DEFAULT_CHECKPOINT, LoadedModel, ModelError, check_shared_preprocessing, \
    dataset_folder_name, load_model, resolve_models
from nnunetv2_gtv.inference.pipeline import RunOptions, predict_cases
from nnunetv2_gtv.runs import write_timings
from nnunetv2_gtv.inference.predictor import EnsemblePredictor
from nnunetv2_gtv.inference.settings import PRECISIONS, InferenceSettings, default_step_size, parse_tile, \
    use_cpu_bfloat16

PROG = "gtv-predict"
DEFAULTS = InferenceSettings()


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("-d", required=True, metavar="DATASET", help="dataset name or id the models were trained on")
    group.add_argument("-m", nargs="+", metavar="MODEL",
                       help="models as SCALE:FOLD (Local:0 Middle:1 ...) or TRAINER:FOLD; default: the paper's six, "
                            "Local:0 Local:1 Middle:0 Middle:1 Global:0 Global:1")
    group.add_argument("-tr_suffix", default="", metavar="SUFFIX",
                       help="appended to the trainer of SCALE:FOLD models (e.g. _smoke: "
                            "nnUNetTrainerGTV25DLocal_smoke)")
    group.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="plans identifier (default: nnUNetPlans)")
    group.add_argument("-c", default="3d_fullres", metavar="CONFIGURATION", help="configuration (default: 3d_fullres)")
    group.add_argument("-chk", default=DEFAULT_CHECKPOINT, metavar="CHECKPOINT",
                       help=f"checkpoint file name (default: {DEFAULT_CHECKPOINT})")
    group.add_argument("-device", choices=("cpu", "cuda", "mps"),
                       default="cuda" if torch.cuda.is_available() else "cpu",
                       help="device (default: cuda when available, else cpu)")


def _add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "inference (defaults chosen by benchmarks/inference_settings.py, see docs/inference.md)")
    group.add_argument("--tile", type=parse_tile, default=DEFAULTS.tile, metavar="TILE",
                       help="patch (the training patch, nnU-Net's sliding window), slab (the patch's slices, whole "
                            "in-plane extent), whole (one pass over the image) or ZxYxX; the network's PE blocks "
                            f"pool over the whole tile, so it can change the result (default: {DEFAULTS.tile})")
    group.add_argument("-step_size", type=float, metavar="STEP",
                       help="sliding-window step as a fraction of the tile, 1 = no overlap (default: 1 on the CPU, "
                            "0.5 on CUDA; nnU-Net's is 0.5)")
    tta = group.add_mutually_exclusive_group()
    tta.add_argument("--disable_tta", dest="mirroring", action="store_false", default=DEFAULTS.mirroring,
                     help="no test-time mirroring" + (" (the default)" if not DEFAULTS.mirroring else ""))
    tta.add_argument("--enable_tta", dest="mirroring", action="store_true",
                     help="test-time mirroring as nnU-Net does it (up to 8 passes)" +
                          (" (the default)" if DEFAULTS.mirroring else ""))
    group.add_argument("-precision", choices=PRECISIONS, default="auto",
                       help="CPU arithmetic of the networks: auto = bfloat16 on CPUs that compute it natively "
                            "(AVX512-BF16, AMX; about 1.5x faster, fused segmentation within 0.1 %% Dice of "
                            "float32, see docs/inference.md), float32 elsewhere (default: auto). On CUDA nnU-Net "
                            "autocasts to float16 whatever this says")
    group.add_argument("-tiles_per_batch", type=int, metavar="N",
                       help="sliding-window tiles per network call (default: 2 on the CPU, 8 on CUDA); changes speed "
                            "and memory, not the result")
    group.add_argument("--no-region-restriction", dest="restrict", action="store_false",
                       default=DEFAULTS.restrict_to_region,
                       help="run every model on the whole image instead of Local and Middle only inside their "
                            "sampling region (head; head and neck) and Global inside the body's bounding box; outside "
                            "it a model abstains in the fusion (see --outside-region)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", required=True, metavar="CT",
                        help="a CT file or a folder of them (.nii.gz, .nii, .nrrd, .mha; <case>_0000 or <case>), or a "
                             "folder of DICOM files: each CT series under it is a case (<PatientID>_<SeriesNumber>), "
                             "with <case>_RTSTRUCT.dcm and <case>_SEG.dcm beside the NIfTI outputs")
    parser.add_argument("-o", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--dicom-reference", metavar="SERIES_DIR",
                        help="for one CT file converted from a DICOM CT series: that series' folder; also writes "
                             "<case>_RTSTRUCT.dcm and <case>_SEG.dcm referring to it (the file must be on its grid)")
    _add_model_arguments(parser)
    _add_inference_arguments(parser)
    add_fusion_arguments(parser.add_argument_group("fusion (as gtv-uncertainty)"),
                         f"; gtv-predict reads $nnUNet_results/<dataset>/{POSTPROCESSING_FILE} when it exists")
    run = parser.add_argument_group("run")
    run.add_argument("-np", type=int, default=2,
                     help="export processes working beside prediction when there are several cases; 0 = export in "
                          "this process (default: %(default)s)")
    add_resume_and_part_arguments(run, "models and settings")
    run.add_argument("--check", action="store_true",
                     help="predict nothing: check that every case of -i is finished in OUT with these models and "
                          "settings (e.g. after a run sharded with -num_parts), write the summary of all of them, and "
                          "exit 1 naming the cases that are not")
    run.add_argument("--save-model-predictions", action="store_true",
                     help="also write each model's own prediction (segmentation, .npz probabilities, .pkl) to "
                          "OUT/model_predictions/<trainer>__fold_<f>, as nnUNetv2_predict --save_probabilities does")
    run.add_argument("--review", action="store_true",
                     help="also write OUT/review/review.html, the review page of gtv-review with the CTs")
    run.add_argument("--disable_progress_bar", action="store_true")
    return parser


def _set_threads(device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # as nnUNetv2_predict does
        # tensors of a tile batch stay for reuse (nnunetv2_gtv.allocator); per-case volumes are still returned
        keep_freed_memory(LARGEST_MMAP_THRESHOLD)
    else:
        torch.set_num_threads(1)


def _model_record(model: LoadedModel) -> dict:
    stat = model.spec.checkpoint.stat()
    return {"label": model.label, "trainer": model.spec.trainer, "fold": model.spec.fold,
            "checkpoint": str(model.spec.checkpoint.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sampling_region": model.sampling_region}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_run_arguments(parser, args, min_processes=0)
    if args.check and args.num_parts != 1:
        parser.error("--check looks at every case: leave out -num_parts / -part_id")
    if args.tiles_per_batch is not None and args.tiles_per_batch < 1:
        parser.error("-tiles_per_batch must be at least 1")
    try:
        step_size = args.step_size if args.step_size is not None else default_step_size(args.device)
        settings = InferenceSettings(args.tile, step_size, args.mirroring, args.restrict,
                                     use_cpu_bfloat16(args.precision, args.device))
    except ValueError as err:
        parser.error(str(err))
    results = os.environ.get("nnUNet_results")
    if not results:
        return fail(PROG, "nnUNet_results is not set: it must point to the folder with the trained models")

    try:
        cases = find_cases(args.i)
        check_inputs(cases[args.part_id::args.num_parts])
        dicom_series = dicom_series_of_cases(cases, args.dicom_reference)
        check_outside_inputs(args.o, [args.i] + ([args.dicom_reference] if args.dicom_reference else []))
        dataset_folder = Path(results) / dataset_folder_name(Path(results), args.d)
        specs = resolve_models(results, dataset_folder.name, args.m, args.p, args.c, args.tr_suffix, args.chk)
        rule_file = dataset_folder / POSTPROCESSING_FILE
        fusion = fusion_settings_from_args(args, rule_file if rule_file.is_file() else None)
        if fusion.label_rules and not args.postprocessing:
            print(f"{PROG}: post-processing per label from {rule_file}")
        fusion.model_weights(len(specs))
        device = torch.device(args.device)
        _set_threads(device)
        models = [load_model(spec, device, settings.step_size, settings.mirroring, args.tiles_per_batch)
                  for spec in specs]
        check_shared_preprocessing(models)
        ensemble = EnsemblePredictor(models, settings)
        fusion.component_rules(len(label_values(ensemble.dataset_json, str(specs[0].folder / "dataset.json"))))
    except (InputError, ModelError, FusionInputError, ValueError) as err:
        return fail(PROG, str(err))
    output_folder = open_output_folder(PROG, args.o, len(models))
    if output_folder is None:
        return 2

    model_folders = None
    if args.save_model_predictions:
        model_folders = tuple(model_predictions_folder(output_folder, s.trainer, s.fold).resolve() for s in specs)
    fingerprint = {"inputs": [str(f) for f in model_folders or ()],
                   "models": [_model_record(m) for m in models],
                   "inference": settings.record(),
                   "weights": list(fusion.model_weights(len(models))),
                   "settings": fusion_settings_record(fusion)}
    options = RunOptions(args.np, args.resume or args.check, args.num_parts, args.part_id, model_folders,
                         not args.disable_progress_bar, overlap_export=device.type != "cpu", check_only=args.check)
    report = predict_cases(ensemble, cases, output_folder, fusion, fingerprint, options)
    write_timings(output_folder, report.timings, model_folders or ())
    if dicom_series:
        report.failures.extend(write_run_outputs(dicom_series, output_folder, cases[0].file_ending, report.done,
                                                 report.skipped, label_names(ensemble.dataset_json)))
    if model_folders:
        print(f"{PROG}: each model's own predictions: {model_folders[0].parent}")
    code = finish_run(PROG, argv, output_folder, report.rows.values(), len(models), fingerprint, len(report.done),
                      report.failures, fusion, label_names(ensemble.dataset_json))
    if args.review:
        code = max(code, review(output_folder, output_folder / "review", {c.case: c.path for c in cases}, PROG))
    return code


if __name__ == "__main__":
    sys.exit(main())
