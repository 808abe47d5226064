"""Stock nnU-Net stopped at a wall-clock budget: the baselines that ``docs/results/real_ct.md`` compares our models with.

``nnUNetTrainer_<N>min`` is nnU-Net's own ``nnUNetTrainer`` (its plans and network for any configuration, Dice +
cross-entropy, SGD with the poly schedule, deep supervision, its augmentation with mirroring) and changes only
what a budget forces:

- training stops once ``budget_minutes`` of wall-clock time are spent (the end-of-training validation comes
  after it); after every epoch the remaining epochs are re-estimated from the mean epoch time so far, and the
  poly schedule is stretched over that many epochs, so the learning rate reaches about 0 at the end of the
  budget as it does at the end of nnU-Net's 1000 epochs;
- an epoch is 5 iterations and 1 validation iteration instead of 250 and 50: on a CPU one iteration of nnU-Net's
  own plans takes about a minute (2d: batch 199 slices; 3d_fullres: batch 2 of 128^3 voxels for the real CTs of
  docs/results/real_ct.md), so nnU-Net's epoch would be longer than the whole budget, and the budget is checked (and the
  schedule stretched) every few minutes;
- the end-of-training validation runs without test-time mirroring (8 network passes per tile on a CPU); the
  checkpoint keeps nnU-Net's mirroring axes, so ``nnUNetv2_predict`` mirrors unless ``--disable_tta``.
"""
from __future__ import annotations

import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _BudgetSpent(Exception):
    pass


class _WallClockBudget:
    budget_minutes = 20.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # explicit signature: nnU-Net records the trainer's init kwargs by inspecting it
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 5
        self.num_val_iterations_per_epoch = 1
        self._budget_started = None

    def on_train_start(self):
        super().on_train_start()
        self._budget_started = time.monotonic()
        self.print_to_log_file(f"wall-clock budget: training stops after {self.budget_minutes:g} minutes")

    def on_epoch_end(self):
        super().on_epoch_end()  # counts this epoch: current_epoch is now the number of epochs done
        elapsed = time.monotonic() - self._budget_started
        remaining = int((60.0 * self.budget_minutes - elapsed) // (elapsed / self.current_epoch))
        self.num_epochs = self.current_epoch + max(remaining, 0)
        self.lr_scheduler.max_steps = max(self.num_epochs, self.current_epoch + 1)
        if remaining <= 0:
            self.print_to_log_file(f"wall-clock budget spent after {self.current_epoch} epochs "
                                   f"({elapsed / 60:.1f} min)")
            raise _BudgetSpent

    def run_training(self):
        try:
            super().run_training()
        except _BudgetSpent:
            self.on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        mirror_axes = self.inference_allowed_mirroring_axes
        self.inference_allowed_mirroring_axes = None
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = mirror_axes


class nnUNetTrainer_20min(_WallClockBudget, nnUNetTrainer):
    """20 minutes of training: the training loop of our real-CT recipe (500 iterations, 19-20 minutes on 2 cores)."""

    budget_minutes = 20.0


class nnUNetTrainer_40min(_WallClockBudget, nnUNetTrainer):
    """40 minutes of training: with nnU-Net's end-of-training validation the command stays within 45 minutes."""

    budget_minutes = 40.0
