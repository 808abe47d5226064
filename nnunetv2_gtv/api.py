"""The Python API: what gtv-predict, gtv-uncertainty, gtv-evaluate and gtv-review do, callable from Python.

The commands parse their arguments and call these functions; a script or a notebook calls them the same way::

    from nnunetv2_gtv import api

    run = api.predict("imagesTs", "fused", dataset=990, models=["Local:0", "Middle:0", "Global:0"],
                      trainer_suffix="_cpu", device="cpu")
    print(run.exit_code, run.failures, run.rows[0]["vvc"])
    result, files = api.evaluate("fused", "labelsTs")

Unusable inputs, models, settings or output folders raise (before anything is written):
:class:`~nnunetv2_gtv.inference.inputs.InputError`, :class:`~nnunetv2_gtv.inference.models.ModelError`,
:class:`~nnunetv2_gtv.ensemble.errors.FusionInputError`, :class:`~nnunetv2_gtv.io.folders.OutputFolderError`,
:class:`~nnunetv2_gtv.evaluation.folders.EvaluationInputError`, :class:`~nnunetv2_gtv.figures.review.ReviewInputError`
or ValueError, each naming the file or setting (:data:`USER_ERRORS`). A case that fails on its own does not raise:
it is listed in :attr:`RunResult.failures` and the run goes on with the others.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from pathlib import Path
from typing import Mapping, Sequence

from tqdm import tqdm

from nnunetv2_gtv.ensemble.errors import FusionInputError, SingleModelWarning
from nnunetv2_gtv.ensemble.folders import check_compatible, label_names, label_values, match_cases, \
    open_prediction_folder
from nnunetv2_gtv.ensemble.fusion import FusionSettings, fuse_case, output_files
from nnunetv2_gtv.ensemble.postprocessing import POSTPROCESSING_FILE, read_postprocessing
from nnunetv2_gtv.ensemble.review_ranking import ReviewSelection
from nnunetv2_gtv.ensemble.summary import fuse_and_record, load_row
from nnunetv2_gtv.evaluation.folders import EvaluationInputError
from nnunetv2_gtv.evaluation.pipeline import EvaluationResult, EvaluationSettings, evaluate_folder, \
    unknown_labels_text
from nnunetv2_gtv.evaluation.report import write_report
from nnunetv2_gtv.figures.review import ReviewInputError, write_review
from nnunetv2_gtv.inference.inputs import InputError
from nnunetv2_gtv.inference.models import DEFAULT_CHECKPOINT, ModelError
from nnunetv2_gtv.inference.settings import InferenceSettings
from nnunetv2_gtv.io.folders import OutputFolderError, check_outside_inputs
from nnunetv2_gtv.planning.ct_channels import channel_names
from nnunetv2_gtv.runs import RunResult, finish_run, finished_row, list_failures, open_output_folder, part_of

USER_ERRORS = (InputError, ModelError, FusionInputError, OutputFolderError, EvaluationInputError, ReviewInputError,
               ValueError)
PAPER_MODELS = ("Local:0", "Local:1", "Middle:0", "Middle:1", "Global:0", "Global:1")

__all__ = ["predict", "fuse", "evaluate", "review", "postprocessing_file", "RunResult", "USER_ERRORS"]


def _results_folder() -> Path:
    results = os.environ.get("nnUNet_results")
    if not results:
        raise ModelError("nnUNet_results is not set: it must point to the folder with the trained models")
    return Path(results)


def postprocessing_file(dataset: str | int) -> Path | None:
    """``$nnUNet_results/<dataset>/gtv_postprocessing.json`` (written by gtv-postprocessing) if it exists; None also
    when the dataset's folder is not found (:func:`predict` says why, after checking the inputs)."""
    from nnunetv2_gtv.inference.models import dataset_folder_name

    try:
        results = _results_folder()
        rule_file = results / dataset_folder_name(results, dataset) / POSTPROCESSING_FILE
    except ModelError:
        return None
    return rule_file if rule_file.is_file() else None


