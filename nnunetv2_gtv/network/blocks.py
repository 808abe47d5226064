"""Building blocks of the 2.5D GTV network (Mei et al.): attention module, Project & Excite, attention gate.

All blocks work on 5D tensors laid out as (batch, channels, D, H, W) with D the slice axis.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IN_PLANE_KERNEL = (1, 3, 3)


def _same_padding(kernel_size: Sequence[int]) -> tuple[int, ...]:
    return tuple((k - 1) // 2 for k in kernel_size)


def _fold_slices(x: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) -> (N * D, C, H, W) in channels_last memory; a view when ``x`` is channels_last_3d."""
    n, c, d, h, w = x.shape
    return x.transpose(1, 2).reshape(n * d, c, h, w).contiguous(memory_format=torch.channels_last)


def _unfold_slices(y: torch.Tensor, depth: int) -> torch.Tensor:
    """Inverse of :func:`_fold_slices`: a channels_last_3d view of shape (N, C, D, H, W), no copy."""
    nd, c, h, w = y.shape
    return y.reshape(nd // depth, depth, c, h, w).transpose(1, 2)


class SliceConv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs as a 2D convolution over the slices when it never mixes slices.

    A convolution whose kernel, stride and dilation are 1 along z and which does not pad z (every 1x3x3 and
    1x1x1 convolution of the 2.5D network) equals a ``Conv2d`` with the same weights (z squeezed) applied to
    each slice, i.e. to the tensor with depth folded into the batch. On the CPU, oneDNN runs that 2D
    convolution in channels_last memory about twice as fast as the 3D one (forward and backward). Tensors then
    stay in channels_last_3d memory, so folding and unfolding are views. Parameters, state-dict keys and
    outputs (up to float32 rounding) are those of ``nn.Conv3d``; other kernels run as ``nn.Conv3d``.
    """

    def _folds(self) -> bool:
        padding_z = 0 if isinstance(self.padding, str) else self.padding[0]  # "same"/"valid": none for kernel 1
        return (self.kernel_size[0] == 1 and self.stride[0] == 1 and self.dilation[0] == 1 and padding_z == 0
                and self.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._folds():
            return super().forward(x.contiguous(memory_format=torch.channels_last_3d))
        padding = self.padding if isinstance(self.padding, str) else self.padding[1:]
        y = F.conv2d(_fold_slices(x), self.weight.squeeze(2), self.bias, self.stride[1:], padding,
                     self.dilation[1:], self.groups)
        return _unfold_slices(y, x.shape[2])


class SliceConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` run as a 2D transposed convolution over the slices when it does not act along z
    (kernel, stride and dilation 1 and no padding along z), as :class:`SliceConv3d` does for convolutions."""

    def _folds(self) -> bool:
        return (self.kernel_size[0] == 1 and self.stride[0] == 1 and self.dilation[0] == 1
                and self.padding[0] == 0 and self.output_padding[0] == 0)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None or not self._folds():
            return super().forward(x.contiguous(memory_format=torch.channels_last_3d), output_size)
        y = F.conv_transpose2d(_fold_slices(x), self.weight.squeeze(2), self.bias, self.stride[1:],
                               self.padding[1:], self.output_padding[1:], self.groups, self.dilation[1:])
        return _unfold_slices(y, x.shape[2])


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
            SliceConv3d(channels, hidden_channels, kernel_size, padding=padding),
            nn.ReLU(inplace=True),
            SliceConv3d(hidden_channels, 1, kernel_size, padding=padding),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x, x, self.attention_map(x))  # x * a + x in one pass


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
            SliceConv3d(channels, reduced, kernel_size=1),
            nn.ReLU(inplace=True),
            SliceConv3d(reduced, channels, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F1 is linear, so F1(Z) = W1 z_D + W1 z_H + W1 z_W + b1: applying it to the three small projections
        # before broadcasting (channels last, so the full-size sum lands in channels_last_3d memory) gives the
        # same result as eq. 4 without a full-size Z and a full-size F1; b1 rides on the smallest term.
        # Eq. 1-3 are read from x as (N, D, H, W, C), contiguous in channels_last_3d memory: reducing its
        # middle axes is a contiguous pass (summing the strided (N, C, D, H, W) view over two axes was about 15x
        # slower), and the sum over W serves both z_D and z_H.
        squeeze, rest = self.excite[0], self.excite[1:]
        d, h, w = x.shape[2:]
        weight = squeeze.weight.flatten(1)
        slices_last = x.permute(0, 2, 3, 4, 1)
        over_w = slices_last.sum(dim=3)  # (N, D, H, C)
        z_d = F.linear(over_w.sum(dim=2) / (h * w), weight, squeeze.bias)  # (N, D, C / d)
        z_h = F.linear(over_w.sum(dim=1) / (d * w), weight)  # (N, H, C / d)
        z_w = F.linear(slices_last.sum(dim=(1, 2)) / (d * h), weight)  # (N, W, C / d)
        z = z_d[:, :, None, None] + z_h[:, None, :, None] + z_w[:, None, None]  # (N, D, H, W, C / d)
        return x * rest(z.permute(0, 4, 1, 2, 3))


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
        self.w_x = SliceConv3d(skip_channels, inter_channels, kernel_size=1, bias=False)
        self.w_g = SliceConv3d(gate_channels, inter_channels, kernel_size=1)
        self.coefficients = nn.Sequential(
            nn.ReLU(inplace=True),
            SliceConv3d(inter_channels, 1, kernel_size=1),
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
            SliceConvTranspose3d(in_channels, out_channels, tuple(stride), stride=tuple(stride), bias=conv_bias),
            norm_op(out_channels, **norm_op_kwargs),
            nonlin(**nonlin_kwargs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
