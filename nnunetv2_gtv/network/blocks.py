"""Building blocks of the 2.5D GTV network (Mei et al.): attention module, Project & Excite, attention gate.

All blocks work on 5D tensors laid out as (batch, channels, D, H, W) with D the slice axis.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

IN_PLANE_KERNEL = (1, 3, 3)


def _same_padding(kernel_size: Sequence[int]) -> tuple[int, ...]:
    return tuple((k - 1) // 2 for k in kernel_size)


class AttentionModule(nn.Module):
    """In-plane spatial attention module AM (Mei et al., Fig. 4).

    ``a = sigmoid(conv2(relu(conv1(x))))`` with ``conv1``: C -> C/2 and ``conv2``: C/2 -> 1, both 1x3x3 and
    without normalisation; the output is ``x * a + x`` (attention with a residual connection). The map
    ``a`` (one channel, values in [0, 1]) is the output of the ``attention_map`` submodule, so a forward
    hook on it retrieves the map for visualisation.
    """

    def __init__(self, *, channels: int, hidden_channels: int | None = None,
                 kernel_size: Sequence[int] = IN_PLANE_KERNEL) -> None:
        super().__init__()
        hidden_channels = channels // 2 if hidden_channels is None else hidden_channels
        if hidden_channels < 1:
            raise ValueError(f"AttentionModule needs at least 2 input channels, got {channels}")
        padding = _same_padding(kernel_size)
        self.attention_map = nn.Sequential(
            nn.Conv3d(channels, hidden_channels, kernel_size, padding=padding),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden_channels, 1, kernel_size, padding=padding),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x) + x


class ProjectExcite(nn.Module):
    """Project & Excite block PE (Rickmann et al. 2019; Mei et al., Fig. 5 and eq. 1-5).

    Projection (eq. 1-3): per channel, average ``x`` over each pair of axes, giving maps of shape D x 1 x 1,
    1 x H x 1 and 1 x 1 x W; broadcasting them to D x H x W and adding gives ``Z``. Excitation (eq. 4):
    ``Z_hat = sigmoid(F2(relu(F1(Z))))`` with 1x1x1 convolutions F1: C -> C/d and F2: C/d -> C. Output
    (eq. 5): ``x * Z_hat``, without a residual connection. The projections average over whatever extent the
    input has, so the output depends on the patch (tile) size.
    """

    def __init__(self, *, channels: int, reduction: int = 2) -> None:
        super().__init__()
        reduced = channels // reduction
        if reduced < 1:
            raise ValueError(f"ProjectExcite: {channels} channels cannot be reduced by a factor {reduction}")
        self.excite = nn.Sequential(
            nn.Conv3d(channels, reduced, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(reduced, channels, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean(dim=(3, 4), keepdim=True) + x.mean(dim=(2, 4), keepdim=True) + x.mean(dim=(2, 3), keepdim=True)
        return x * self.excite(z)


class AttentionGate(nn.Module):
    """Additive attention gate AG (Oktay et al. 2018, eq. 1-2), used for the paper's Table 2 comparison.

    ``alpha = sigmoid(psi(relu(W_x x + W_g g + b_g)) + b_psi)`` with 1x1x1 convolutions ``W_x`` (skip
    features ``x``, no bias), ``W_g`` (gating signal ``g``) and ``psi`` (to one channel); the output is
    ``x * alpha``. Here ``g`` is the decoder feature map after up-sampling, so ``x`` and ``g`` share one
    grid and the gate needs no resampling. ``alpha`` is the output of the ``coefficients`` submodule.
    """

    def __init__(self, *, skip_channels: int, gate_channels: int, inter_channels: int | None = None) -> None:
        super().__init__()
        inter_channels = max(1, skip_channels // 2) if inter_channels is None else inter_channels
        self.w_x = nn.Conv3d(skip_channels, inter_channels, kernel_size=1, bias=False)
        self.w_g = nn.Conv3d(gate_channels, inter_channels, kernel_size=1)
        self.coefficients = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv3d(inter_channels, 1, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * self.coefficients(self.w_x(x) + self.w_g(g))


class UpsampleBlock(nn.Module):
    """Transposed convolution (kernel = stride) followed by normalisation and non-linearity (authors' code)."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: Sequence[int], conv_bias: bool,
                 norm_op: type[nn.Module], norm_op_kwargs: dict, nonlin: type[nn.Module],
                 nonlin_kwargs: dict) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.ConvTranspose3d(in_channels, out_channels, tuple(stride), stride=tuple(stride), bias=conv_bias),
            norm_op(out_channels, **norm_op_kwargs),
            nonlin(**nonlin_kwargs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
