"""Short runs of the paper's recipe (nnU-Net's ``_5epochs`` habit) and CPU smoke runs (``_smoke``), for each sampling
region."""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import \
    nnUNetTrainerNoMirroring

from nnunetv2_gtv.training.nnUNetTrainerGTV25D import nnUNetTrainerGTV25DGlobal, nnUNetTrainerGTV25DLocal, \
    nnUNetTrainerGTV25DMiddle


class FiveEpochsRecipe:
    """nnU-Net's ``_5epochs`` habit: the full recipe, five epochs of 250 iterations (a quick GPU check)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # explicit signature: nnU-Net records the trainer's init kwargs by inspecting it
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class SmokeRecipe(nnUNetTrainerNoMirroring):
    """CPU smoke runs and demos: 2 epochs of 5 iterations at batch 2, 1 validation iteration per epoch, no
    mirroring (neither as augmentation nor as test-time augmentation, which would cost 8 forward passes per tile),
    and the end-of-training validation's window sliding at step 1 (no overlap, as the ``_cpu`` recipe's)."""

    smoke_batch_size = 2
    validation_step_size = 1.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 5
        self.num_val_iterations_per_epoch = 1

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.batch_size = min(self.batch_size, self.smoke_batch_size)


class nnUNetTrainerGTV25DLocal_5epochs(FiveEpochsRecipe, nnUNetTrainerGTV25DLocal):
    pass

class nnUNetTrainerGTV25DMiddle_5epochs(FiveEpochsRecipe, nnUNetTrainerGTV25DMiddle):
    pass

class nnUNetTrainerGTV25DGlobal_5epochs(FiveEpochsRecipe, nnUNetTrainerGTV25DGlobal):
    pass

class nnUNetTrainerGTV25DLocal_smoke(SmokeRecipe, nnUNetTrainerGTV25DLocal):
    pass

class nnUNetTrainerGTV25DMiddle_smoke(SmokeRecipe, nnUNetTrainerGTV25DMiddle):
    pass

class nnUNetTrainerGTV25DGlobal_smoke(SmokeRecipe, nnUNetTrainerGTV25DGlobal):
    pass
