"""CPU recipes: ``_cpu`` (the README demo's, synthetic CT in minutes) and ``_cpuRealCT`` (a target learnt on real CT
at a CPU budget, docs/results/real_ct.md), for each sampling region."""
from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import \
    nnUNetTrainerNoMirroring

from nnunetv2_gtv.training.nnUNetTrainerGTV25D import nnUNetTrainerGTV25DGlobal, nnUNetTrainerGTV25DLocal, \
    nnUNetTrainerGTV25DMiddle


class CpuRecipe(nnUNetTrainerNoMirroring):
    """``..._cpu``: a recipe that learns on 2 CPU cores in minutes (the demo's). The network, planner,
    augmentation and sampling region are the paper's; what differs, and why:

    - 300 iterations (6 epochs of 50; Global 600, see its class) at batch 4 instead of 17,000 at batch 16: a
      batch-16 step costs about 5-8 s on 2 cores, the paper's length would take more than a day;
    - Adam from 1e-3 with nnU-Net's poly decay to 0, nnU-Net's soft Dice + cross-entropy loss and a third of each
      batch centred on foreground (nnU-Net's defaults) instead of the paper's 1e-4 (x 0.9 every 10,000 iterations),
      soft Dice alone and half of each batch on foreground. In a few hundred iterations 1e-4 barely moves the
      weights; at a constant 1e-3 the last weights land anywhere on a noisy path, and the Global model marked up
      to 2.5x the tumour in one seed of two, with either loss; with the decay and a third on foreground it did not
      (``benchmarks/demo_recipe.py``, docs/results/learning.md#the-demo-recipe);
    - seeded (``training_seed``): network initialisation, patch sampling and augmentation, in this process and in
      nnU-Net's augmentation workers, so a rerun trains the same models (nnU-Net seeds nothing);
    - no mirroring, neither as augmentation nor at inference: test-time mirroring costs 8 network passes per
      tile on the CPU; 5 validation iterations per epoch instead of 50 (the pseudo Dice is a progress signal);
    - the end-of-training validation slides its window at step 1 (no overlap, gtv-predict's CPU default)
      instead of 0.5: on a clinical CT (107 x 500 x 500 voxels) step 0.5 means 2925 tiles per case, step 1 448.
    """

    cpu_batch_size = 4
    validation_step_size = 1.0
    loss_kind = "dice_ce"  # or "dice" (the paper's); recipe studies switch it on the instance
    lr_schedule = "poly"  # or "step" (the paper's)
    training_seed: int | None = 0  # None: unseeded, as nnU-Net trains

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.num_epochs = 6
        self.num_iterations_per_epoch = 50
        self.num_val_iterations_per_epoch = 5
        self.oversample_foreground_percent = 0.33

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.batch_size = min(self.batch_size, self.cpu_batch_size)

    def _build_loss(self):
        if self.loss_kind == "dice_ce":
            return nnUNetTrainer._build_loss(self)
        return super()._build_loss()

    def configure_optimizers(self):
        optimizer, scheduler = super().configure_optimizers()
        if self.lr_schedule == "poly":
            scheduler = PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
        return optimizer, scheduler

    def seed_training(self) -> None:
        """Seed what this process draws at random: network initialisation, patch sampling, augmentation."""
        random.seed(self.training_seed)
        np.random.seed(self.training_seed)
        torch.manual_seed(self.training_seed)

    def on_train_start(self):
        if self.training_seed is not None:
            self.seed_training()
            self.print_to_log_file(f"training seeded with {self.training_seed}")
        super().on_train_start()

    def get_dataloaders(self):
        """nnU-Net's loaders; seeded, their augmentation worker processes get seeds of their own (nnU-Net starts them
        unseeded, inside this very call, so the seeds go in as the augmenters are built)."""
        if self.training_seed is None:
            return super().get_dataloaders()
        module = sys.modules[nnUNetTrainer.__module__]
        unseeded = module.NonDetMultiThreadedAugmenter
        built = []

        def seeded(*args, num_processes: int, seeds=None, **kwargs):
            base = self.training_seed + 1000 * (len(built) + 1)
            built.append(unseeded(*args, num_processes=num_processes,
                                  seeds=[base + i for i in range(num_processes)], **kwargs))
            return built[-1]

        module.NonDetMultiThreadedAugmenter = seeded
        try:
            return super().get_dataloaders()
        finally:
            module.NonDetMultiThreadedAugmenter = unseeded

