"""Which ``_cpu`` recipe lets every model of the README demo learn, whatever the seed? Studied on the demo's data.

With the paper's soft Dice and a constant lr of 1e-3, the demo's Global model sometimes marked several times the
tumour (held-out Dice 0.06-0.71 over demo reruns). This script trains, on the demo's synthetic dataset (same
generator arguments as ``setup_scripts/run_demo.sh``), each (variant, scale, seed) with the ``_cpu`` recipe in its
own results folder, the variant's loss, lr schedule, foreground share and length set on the trainer; then each
model alone segments the 2 validation CTs of its fold 0 (nnU-Net's split of the 10 training CTs: the variants are
chosen on these) and the demo's 3 held-out CTs (``gtv-predict``, every component kept), each scored by Dice and by
its volume over the reference's. Results: docs/results/learning.md#the-demo-recipe.

    python benchmarks/demo_recipe.py --work DIR [--variants dice dice_ce dice_ce_poly_33] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import logger, machine_line, nnunet_command

DATASET_ID = 979
DATASET_NAME = f"Dataset{DATASET_ID}_DemoRecipe"
# the demo's gtv-synthetic arguments (setup_scripts/run_demo.sh)
DEMO_DATA = {"num_train": 10, "num_test": 3, "in_plane_size": 128, "num_slices": 44, "in_plane_mm": (1.6, 1.9),
             "orientations": "mixed", "seed": 0}
# what a variant changes on the ``_cpu`` recipe (loss; lr schedule: a constant 1e-3 or nnU-Net's poly decay; share
# of patches centred on foreground; epochs of 50 iterations): the recipe before this study was "dice", the one of
# the first round "dice_ce_poly_33"
VARIANTS = {
    "dice": {"loss": "dice", "lr": "constant", "foreground": 0.5, "epochs": 6},
    "dice_ce": {"loss": "dice_ce", "lr": "constant", "foreground": 0.5, "epochs": 6},
    "dice_ce_poly_33": {"loss": "dice_ce", "lr": "poly", "foreground": 0.33, "epochs": 6},
    "dice_ce_poly_50": {"loss": "dice_ce", "lr": "poly", "foreground": 0.5, "epochs": 6},
    "dice_ce_poly_33_12ep": {"loss": "dice_ce", "lr": "poly", "foreground": 0.33, "epochs": 12},
}


log = logger("demo_recipe")


def environment(work: Path, results: Path) -> dict[str, str]:
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(results))
    env.setdefault("nnUNet_n_proc_DA", "1")
    env.setdefault("nnUNet_def_n_proc", "2")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def prepare(work: Path) -> None:
    from nnunetv2_gtv.demo.synthetic import write_dataset

    raw = work / "raw"
    if not (raw / DATASET_NAME / "dataset.json").is_file():
        write_dataset(raw, DATASET_ID, name="DemoRecipe", **DEMO_DATA)
    if not (work / "preprocessed" / DATASET_NAME / "nnUNetPlans_3d_fullres").is_dir():
        subprocess.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID),
                        "-pl", "nnUNetPlannerGTV25D",
                        "-c", "3d_fullres", "-np", "2"], check=True, stdout=subprocess.DEVNULL,
                       env=environment(work, work / "results"))


def train_worker(scale: str, variant: str, seed: int) -> None:
    """Runs in its own process (nnU-Net reads its folders at import): seed, switch the variant on, train fold 0."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(DATASET_NAME, "3d_fullres", 0, f"nnUNetTrainerGTV25D{scale}_cpu",
                                    device=torch.device("cpu"))
    switches = VARIANTS[variant]
    trainer.loss_kind = switches["loss"]
    trainer.lr_schedule = "poly" if switches["lr"] == "poly" else "step"  # "step": constant over 300 iterations
    trainer.oversample_foreground_percent = switches["foreground"]
    trainer.num_epochs = switches["epochs"]
    trainer.training_seed = seed
    trainer.print_to_log_file(f"demo_recipe study: {variant} {switches}, seed {seed}")
    trainer.run_training()


def score(prediction_folder: Path, label_folder: Path) -> list[dict]:
    import SimpleITK as sitk

    from nnunetv2_gtv.evaluation.metrics import dice_score

    rows = []
    for label_file in sorted(label_folder.glob("*.nii.gz")):
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file))) > 0
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_folder / label_file.name))) > 0
        rows.append({"case": label_file.name[:-7], "dice": dice_score(predicted, reference),
                     "volume_ratio": float(predicted.sum() / max(reference.sum(), 1))})
    return rows


