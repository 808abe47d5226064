"""``gtv-regions``: draw where the local, middle and global models sample on axial, coronal and sagittal views.

Input is either a CT file in Hounsfield units (anything SimpleITK reads), optionally with a label file, or an
nnU-Net preprocessed case (folder + case id; its cached regions are shown when present, so the picture is what the
trainers use). Views pass through the label's centre (else the volume centre) and are drawn in radiological
convention with superior up, whatever the file's orientation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from nnunetv2_gtv.figures.regions import InputError, load_preprocessed_case, load_raw_case, render_png
from nnunetv2_gtv.training.regions import BODY_THRESHOLD_HU


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gtv-regions", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", nargs="?", type=Path, help="CT image file in HU (NIfTI, NRRD, MHA, ...)")
    parser.add_argument("-l", "--label", type=Path, help="label file on the image's grid (raw input only)")
    parser.add_argument("-p", "--preprocessed", type=Path,
                        help="nnU-Net preprocessed folder (e.g. .../DatasetXXX/nnUNetPlans_3d_fullres)")
    parser.add_argument("-c", "--case", help="case identifier in --preprocessed")
    parser.add_argument("--plans", type=Path, help="plans JSON (default: found next to --preprocessed)")
    parser.add_argument("--threshold", type=float,
                        help=f"body threshold in image units (default {BODY_THRESHOLD_HU:g} HU; for preprocessed "
                             "input converted with the plans' CT normalisation, and cached regions are not used)")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: <case>_regions.png here)")
    args = parser.parse_args(argv)
    if (args.image is None) == (args.preprocessed is None):
        parser.error("give either an image file or --preprocessed FOLDER --case ID")
    if args.preprocessed is not None and not args.case:
        parser.error("--preprocessed needs --case")
    if args.label is not None and args.image is None:
        parser.error("--label goes with an image file; preprocessed cases carry their own label")
    try:
        if args.image is not None:
            case = load_raw_case(args.image, args.label, args.threshold)
        else:
            case = load_preprocessed_case(args.preprocessed, args.case, args.plans, args.threshold)
        output = args.output or Path(f"{case.name}_regions.png")
        render_png(case, output)
    except InputError as error:
        print(f"gtv-regions: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. the output folder is not writable
        print(f"gtv-regions: error: {error}", file=sys.stderr)
        return 1
    print(f"gtv-regions: {case.name}: regions {case.source}: {case.regions.describe()}")
    for warning in case.regions.warnings:
        print(f"gtv-regions: warning: {warning}")
    print(f"gtv-regions: wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
