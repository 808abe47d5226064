"""The network in its direct formulation: the reference that the fast CPU path is tested and timed against.

:func:`reference_copy` returns a deep copy of a network in which every :class:`SliceConv3d` runs as the plain
``nn.Conv3d``, every :class:`SliceConvTranspose3d` as ``nn.ConvTranspose3d`` and every :class:`ProjectExcite` as
eq. 1-5 written out (full-size ``Z``, then the excitation), all in ordinary contiguous memory. This is the
network as it was implemented before the slice-folding speed-up; parameters and state-dict keys are shared
with the fast version, so the two can be compared output for output.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from nnunetv2_gtv.network.blocks import ProjectExcite, SliceConv3d, SliceConvTranspose3d


class ReferenceProjectExcite(ProjectExcite):
    """Eq. 1-5 as written: ``Z`` = broadcast sum of the three mean projections, ``x * sigmoid(F2(relu(F1(Z))))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean(dim=(3, 4), keepdim=True) + x.mean(dim=(2, 4), keepdim=True) + x.mean(dim=(2, 3), keepdim=True)
        return x * self.excite(z)


_REFERENCE_CLASSES = {
    SliceConv3d: nn.Conv3d,
    SliceConvTranspose3d: nn.ConvTranspose3d,
    ProjectExcite: ReferenceProjectExcite,
}


def reference_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` computing the same function the direct way (see the module docstring)."""
    reference = copy.deepcopy(network)
    for module in reference.modules():
        module.__class__ = _REFERENCE_CLASSES.get(type(module), type(module))
    return reference
