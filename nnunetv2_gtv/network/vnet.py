"""3D V-Net (Milletari et al. 2016), the second baseline of Mei et al.'s Table 1.

What makes it a V-Net: every stage is residual (its convolutions' output is added to its input), all
convolutions are 5x5x5, down-sampling is a strided convolution (kernel = stride, channels doubled) instead of
max-pooling, up-sampling a transposed convolution, and the non-linearity is PReLU. As in Milletari's network,
the encoder stages have 1, 2, 3, 3 convolutions and the bottom 3; the decoder stages 3, 3, 2, 1, each working
on the concatenated (skip, up-sampled) features. One change to the 2016 network: a normalisation layer
(BatchNorm, as in the common PyTorch ports) after each convolution, since the paper's recipe trains every
Table 1 network from scratch with Adam at lr 1e-4.

Sizing for the paper's 16 x 64 x 64 patch: :func:`vnet_strides` pools each axis only while the feature map
keeps at least ``min_feature_size`` voxels along it, so 16 slices are halved twice and the in-plane size four
times (in-plane first, as the slices are three times thicker). The network follows nnU-Net's conventions:
``decoder.deep_supervision``, a list of logits (highest resolution first) with deep supervision on, an
``initialize`` method, and ``required_divisor`` (the input shape per axis must be a multiple of it).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunetv2_gtv.network.gtv_unet import resolve_class

VNET_CLASS_PATH = "nnunetv2_gtv.network.vnet.VNet3D"
VNET_FEATURES = (16, 32, 64, 128, 256)
VNET_ENCODER_CONVS = (1, 2, 3, 3, 3)  # the last entry is the bottom stage
VNET_DECODER_CONVS = (3, 3, 2, 1)  # deepest decoder stage first
VNET_KERNEL = 5
MIN_FEATURE_SIZE = 4


def vnet_strides(patch_size: Sequence[int], num_pool: int = len(VNET_FEATURES) - 1,
                 min_feature_size: int = MIN_FEATURE_SIZE) -> list[list[int]]:
    """Per-stage (z, y, x) down-sampling strides for ``patch_size``: ``[1, 1, 1]`` for the first stage, then
    ``num_pool`` stages that halve an axis only while it stays at least ``min_feature_size`` (and even).
    ValueError if an axis cannot be halved even once.

    The axes halved fewer times than ``num_pool`` are halved in the deepest stages: for 16 x 64 x 64 that is
    (1,2,2), (1,2,2), (2,2,2), (2,2,2), so the 3 mm slices are kept while the 1 mm pixels coarsen.
    """
    pools = []
    for axis, size in zip("zyx", patch_size):
        count = 0
        while count < num_pool and size % 2 == 0 and size // 2 >= min_feature_size:
            size //= 2
            count += 1
        if count == 0:
            raise ValueError(f"a V-Net down-samples every axis, but {axis} = {size} voxels cannot be halved to an even "
                             f"size of at least {min_feature_size}")
        pools.append(count)
    return [[1] * len(patch_size)] + [[2 if stage >= num_pool - count else 1 for count in pools]
                                      for stage in range(num_pool)]


def vnet_arch_kwargs(patch_size: Sequence[int], features_per_stage: Sequence[int] = VNET_FEATURES) -> dict:
    """JSON-serialisable keyword arguments of :class:`VNet3D` for a patch size (Milletari's layout)."""
    n_stages = len(features_per_stage)
    if n_stages != len(VNET_ENCODER_CONVS):
        raise ValueError(f"VNet3D has {len(VNET_ENCODER_CONVS)} stages; got {n_stages} features_per_stage")
    return {
        "features_per_stage": [int(f) for f in features_per_stage],
        "strides": vnet_strides(patch_size, n_stages - 1),
        "encoder_convs": list(VNET_ENCODER_CONVS),
        "decoder_convs": list(VNET_DECODER_CONVS),
        "kernel_size": VNET_KERNEL,
        "norm_op": "torch.nn.BatchNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "momentum": 0.1, "affine": True},
    }


class _ConvLayer(nn.Sequential):
    """Convolution (kernel = stride for re-sampling, else 'same' padding), normalisation, PReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 norm: tuple[type[nn.Module], dict], stride: Sequence[int] = (1, 1, 1), transposed: bool = False):
        norm_op, norm_kwargs = norm
        if transposed:
            conv = nn.ConvTranspose3d(in_channels, out_channels, tuple(stride), stride=tuple(stride))
        elif any(s > 1 for s in stride):
            conv = nn.Conv3d(in_channels, out_channels, tuple(stride), stride=tuple(stride))
        else:
            conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        super().__init__(conv, norm_op(out_channels, **norm_kwargs), nn.PReLU(out_channels))


class _ResidualConvs(nn.Module):
    """``num_convs`` 5x5x5 conv layers (``in_channels`` -> ``channels``, then ``channels``); the stage's input is
    added before the last PReLU (Milletari). A narrower input is repeated over the channels, as in his first stage."""

    def __init__(self, in_channels: int, channels: int, num_convs: int, kernel_size: int,
                 norm: tuple[type[nn.Module], dict]):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"a V-Net stage needs at least one convolution, got {num_convs}")
        layers = [_ConvLayer(in_channels if i == 0 else channels, channels, kernel_size, norm)
                  for i in range(num_convs)]
        *last_layer, self.activation = layers[-1]  # the last layer's PReLU acts on the residual sum
        self.convs = nn.Sequential(*layers[:-1], *last_layer)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if x.shape[1] == self.channels else x.repeat(
            1, -(-self.channels // x.shape[1]), 1, 1, 1)[:, :self.channels]
        return self.activation(self.convs(x) + residual)


class VNetEncoder(nn.Module):
    """A residual input stage, then (strided down-convolution, residual convolutions) per stage; returns each
    stage's output (the last one is the bottom)."""

    def __init__(self, input_channels: int, features: Sequence[int], strides: Sequence[Sequence[int]],
                 convs: Sequence[int], kernel_size: int, norm: tuple[type[nn.Module], dict]):
        super().__init__()
        self.first = _ResidualConvs(input_channels, features[0], convs[0], kernel_size, norm)
        self.down = nn.ModuleList(_ConvLayer(features[s - 1], features[s], kernel_size, norm, stride=strides[s])
                                  for s in range(1, len(features)))
        self.stages = nn.ModuleList(_ResidualConvs(features[s], features[s], convs[s], kernel_size, norm)
                                    for s in range(1, len(features)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.first(x)]
        for down, stage in zip(self.down, self.stages):
            skips.append(stage(down(skips[-1])))
        return skips


class VNetDecoder(nn.Module):
    """Per stage, deepest first: transposed convolution, concatenation with the skip, residual convolutions;
    a 1x1x1 head per stage (only the highest-resolution one is used unless ``deep_supervision``)."""

    def __init__(self, features: Sequence[int], strides: Sequence[Sequence[int]], convs: Sequence[int],
                 kernel_size: int, norm: tuple[type[nn.Module], dict], num_classes: int, deep_supervision: bool):
        super().__init__()
        levels = range(len(features) - 2, -1, -1)
        self.up = nn.ModuleList(_ConvLayer(features[s + 1] if s == len(features) - 2 else 2 * features[s + 1],
                                           features[s], kernel_size, norm, stride=strides[s + 1], transposed=True)
                                for s in levels)
        self.stages = nn.ModuleList(_ResidualConvs(2 * features[s], 2 * features[s], n, kernel_size, norm)
                                    for s, n in zip(levels, convs))
        self.seg_layers = nn.ModuleList(nn.Conv3d(2 * features[s], num_classes, 1) for s in levels)
        self.deep_supervision = deep_supervision

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for i, (up, stage) in enumerate(zip(self.up, self.stages)):
            x = stage(torch.cat((skips[-(i + 2)], up(x)), dim=1))
            if self.deep_supervision or i == last:
                outputs.append(self.seg_layers[i](x))
        return outputs[::-1] if self.deep_supervision else outputs[0]


class VNet3D(nn.Module):
    """3D V-Net; see the module docstring. Built by nnU-Net-style keyword arguments (:func:`vnet_arch_kwargs`).

    ``strides[s]``: the down-convolution before stage ``s`` (``strides[0]`` must be all ones);
    ``encoder_convs``: convolutions per encoder stage (last = bottom); ``decoder_convs``: per decoder stage,
    deepest first; ``norm_op``: a class or its dotted path.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, *,
                 features_per_stage: Sequence[int] = VNET_FEATURES,
                 strides: Sequence[Sequence[int]] | None = None,
                 encoder_convs: Sequence[int] = VNET_ENCODER_CONVS,
                 decoder_convs: Sequence[int] = VNET_DECODER_CONVS,
                 kernel_size: int = VNET_KERNEL,
                 norm_op: str | type[nn.Module] = nn.BatchNorm3d, norm_op_kwargs: dict | None = None) -> None:
        super().__init__()
        n_stages = len(features_per_stage)
        strides = vnet_strides((16, 64, 64), n_stages - 1) if strides is None else strides
        if len(strides) != n_stages or any(s != 1 for s in strides[0]):
            raise ValueError(f"VNet3D: strides needs {n_stages} (z, y, x) entries, the first all ones; got {strides}")
        if len(encoder_convs) != n_stages or len(decoder_convs) != n_stages - 1:
            raise ValueError(f"VNet3D: {n_stages} stages need {n_stages} encoder_convs and {n_stages - 1} "
                             f"decoder_convs; got {list(encoder_convs)} and {list(decoder_convs)}")
        if kernel_size % 2 == 0:
            raise ValueError(f"VNet3D: kernel_size must be odd, got {kernel_size}")
        norm = (resolve_class(norm_op, "norm_op"), dict(norm_op_kwargs or {}))
        self.num_classes = num_classes
        self.required_divisor = tuple(math.prod(s[axis] for s in strides) for axis in range(3))
        self.encoder = VNetEncoder(input_channels, features_per_stage, strides, encoder_convs, kernel_size, norm)
        self.decoder = VNetDecoder(features_per_stage, strides, decoder_convs, kernel_size, norm, num_classes,
                                   deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        spatial = tuple(x.shape[2:])
        if x.ndim != 5 or any(size % div for size, div in zip(spatial, self.required_divisor)):
            raise ValueError(f"VNet3D expects (batch, channels, z, y, x) with z, y, x multiples of "
                             f"{self.required_divisor}; got shape {tuple(x.shape)}")
        return self.decoder(self.encoder(x))

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He initialisation, as nnU-Net's networks (``network.apply(initialize)``)."""
        InitWeights_He(1e-2)(module)
