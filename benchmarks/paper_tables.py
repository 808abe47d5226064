"""Tables 1-3 of Mei et al. rerun with this package: every variant trained for the same budget, compared by gtv-compare.

For each dataset (synthetic, written here; and the real CTs in ../shared/data beside the repository when present,
``--datasets real``, whose last two cases are held out): plan and preprocess with nnUNetPlannerGTV25D, train every trainer of the tables
(``nnunetv2_gtv.training.paper_variants.TABLE_TRAINERS``) on fold 0 through nnU-Net's own trainer
(``run_training``, as nnUNetv2_train runs it, without the final validation) for ``--epochs`` x
``--iterations`` at ``--batch``, predict the held-out cases with ``gtv-predict -m TRAINER:0`` (and Table 3's
ensemble of the three sampling models), then ``gtv-compare`` each table against its reference row. The
tables are printed beside the paper's values with the paired Wilcoxon p-values.

A short budget ranks nothing: with a few hundred iterations the models have not converged, and with a handful
of test cases no difference is significant. The paper trained 17,000 iterations at batch 16 (about 11 minutes
of network time per model on an H200; days on a CPU).

    python benchmarks/paper_tables.py [--datasets synthetic real] [--epochs 2] [--iterations 10] [--batch 2]
                                      [--device cpu] [--work DIR] [--tables "Table 1" ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "Dataset910_OpenKBPHN"
SYNTHETIC_ID = 987
REAL_SPLIT_ID = 986
BIN = Path(sys.executable).parent
# the paper's Tables 1-3: Dice (%), ASSD (mm), RVE (%), time per case (s) on a GTX 1080 Ti
PAPER = {
    "3D UNet": (59.91, 5.52, 72.7, 0.094), "3D VNet": (61.02, 5.63, 65.0, 0.123),
    "2.5D UNet": (62.16, 5.04, 60.6, 0.093), "2.5D UNet + PE": (63.11, 4.35, 55.0, 0.097),
    "2.5D UNet + PE + AG": (62.62, 4.41, 50.5, 0.099), "2.5D UNet + PE + AM": (64.46, 4.24, 50.0, 0.098),
    "Local": (64.46, 4.24, 50.0, 0.098), "Middle": (64.69, 4.15, 59.2, 0.099), "Global": (64.54, 4.08, 41.5, 0.10),
    "Ensemble": (65.66, 3.98, 40.4, 0.297),
}
BASELINES = {"Table 1": "2.5D UNet", "Table 2": "2.5D UNet + PE + AM", "Table 3": "Ensemble"}


def run(args: list[str], env: dict) -> str:
    result = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def synthetic_dataset(root: Path, num_train: int, num_test: int) -> tuple[int, Path, Path]:
    """(dataset id, test images, test labels) of a synthetic dataset written into ``root``/nnUNet_raw."""
    from nnunetv2_gtv.demo.synthetic import write_dataset

    raw = root / "nnUNet_raw" / f"Dataset{SYNTHETIC_ID}_SyntheticGTV"
    if not (raw / "dataset.json").is_file():  # a rerun with the same --work reuses the dataset
        raw = write_dataset(root / "nnUNet_raw", SYNTHETIC_ID, num_train=num_train, num_test=num_test,
                            in_plane_size=128, num_slices=44, orientations="mixed", seed=3)
    return SYNTHETIC_ID, raw / "imagesTs", raw / "labelsTs"


def real_dataset(root: Path, num_test: int) -> tuple[int, Path, Path]:
    """A split of the real CTs (which have only imagesTr): the last ``num_test`` cases held out, as links in a new
    raw dataset under ``root`` (the read-only data is never written)."""
    source = json.loads((REAL_DATA / "dataset.json").read_text())
    ending = source["file_ending"]
    cases = sorted(p.name[:-len(ending)] for p in (REAL_DATA / "labelsTr").iterdir() if p.name.endswith(ending))
    target = root / "nnUNet_raw" / f"Dataset{REAL_SPLIT_ID}_RealSplit"
    for i, case in enumerate(cases):
        split = "Ts" if i >= len(cases) - num_test else "Tr"
        for kind, name in (("images", f"{case}_0000{ending}"), ("labels", f"{case}{ending}")):
            link = target / f"{kind}{split}" / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(REAL_DATA / f"{kind}Tr" / name)
    (target / "dataset.json").write_text(json.dumps({**source, "numTraining": len(cases) - num_test}, indent=2))
    return REAL_SPLIT_ID, target / "imagesTs", target / "labelsTs"


def train(trainer_name: str, dataset_id: int, env: dict, epochs: int, iterations: int, batch: int,
          device: str, lr: float | None, oversample_foreground: float | None) -> None:
    """nnU-Net's trainer on fold 0 as nnUNetv2_train builds and runs it, with this budget; no final validation.
    ``lr`` and ``oversample_foreground`` replace the paper's recipe values when given (same for every row)."""
    import torch
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    folder = Path(env["nnUNet_preprocessed"]) / maybe_convert_to_dataset_name(dataset_id)
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans = copy.deepcopy(plans)
    plans["configurations"]["3d_fullres"]["batch_size"] = batch
    plans["continue_training"] = False
    dataset_json = json.loads((folder / "dataset.json").read_text())
    trainer = recursive_find_trainer_class_by_name(trainer_name)(plans, "3d_fullres", 0, dataset_json,
                                                                 torch.device(device))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = epochs, iterations, 1
    if lr is not None:
        trainer.initial_lr = lr
    if oversample_foreground is not None:
        trainer.oversample_foreground_percent = oversample_foreground
    trainer.run_training()


