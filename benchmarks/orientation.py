"""The same CT stored in other orientations: does gtv-predict give the same contour?

Takes the held-out test CTs of a trained dataset (by default the demo's, ``gtv_work`` of ``setup_scripts/run_demo.sh``),
writes each as stored and as three copies that hold the same physical image (slice order reversed with the z
direction negated and the origin moved to the former last slice; x reversed with ``sitk.Flip``; x and y axes
swapped with ``sitk.PermuteAxes``), segments all of them with one gtv-predict run (same models and settings), and
compares each copy's fused labels, taken back onto the original's grid by nearest neighbour, with the original's:
Dice of the foreground and the number of voxels whose label differs. Prints a markdown table and writes
``orientation.json`` (with the machine and load average) into ``--out``.

Run: ``python benchmarks/orientation.py [--work gtv_work] [-d 990] [-m Local:0 Middle:0 Global:0] [-tr_suffix _cpu]
[--out DIR]``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_gtv.cli.predict import main as predict_main
from nnunetv2_gtv.demo.synthetic import reversed_slice_order
from nnunetv2_gtv.evaluation.metrics import dice_score


COPIES = {"z_flipped": reversed_slice_order, "x_flipped": lambda image: sitk.Flip(image, [True, False, False]),
          "xy_swapped": lambda image: sitk.PermuteAxes(image, [1, 0, 2])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("gtv_work"), help="the demo's work folder")
    parser.add_argument("-d", default="990", help="dataset id (default: the demo's 990)")
    parser.add_argument("-m", nargs="+", default=["Local:0", "Middle:0", "Global:0"])
    parser.add_argument("-tr_suffix", default="_cpu")
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary one)")
    args = parser.parse_args()
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(name, str((args.work / name).resolve()))
    raw = next(Path(os.environ["nnUNet_raw"]).glob(f"Dataset{int(args.d):03d}_*"))
    out = args.out or Path(tempfile.mkdtemp(prefix="orientation_"))
    inputs = out / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    originals = {}
    for path in sorted((raw / "imagesTs").glob("*_0000.nii.gz")):
        case = path.name.replace("_0000.nii.gz", "")
        originals[case] = sitk.ReadImage(str(path))
        sitk.WriteImage(originals[case], str(inputs / f"{case}.nii.gz"))
        for name, make in COPIES.items():
            sitk.WriteImage(make(originals[case]), str(inputs / f"{case}_{name}.nii.gz"))
    load_before = os.getloadavg()[0]
    code = predict_main(["-i", str(inputs), "-o", str(out / "fused"), "-d", args.d, "-m", *args.m,
                         "-tr_suffix", args.tr_suffix, "-device", "cpu", "-np", "0", "--disable_progress_bar"])
    if code != 0:
        return code
    rows = []
    for case, original in originals.items():
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "fused" / f"{case}.nii.gz")))
        for name in COPIES:
            copy = sitk.ReadImage(str(out / "fused" / f"{case}_{name}.nii.gz"))
            on_grid = sitk.GetArrayFromImage(sitk.Resample(copy, original, sitk.Transform(),
                                                           sitk.sitkNearestNeighbor, 0, copy.GetPixelID()))
            rows.append({"case": case, "copy": name, "dice": dice_score(on_grid > 0, reference > 0),
                         "voxels_differing": int(np.count_nonzero(on_grid != reference)),
                         "voxels_original": int(np.count_nonzero(reference))})
    machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "load_average": [load_before, os.getloadavg()[0]]}
    (out / "orientation.json").write_text(json.dumps({"models": args.m, "tr_suffix": args.tr_suffix, "rows": rows,
                                                      "machine": machine}, indent=1))
    print("| case | copy | Dice with the original | voxels differing | original's foreground voxels |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['copy']} | {row['dice']:.3f} | {row['voxels_differing']} | "
              f"{row['voxels_original']} |")
    print(f"machine: {machine}; outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
