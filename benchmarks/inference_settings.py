"""Dice and time per case of gtv-predict's inference settings, against nnU-Net's default inference.

Trains the three sampling trainers (nnUNetTrainerGTV25DLocal / Middle / Global, fold ``all``) briefly, in this
process on the CPU: the package's trainers with a short schedule set on the instance (epochs, iterations,
batch, learning rate; see ``Schedule``), so the checkpoints name the real trainers and gtv-predict finds
them. Datasets: a synthetic one (``nnunetv2_gtv.demo.synthetic``, labelled test cases) and, when present,
``../shared/data/Dataset910_OpenKBPHN`` (real CT; PTV70 as label; the last cases held out).

Then the 3-model ensemble segments the held-out cases under each setting of ``SETTINGS`` through gtv-predict's
own pipeline (one preprocessing per case, in-memory fusion, largest component) and the table gives the fused
Dice against the reference and the wall time per case (read, preprocess, 3 models, export; models loaded
once). ``nnU-Net default`` is nnUNetv2_predict's inference: the training patch as tile, step 0.5, mirroring,
no region restriction. On the real CTs (about 600 x 600 x 110-130 voxels at 1 x 1 x 3 mm) that row would take
hours per case on a CPU, so there (``--estimate-reference``) it is not run: its time is the measured ``patch,
step 1, whole image`` run with each model's seconds scaled by the ratio of network passes (nnU-Net's tile layout
at step 0.5, times the mirrorings, over step 1's), and its Dice is not known. The CPU may be shared: the load
average is printed with each row.

Run: ``python benchmarks/inference_settings.py [--work DIR] [--datasets synthetic real] [--iterations N]``;
a rerun with the same --work reuses the datasets and trained models.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import FOLD, REAL_SOURCE, SCALES, Schedule, configure_environment, dice_of_files, \
    nnunet_tile_passes, plan_and_preprocess, real_dataset, train

SYNTHETIC_ID = 981

# name: (tile, step size, mirroring, restrict Local/Middle to their region, bfloat16 on the CPU); the first row
# is nnUNetv2_predict's inference and the reference of the speed-up and agreement columns
SETTINGS = {
    "nnU-Net default (patch, step 0.5, mirroring, whole image)": ("patch", 0.5, True, False, False),
    "patch, step 0.5, regions": ("patch", 0.5, False, True, False),
    "patch, step 1, whole image": ("patch", 1.0, False, False, False),
    "patch, step 1, regions": ("patch", 1.0, False, True, False),
    "patch, step 1, regions, bfloat16 (gtv-predict default here)": ("patch", 1.0, False, True, True),
    "patch, step 0.5, regions, bfloat16": ("patch", 0.5, False, True, True),
    "slab, step 1, regions": ("slab", 1.0, False, True, False),
    "whole, regions": ("whole", 1.0, False, True, False),
}

REFERENCE = next(iter(SETTINGS))
SCALED_FROM = "patch, step 1, whole image"  # the measured setting an estimated reference is scaled from


def synthetic_dataset(raw: Path, num_train: int, num_test: int, size: int, slices: int) -> str:
    from nnunetv2_gtv.demo.synthetic import write_dataset

    name = f"Dataset{SYNTHETIC_ID}_SyntheticGTV"
    if not (raw / name / "dataset.json").is_file():
        write_dataset(raw, SYNTHETIC_ID, num_train=num_train, num_test=num_test, in_plane_size=size,
                      num_slices=slices, orientations="mixed", seed=3)
    return name


def _cases_and_labels(raw: Path, dataset_name: str) -> tuple[list, dict[str, Path]]:
    from nnunetv2_gtv.inference import find_cases

    cases = find_cases(raw / dataset_name / "imagesTs")
    return cases, {c.case: raw / dataset_name / "labelsTs" / f"{c.case}.nii.gz" for c in cases}


def evaluate(dataset_name: str, raw: Path, results: Path, work: Path, names: list[str]) -> list[dict]:
    """Each setting's fused Dice per case and seconds per case (with the per-model split), 3-model ensemble
    (fold ``all``); the agreement column compares with the first setting's output."""
    import torch
    from nnunetv2_gtv.ensemble.fusion import FusionSettings
    from nnunetv2_gtv.inference import EnsemblePredictor, InferenceSettings, RunOptions, load_model, \
        predict_cases, resolve_models

    torch.set_num_threads(os.cpu_count() or 1)
    cases, labels = _cases_and_labels(raw, dataset_name)
    specs = resolve_models(results, dataset_name, [f"{s}:{FOLD}" for s in SCALES])
    rows = []
    for name in names:
        tile, step, mirroring, restrict, bfloat16 = SETTINGS[name]
        settings = InferenceSettings(tile, step, mirroring, restrict, bfloat16)
        models = [load_model(spec, torch.device("cpu"), step, mirroring) for spec in specs]
        output = work / "predictions" / dataset_name / name.replace(", ", "_").replace(" ", "-")
        shutil.rmtree(output, ignore_errors=True)
        output.mkdir(parents=True)
        load_before = os.getloadavg()[0]
        report = predict_cases(EnsemblePredictor(models, settings), cases, output, FusionSettings(), {},
                               RunOptions(num_processes=0, progress=False), log=lambda m: None)
        if report.failures:
            raise RuntimeError(f"{name}: {report.failures}")
        case_dice = {c.case: dice_of_files(output / f"{c.case}{c.file_ending}", labels[c.case]) for c in cases}
        first = Path(rows[0]["output"]) if rows else output
        agreement = {c.case: dice_of_files(output / f"{c.case}{c.file_ending}", first / f"{c.case}{c.file_ending}")
                     for c in cases}
        rows.append({"dataset": dataset_name, "setting": name, "output": str(output), "agreement": agreement,
                     "tile": tile, "step": step, "mirroring": mirroring,
                     "regions": restrict, "bfloat16": bfloat16, "dice": case_dice,
                     "seconds": {case: timing.total for case, timing in report.timings.items()},
                     "model_seconds": {case: timing.models for case, timing in report.timings.items()},
                     "load": [load_before, os.getloadavg()[0]]})
        print(f"{name}: Dice {np.mean(list(case_dice.values())):.3f}, "
              f"{np.mean(list(rows[-1]['seconds'].values())):.1f} s per case", flush=True)
    return rows


