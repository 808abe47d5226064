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
from typing import Sequence

# before torch starts OpenMP: idle threads sleep instead of spinning. On a CPU shared with other jobs spinning
# threads made inference 3-6x slower (README, gtv-predict); an explicit OMP_WAIT_POLICY is kept
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from nnunetv2_gtv.api import USER_ERRORS, postprocessing_file, predict  # noqa: E402
from nnunetv2_gtv.cli.common import add_fusion_arguments, add_inference_arguments, add_model_arguments, \
    add_resume_and_part_arguments, check_run_arguments, fail, fusion_settings_from_args, \
    inference_settings_from_args, review_selection_from_args  # noqa: E402
from nnunetv2_gtv.ensemble.postprocessing import POSTPROCESSING_FILE  # noqa: E402
from nnunetv2_gtv.runs import command_line  # noqa: E402

PROG = "gtv-predict"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", required=True, metavar="CT",
                        help="a CT file or a folder of them (.nii.gz, .nii, .nrrd, .mha; <case>_0000 or <case>), or a "
                             "folder of DICOM files: each CT series under it is a case (<PatientID>_<SeriesNumber>), "
                             "with <case>_RTSTRUCT.dcm and <case>_SEG.dcm beside the NIfTI outputs. Models trained on "
                             "several CT channels take a folder with <case>_0000, <case>_0001, ... per case")
    parser.add_argument("-o", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--dicom-reference", metavar="SERIES_DIR",
                        help="for one CT file converted from a DICOM CT series: that series' folder; also writes "
                             "<case>_RTSTRUCT.dcm and <case>_SEG.dcm referring to it (the file must be on its grid)")
    add_model_arguments(parser)
    add_inference_arguments(parser)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_run_arguments(parser, args, min_processes=0)
    if args.check and args.num_parts != 1:
        parser.error("--check looks at every case: leave out -num_parts / -part_id")
    settings = inference_settings_from_args(parser, args)
    try:
        rule_file = postprocessing_file(args.d)
        fusion = fusion_settings_from_args(args, rule_file)
        if fusion.label_rules and not args.postprocessing:
            print(f"{PROG}: post-processing per label from {rule_file}")
        review_selection = review_selection_from_args(args, rule_file)
        if review_selection.threshold is not None:
            print(f"{PROG}: review flag: {review_selection.flag_text()}")
        run = predict(args.i, args.o, args.d, args.m, trainer_suffix=args.tr_suffix, plans=args.p,
                      configuration=args.c, checkpoint=args.chk, device=args.device, inference=settings,
                      tiles_per_batch=args.tiles_per_batch, fusion=fusion, dicom_reference=args.dicom_reference,
                      num_processes=args.np, resume=args.resume, num_parts=args.num_parts, part_id=args.part_id,
                      check_only=args.check, save_model_predictions=args.save_model_predictions,
                      review_page=args.review, review_selection=review_selection,
                      progress=not args.disable_progress_bar,
                      command=command_line(PROG, argv))
    except USER_ERRORS as err:
        return fail(PROG, str(err))
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
