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
from typing import Mapping, Sequence

from nnunetv2_gtv.cli.common import fail, list_failures
from nnunetv2_gtv.figures.review import PAGE_NAME, ReviewInputError, write_review

PROG = "gtv-review"


def review(fused: Path, output: Path, images: Mapping[str, Path] | Path | None, prog: str = PROG) -> int:
    """Write the page and report it; returns the exit code (shared with ``gtv-predict --review``)."""
    try:
        page, reviews = write_review(fused, output, images)
    except ReviewInputError as error:
        return fail(prog, str(error))
    except OSError as error:
        return fail(prog, f"cannot write the review page to {output}: {error}")
    flagged = sum(bool(r.row.get("review")) for r in reviews)
    print(f"{prog}: wrote {page} ({page.stat().st_size / 1e6:.2f} MB): {len(reviews)} cases, {flagged} flagged")
    for r in reviews:
        for note in r.notes:
            print(f"{prog}: warning: {r.case}: {note}", file=sys.stderr)
    return list_failures(prog, "cannot be shown (marked on the page)",
                         [f"{r.case}: {r.error}" for r in reviews if r.error])


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
    return review(args.fused, args.output or args.fused / "review", args.images)


if __name__ == "__main__":
    sys.exit(main())
