"""Does the method learn, and do the paper's claims hold in miniature? Six models, held-out cases, Tables 3-4.

For each dataset (synthetic CT with a known answer; the real CTs of ``../shared/data/Dataset910_OpenKBPHN`` with
PTV70 as the target and the last two CTs held out, when present):

1. plan and preprocess with ``nnUNetPlannerGTV25D``;
2. train the paper's six models (Local, Middle, Global x folds 0 and 1) through the stock ``nnUNetv2_train`` with
   the ``..._cpu`` recipe (300 iterations at batch 4, docs/trainers.md says what differs from the
   paper's recipe); ``--trainer-suffix ''`` trains the paper's full recipe instead (on a GPU: ``-device cuda``);
3. segment the held-out cases with all six in one ``gtv-predict`` run (``--save-model-predictions`` keeps each
   model's own segmentation) and score them with ``gtv-evaluate``;
4. print, beside the paper's values: Dice, ASSD, HD95 and RVE per model and for the ensemble (Table 3); the voxel
   error rate per vote-entropy level (Table 4); VVC against 1 - Dice (Spearman) and how many review-flagged cases
   are among the worst; each trainer's learning curve (nnU-Net's pseudo Dice per epoch); and which claims hold.

Nothing is tuned on the held-out cases: the recipe and the fusion settings are fixed before this script runs.
A rerun with the same ``--work`` reuses datasets, trained models and predictions.

    python benchmarks/learning.py --work DIR [--datasets synthetic real] [--trainer-suffix _cpu] [-device cpu]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REAL_SOURCE, configure_environment, nnunet_command, plan_and_preprocess, real_dataset

SYNTHETIC_ID = 983
SYNTHETIC = {"num_train": 12, "num_test": 6, "size": 128, "slices": 44, "in_plane_mm": (1.6, 1.9)}
SCALES = ("Local", "Middle", "Global")
FOLDS = (0, 1)
# Mei et al., Table 3 (ensemble row) and Table 4 (pixel error rate per vote-entropy level, six models)
PAPER_ENSEMBLE = {"dice": 0.6566, "assd_mm": 3.98, "rve_percent": 40.4}
PAPER_SINGLE_DICE = {"Local": 0.6446, "Middle": 0.6469, "Global": 0.6454}
PAPER_ERROR_RATE_PERCENT = {0.0: 0.42, 0.45: 33.0, 0.64: 46.0, 0.69: 58.0}


def log(message: str) -> None:
    print(f"[learning {time.strftime('%H:%M:%S')}] {message}", flush=True)


def synthetic_dataset(raw: Path) -> str:
    from nnunetv2_gtv.demo.synthetic import write_dataset

    name = f"Dataset{SYNTHETIC_ID}_SyntheticGTV"
    if not (raw / name / "dataset.json").is_file():
        write_dataset(raw, SYNTHETIC_ID, num_train=SYNTHETIC["num_train"], num_test=SYNTHETIC["num_test"],
                      in_plane_size=SYNTHETIC["size"], num_slices=SYNTHETIC["slices"], orientations="mixed",
                      seed=2026, in_plane_mm=SYNTHETIC["in_plane_mm"])
    return name


def train_six(dataset_name: str, results: Path, suffix: str, device: str) -> dict[str, float]:
    """The six models through ``nnUNetv2_train``; returns each one's training wall time (s), 0 when reused."""
    seconds = {}
    for scale in SCALES:
        trainer = f"nnUNetTrainerGTV25D{scale}{suffix}"
        for fold in FOLDS:
            final = results / dataset_name / f"{trainer}__nnUNetPlans__3d_fullres" / f"fold_{fold}" / \
                "checkpoint_final.pth"
            if final.is_file():
                seconds[f"{scale}:{fold}"] = 0.0
                continue
            log(f"training {trainer} fold {fold} (log: {final.parent})")
            start = time.perf_counter()
            subprocess.run([nnunet_command("nnUNetv2_train"), dataset_name[7:10], "3d_fullres", str(fold), "-tr",
                            trainer, "-device", device], check=True, stdout=subprocess.DEVNULL)
            seconds[f"{scale}:{fold}"] = time.perf_counter() - start
            log(f"  done in {seconds[f'{scale}:{fold}']:.0f} s")
    return seconds