def validation_cases(work: Path) -> tuple[Path, Path]:
    """Fold 0's validation CTs (nnU-Net's splits_final.json) and their labels, linked into folders of their own."""
    images, labels = work / "validation" / "images", work / "validation" / "labels"
    if not labels.is_dir():
        split = json.loads((work / "preprocessed" / DATASET_NAME / "splits_final.json").read_text())[0]["val"]
        raw = work / "raw" / DATASET_NAME
        images.mkdir(parents=True)
        labels.mkdir()
        for case in split:
            (images / f"{case}_0000.nii.gz").symlink_to(raw / "imagesTr" / f"{case}_0000.nii.gz")
            (labels / f"{case}.nii.gz").symlink_to(raw / "labelsTr" / f"{case}.nii.gz")
    return images, labels


def predict_and_score(images: Path, labels: Path, prediction: Path, scale: str, env: dict) -> list[dict]:
    subprocess.run([nnunet_command("gtv-predict"), "-i", str(images), "-o", str(prediction), "-d", str(DATASET_ID),
                    "-m", f"{scale}:0", "-tr_suffix", "_cpu", "-device", "cpu", "--keep-all-components",
                    "--continue"], check=True, env=env, stdout=subprocess.DEVNULL)
    return score(prediction, labels)


def run_one(work: Path, scale: str, variant: str, seed: int) -> dict:
    key = f"{scale}_{variant}_seed{seed}"
    results = work / "results" / key
    env = environment(work, results)
    record = work / "scores" / f"{key}.json"
    result = json.loads(record.read_text()) if record.is_file() else None
    if result is None:
        model = results / DATASET_NAME / f"nnUNetTrainerGTV25D{scale}_cpu__nnUNetPlans__3d_fullres" / "fold_0"
        started = time.time()
        if not (model / "checkpoint_final.pth").is_file():
            log(f"train {key} -> {model}")
            subprocess.run([sys.executable, __file__, "--work", str(work), "--train-worker", scale, variant,
                            str(seed)], check=True, env=env, stdout=subprocess.DEVNULL)
        train_seconds = time.time() - started
        raw = work / "raw" / DATASET_NAME
        rows = predict_and_score(raw / "imagesTs", raw / "labelsTs", work / "predictions" / key, scale, env)
        result = {"scale": scale, "variant": variant, "seed": seed, "train_seconds": round(train_seconds),
                  "mean_dice": sum(r["dice"] for r in rows) / len(rows), "cases": rows}
    if "validation" not in result:
        rows = predict_and_score(*validation_cases(work), work / "predictions" / f"{key}_validation", scale, env)
        result["validation"] = {"mean_dice": sum(r["dice"] for r in rows) / len(rows), "cases": rows}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=1))
    ratios = ", ".join(f"{r['volume_ratio']:.2f}" for r in result["cases"])
    log(f"{key}: validation Dice {result['validation']['mean_dice']:.3f}, held-out Dice {result['mean_dice']:.3f}, "
        f"volume ratios {ratios} ({result['train_seconds']} s)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--scales", nargs="+", choices=("Local", "Middle", "Global"), default=["Global"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train-worker", nargs=3, metavar=("SCALE", "VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work.resolve()
    if args.train_worker:
        scale, variant, seed = args.train_worker
        train_worker(scale, variant, int(seed))
        return 0
    log(f"{machine_line()}; work folder {work}")
    prepare(work)
    results = [run_one(work, scale, variant, seed) for variant in args.variants for scale in args.scales
               for seed in args.seeds]
    print("\n| scale | variant | seed | validation Dice (2 CTs) | volume ratio per CT | held-out Dice (3 CTs) "
          "| volume ratio per CT | training s |")
    print("|---|---|---:|---:|---|---:|---|---:|")
    for r in results:
        ratios = {part: ", ".join(f"{c['volume_ratio']:.2f}" for c in cases)
                  for part, cases in (("validation", r["validation"]["cases"]), ("test", r["cases"]))}
        print(f"| {r['scale']} | {r['variant']} | {r['seed']} | {r['validation']['mean_dice']:.3f} | "
              f"{ratios['validation']} | {r['mean_dice']:.3f} | {ratios['test']} | {r['train_seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