def _fusion_with_dataset_rules(dataset: str | int) -> FusionSettings:
    rule_file = postprocessing_file(dataset)
    if rule_file is None:
        return FusionSettings()
    choice = read_postprocessing(rule_file)
    print(f"gtv-predict: post-processing per label from {rule_file}")
    return FusionSettings(connectivity=choice.connectivity, label_rules=tuple(sorted(choice.rules.items())))


def _review_with_dataset_rules(dataset: str | int) -> ReviewSelection:
    rule_file = postprocessing_file(dataset)
    calibrated = None if rule_file is None else read_postprocessing(rule_file).review_selection(rule_file)
    if calibrated is None:
        return ReviewSelection()
    print(f"gtv-predict: review flag: {calibrated.flag_text()}")
    return calibrated


def predict(images: str | os.PathLike, output: str | os.PathLike, dataset: str | int,
            models: Sequence[str] | None = None, *, trainer_suffix: str = "", plans: str = "nnUNetPlans",
            configuration: str = "3d_fullres", checkpoint: str = DEFAULT_CHECKPOINT, device: str | None = None,
            inference: InferenceSettings | None = None, tiles_per_batch: int | None = None,
            fusion: FusionSettings | None = None, dicom_reference: str | os.PathLike | None = None,
            num_processes: int = 2, resume: bool = False, num_parts: int = 1, part_id: int = 0,
            check_only: bool = False, save_model_predictions: bool = False, review_page: bool = False,
            review_selection: ReviewSelection | None = None, progress: bool = True,
            command: str | None = None) -> RunResult:
    """Segment the CTs of ``images`` (a file, a folder of them, or a folder of DICOM series) with the ensemble of
    ``models`` (``SCALE:FOLD`` or ``TRAINER:FOLD``; default the paper's six) trained on ``dataset`` under
    ``$nnUNet_results``, fused with ``fusion`` (default: the dataset's gtv_postprocessing.json when present, else
    the default rules), into ``output``: per case the fused labels, the vote entropy, a summary row (volumes, VVC,
    review flag and rank, ``review_selection``, default: the review flag calibrated in that file, else VVC);
    RTSTRUCT and SEG for DICOM input. ``inference`` defaults to the device's defaults (no overlap and bfloat16 where
    native on the CPU, step 0.5 on CUDA). The other arguments are gtv-predict's options."""
    import torch

    from nnunetv2_gtv.dicom.outputs import write_run_outputs
    from nnunetv2_gtv.inference.export import model_predictions_folder
    from nnunetv2_gtv.inference.inputs import check_channels, check_inputs, dicom_series_of_cases, find_cases
    from nnunetv2_gtv.inference.models import check_shared_preprocessing, dataset_folder_name, load_model, \
        model_record, resolve_models
    from nnunetv2_gtv.inference.pipeline import RunOptions, predict_cases
    from nnunetv2_gtv.inference.predictor import EnsemblePredictor
    from nnunetv2_gtv.inference.settings import default_step_size, set_threads, use_cpu_bfloat16
    from nnunetv2_gtv.runs import write_timings

    prog = "gtv-predict"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = inference or InferenceSettings(step_size=default_step_size(device),
                                              bfloat16=use_cpu_bfloat16("auto", device))
    results = _results_folder()
    cases = find_cases(images)
    check_inputs(part_of(cases, num_parts, part_id))
    dicom_series = dicom_series_of_cases(cases, dicom_reference)
    check_outside_inputs(output, [images] + ([dicom_reference] if dicom_reference else []))
    dataset_folder = results / dataset_folder_name(results, dataset)
    specs = resolve_models(str(results), dataset_folder.name, list(models or PAPER_MODELS), plans, configuration,
                           trainer_suffix, checkpoint)
    if review_selection is None:
        review_selection = _review_with_dataset_rules(dataset) if fusion is None else ReviewSelection()
    fusion = fusion or _fusion_with_dataset_rules(dataset)
    fusion.model_weights(len(specs))
    set_threads(device)
    loaded = [load_model(spec, torch.device(device), settings.step_size, settings.mirroring, tiles_per_batch)
              for spec in specs]
    check_shared_preprocessing(loaded)
    ensemble = EnsemblePredictor(loaded, settings)
    check_channels(part_of(cases, num_parts, part_id),
                   channel_names(ensemble.dataset_json, str(specs[0].folder / "dataset.json")))
    names = label_names(ensemble.dataset_json)
    fusion.component_rules(len(label_values(ensemble.dataset_json, str(specs[0].folder / "dataset.json"))))
    output_folder = open_output_folder(prog, output, len(loaded))

    model_folders = None
    if save_model_predictions:
        model_folders = tuple(model_predictions_folder(output_folder, s.trainer, s.fold).resolve() for s in specs)
    fingerprint = {"inputs": [str(f) for f in model_folders or ()], "models": [model_record(m) for m in loaded],
                   "inference": settings.record(), "weights": list(fusion.model_weights(len(loaded))),
                   "settings": fusion.record()}
    options = RunOptions(num_processes, resume or check_only, num_parts, part_id, model_folders, progress,
                         overlap_export=device != "cpu", check_only=check_only)
    report = predict_cases(ensemble, cases, output_folder, fusion, fingerprint, options)
    write_timings(output_folder, report.timings, model_folders or ())
    if dicom_series:
        report.failures.extend(write_run_outputs(dicom_series, output_folder, cases[0].file_ending, report.done,
                                                 report.skipped, names))
    if model_folders:
        print(f"{prog}: each model's own predictions: {model_folders[0].parent}")
    run = finish_run(prog, command or f"nnunetv2_gtv.api.predict({images!r}, {output!r})", output_folder,
                     report.rows, len(loaded), fingerprint, report.done, report.failures, fusion, names,
                     review_selection)
    if review_page:
        try:
            run.exit_code = max(run.exit_code, review(output_folder, output_folder / "review",
                                                      {c.case: c.path for c in cases}, prog))
        except (ReviewInputError, OSError) as error:
            print(f"{prog}: error: no review page: {error}", file=sys.stderr)
            run.exit_code = 2
    return run


