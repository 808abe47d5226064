"""Trainers for the network rows of Mei et al.'s Tables 1 and 2, each on the local sampling region.

One trainer per row, named ``nnUNetTrainerGTVLocal_<network>``::

    Table 1: 3D UNet            -> nnUNetTrainerGTVLocal_UNet3D
             3D VNet            -> nnUNetTrainerGTVLocal_VNet3D
             2.5D UNet          -> nnUNetTrainerGTVLocal_UNet25D
    Table 2: 2.5D UNet + PE     -> nnUNetTrainerGTVLocal_UNet25D_PE
             2.5D UNet + PE + AG -> nnUNetTrainerGTVLocal_UNet25D_PE_AG
             2.5D UNet + PE + AM -> nnUNetTrainerGTVLocal_UNet25D_PE_AM  (the paper's network, = nnUNetTrainerGTV25DLocal)

Table 3's rows are the sampling trainers ``nnUNetTrainerGTV25D{Local,Middle,Global}`` and their ensemble.
Everything but the network is the paper's recipe (``nnUNetTrainerGTV25DLocal``). The plans stay those of
``nnUNetPlannerGTV25D``; the trainer's ``build_network_architecture`` swaps the network, and nnU-Net's predictor
calls that same method of the trainer named in the checkpoint, so ``nnUNetv2_predict`` and ``gtv-predict`` load
these checkpoints with no extra flag. Each has a ``_smoke`` twin (2 epochs of 5 iterations at batch 2, for CPU
tests and demos).
"""
from __future__ import annotations

import math

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunetv2_gtv.network.gtv_unet import PAPER_VARIANTS, stage_kernel_sizes
from nnunetv2_gtv.network.vnet import VNET_CLASS_PATH, vnet_arch_kwargs
from nnunetv2_gtv.planning.plans_check import GTVPlansError
from nnunetv2_gtv.training.nnUNetTrainerGTV25D import nnUNetTrainerGTV25DLocal
from nnunetv2_gtv.training.short_runs import SmokeRecipe

VNET_ROW = "3D VNet"


def variant_architecture(paper_row: str, configuration_manager: ConfigurationManager) -> tuple[str, dict, list]:
    """(network class path, arch kwargs, kwargs needing import) of a table row, from the plans' GTV25DUNet entry.

    U-Net rows keep the plans' stages and features and take attention, PE and kernels from ``PAPER_VARIANTS``;
    the V-Net is sized for the plans' patch (:func:`nnunetv2_gtv.network.vnet.vnet_arch_kwargs`).
    """
    if paper_row == VNET_ROW:
        return VNET_CLASS_PATH, vnet_arch_kwargs(configuration_manager.patch_size), ["norm_op"]
    if paper_row not in PAPER_VARIANTS:
        raise ValueError(f"unknown paper row {paper_row!r}; known: {VNET_ROW!r}, {', '.join(map(repr, PAPER_VARIANTS))}")
    variant = PAPER_VARIANTS[paper_row]
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    kwargs.update(attention=variant["attention"], project_excite=variant["project_excite"],
                  kernel_sizes=stage_kernel_sizes(len(kwargs["features_per_stage"]), variant["kernel_pattern"]))
    return (configuration_manager.network_arch_class_name, kwargs,
            list(configuration_manager.network_arch_init_kwargs_req_import))


def required_divisor(arch_kwargs: dict) -> tuple[int, ...]:
    """Per axis, the product of the network's down-sampling strides: patch and tiles must be multiples of it."""
    return tuple(math.prod(stride[axis] for stride in arch_kwargs["strides"]) for axis in range(3))


