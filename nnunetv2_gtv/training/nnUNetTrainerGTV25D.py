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

Shorter recipes of the same trainers live beside this module: ``short_runs`` (``_5epochs``, ``_smoke``) and
``cpu_recipes`` (``_cpu``, the demo's; ``_cpuRealCT``, real CT on a CPU budget).
"""
from __future__ import annotations


import torch
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