def predict(models: list[str], images: Path, output: Path, dataset_id: int, env: dict, device: str) -> None:
    """gtv-predict; writes timings.csv with each case's network seconds (all models) from its log."""
    log = run(["gtv-predict", "-i", str(images), "-o", str(output), "-d", str(dataset_id), "-m", *models,
               "-device", device, "--disable_progress_bar", "-np", "0"], env)
    rows = [(m.group(1), sum(float(s) for s in m.group(2).split("+")))
            for m in re.finditer(r"^gtv-predict: (\S+): [\d.]+ s: .*?models ([\d.+ ]+) s", log, re.MULTILINE)]
    (output / "timings.csv").write_text("case,seconds\n" + "".join(f"{case},{seconds}\n" for case, seconds in rows))


def tables(names: list[str]) -> dict[str, dict[str, str]]:
    from nnunetv2_gtv.training.paper_variants import TABLE_TRAINERS

    return {name: TABLE_TRAINERS[name] for name in names}


def print_table(name: str, comparison: Path) -> None:
    doc = json.loads((comparison / "comparison.json").read_text())
    print(f"\n{name} (ours: mean ± sd over {len(doc['cases'])} held-out cases; p: paired Wilcoxon against "
          f"{doc['baseline']})")
    print("| row | paper Dice (%) | Dice (%) | p | paper ASSD (mm) | ASSD (mm) | p | paper RVE (%) | RVE (%) | p "
          "| paper time (s) | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cell(row: dict, metric: str) -> tuple[str, str]:
        stats, test = row[metric], row[f"{metric}_test"]
        value = "–" if stats["mean"] is None else f"{stats['mean']:.2f} ± {stats['std'] or 0:.2f}"
        p = "base" if test is None else ("–" if test["p"] is None else f"{test['p']:.2g}")
        return value, p

    for row in doc["summary"]:
        paper = PAPER[row["name"]]
        dice, assd, rve = cell(row, "dice"), cell(row, "assd_mm"), cell(row, "rve_percent")
        seconds = "–" if row["seconds"] is None else f"{row['seconds']['mean']:.2f}"
        print(f"| {row['name']} | {paper[0]} | {dice[0]} | {dice[1]} | {paper[1]} | {assd[0]} | {assd[1]} "
              f"| {paper[2]} | {rve[0]} | {rve[1]} | {paper[3]} | {seconds} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=("synthetic", "real"), default=["synthetic"])
    parser.add_argument("--tables", nargs="+", choices=tuple(BASELINES), default=list(BASELINES))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=10, help="iterations per epoch")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, help="Adam learning rate of every row (default: the paper's 1e-4); "
                        "the demo's CPU recipe uses 1e-3 for short budgets")
    parser.add_argument("--oversample-foreground", type=float,
                        help="share of each batch centred on the GTV (default: nnU-Net's 0.33; the CPU recipe: 0.5)")
    parser.add_argument("--num-train", type=int, default=8, help="synthetic training cases")
    parser.add_argument("--num-test", type=int, default=6, help="synthetic held-out cases (the paper: 10)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, deleted)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = (args.work or Path(tmp)).resolve()
        dirs = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **{k: str(v) for k, v in dirs.items()}, "nnUNet_n_proc_DA": "0"}
        os.environ.update({k: str(v) for k, v in dirs.items()})
        os.environ["nnUNet_n_proc_DA"] = "0"
        start = time.time()
        for dataset in args.datasets:
            if dataset == "real" and not (REAL_DATA / "dataset.json").is_file():
                print(f"real data: not present at {REAL_DATA}; skipped")
                continue
            dataset_id, images, labels = (synthetic_dataset(root, args.num_train, args.num_test)
                                          if dataset == "synthetic" else real_dataset(root, 2))
            run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-pl", "nnUNetPlannerGTV25D", "-c",
                 "3d_fullres", "-np", "2"], env)
            out = root / f"predictions_{dataset_id}"
            selected = tables(args.tables)
            trained = {trainer for rows in selected.values() for trainer in rows.values()}
            for trainer in sorted(trained):
                print(f"[{dataset}] training {trainer}: {args.epochs} x {args.iterations} iterations at batch "
                      f"{args.batch} ({time.time() - start:.0f} s so far)", flush=True)
                train(trainer, dataset_id, env, args.epochs, args.iterations, args.batch, args.device, args.lr,
                      args.oversample_foreground)
                predict([f"{trainer}:0"], images, out / trainer, dataset_id, env, args.device)
            if "Table 3" in selected:
                predict([f"{t}:0" for t in selected["Table 3"].values()], images, out / "ensemble", dataset_id,
                        env, args.device)
            for name, rows in selected.items():
                inputs = [f"{row}={out / trainer}" for row, trainer in rows.items()]
                if name == "Table 3":
                    inputs.append(f"Ensemble={out / 'ensemble'}")
                comparison = root / f"comparison_{dataset_id}_{name.replace(' ', '_')}"
                run(["gtv-compare", "-i", *inputs, "-r", str(labels), "-o", str(comparison),
                     "--baseline", BASELINES[name]], env)
                print_table(f"{name}, {dataset} data", comparison)
        load = os.getloadavg()
        lr = args.lr if args.lr is not None else "the paper's 1e-4"
        oversample = args.oversample_foreground if args.oversample_foreground is not None else "nnU-Net's 0.33"
        print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {args.device}; "
              f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; total {time.time() - start:.0f} s. Budget: "
              f"{args.epochs} x {args.iterations} iterations at batch {args.batch} per model, lr "
              f"{lr}, foreground oversampling {oversample} (the paper: 17,000 at "
              "batch 16). A budget this short ranks nothing: the models have not converged and the p-values say "
              "whether the held-out cases could tell the rows apart at all.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