class _PaperNetwork:
    """Mixin: the network of ``paper_row`` instead of the plans' default, for training and for inference."""

    paper_row: str

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        patch = list(self.configuration_manager.patch_size)
        refusal = (f"{type(self).__name__} ({self.paper_row}) cannot train on the plans' patch {patch} "
                   f"(configuration '{configuration}')")
        try:
            _, arch_kwargs, _ = variant_architecture(self.paper_row, self.configuration_manager)
        except ValueError as error:
            raise GTVPlansError(f"{refusal}: {error}") from None
        divisor = required_divisor(arch_kwargs)
        if any(size % div for size, div in zip(patch, divisor)):
            raise GTVPlansError(f"{refusal}: its down-sampling needs a multiple of {list(divisor)} per axis (z, y, x). "
                                "Re-plan with a patch that fits, or pick another variant")

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net calls this for training and, through the checkpoint's trainer name, for inference."""
        class_name, arch_kwargs, requires_import = variant_architecture(cls.paper_row, configuration_manager)
        return get_network_from_plans(class_name, arch_kwargs, requires_import, num_input_channels,
                                      num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)


class nnUNetTrainerGTVLocal_UNet3D(_PaperNetwork, nnUNetTrainerGTV25DLocal):
    paper_row = "3D UNet"


class nnUNetTrainerGTVLocal_VNet3D(_PaperNetwork, nnUNetTrainerGTV25DLocal):
    paper_row = VNET_ROW


class nnUNetTrainerGTVLocal_UNet25D(_PaperNetwork, nnUNetTrainerGTV25DLocal):
    paper_row = "2.5D UNet"


class nnUNetTrainerGTVLocal_UNet25D_PE(_PaperNetwork, nnUNetTrainerGTV25DLocal):
    paper_row = "2.5D UNet + PE"


class nnUNetTrainerGTVLocal_UNet25D_PE_AG(_PaperNetwork, nnUNetTrainerGTV25DLocal):
    paper_row = "2.5D UNet + PE + AG"


class nnUNetTrainerGTVLocal_UNet25D_PE_AM(_PaperNetwork, nnUNetTrainerGTV25DLocal):
    paper_row = "2.5D UNet + PE + AM"


class nnUNetTrainerGTVLocal_UNet3D_smoke(SmokeRecipe, nnUNetTrainerGTVLocal_UNet3D):
    pass


class nnUNetTrainerGTVLocal_VNet3D_smoke(SmokeRecipe, nnUNetTrainerGTVLocal_VNet3D):
    pass


class nnUNetTrainerGTVLocal_UNet25D_smoke(SmokeRecipe, nnUNetTrainerGTVLocal_UNet25D):
    pass


class nnUNetTrainerGTVLocal_UNet25D_PE_smoke(SmokeRecipe, nnUNetTrainerGTVLocal_UNet25D_PE):
    pass


class nnUNetTrainerGTVLocal_UNet25D_PE_AG_smoke(SmokeRecipe, nnUNetTrainerGTVLocal_UNet25D_PE_AG):
    pass


class nnUNetTrainerGTVLocal_UNet25D_PE_AM_smoke(SmokeRecipe, nnUNetTrainerGTVLocal_UNet25D_PE_AM):
    pass


# the paper's tables, row label -> trainer (Table 3: sampling scales; its last row is their 6-model ensemble)
TABLE_TRAINERS: dict[str, dict[str, str]] = {
    "Table 1": {"3D UNet": nnUNetTrainerGTVLocal_UNet3D.__name__, "3D VNet": nnUNetTrainerGTVLocal_VNet3D.__name__,
                "2.5D UNet": nnUNetTrainerGTVLocal_UNet25D.__name__},
    "Table 2": {"2.5D UNet + PE": nnUNetTrainerGTVLocal_UNet25D_PE.__name__,
                "2.5D UNet + PE + AG": nnUNetTrainerGTVLocal_UNet25D_PE_AG.__name__,
                "2.5D UNet + PE + AM": nnUNetTrainerGTVLocal_UNet25D_PE_AM.__name__},
    "Table 3": {"Local": "nnUNetTrainerGTV25DLocal", "Middle": "nnUNetTrainerGTV25DMiddle",
                "Global": "nnUNetTrainerGTV25DGlobal"},
}
