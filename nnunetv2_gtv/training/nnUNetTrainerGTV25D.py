"""Trainers for the 2.5D GTV network: the paper's recipe, and three anatomical sampling regions.

``nnUNetTrainerGTV25D`` (the shared base) follows Mei et al. section 3.3 and the authors' code:

- Adam, lr 1e-4, weight decay 1e-5; batch 16 comes from the plans;
- soft Dice loss (nnU-Net's ``MemoryEfficientSoftDiceLoss`` through ``nnUNetTrainerDiceLoss``) over the
  foreground classes only: background is not included;
- lr multiplied by 0.9 every 10,000 iterations;
- no deep supervision (the paper has none);
- 250 iterations per epoch and 68 epochs = 17,000 iterations, the authors' training length.

Freed memory stays in the process for the next tensor (``nnunetv2_gtv.allocator``: the same outputs, a
training step up to 1.8x faster on the CPU, more resident memory).

nnU-Net's data augmentation is kept unchanged: for a 16 x 64 x 64 patch it switches to "dummy 2D"
augmentation (in-plane rotation and scaling, mirroring). Logging, checkpoints, validation and export are
nnU-Net's. The sampling region is the only thing the Local / Middle / Global subclasses change:

- Global samples as nnU-Net does, from the whole (cropped) image;
- Middle samples from the head and neck (the body above the shoulders);
- Local samples from the head (the body above the neck).

Regions are detected per case from the anatomy (``nnunetv2_gtv.training.regions``), cached in the
preprocessed folder, and each training case is cropped to its region before nnU-Net's loader draws patches.
"""
from __future__ import annotations

import math
import os

import torch
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import \
    nnUNetTrainerNoMirroring
from nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerDiceLoss import nnUNetTrainerDiceLoss

from nnunetv2_gtv.allocator import keep_freed_memory
from nnunetv2_gtv.inference.sliding_window import batched_tiles_in_nnunet_validation, default_tiles_per_batch
from nnunetv2_gtv.planning.plans_check import assert_gtv_plans
from nnunetv2_gtv.training.lr_schedule import IterationStepLR
from nnunetv2_gtv.training.region_dataset import RegionCroppedDataset
from nnunetv2_gtv.training.sampling_regions import training_region_boxes


class nnUNetTrainerGTV25D(nnUNetTrainerDiceLoss):
    sampling_region = "global"
    lr_step_iterations = 10_000
    lr_gamma = 0.9
    validation_step_size = 0.5  # nnU-Net's, for the end-of-training validation
    training_precision = "float32"  # or "bfloat16": the training step under CPU autocast (study and speed benchmark)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        assert_gtv_plans(plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.weight_decay = 1e-5
        self.enable_deep_supervision = False
        self.num_iterations_per_epoch = 250
        self.num_epochs = 68
        if keep_freed_memory():
            self.print_to_log_file("memory: freed tensors stay in the process for reuse (nnunetv2_gtv.allocator)")

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step; with ``training_precision`` "bfloat16" on the CPU, forward and loss run under bfloat16
        autocast (nnU-Net autocasts to float16 on a GPU and not at all on the CPU)."""
        bfloat16 = self.training_precision == "bfloat16" and self.device.type == "cpu"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            return super().train_step(batch)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        scheduler = IterationStepLR(optimizer, self.initial_lr, self.num_iterations_per_epoch,
                                    self.lr_step_iterations, self.lr_gamma)
        return optimizer, scheduler

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's validation, its sliding window run several tiles per call (gtv-predict's fast path: the same
        tiles and weights; on the CPU a tile costs about half) at ``validation_step_size``."""
        with batched_tiles_in_nnunet_validation(self.validation_step_size, default_tiles_per_batch(self.device)):
            super().perform_actual_validation(save_probabilities)

    def get_tr_and_val_datasets(self):
        """Crop the training cases to this trainer's sampling region; validation stays whole, as in nnU-Net."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.sampling_region == "global":
            return dataset_tr, dataset_val
        labels = {int(v): k for k, v in self.dataset_json["labels"].items() if k not in ("background", "ignore")
                  and not isinstance(v, (list, tuple))}
        boxes = training_region_boxes(self.preprocessed_dataset_folder, dataset_tr, self.plans_manager.plans,
                                      self.configuration_manager.spacing, self.sampling_region,
                                      log=self.print_to_log_file, labels=labels)
        return RegionCroppedDataset(dataset_tr, boxes), dataset_val


class nnUNetTrainerGTV25DLocal(nnUNetTrainerGTV25D):
    sampling_region = "local"


class nnUNetTrainerGTV25DMiddle(nnUNetTrainerGTV25D):
    sampling_region = "middle"


class nnUNetTrainerGTV25DGlobal(nnUNetTrainerGTV25D):
    sampling_region = "global"


class _FiveEpochs:
    """nnU-Net's ``_5epochs`` habit: the full recipe, five epochs of 250 iterations (a quick GPU check)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # explicit signature: nnU-Net records the trainer's init kwargs by inspecting it
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class _Smoke(nnUNetTrainerNoMirroring):
    """CPU smoke runs and demos: 2 epochs of 5 iterations at batch 2, 1 validation iteration per epoch, and no
    mirroring (neither as augmentation nor as test-time augmentation, which would cost 8 forward passes per tile)."""

    smoke_batch_size = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 5
        self.num_val_iterations_per_epoch = 1

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.batch_size = min(self.batch_size, self.smoke_batch_size)