def _fuse_one(job: tuple) -> tuple[str, dict | None, str | None]:
    """Pool worker: fuse one case and write its record; returns (case, row, error message)."""
    case, files, output_folder, dataset, settings, fingerprint, quiet_single_model = job
    with warnings.catch_warnings():
        if quiet_single_model:
            warnings.simplefilter("ignore", SingleModelWarning)
        row, error = fuse_and_record(case, lambda: fuse_case(case, files, output_folder, dataset, settings),
                                     output_folder, dataset.file_ending, settings, fingerprint)
    return case, row, error


def _fuse_jobs(jobs: list[tuple], num_processes: int) -> list[tuple[str, dict | None, str | None]]:
    progress = tqdm(total=len(jobs), desc="Fusing", unit="case", disable=not jobs)
    results = []
    if num_processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append(_fuse_one(job))
            progress.update()
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            for result in pool.imap_unordered(_fuse_one, jobs):
                results.append(result)
                progress.update()
    progress.close()
    return results


def fuse(prediction_folders: Sequence[str | os.PathLike], output: str | os.PathLike,
         fusion: FusionSettings | None = None, *, allow_missing: bool = False, num_processes: int = 2,
         resume: bool = False, num_parts: int = 1, part_id: int = 0,
         review_selection: ReviewSelection = ReviewSelection(), command: str | None = None) -> RunResult:
    """Fuse the probabilities that several models saved (``nnUNetv2_predict --save_probabilities`` folders, fold
    validation folders, or gtv-predict's model_predictions) into ``output``, as gtv-predict fuses: fused labels,
    vote entropy, summary rows with volumes, VVC, review flag and rank (gtv-uncertainty)."""
    prog = "gtv-uncertainty"
    fusion = fusion or FusionSettings()
    fusion.model_weights(len(prediction_folders))
    folders = [open_prediction_folder(p) for p in prediction_folders]
    for message in check_compatible(folders):
        print(f"{prog}: warning: {message}", file=sys.stderr)
    cases = match_cases(folders, allow_missing)
    check_outside_inputs(output, prediction_folders)
    dataset = folders[0].dataset_info
    fusion.component_rules(dataset.num_labels)
    output_folder = open_output_folder(prog, output, len(folders))

    fingerprint = {"inputs": [str(f.path.resolve()) for f in folders],
                   "weights": list(fusion.model_weights(len(folders))), "settings": fusion.record()}
    my_cases = part_of(sorted(cases), num_parts, part_id)
    rows, jobs = {}, []
    for case in my_cases:
        done = finished_row(output_folder, case, fingerprint,
                            output_files(case, output_folder, dataset.file_ending, fusion)) if resume else None
        if done is not None:
            rows[case] = done
        else:
            jobs.append((case, cases[case], output_folder, dataset, fusion, fingerprint, len(folders) == 1))
    print(f"{prog}: {len(cases)} cases in {len(folders)} folders; this part: {len(my_cases)}, "
          f"{len(my_cases) - len(jobs)} already finished, {len(jobs)} to fuse")

    failures, finished = [], []
    for case, row, error in _fuse_jobs(jobs, num_processes):
        if error is None:
            rows[case] = row
            finished.append(case)
        else:
            failures.append(error)
    for case in sorted(cases):  # rows of other parts or earlier runs with the same inputs and settings
        if case not in rows:
            row = load_row(output_folder, case, fingerprint)
            if row is not None:
                rows[case] = row
    return finish_run(prog, command or f"nnunetv2_gtv.api.fuse({list(map(str, prediction_folders))!r}, "
                                       f"{str(output)!r})", output_folder, rows, len(folders), fingerprint,
                      finished, failures, fusion, dataset.label_names, review_selection)


