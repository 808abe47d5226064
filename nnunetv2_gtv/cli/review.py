"""``gtv-review``: an offline HTML page for the clinician: which cases to check, and where.

Reads a gtv-uncertainty / gtv-predict output folder (summary.json, <case>, <case>_entropy) and, with -i, the CTs;
writes PAGE_DIR/review.html: the cases in review priority (flagged first, then VVC descending) and a slice viewer
of CT, fused GTV outline and entropy. No model, server or network needed; open the file in any current browser.

Exit codes: 0 page written with every case; 1 page written, some cases could not be shown (marked on the page
and listed here); 2 no page (no summary.json, unreadable folder, output not writable).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from nnunetv2_gtv.api import review
from nnunetv2_gtv.cli.common import fail
from nnunetv2_gtv.figures.review import PAGE_NAME, ReviewInputError

PROG = "gtv-review"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fused", type=Path, metavar="FUSED", help="output folder of gtv-uncertainty or gtv-predict")
    parser.add_argument("-i", "--images", type=Path, metavar="IMAGES",
                        help="folder of the CTs, <case>_0000<ending> or <case><ending> (default: no CT layer)")
    parser.add_argument("-o", "--output", type=Path, metavar="PAGE_DIR",
                        help=f"folder for {PAGE_NAME} (default: FUSED/review)")
    args = parser.parse_args(argv)
    try:
        return review(args.fused, args.output, args.images, PROG)
    except ReviewInputError as error:
        return fail(PROG, str(error))
    except OSError as error:
        return fail(PROG, f"cannot write the review page to {args.output or args.fused / 'review'}: {error}")


if __name__ == "__main__":
    sys.exit(main())