class _CpuRecipe(nnUNetTrainerNoMirroring):
    """``..._cpu``: a recipe that learns on 2 CPU cores in minutes (the demo's). The network, planner, loss,
    augmentation and sampling region are the paper's; what differs, and why:

    - 300 iterations (6 epochs of 50) at batch 4 instead of 17,000 at batch 16: a batch-16 step costs about
      5-8 s on 2 cores, the paper's length would take more than a day;
    - Adam lr 1e-3 instead of 1e-4: with a few hundred iterations the paper's rate barely moves the weights
      (the step decay of 0.9 every 10,000 iterations never triggers either way);
    - half of each batch centred on foreground (the authors' code; nnU-Net's default is a third), so that a
      short run sees the tumour often enough;
    - no mirroring, neither as augmentation nor at inference: test-time mirroring costs 8 network passes per
      tile on the CPU; 5 validation iterations per epoch instead of 50 (the pseudo Dice is a progress signal);
    - the end-of-training validation slides its window at step 1 (no overlap, gtv-predict's CPU default)
      instead of 0.5: on a clinical CT (107 x 500 x 500 voxels) step 0.5 means 2925 tiles per case, step 1 448.
    """

    cpu_batch_size = 4
    validation_step_size = 1.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.num_epochs = 6
        self.num_iterations_per_epoch = 50
        self.num_val_iterations_per_epoch = 5
        self.oversample_foreground_percent = 0.5

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.batch_size = min(self.batch_size, self.cpu_batch_size)


