"""gtv-uncertainty: fuse several nnU-Net models' probabilities and measure their disagreement.

Reads folders written by ``nnUNetv2_predict ... --save_probabilities`` (or ``nnUNetv2_train --val --npz``)
and writes per case, on the original image grid: the fused segmentation (mean probability, argmax,
connected-component rule per label), the vote entropy map (Mei et al. eq. 6), optionally the mean foreground
probability, plus summary.json / summary.csv with each model's volume and the VVC (eq. 7), for the case and,
with several labels, per label. Probabilities that gtv-predict saved for a model run in a region carry that box:
the model is left out of the fusion outside it, as gtv-predict fuses.

Exit codes: 0 all cases fused; 1 some cases failed (listed); 2 unusable inputs or output folder.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from nnunetv2_gtv.api import USER_ERRORS, fuse
from nnunetv2_gtv.cli.common import add_fusion_arguments, add_resume_and_part_arguments, check_run_arguments, \
    fail, fusion_settings_from_args, review_selection_from_args
from nnunetv2_gtv.runs import command_line

PROG = "gtv-uncertainty"


def build_parser() -> argparse.ArgumentParser:
    from nnunetv2.configuration import default_num_processes

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", nargs="+", required=True, metavar="PRED",
                        help="one probability folder per model (nnUNetv2_predict --save_probabilities output, a "
                             "fold_X[/validation] folder or a trained model folder with fold_*/validation)")
    parser.add_argument("-o", required=True, metavar="OUT", help="output folder")
    parser.add_argument("-np", type=int, default=default_num_processes,
                        help=f"cases processed in parallel (default {default_num_processes}, capped at the number "
                             "of cases); each process holds about 2 probability maps")
    add_fusion_arguments(parser)
    parser.add_argument("--allow-missing", action="store_true",
                        help="fuse cases that some folders lack from the models that have them (recorded in "
                             "missing_models)")
    add_resume_and_part_arguments(parser, "inputs and settings")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_run_arguments(parser, args, min_processes=1)
    try:
        settings = fusion_settings_from_args(args)
        settings.model_weights(len(args.i))
        review_selection = review_selection_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    try:
        run = fuse(args.i, args.o, settings, allow_missing=args.allow_missing, num_processes=args.np,
                   resume=args.resume, num_parts=args.num_parts, part_id=args.part_id,
                   review_selection=review_selection, command=command_line(PROG, argv))
    except USER_ERRORS as err:
        return fail(PROG, str(err))
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