def predict_and_evaluate(dataset_name: str, raw: Path, work: Path, suffix: str, device: str) -> Path:
    """gtv-predict with the six models, then gtv-evaluate; returns the fused folder."""
    fused = work / "predictions" / dataset_name
    if not (fused / "summary.json").is_file():
        log(f"gtv-predict: six models on {raw / dataset_name / 'imagesTs'} -> {fused}")
        subprocess.run([nnunet_command("gtv-predict"), "-i", str(raw / dataset_name / "imagesTs"), "-o", str(fused),
                        "-d", dataset_name, "-tr_suffix", suffix, "-device", device, "--save-model-predictions",
                        "--disable_progress_bar"], check=True, stdout=subprocess.DEVNULL)
    if not (fused / "evaluation" / "evaluation.json").is_file():
        log(f"gtv-evaluate -> {fused / 'evaluation'}")
        subprocess.run([nnunet_command("gtv-evaluate"), "-p", str(fused), "-r", str(raw / dataset_name / "labelsTs"),
                        "--images", str(raw / dataset_name / "imagesTs")], check=True, stdout=subprocess.DEVNULL)
    return fused


def learning_curves(dataset_name: str, results: Path, suffix: str) -> dict[str, list[float]]:
    """nnU-Net's pseudo Dice (mean foreground Dice of the validation patches) per epoch, per model."""
    import torch

    curves = {}
    for scale in SCALES:
        for fold in FOLDS:
            checkpoint = results / dataset_name / f"nnUNetTrainerGTV25D{scale}{suffix}__nnUNetPlans__3d_fullres" / \
                f"fold_{fold}" / "checkpoint_final.pth"
            logging = torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]
            curves[f"{scale}:{fold}"] = [float(d) for d in logging["mean_fg_dice"]]
    return curves


def _fmt(summary: dict, metric: str, scale: float = 1.0, digits: int = 1) -> str:
    entry = summary.get(metric, {})
    if entry.get("mean") is None:
        return "-"
    return f"{scale * entry['mean']:.{digits}f} ± {scale * (entry.get('std') or 0.0):.{digits}f}"