def evaluate(predictions: str | os.PathLike, reference: str | os.PathLike, output: str | os.PathLike | None = None,
             settings: EvaluationSettings = EvaluationSettings(), command: str | None = None
             ) -> tuple[EvaluationResult, list[Path]]:
    """Score a fused folder (gtv-predict's or gtv-uncertainty's) against the reference labels: Dice, NSD, ASSD,
    HD95, RVE per label, model and fused, error rate per entropy level, VVC against 1 - Dice; writes the report
    (``output``, default PREDICTIONS/evaluation) and returns the numbers and the files written."""
    predictions = Path(predictions)
    output = Path(output) if output else predictions / "evaluation"
    result = evaluate_folder(predictions, Path(reference), settings)
    for entry in result.mapped:
        print(f"gtv-evaluate: warning: {unknown_labels_text(entry, result.label_set)}: mapped to background",
              file=sys.stderr)
    written = write_report(result, output, command or f"nnunetv2_gtv.api.evaluate({str(predictions)!r}, "
                                                      f"{str(reference)!r})")
    return result, written


def review(fused: str | os.PathLike, output: str | os.PathLike | None = None,
           images: Mapping[str, Path] | str | os.PathLike | None = None, prog: str = "gtv-review") -> int:
    """Write the review page of a fused folder (``output``, default FUSED/review) and report it; returns 0, or 1
    when some cases could not be shown (marked on the page)."""
    fused = Path(fused)
    output = Path(output) if output else fused / "review"
    page, reviews = write_review(fused, output, images if images is None or isinstance(images, Mapping)
                                 else Path(images))
    flagged = sum(bool(r.row.get("review")) for r in reviews)
    print(f"{prog}: wrote {page} ({page.stat().st_size / 1e6:.2f} MB): {len(reviews)} cases, {flagged} flagged")
    for r in reviews:
        for note in r.notes:
            print(f"{prog}: warning: {r.case}: {note}", file=sys.stderr)
    return list_failures(prog, "cannot be shown (marked on the page)",
                         [f"{r.case}: {r.error}" for r in reviews if r.error])
