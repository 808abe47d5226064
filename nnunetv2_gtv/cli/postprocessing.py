"""``gtv-postprocessing``: choose each label's connected-component rule on cross-validation predictions.

Fuse the out-of-fold predictions with every component kept, then let this command compare each label's Dice with
and without its largest-component rule (nnU-Net's criterion: the rule is kept only where it raises that label's
mean Dice). The choice goes to a small JSON that gtv-predict reads from $nnUNet_results/<dataset>/ (-d) and that
gtv-predict / gtv-uncertainty take with --postprocessing FILE. With the fusion's summary.csv and at least 8 cases,
the review flag is calibrated there too: the per-case score that best picks the worst cases and the threshold that
flags the riskiest quarter of them (docs/uncertainty.md#validating-a-review-score). Example:

  gtv-uncertainty -i $nnUNet_results/Dataset920_X/nnUNetTrainerGTV25D{Local,Middle,Global}__nnUNetPlans__3d_fullres \
      -o cv_fused --keep-all-components
  gtv-postprocessing -p cv_fused -r $nnUNet_raw/Dataset920_X/labelsTr -d 920

Exit codes: 0 written; 2 unusable inputs (named) or output.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from nnunetv2_gtv.cli.common import fail
from nnunetv2_gtv.ensemble.postprocessing import POSTPROCESSING_FILE, write_postprocessing
from nnunetv2_gtv.evaluation.folders import EvaluationInputError
from nnunetv2_gtv.evaluation.postprocessing import choose_postprocessing
from nnunetv2_gtv.inference.models import ModelError, dataset_folder_name

PROG = "gtv-postprocessing"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--predictions", required=True, type=Path,
                        help="fused out-of-fold predictions made with --keep-all-components (gtv-uncertainty or "
                             "gtv-predict output)")
    parser.add_argument("-r", "--reference", required=True, type=Path, help="folder of reference labels <case>")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("-d", metavar="DATASET",
                        help=f"write $nnUNet_results/<dataset>/{POSTPROCESSING_FILE}, where gtv-predict finds it")
    target.add_argument("-o", "--output", type=Path, help="write the rules to this JSON file")
    parser.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=6,
                        help="neighbourhood of the components (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.d is not None:
            results = os.environ.get("nnUNet_results")
            if not results:
                return fail(PROG, "nnUNet_results is not set: -d writes the rules beside the dataset's models there")
            output = Path(results) / dataset_folder_name(Path(results), args.d) / POSTPROCESSING_FILE
        else:
            output = args.output
        for folder in (args.predictions, args.reference):
            if output.resolve().is_relative_to(folder.resolve()):
                return fail(PROG, f"{output} lies inside the input folder {folder}; nothing is written into an input "
                                  "folder: choose another -o")
        choice = choose_postprocessing(args.predictions, args.reference, args.connectivity,
                                       log=lambda line: print(f"{PROG}: {line}"))
        write_postprocessing(choice, output)
    except (EvaluationInputError, ModelError) as err:
        return fail(PROG, str(err))
    except OSError as err:
        return fail(PROG, f"cannot write the rules: {err}")
    print(f"{PROG}: wrote {output} ({choice.chosen_on['cases']} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