def report(dataset_name: str, fused: Path, curves: dict[str, list[float]], train_seconds: dict[str, float]) -> None:
    evaluation = json.loads((fused / "evaluation" / "evaluation.json").read_text())
    summary = evaluation["summary"]
    model_names = {f"model_{i + 1}": m["listed_as"] for i, m in enumerate(evaluation["inputs"]["models"])}
    print(f"\n### {dataset_name}: {len(evaluation['cases'])} held-out cases\n")
    print("Table 3 in miniature (Dice and RVE in %, distances in mm; mean ± sd over the held-out cases)\n")
    print("| model | Dice | ASSD | HD95 | RVE | paper Dice |")
    print("|---|---:|---:|---:|---:|---:|")
    single_dice = []
    for source in [s for s in summary if s != "fused"]:
        label = Path(model_names.get(source, source)).name
        single_dice.append(summary[source]["dice"]["mean"])
        scale_name = next((s for s in SCALES if s in label), "")
        paper = PAPER_SINGLE_DICE.get(scale_name)
        print(f"| {label} | {_fmt(summary[source], 'dice', 100)} | {_fmt(summary[source], 'assd_mm', digits=2)} | "
              f"{_fmt(summary[source], 'hd95_mm', digits=2)} | {_fmt(summary[source], 'rve_percent')} | "
              f"{'-' if paper is None else f'{100 * paper:.2f}'} |")
    fused_summary = summary["fused"]
    print(f"| **ensemble of {len(single_dice)}** | {_fmt(fused_summary, 'dice', 100)} | "
          f"{_fmt(fused_summary, 'assd_mm', digits=2)} | {_fmt(fused_summary, 'hd95_mm', digits=2)} | "
          f"{_fmt(fused_summary, 'rve_percent')} | {100 * PAPER_ENSEMBLE['dice']:.2f} (ASSD "
          f"{PAPER_ENSEMBLE['assd_mm']}, RVE {PAPER_ENSEMBLE['rve_percent']}) |")

    rates = evaluation["error_rate"]
    print(f"\nTable 4 in miniature: voxel error rate (%) per vote-entropy level ({rates['region_description']})\n")
    print("| entropy level | voxels | error rate, mean over cases | pooled | paper |")
    print("|---:|---:|---:|---:|---:|")
    for i, level in enumerate(rates["levels"]):
        paper = PAPER_ERROR_RATE_PERCENT.get(round(level, 2))
        print(f"| {level:.2f} | {rates['voxels'][i]} | {rates['mean_over_cases_percent'][i]:.2f} | "
              f"{rates['pooled_percent'][i]:.2f} | {'-' if paper is None else paper} |")

    vvc = evaluation["vvc_vs_1_minus_dice"]
    with (fused / "summary.csv").open() as handle:
        flagged = {row["case"] for row in csv.DictReader(handle) if row["review"] == "true"}
    fused_dice = {r["case"]: r["dice"] for r in evaluation["metrics"] if r["source"] == "fused"}
    worst = set(sorted(fused_dice, key=fused_dice.get)[:len(flagged)])
    rho, p = vvc.get("spearman_rho"), vvc.get("spearman_p")
    correlation = ("Spearman rho undefined (fewer than 3 cases or constant values)" if rho is None
                   else f"Spearman rho {rho:.2f}, p {p:.2g}")
    print(f"\nVVC against 1 - Dice over {len(vvc['cases'])} cases: {correlation}. Review-flagged cases: "
          f"{len(flagged)}; of these, "
          f"{len(flagged & worst)} are among the {len(flagged)} cases with the lowest fused Dice.")

    print("\nLearning curves: nnU-Net's pseudo Dice per epoch (validation patches of the fold)\n")
    epochs = max(len(c) for c in curves.values())
    print("| model | train s | " + " | ".join(f"ep {e}" for e in range(epochs)) + " |")
    print("|---|---:|" + "---:|" * epochs)
    for name, curve in curves.items():
        seconds = train_seconds.get(name, 0.0)
        print(f"| {name} | {seconds:.0f} | " + " | ".join(f"{d:.3f}" for d in curve) + " |")

    ensemble = fused_summary["dice"]["mean"]
    levels_rise = all(b >= a for a, b in zip(rates["mean_over_cases_percent"], rates["mean_over_cases_percent"][1:]))
    rho, n_vvc = vvc.get("spearman_rho"), len(vvc["cases"])
    print("\nClaims on this data:")
    print(f"- the models learn the target (fused Dice at least half the paper's {100 * PAPER_ENSEMBLE['dice']:.2f}): "
          f"{'holds' if ensemble >= PAPER_ENSEMBLE['dice'] / 2 else 'does not hold'} ({100 * ensemble:.2f}); "
          "the claims below compare the models with each other")
    print(f"- the ensemble is at least as good as the mean single model (paper: 65.66 vs 64.46-64.69 Dice): "
          f"{'holds' if ensemble >= sum(single_dice) / len(single_dice) else 'does not hold'} "
          f"({100 * ensemble:.2f} vs {100 * sum(single_dice) / len(single_dice):.2f}; best single "
          f"{100 * max(single_dice):.2f})")
    print(f"- the error rate rises with the entropy level (Table 4): {'holds' if levels_rise else 'does not hold'}")
    vvc_verdict = (f"cannot be tested ({n_vvc} held-out cases; a rank correlation needs at least 3)" if n_vvc < 3
                   else f"{'holds' if rho is not None and rho > 0 else 'does not hold'}"
                        f"{'' if rho is None else f' (rho {rho:.2f} over {n_vvc} cases)'}")
    print(f"- a larger VVC goes with a worse segmentation (positive Spearman rho): {vvc_verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--work", type=Path, required=True, help="working folder (kept; reused by a rerun)")
    parser.add_argument("--datasets", nargs="+", choices=("synthetic", "real"),
                        default=["synthetic", "real"] if (REAL_SOURCE / "dataset.json").is_file() else ["synthetic"])
    parser.add_argument("--trainer-suffix", default="_cpu",
                        help="trainer variant: _cpu (default, the demo's CPU recipe) or '' (the paper's recipe)")
    parser.add_argument("-device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    work = args.work.resolve()
    dirs = configure_environment(work)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    started = time.perf_counter()
    log(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; work folder {work}")
    for kind in args.datasets:
        if kind == "real" and not (REAL_SOURCE / "dataset.json").is_file():
            log(f"skipping the real CTs: {REAL_SOURCE} not found")
            continue
        name = synthetic_dataset(dirs["nnUNet_raw"]) if kind == "synthetic" else real_dataset(dirs["nnUNet_raw"])
        log(f"{name}: planning and preprocessing")
        plan_and_preprocess(name, dirs["nnUNet_preprocessed"])
        seconds = train_six(name, dirs["nnUNet_results"], args.trainer_suffix, args.device)
        fused = predict_and_evaluate(name, dirs["nnUNet_raw"], work, args.trainer_suffix, args.device)
        report(name, fused, learning_curves(name, dirs["nnUNet_results"], args.trainer_suffix), seconds)
    log(f"finished in {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
