"""``gtv-compare``: several models' segmentations of the same cases against one reference, as the paper's tables
(Dice %, NSD %, ASSD, HD95, RVE %, mean ± sd, paired Wilcoxon tests against a baseline, box plots), every label on
its own and their mean."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from nnunetv2_gtv.cli.common import fail
from nnunetv2_gtv.evaluation.compare import OUTPUT_NAMES, compare_folders, parse_input, parse_minutes, \
    write_comparison
from nnunetv2_gtv.evaluation.folders import EvaluationInputError
from nnunetv2_gtv.runs import TIMINGS_CSV


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gtv-compare", description=__doc__)
    parser.add_argument("-i", "--inputs", nargs="+", required=True, metavar="NAME=FOLDER",
                        help="two or more prediction folders (<case><ending>) or gtv-evaluate output folders, each "
                             f"optionally named (NAME=FOLDER; default name: the folder's). A {TIMINGS_CSV} "
                             "(case, seconds) in a prediction folder adds the inference time per case")
    parser.add_argument("-r", "--reference", required=True, type=Path, help="folder of reference labels <case>")
    parser.add_argument("-o", "--output", required=True, type=Path, help="folder for the comparison files")
    parser.add_argument("--baseline", help="input NAME the others are tested against (default: the first)")
    parser.add_argument("--label", type=int,
                        help="compare this foreground label only (default: every foreground label, each on its own, "
                             "and each case's mean over them)")
    parser.add_argument("--training-minutes", nargs="+", default=[], metavar="NAME=MINUTES",
                        help="minutes each named input's training took: a column of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = shlex.join(["gtv-compare", *(sys.argv[1:] if argv is None else argv)])
    try:
        inputs = [parse_input(text) for text in args.inputs]
        training_minutes = dict(parse_minutes(text) for text in args.training_minutes)
        for folder in [item.folder for item in inputs] + [args.reference]:
            if args.output.resolve().is_relative_to(folder.resolve()):
                raise EvaluationInputError(f"{args.output}: the output folder must not be (inside) the input {folder}")
        result = compare_folders(inputs, args.reference, args.label, args.baseline, training_minutes)
        written = write_comparison(result, args.output, command)
    except EvaluationInputError as error:
        return fail("gtv-compare", str(error))
    print(f"gtv-compare: compared {len(inputs)} inputs on {len(result.cases)} cases; wrote {len(written)} files to "
          f"{args.output} (start with {args.output / OUTPUT_NAMES[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
