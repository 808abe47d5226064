"""``gtv-evaluate``: Dice, NSD, ASSD, HD95, RVE per label and their mean, error rate per uncertainty level and VVC
against 1 - Dice (per label) of a fused folder."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunetv2_gtv.api import evaluate
from nnunetv2_gtv.cli.common import fail
from nnunetv2_gtv.evaluation.folders import EvaluationInputError
from nnunetv2_gtv.evaluation.metrics import NSD_TOLERANCE_MM
from nnunetv2_gtv.evaluation.pipeline import UNKNOWN_LABEL_RULES, EvaluationSettings
from nnunetv2_gtv.evaluation.report import REPORT_NAME
from nnunetv2_gtv.runs import command_line
from nnunetv2_gtv.evaluation.uncertainty_analysis import REGION_KINDS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gtv-evaluate", description=__doc__)
    parser.add_argument("-p", "--predictions", required=True, type=Path,
                        help="fused output folder of gtv-uncertainty (<case>, <case>_entropy, summary.csv/json)")
    parser.add_argument("-r", "--reference", required=True, type=Path, help="folder of reference labels <case>")
    parser.add_argument("-o", "--output", type=Path, help="report folder (default: PREDICTIONS/evaluation)")
    parser.add_argument("--label", type=int,
                        help="evaluate this foreground label only (default: every foreground label of the dataset, "
                             "each on its own, and their mean)")
    parser.add_argument("--nsd-tolerance-mm", type=float, default=NSD_TOLERANCE_MM,
                        help="tolerance of the normalised surface Dice in mm (default: %(default)s, as SegRap2023)")
    parser.add_argument("--error-region", choices=REGION_KINDS, default="bbox",
                        help="where pixel errors are counted: bbox = bounding box of prediction, reference and "
                             "entropy > 0 grown by --margin-mm; body = CT > --body-threshold (needs --images); "
                             "image = whole image (default: bbox)")
    parser.add_argument("--margin-mm", type=float, default=10.0, help="bbox margin in mm (default: 10)")
    parser.add_argument("--images", type=Path,
                        help="CT images <case>_0000<ending>: one overlay PNG per case (CT, contours, entropy); "
                             "also needed by --error-region body")
    parser.add_argument("--body-threshold", type=float, default=-300.0, help="body HU threshold (default: -300)")
    parser.add_argument("--entropy-decimals", type=int, default=4,
                        help="entropy values are rounded to this many decimals to form levels (default: 4)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="skip (and record) cases without a reference instead of failing")
    parser.add_argument("--unknown-labels", choices=UNKNOWN_LABEL_RULES, default="refuse",
                        help="a value outside the dataset's label set (dataset.json 'labels' of the predictions or "
                             "their models; else background and --label) in a reference or prediction: refuse = "
                             "error naming the file (default); background = count it as background in every "
                             "metric and the error rates, with a warning and a note in the report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = EvaluationSettings(args.label, args.error_region, args.margin_mm, args.images, args.body_threshold,
                                  args.entropy_decimals, args.skip_missing, args.unknown_labels, args.nsd_tolerance_mm)
    output = args.output or args.predictions / "evaluation"
    try:
        result, written = evaluate(args.predictions, args.reference, output, settings,
                                   command_line("gtv-evaluate", argv))
    except EvaluationInputError as error:
        return fail("gtv-evaluate", str(error))
    print(f"gtv-evaluate: evaluated {len(result.cases)} cases; wrote {len(written)} files to {output} "
          f"(start with {output / REPORT_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