class CpuRealCTRecipe(CpuRecipe):
    """``..._cpuRealCT``: the CPU recipe that learns a target on real CT (``docs/results/real_ct.md``). Network, AM/PE,
    Adam, augmentation and sampling region are the paper's; it is meant for plans made at a coarser grid
    (``-overwrite_target_spacing 3 4 4``, see docs/results/real_ct.md). What differs from the paper's recipe, and why:

    - loss: nnU-Net's soft Dice + cross-entropy instead of the soft Dice alone (as the ``_cpu`` recipe). The Dice
      over the foreground barely punishes false positives in patches without target, and real CT has far more
      target-like soft tissue than a patch shows: on real CT the ``_cpu`` recipe of the paper's loss (Dice only,
      300 iterations) marked 10-50x the target's volume, and this recipe with the Dice alone 2-3x (the loss study
      of docs/results/real_ct.md);
    - lr: Adam from 1e-3 with nnU-Net's poly decay to 0 (as ``_cpu``; the paper: 1e-4, x 0.9 every 10,000
      iterations; in a few thousand iterations 1e-4 barely moves the weights, and the decay lets the last epochs
      settle);
    - 500 iterations (10 epochs of 50) at batch 8 instead of 17,000 at batch 16: about 20 minutes on 2 cores,
      end-of-training validation included (the learning curve of docs/results/real_ct.md shows where it flattens);
    - as the ``_cpu`` recipe: a third of each batch centred on foreground (nnU-Net's default; the paper's code:
      half), seeded, no mirroring, 5 validation iterations per epoch, end-of-training validation at step 1.

    Every ``snapshot_every_epochs`` epochs the network weights are saved as ``checkpoint_epoch_<E>.pth`` (weights
    only, 17 MB; ``gtv-predict -chk``), so the Dice on held-out cases can be drawn against iterations.
    """

    cpu_batch_size = 8
    snapshot_every_epochs = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 10

    def on_epoch_end(self):
        epoch = self.current_epoch + 1
        super().on_epoch_end()
        if self.snapshot_every_epochs and epoch % self.snapshot_every_epochs == 0 and not self.disable_checkpointing:
            self.save_weights_snapshot(os.path.join(self.output_folder, f"checkpoint_epoch_{epoch}.pth"))

    def save_weights_snapshot(self, filename: str) -> None:
        """What nnU-Net's predictor reads from a checkpoint, without the optimizer state (a third of the size)."""
        torch.save({"network_weights": self.network.state_dict(), "init_args": self.my_init_kwargs,
                    "trainer_name": type(self).__name__, "current_epoch": self.current_epoch,
                    "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes}, filename)


class CpuRealCTLongRecipe(CpuRealCTRecipe):
    """``..._cpuRealCTLong``: the ``_cpuRealCT`` recipe over the whole 45-minute budget of 2 cores: 1400 iterations
    (28 epochs of 50, the poly decay stretched over them) with the training step under CPU bfloat16 autocast, which
    makes a step about 0.65x as long (36-38 minutes of training loop, docs/results/real_ct.md). For a target that the
    500 iterations leave still learning, e.g. organs beside the PTV70 (docs/results/real_ct_organs.md)."""

    training_precision = "bfloat16"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 28


class nnUNetTrainerGTV25DLocal_cpu(CpuRecipe, nnUNetTrainerGTV25DLocal):
    pass

class nnUNetTrainerGTV25DMiddle_cpu(CpuRecipe, nnUNetTrainerGTV25DMiddle):
    pass

class nnUNetTrainerGTV25DGlobal_cpu(CpuRecipe, nnUNetTrainerGTV25DGlobal):
    """Twice the iterations of the other two (600, 12 epochs of 50): the Global model samples the whole image, two
    thirds of its patches hold little or no tumour, and at 300 iterations it stopped short, marking 0.5-0.9x the
    tumour at every seed of four (``benchmarks/demo_recipe.py``, docs/results/learning.md#the-demo-recipe). Its
    iterations are the cheapest of the three on a CPU (about 35 s per epoch on 2 cores)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 12

class nnUNetTrainerGTV25DLocal_cpuRealCT(CpuRealCTRecipe, nnUNetTrainerGTV25DLocal):
    pass

class nnUNetTrainerGTV25DMiddle_cpuRealCT(CpuRealCTRecipe, nnUNetTrainerGTV25DMiddle):
    pass

class nnUNetTrainerGTV25DGlobal_cpuRealCT(CpuRealCTRecipe, nnUNetTrainerGTV25DGlobal):
    pass

class nnUNetTrainerGTV25DLocal_cpuRealCTLong(CpuRealCTLongRecipe, nnUNetTrainerGTV25DLocal):
    pass

class nnUNetTrainerGTV25DMiddle_cpuRealCTLong(CpuRealCTLongRecipe, nnUNetTrainerGTV25DMiddle):
    pass

class nnUNetTrainerGTV25DGlobal_cpuRealCTLong(CpuRealCTLongRecipe, nnUNetTrainerGTV25DGlobal):
    pass
