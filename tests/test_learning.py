"""Training learns: a short CPU run of the demo recipe segments the tumour of a case it never saw.

The run goes through the real trainer (its region cropping, nnU-Net's loader and augmentation, the Dice loss, the
preprocessed CT window) and the real predictor on the raw held-out CT, so it fails if any of them is broken: a
loss or label mix-up, an intensity window that hides the tumour, a sampling region that misses it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conftest import DATASET_NAME

TRAINING_ITERATIONS = 60


def _held_out_dice(trainer, raw: Path) -> float:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=1.0, use_mirroring=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [trainer.network.state_dict()],
                                    trainer.dataset_json, type(trainer).__name__, None)
    trainer.network.eval()
    dice = []
    reader = trainer.plans_manager.image_reader_writer_class()  # as the plans read (reoriented), image and label
    for image_file in sorted((raw / "imagesTs").glob("*_0000.nii.gz")):
        image, properties = reader.read_images([str(image_file)])
        predicted = predictor.predict_single_npy_array(image, properties) == 1
        reference = reader.read_seg(str(raw / "labelsTs" / image_file.name.replace("_0000", "")))[0][0] == 1
        dice.append(2 * np.logical_and(predicted, reference).sum() / (predicted.sum() + reference.sum()))
    trainer.network.train()
    return float(np.mean(dice))


def test_a_short_cpu_training_segments_a_held_out_case(gtv_dataset, monkeypatch):
    from nnunetv2_gtv.training.cpu_recipes import nnUNetTrainerGTV25DLocal_cpu

    for name, path in gtv_dataset["dirs"].items():
        monkeypatch.setenv(name, path)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    folder = Path(gtv_dataset["dirs"]["nnUNet_preprocessed"]) / DATASET_NAME
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans["continue_training"] = False
    torch.manual_seed(0)
    np.random.seed(0)  # nnU-Net's loader and augmentation draw from numpy's global generator (single process here)
    trainer = nnUNetTrainerGTV25DLocal_cpu(plans, "3d_fullres", "all", dataset_json, torch.device("cpu"))
    trainer.on_train_start()
    untrained = _held_out_dice(trainer, gtv_dataset["raw"])
    trainer.on_train_epoch_start()
    losses = [trainer.train_step(next(trainer.dataloader_train))["loss"] for _ in range(TRAINING_ITERATIONS)]
    trained = _held_out_dice(trainer, gtv_dataset["raw"])
    print(f"held-out Dice untrained {untrained:.3f}, after {TRAINING_ITERATIONS} iterations {trained:.3f}; "
          f"loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}")
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2
    # measured: untrained 0.05, trained 0.48 (60 iterations; the tiny test CTs have little context)
    assert trained >= 0.35 and trained >= untrained + 0.3
