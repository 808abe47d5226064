"""Per-iteration time of the three sampling trainers at batch 2 and 16, on the CPU.

Writes a synthetic dataset to a temporary folder, plans and preprocesses it with nnUNetPlannerGTV25D, then for
each trainer and batch size builds the trainer as nnUNetv2_train does and times data loading (nnU-Net's loader
and augmentation, single process: nnUNet_n_proc_DA=0) and the training step (forward, loss, backward, Adam)
separately. Prints one table; Global is the baseline of one ratio column. With ``--precisions float32 bfloat16``
every step is also timed with the trainer's ``training_precision = "bfloat16"``, under CPU bfloat16 autocast
(nnU-Net trains in float32 on the CPU; gtv-predict's ``-precision`` does the same at inference), and a second
ratio column compares it with float32 of the same trainer and batch, measured in the same run. A recipe with a
batch of its own (``_cpu``, ``_cpuRealCT``) keeps it.

    python benchmarks/trainer_speed.py [--iterations 5] [--size 128] [--slices 44] [--trainers ...]
        [--precisions float32 bfloat16]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

TRAINERS = ("nnUNetTrainerGTV25DLocal", "nnUNetTrainerGTV25DMiddle", "nnUNetTrainerGTV25DGlobal")


def prepare_dataset(root: Path, size: int, slices: int) -> tuple[dict, dict]:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiment_dataset,
                                                                      preprocess_dataset)

    from nnunetv2_gtv.demo.synthetic import write_dataset
    from nnunetv2_gtv.planning.nnUNetPlannerGTV25D import nnUNetPlannerGTV25D

    dataset_id = 988
    raw = write_dataset(root / "nnUNet_raw", dataset_id, num_train=8, num_test=0, in_plane_size=size,
                        num_slices=slices, orientations="mixed")
    extract_fingerprints([dataset_id], num_processes=2)
    plan_experiment_dataset(dataset_id, experiment_planner_class=nnUNetPlannerGTV25D)
    preprocess_dataset(dataset_id, configurations=("3d_fullres",), num_processes=(2,))
    folder = root / "nnUNet_preprocessed" / raw.name
    return json.loads((folder / "nnUNetPlans.json").read_text()), json.loads((folder / "dataset.json").read_text())


def time_trainer(name: str, batch_size: int, plans: dict, dataset_json: dict, iterations: int,
                 precision: str = "float32") -> tuple[int, float, float]:
    """(batch the trainer used, seconds of data loading, seconds of the training step), means over ``iterations``."""
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    plans = copy.deepcopy(plans)
    plans["configurations"]["3d_fullres"]["batch_size"] = batch_size
    plans["continue_training"] = False
    trainer = recursive_find_trainer_class_by_name(name)(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    trainer.training_precision = precision  # the trainers' own switch (nnUNetTrainerGTV25D.train_step)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    next(trainer.dataloader_train)  # warm-up: first batch and first step are slower
    data_times, step_times = [], []
    for _ in range(iterations + 1):
        start = time.perf_counter()
        batch = next(trainer.dataloader_train)
        loaded = time.perf_counter()
        trainer.train_step(batch)
        data_times.append(loaded - start)
        step_times.append(time.perf_counter() - loaded)
    return trainer.batch_size, sum(data_times[1:]) / iterations, sum(step_times[1:]) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="in-plane size of the synthetic CT")
    parser.add_argument("--slices", type=int, default=44)
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), help="trainer classes (default: %(default)s)")
    parser.add_argument("--precisions", nargs="+", choices=("float32", "bfloat16"), default=["float32"],
                        help="arithmetic of the training step (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (root / name).mkdir()
            os.environ[name] = str(root / name)
        os.environ["nnUNet_n_proc_DA"] = "0"
        plans, dataset_json = prepare_dataset(root, args.size, args.slices)
        rows = {(name, batch, precision): time_trainer(name, batch, plans, dataset_json, args.iterations, precision)
                for batch in (2, 16) for name in args.trainers for precision in args.precisions}
    load = os.getloadavg()[0]
    print(f"\nper-iteration time, CPU, torch threads {__import__('torch').get_num_threads()}, "
          f"{os.cpu_count()} cores, 1-min load average at the end {load:.1f}, mean of {args.iterations} iterations")
    print("| trainer | batch | precision | data loading + augmentation (s) | training step (s) | total (s) | x Global "
          "| step x float32 |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for (name, batch, precision), (used_batch, data, step) in rows.items():
        global_row = rows.get(("nnUNetTrainerGTV25DGlobal", batch, precision))
        same_batch = global_row is not None and global_row[0] == used_batch
        versus_global = f"{(data + step) / sum(global_row[1:]):.2f}" if same_batch else "-"
        float32_row = rows.get((name, batch, "float32"))
        versus_float32 = f"{step / float32_row[2]:.2f}" if float32_row else "-"
        print(f"| {name} | {used_batch} | {precision} | {data:.2f} | {step:.2f} | {data + step:.2f} | {versus_global} "
              f"| {versus_float32} |")


if __name__ == "__main__":
    main()
