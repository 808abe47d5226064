"""``gtv-dataset``: an nnU-Net raw dataset (training CTs + held-out test CTs) from one folder per patient."""
from __future__ import annotations

import argparse
import os
import sys

from nnunetv2_gtv.dataset_conversion.patient_folders import MISSING_RULES, OVERLAP_RULES, PatientFolderError, \
    write_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gtv-dataset", description=__doc__,
        epilog="Layout read: SOURCE/<patient>/ct.nii.gz and SOURCE/<patient>/<TARGET>.nii.gz (0/1 on the CT's grid), "
               "one mask per target. Written: imagesTr/labelsTr (training; nnU-Net makes its folds over them), "
               "imagesTs/labelsTs (held out), dataset.json and split.json. Examples: gtv-dataset -i "
               "../shared/data/OpenKBP_anatomy -d 920; gtv-dataset -i SOURCE -d 921 -n NPC --target GTVp GTVnd "
               "--missing-mask empty")
    parser.add_argument("-i", "--input", required=True, help="folder with one sub-folder per patient")
    parser.add_argument("-o", "--output", default=os.environ.get("nnUNet_raw"),
                        help="nnU-Net raw folder to write into (default: $nnUNet_raw)")
    parser.add_argument("-d", "--dataset-id", type=int, required=True)
    parser.add_argument("-n", "--name", default="HeadNeckPTV70", help="dataset name (default: %(default)s)")
    parser.add_argument("--target", nargs="+", default=["PTV70"], metavar="TARGET",
                        help="mask file names without .nii.gz, and the labels' names: labels 1..K in this order "
                             "(default: PTV70)")
    parser.add_argument("--overlap", choices=OVERLAP_RULES, default="refuse",
                        help="voxels that two masks mark: refuse (an error naming the patient and labels; default), "
                             "later (the later --target wins) or earlier")
    parser.add_argument("--missing-mask", choices=MISSING_RULES, default="refuse",
                        help="a patient without one of the masks: refuse (an error naming it; default), skip (left "
                             "out, listed in split.json) or empty (that label is absent, e.g. no nodes)")
    parser.add_argument("--ct", nargs="+", default=["ct.nii.gz"], metavar="CT_FILE",
                        help="CT file name in each patient folder (default: %(default)s); several co-registered CTs "
                             "on one grid (e.g. ct.nii.gz ct_contrast.nii.gz) become channels 0, 1, ... in this order")
    parser.add_argument("--ct-window", nargs=2, type=float, action="append", metavar=("LOW", "HIGH"),
                        help="HU window of a CT channel, once per --ct file in its order (default: the paper's -200 "
                             "700 for every channel); written to dataset.json, recorded in the plans")
    parser.add_argument("--num-test", type=int, default=16, help="held-out test patients (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the split's permutation (default: %(default)s)")
    parser.add_argument("--split", metavar="SPLIT_JSON",
                        help="use this split (a split.json written before) instead of drawing one")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.output:
        parser.error("no output folder: pass -o or set nnUNet_raw")
    try:
        write_dataset(args.input, args.output, args.dataset_id, args.name, args.target, args.ct, args.num_test,
                      args.seed, args.split, args.overwrite, log=lambda line: print(f"gtv-dataset: {line}"),
                      missing=args.missing_mask, overlap=args.overlap, ct_windows=args.ct_window)
    except PatientFolderError as err:
        print(f"gtv-dataset: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
