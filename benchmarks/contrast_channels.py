"""Does a model read the second CT channel? A plain + contrast-enhanced CT model against a plain-CT-only model of the
same recipe, on synthetic cases whose tumour is visible only with contrast.

``gtv-synthetic --contrast`` draws, per case, a plain CT on which tumour and nodes are iso-dense with the soft tissue
around them (only the tumour's bulge into the airway shows its shape) and a contrast-enhanced CT on which they
enhance. The same cases make two datasets: both CTs as channels 0 and 1, and the plain CT alone. Each is planned with
nnUNetPlannerGTV25D and trains ``nnUNetTrainerGTV25D<scale>_cpu`` fold 0 (the demo's recipe) for each seed; each model
alone segments the held-out cases (``gtv-predict``, every component kept), scored by Dice against the reference.
A paired Wilcoxon test over the held-out cases compares the two inputs (seeds averaged per case). Results:
docs/results/contrast_channels.md.

    python benchmarks/contrast_channels.py --work DIR [--seeds 0 1] [--scale Global]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import dice_of_files, logger, machine_line, nnunet_command

TWO_CHANNEL_ID, PLAIN_ID = 973, 972
TWO_CHANNEL, PLAIN = f"Dataset{TWO_CHANNEL_ID}_ContrastCT", f"Dataset{PLAIN_ID}_PlainCT"
# the README demo's anatomy and grid (setup_scripts/run_demo.sh), more held-out cases
SYNTHETIC = ["--num-train", "10", "--num-test", "8", "--size", "128", "--slices", "44", "--in-plane-mm", "1.6", "1.9",
             "--orientations", "mixed", "--seed", "0", "--contrast"]

log = logger("contrast_channels")


def environment(work: Path, seed: int | None = None) -> dict[str, str]:
    results = work / "results" / (f"seed{seed}" if seed is not None else "none")
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(results))
    env.setdefault("nnUNet_n_proc_DA", "1")
    env.setdefault("nnUNet_def_n_proc", "2")
    return env


def prepare(work: Path) -> None:
    """The two-channel dataset (gtv-synthetic --contrast) and its plain-CT copy, both planned and preprocessed."""
    raw, env = work / "raw", environment(work)
    if not (raw / TWO_CHANNEL / "dataset.json").is_file():
        subprocess.run([nnunet_command("gtv-synthetic"), "-o", str(raw), "-d", str(TWO_CHANNEL_ID), "-n",
                        "ContrastCT", *SYNTHETIC], check=True, env=env, stdout=subprocess.DEVNULL)
    if not (raw / PLAIN / "dataset.json").is_file():
        plain = raw / PLAIN
        shutil.copytree(raw / TWO_CHANNEL, plain, ignore=lambda _, names: [n for n in names if "_0001." in n])
        dataset_json = json.loads((plain / "dataset.json").read_text())
        dataset_json["channel_names"] = {"0": "CT"}
        (plain / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    for dataset_id, name in ((TWO_CHANNEL_ID, TWO_CHANNEL), (PLAIN_ID, PLAIN)):
        if not (work / "preprocessed" / name / "nnUNetPlans_3d_fullres").is_dir():
            subprocess.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-pl",
                            "nnUNetPlannerGTV25D", "-c", "3d_fullres", "-np", "2"], check=True, env=env,
                           stdout=subprocess.DEVNULL)


def train_worker(dataset: str, trainer_name: str, seed: int) -> None:
    """Runs in its own process (nnU-Net reads its folders at import): the recipe as shipped, seeded."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(dataset, "3d_fullres", 0, trainer_name, device=torch.device("cpu"))
    trainer.training_seed = seed
    trainer.run_training()


def run_one(work: Path, dataset: str, scale: str, seed: int) -> dict:
    record = work / "scores" / f"{dataset}_{scale}_seed{seed}.json"
    if record.is_file():
        return json.loads(record.read_text())
    env, trainer = environment(work, seed), f"nnUNetTrainerGTV25D{scale}_cpu"
    model = Path(env["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    started = time.time()
    if not (model / "checkpoint_final.pth").is_file():
        log(f"train {trainer} on {dataset}, seed {seed} -> {model}")
        subprocess.run([sys.executable, __file__, "--work", str(work), "--train-worker", dataset, trainer, str(seed)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    train_seconds = time.time() - started
    raw = work / "raw" / dataset
    prediction = work / "predictions" / f"{dataset}_{scale}_seed{seed}"
    subprocess.run([nnunet_command("gtv-predict"), "-i", str(raw / "imagesTs"), "-o", str(prediction),
                    "-d", dataset, "-m", f"{trainer}:0", "-device", "cpu", "--keep-all-components", "--continue"],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cases = {label.name[:-7]: dice_of_files(prediction / label.name, label)
             for label in sorted((raw / "labelsTs").glob("*.nii.gz"))}
    result = {"dataset": dataset, "scale": scale, "seed": seed, "train_seconds": round(train_seconds),
              "mean_dice": sum(cases.values()) / len(cases), "dice": cases}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=1))
    log(f"{dataset} {scale} seed {seed}: held-out Dice {result['mean_dice']:.3f} ({train_seconds:.0f} s)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--scale", choices=("Local", "Middle", "Global"), default="Global")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train-worker", nargs=3, metavar=("DATASET", "TRAINER", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work.resolve()
    if args.train_worker:
        dataset, trainer, seed = args.train_worker
        train_worker(dataset, trainer, int(seed))
        return 0
    from scipy.stats import wilcoxon

    log(f"{machine_line()}; work folder {work}")
    prepare(work)
    results = {name: [run_one(work, name, args.scale, seed) for seed in args.seeds] for name in (TWO_CHANNEL, PLAIN)}
    print("\n| input | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean held-out Dice |")
    print("|---|" + "---:|" * (len(args.seeds) + 1))
    per_case = {}
    for name, label in ((TWO_CHANNEL, "plain + contrast CT"), (PLAIN, "plain CT only")):
        runs = results[name]
        per_case[name] = [sum(r["dice"][case] for r in runs) / len(runs) for case in sorted(runs[0]["dice"])]
        print(f"| {label} | " + " | ".join(f"{r['mean_dice']:.3f}" for r in runs)
              + f" | {sum(per_case[name]) / len(per_case[name]):.3f} |")
    difference = [a - b for a, b in zip(per_case[TWO_CHANNEL], per_case[PLAIN])]
    test = wilcoxon(per_case[TWO_CHANNEL], per_case[PLAIN])
    print(f"\nper held-out case (seeds averaged), two channels minus plain: "
          f"{', '.join(f'{d:+.3f}' for d in difference)}; paired Wilcoxon p = {test.pvalue:.3g} "
          f"({len(difference)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
