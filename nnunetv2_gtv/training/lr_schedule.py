"""The paper's learning-rate schedule: multiply by ``gamma`` every ``step_iterations`` training iterations."""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import _LRScheduler


class IterationStepLR(_LRScheduler):
    """Step decay counted in iterations, driven (like nnU-Net's PolyLRScheduler) by ``step(epoch)`` once per epoch.

    lr(epoch) = initial_lr * gamma ** floor(epoch * iterations_per_epoch / step_iterations)
    """

    def __init__(self, optimizer: Optimizer, initial_lr: float, iterations_per_epoch: int,
                 step_iterations: int = 10_000, gamma: float = 0.9):
        self.initial_lr = initial_lr
        self.iterations_per_epoch = iterations_per_epoch
        self.step_iterations = step_iterations
        self.gamma = gamma
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at_epoch(self, epoch: int) -> float:
        return self.initial_lr * self.gamma ** ((epoch * self.iterations_per_epoch) // self.step_iterations)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at_epoch(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