class _CpuRealCTRecipe(_CpuRecipe):
    """``..._cpuRealCT``: the CPU recipe that learns a target on real CT (``docs/real_ct.md``). Network, AM/PE,
    Adam, augmentation and sampling region are the paper's; it is meant for plans made at a coarser grid
    (``-overwrite_target_spacing 3 4 4``, see docs/real_ct.md). What differs from the paper's recipe, and why:

    - loss: nnU-Net's soft Dice + cross-entropy instead of the soft Dice alone. The Dice over the foreground
      barely punishes false positives in patches without target, and real CT has far more target-like soft tissue
      than a patch shows; the models of the Dice-only recipe marked 10-50x the target's volume;
    - lr: Adam from 1e-3 with nnU-Net's poly decay to 0 (the paper: 1e-4, x 0.9 every 10,000 iterations; in a
      few thousand iterations 1e-4 barely moves the weights, and the decay lets the last epochs settle);
    - 500 iterations (10 epochs of 50) at batch 8 instead of 17,000 at batch 16: about 20 minutes on 2 cores,
      end-of-training validation included (the learning curve of docs/real_ct.md shows where it flattens);
    - a third of each batch centred on foreground (nnU-Net's default; the paper's code: half), so most patches
      show the background the model must learn to leave alone;
    - as the ``_cpu`` recipe: no mirroring, 5 validation iterations per epoch, end-of-training validation at step 1.

    Every ``snapshot_every_epochs`` epochs the network weights are saved as ``checkpoint_epoch_<E>.pth`` (weights
    only, 17 MB; ``gtv-predict -chk``), so the Dice on held-out cases can be drawn against iterations.
    """

    cpu_batch_size = 8
    loss_kind = "dice_ce"  # or "dice" (the paper's); the learning study switches it on the instance
    lr_schedule = "poly"  # or "step" (the paper's)
    mirror_axes: tuple[int, ...] | None = None  # spatial axes (z, y, x) mirrored in training and at inference
    patch_size_zyx: tuple[int, int, int] | None = None  # None: the plans' patch
    snapshot_every_epochs = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 10
        self.oversample_foreground_percent = 0.33

    def _build_loss(self):
        if self.loss_kind == "dice_ce":
            return nnUNetTrainer._build_loss(self)
        return super()._build_loss()

    def on_train_start(self):
        """A ``patch_size_zyx`` of the recipe goes into the plans this model writes (its plans.json), so that
        nnUNetv2_predict and gtv-predict slide the same patch over a CT as training drew."""
        if self.patch_size_zyx is not None:
            for configuration in (self.plans_manager.plans["configurations"][self.configuration_name],
                                  self.configuration_manager.configuration):
                configuration["patch_size"] = list(self.patch_size_zyx)
        super().on_train_start()

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's, with the recipe's mirroring axes; with a patch of the recipe's own the augmentation stays
        in-plane ("dummy 2D", as nnU-Net chooses for the plans' 16 x 64 x 64) whatever the patch's shape, since the
        network convolves in-plane."""
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if self.patch_size_zyx is not None and not dummy_2d:
            dummy_2d = True
            rotation = (-math.pi, math.pi)  # nnU-Net's in-plane range for dummy 2D
            patch_size = self.configuration_manager.patch_size
            initial_patch_size = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
            initial_patch_size[0] = patch_size[0]
            self.print_to_log_file(f"in-plane augmentation for patch {list(patch_size)}, drawn as "
                                   f"{[int(v) for v in initial_patch_size]}")
        self.inference_allowed_mirroring_axes = self.mirror_axes
        return rotation, dummy_2d, initial_patch_size, self.mirror_axes

    def configure_optimizers(self):
        optimizer, scheduler = super().configure_optimizers()
        if self.lr_schedule == "poly":
            scheduler = PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
        return optimizer, scheduler

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


class nnUNetTrainerGTV25DLocal_5epochs(_FiveEpochs, nnUNetTrainerGTV25DLocal):
    pass


class nnUNetTrainerGTV25DMiddle_5epochs(_FiveEpochs, nnUNetTrainerGTV25DMiddle):
    pass


class nnUNetTrainerGTV25DGlobal_5epochs(_FiveEpochs, nnUNetTrainerGTV25DGlobal):
    pass


class nnUNetTrainerGTV25DLocal_smoke(_Smoke, nnUNetTrainerGTV25DLocal):
    pass


class nnUNetTrainerGTV25DMiddle_smoke(_Smoke, nnUNetTrainerGTV25DMiddle):
    pass


class nnUNetTrainerGTV25DGlobal_smoke(_Smoke, nnUNetTrainerGTV25DGlobal):
    pass


class nnUNetTrainerGTV25DLocal_cpu(_CpuRecipe, nnUNetTrainerGTV25DLocal):
    pass


class nnUNetTrainerGTV25DMiddle_cpu(_CpuRecipe, nnUNetTrainerGTV25DMiddle):
    pass


class nnUNetTrainerGTV25DGlobal_cpu(_CpuRecipe, nnUNetTrainerGTV25DGlobal):
    pass


class nnUNetTrainerGTV25DLocal_cpuRealCT(_CpuRealCTRecipe, nnUNetTrainerGTV25DLocal):
    pass


class nnUNetTrainerGTV25DMiddle_cpuRealCT(_CpuRealCTRecipe, nnUNetTrainerGTV25DMiddle):
    pass


class nnUNetTrainerGTV25DGlobal_cpuRealCT(_CpuRealCTRecipe, nnUNetTrainerGTV25DGlobal):
    pass