def estimated_row(name: str, measured: dict, raw: Path, results: Path) -> dict:
    """``name``'s seconds per case estimated from ``measured``, a run over the whole image without mirroring:
    each model's measured seconds scaled by the ratio of network passes (sliding window at ``name``'s step,
    times its mirrorings, over the measured setting's), reading, preprocessing and export as measured.
    Dice and agreement are not known (None)."""
    import torch
    from nnunetv2_gtv.inference import load_model, resolve_models

    tile, step, mirroring, restrict, bfloat16 = SETTINGS[name]
    base = SETTINGS[measured["setting"]]
    if restrict or base[3] or base[2] or tile != base[0] or bfloat16 != base[4]:
        raise ValueError(f"cannot estimate {name!r} from {measured['setting']!r}")
    dataset_name = measured["dataset"]
    cases, _ = _cases_and_labels(raw, dataset_name)
    predictors = [load_model(spec, torch.device("cpu"), step, mirroring).predictor
                  for spec in resolve_models(results, dataset_name, [f"{s}:{FOLD}" for s in SCALES])]
    target = {c.case: [nnunet_tile_passes(p, c.path, step, mirroring) for p in predictors] for c in cases}
    source = {c.case: [nnunet_tile_passes(p, c.path, base[1], False) for p in predictors] for c in cases}
    seconds = {}
    for case, total in measured["seconds"].items():
        models = measured["model_seconds"][case]
        scaled = sum(s * t / b for s, t, b in zip(models, target[case], source[case]))
        seconds[case] = total - sum(models) + scaled
    return {"dataset": dataset_name, "setting": name, "output": None, "agreement": None, "tile": tile, "step": step,
            "mirroring": mirroring, "regions": restrict, "bfloat16": bfloat16, "dice": None, "seconds": seconds,
            "estimated_from": {"setting": measured["setting"], "passes": target, "measured_passes": source},
            "load": measured["load"]}


def _row(row: dict, reference: dict) -> str:
    seconds = float(np.mean(list(row["seconds"].values())))
    reference_seconds = float(np.mean(list(reference["seconds"].values())))
    if row["dice"] is None:
        passes = np.mean([sum(p) for p in row["estimated_from"]["passes"].values()])
        return (f"| {row['setting']} | not run | - | {seconds:.0f} (estimated: {passes:.0f} network passes per case "
                f"at the measured '{row['estimated_from']['setting']}' rate) | {reference_seconds / seconds:.1f}x | "
                f"{row['load'][0]:.1f}-{row['load'][1]:.1f} |")
    values = list(row["dice"].values())
    return (f"| {row['setting']} | {np.mean(values):.3f} ± {np.std(values):.3f} | "
            f"{np.mean(list(row['agreement'].values())):.3f} | {seconds:.1f} | {reference_seconds / seconds:.1f}x | "
            f"{row['load'][0]:.1f}-{row['load'][1]:.1f} |")


TABLE_HEADER = ("| setting | fused Dice vs reference (mean ± sd) | Dice vs first measured row's output | s per case | "
                "speed-up vs first row | load avg |\n|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary folder, kept)")
    parser.add_argument("--datasets", nargs="+", choices=("synthetic", "real"),
                        default=["synthetic", "real"] if (REAL_SOURCE / "dataset.json").is_file() else ["synthetic"])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        metavar="SETTING", help=f"subset of: {'; '.join(SETTINGS)} (the first row is the reference "
                                                "of the speed-up column)")
    parser.add_argument("--estimate-reference", nargs="*", choices=("synthetic", "real"), default=["real"],
                        help="datasets on which the first setting (nnU-Net's default inference) is not run but timed "
                             f"from '{SCALED_FROM}' scaled by its network passes (on a CPU it takes hours per real "
                             "case); default: real")
    parser.add_argument("--train-cases", type=int, default=10)
    parser.add_argument("--test-cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=96, help="synthetic in-plane size (voxels)")
    parser.add_argument("--slices", type=int, default=40, help="synthetic number of slices")
    parser.add_argument("--epochs", type=int, default=Schedule.epochs)
    parser.add_argument("--iterations", type=int, default=Schedule.iterations, help="per epoch")
    parser.add_argument("--batch", type=int, default=Schedule.batch)
    parser.add_argument("--lr", type=float, default=Schedule.lr)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="gtv-inference-settings-"))
    dirs = configure_environment(work.resolve())
    schedule = Schedule(args.epochs, args.iterations, args.batch, args.lr)
    print(f"work folder: {work}; training schedule per trainer: {schedule}; load average {os.getloadavg()}")
    all_rows = []
    for kind in args.datasets:
        if kind == "synthetic":
            dataset = synthetic_dataset(dirs["nnUNet_raw"], args.train_cases, args.test_cases, args.size, args.slices)
        else:
            dataset = real_dataset(dirs["nnUNet_raw"])
        plan_and_preprocess(dataset, dirs["nnUNet_preprocessed"])
        for scale in SCALES:
            start = time.perf_counter()
            train(dataset, scale, schedule, dirs["nnUNet_results"])
            print(f"{dataset}: {scale} trained/found in {time.perf_counter() - start:.0f} s", flush=True)
        names = list(args.settings)
        estimate = kind in args.estimate_reference and names[0] == REFERENCE
        if estimate:
            names = [SCALED_FROM] + [name for name in names[1:] if name != SCALED_FROM]
        rows = evaluate(dataset, dirs["nnUNet_raw"], dirs["nnUNet_results"], work, names)
        if estimate:
            rows.insert(0, estimated_row(REFERENCE, rows[0], dirs["nnUNet_raw"], dirs["nnUNet_results"]))
        print(f"\n{dataset}, 3-model ensemble (Local, Middle, Global; fold {FOLD})\n{TABLE_HEADER}")
        print("\n".join(_row(row, rows[0]) for row in rows), flush=True)
        all_rows += rows
    (work / "inference_settings.json").write_text(json.dumps(all_rows, indent=1))
    print(f"\nper-case numbers: {work / 'inference_settings.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
