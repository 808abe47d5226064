"""The 2.5D U-Net of Mei et al. with in-plane attention modules (AM) and Project & Excite blocks (PE).

Stage ``s`` of the encoder max-pools by ``strides[s]`` and applies two (conv, norm, non-linearity) layers;
the last stage is the bottom block. With the defaults this is the authors' network: 16/32/64/128 features in
the encoder and 256 in the bottom block, 1x3x3 kernels except 3x3x3 in the bottom block, three (1, 2, 2)
max-pools, a bottom block at the resolution of the fourth level (stride 1, so the first up-sampling is a
1x1x1 transposed convolution), a PE before every conv block but the first and an AM before the PE in the
bottom block and in every decoder block (8 PE, 5 AM). Other rows of the paper's Tables 1-2 come from
:func:`default_arch_kwargs` options (see :data:`PAPER_VARIANTS`).

The class follows nnU-Net's network conventions: it is built from JSON-serialisable ``arch_kwargs``
(:func:`plans_architecture`), has ``decoder.deep_supervision``, returns a list of logits (highest resolution
first) with deep supervision on and one tensor with it off, and has a He ``initialize`` method.
"""
from __future__ import annotations

import math
import pydoc
from typing import Sequence

import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunetv2_gtv.network.blocks import AttentionGate, AttentionModule, ProjectExcite, SliceConv3d, UpsampleBlock

NETWORK_CLASS_PATH = "nnunetv2_gtv.network.gtv_unet.GTV25DUNet"
KW_REQUIRES_IMPORT = ("norm_op", "nonlin")
ATTENTION_TYPES = ("am", "ag", "none")
KERNEL_PATTERNS = ("2.5d", "3d")
PAPER_FEATURES = (16, 32, 64, 128, 256)
CONVS_PER_BLOCK = 2
NORM_KWARGS = {"eps": 1e-5, "momentum": 0.1, "affine": True}
NONLIN_KWARGS = {"negative_slope": 0.01, "inplace": True}

# Arguments of default_arch_kwargs for the network rows of the paper's Table 1 (except 3D VNet) and Table 2.
PAPER_VARIANTS: dict[str, dict] = {
    "3D UNet": {"kernel_pattern": "3d", "attention": "none", "project_excite": False},
    "2.5D UNet": {"kernel_pattern": "2.5d", "attention": "none", "project_excite": False},
    "2.5D UNet + PE": {"kernel_pattern": "2.5d", "attention": "none", "project_excite": True},
    "2.5D UNet + PE + AG": {"kernel_pattern": "2.5d", "attention": "ag", "project_excite": True},
    "2.5D UNet + PE + AM": {"kernel_pattern": "2.5d", "attention": "am", "project_excite": True},
}


def _dotted_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_class(value: str | type, argument: str) -> type:
    """Accept a class or its dotted import path (as nnU-Net plans store class-valued options)."""
    if not isinstance(value, str):
        return value
    located = pydoc.locate(value)
    if not isinstance(located, type):
        raise ValueError(f"GTV25DUNet: {argument}={value!r} does not name an importable class")
    return located


def stage_kernel_sizes(n_stages: int, kernel_pattern: str = "2.5d") -> list[list[int]]:
    """Conv kernel per stage: "2.5d" = 1x3x3 everywhere but 3x3x3 in the bottom block; "3d" = all 3x3x3."""
    if kernel_pattern not in KERNEL_PATTERNS:
        raise ValueError(f"kernel_pattern must be one of {KERNEL_PATTERNS}, got {kernel_pattern!r}")
    if kernel_pattern == "3d":
        return [[3, 3, 3] for _ in range(n_stages)]
    return [[1, 3, 3] for _ in range(n_stages - 1)] + [[3, 3, 3]]


def stage_strides(n_stages: int) -> list[list[int]]:
    """Pooling per stage: none before the first stage and the bottom block, in-plane (1, 2, 2) in between."""
    if n_stages < 2:
        raise ValueError(f"the network needs at least 2 stages, got {n_stages}")
    return [[1, 1, 1]] + [[1, 2, 2] for _ in range(n_stages - 2)] + [[1, 1, 1]]


def default_arch_kwargs(*, attention: str = "am", project_excite: bool = True, kernel_pattern: str = "2.5d",
                        features_per_stage: Sequence[int] | None = None, num_pool: int | None = None) -> dict:
    """JSON-serialisable ``arch_kwargs`` for :class:`GTV25DUNet`; the defaults give the paper's network.

    ``num_pool`` is the number of in-plane down-samplings; with ``features_per_stage`` unset, features start
    at 16 and double per stage (``num_pool + 1`` encoder levels plus the bottom block). Given both, they must
    agree (``len(features_per_stage) == num_pool + 2``).
    """
    if features_per_stage is None:
        num_pool = 3 if num_pool is None else num_pool
        features_per_stage = [PAPER_FEATURES[0] * 2**i for i in range(num_pool + 2)]
    elif num_pool is not None and len(features_per_stage) != num_pool + 2:
        raise ValueError(f"features_per_stage has {len(features_per_stage)} entries; num_pool={num_pool} "
                         f"needs {num_pool + 2} (one per encoder level plus the bottom block)")
    n_stages = len(features_per_stage)
    return {
        "features_per_stage": [int(f) for f in features_per_stage],
        "kernel_sizes": stage_kernel_sizes(n_stages, kernel_pattern),
        "strides": stage_strides(n_stages),
        "attention": attention,
        "project_excite": project_excite,
        "pe_reduction": 2,
        "conv_bias": True,
        "norm_op": _dotted_name(nn.BatchNorm3d),
        "norm_op_kwargs": dict(NORM_KWARGS),
        "nonlin": _dotted_name(nn.LeakyReLU),
        "nonlin_kwargs": dict(NONLIN_KWARGS),
    }


def plans_architecture(arch_kwargs: dict | None = None) -> dict:
    """The ``configurations.<name>.architecture`` entry of an nnU-Net plans file for this network."""
    return {
        "network_class_name": NETWORK_CLASS_PATH,
        "arch_kwargs": default_arch_kwargs() if arch_kwargs is None else arch_kwargs,
        "_kw_requires_import": list(KW_REQUIRES_IMPORT),
    }


class _EncoderStage(nn.Module):
    """Max-pool, optional AM, optional PE, then two (conv, norm, non-linearity) layers."""

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                 attention: bool, project_excite: bool, pe_reduction: int, conv_kwargs: dict) -> None:
        super().__init__()
        pooled = any(s > 1 for s in stride)
        self.pool = nn.MaxPool3d(tuple(stride), stride=tuple(stride)) if pooled else nn.Identity()
        self.attention = AttentionModule(channels=in_channels) if attention else nn.Identity()
        self.project_excite = (ProjectExcite(channels=in_channels, reduction=pe_reduction) if project_excite
                               else nn.Identity())
        self.convs = StackedConvBlocks(CONVS_PER_BLOCK, SliceConv3d, in_channels, out_channels, list(kernel_size), 1,
                                       **conv_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(self.project_excite(self.attention(self.pool(x))))


class _DecoderStage(nn.Module):
    """Up-sample, (gate the skip,) concatenate (skip, up), optional AM and PE, then two conv layers."""

    def __init__(self, *, below_channels: int, channels: int, kernel_size: Sequence[int], up_stride: Sequence[int],
                 attention: str, project_excite: bool, pe_reduction: int, conv_kwargs: dict) -> None:
        super().__init__()
        self.upsample = UpsampleBlock(in_channels=below_channels, out_channels=channels, stride=up_stride,
                                      **conv_kwargs)
        self.gate = AttentionGate(skip_channels=channels, gate_channels=channels) if attention == "ag" else None
        self.attention = AttentionModule(channels=2 * channels) if attention == "am" else nn.Identity()
        self.project_excite = (ProjectExcite(channels=2 * channels, reduction=pe_reduction) if project_excite
                               else nn.Identity())
        self.convs = StackedConvBlocks(CONVS_PER_BLOCK, SliceConv3d, 2 * channels, channels, list(kernel_size), 1,
                                       **conv_kwargs)

    def forward(self, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.upsample(below)
        if self.gate is not None:
            skip = self.gate(skip, up)
        x = torch.cat((skip, up), dim=1)
        return self.convs(self.project_excite(self.attention(x)))


class GTV25DEncoder(nn.Module):
    """Encoder stages; returns the output of every stage (the last one is the bottom block)."""

    def __init__(self, stages: Sequence[_EncoderStage]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class GTV25DDecoder(nn.Module):
    """Decoder stages (deepest first) with one segmentation head each.

    The head of the highest-resolution stage is the paper's output convolution; the others are 1x1x1 heads
    used only for deep supervision. They exist either way so that checkpoints load whatever the setting.
    """

    def __init__(self, stages: Sequence[_DecoderStage], seg_layers: Sequence[nn.Module],
                 deep_supervision: bool) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)
        self.deep_supervision = deep_supervision

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            x = stage(x, skips[-(i + 2)])
            if self.deep_supervision or i == last:
                outputs.append(self.seg_layers[i](x))
        return outputs[::-1] if self.deep_supervision else outputs[0]


class GTV25DUNet(nn.Module):
    """2.5D U-Net with AM and PE (Mei et al.); keyword defaults give the authors' network.

    ``features_per_stage``: channels per encoder stage, the last one being the bottom block.
    ``kernel_sizes`` / ``strides``: per stage, (z, y, x); default :func:`stage_kernel_sizes` ("2.5d") and
    :func:`stage_strides`. ``strides[s]`` is the max-pool before stage ``s`` and the transposed convolution
    that brings stage ``s`` back up; ``strides[0]`` must be all ones. ``attention``: "am" (AM in the bottom
    block and every decoder block), "ag" (attention gates on the skip connections) or "none".
    ``project_excite``: PE before every conv block but the first, reduction ``pe_reduction``.
    ``norm_op`` / ``nonlin``: classes or dotted import paths.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, *,
                 features_per_stage: Sequence[int] = PAPER_FEATURES,
                 kernel_sizes: Sequence[Sequence[int]] | None = None,
                 strides: Sequence[Sequence[int]] | None = None,
                 attention: str = "am", project_excite: bool = True, pe_reduction: int = 2,
                 conv_bias: bool = True, norm_op: str | type[nn.Module] = nn.BatchNorm3d,
                 norm_op_kwargs: dict | None = None, nonlin: str | type[nn.Module] = nn.LeakyReLU,
                 nonlin_kwargs: dict | None = None) -> None:
        super().__init__()
        n_stages = len(features_per_stage)
        kernel_sizes = stage_kernel_sizes(n_stages) if kernel_sizes is None else kernel_sizes
        strides = stage_strides(n_stages) if strides is None else strides
        self._validate(n_stages, kernel_sizes, strides, attention)
        conv_kwargs = {
            "conv_bias": conv_bias,
            "norm_op": resolve_class(norm_op, "norm_op"),
            "norm_op_kwargs": dict(NORM_KWARGS if norm_op_kwargs is None else norm_op_kwargs),
            "nonlin": resolve_class(nonlin, "nonlin"),
            "nonlin_kwargs": dict(NONLIN_KWARGS if nonlin_kwargs is None else nonlin_kwargs),
        }
        self.num_classes = num_classes
        self.required_divisor = tuple(math.prod(s[axis] for s in strides) for axis in range(3))

        bottom = n_stages - 1
        encoder_stages = [
            _EncoderStage(in_channels=input_channels if s == 0 else features_per_stage[s - 1],
                          out_channels=features_per_stage[s], kernel_size=kernel_sizes[s], stride=strides[s],
                          attention=attention == "am" and s == bottom, project_excite=project_excite and s > 0,
                          pe_reduction=pe_reduction, conv_kwargs=conv_kwargs)
            for s in range(n_stages)
        ]
        decoder_levels = range(bottom - 1, -1, -1)
        decoder_stages = [
            _DecoderStage(below_channels=features_per_stage[s + 1], channels=features_per_stage[s],
                          kernel_size=kernel_sizes[s], up_stride=strides[s + 1], attention=attention,
                          project_excite=project_excite, pe_reduction=pe_reduction, conv_kwargs=conv_kwargs)
            for s in decoder_levels
        ]
        seg_layers = [
            SliceConv3d(features_per_stage[s], num_classes, kernel_size=tuple(kernel_sizes[0]) if s == 0 else 1,
                      padding="same")
            for s in decoder_levels
        ]
        self.encoder = GTV25DEncoder(encoder_stages)
        self.decoder = GTV25DDecoder(decoder_stages, seg_layers, deep_supervision)

    @staticmethod
    def _validate(n_stages: int, kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                  attention: str) -> None:
        if n_stages < 2:
            raise ValueError(f"GTV25DUNet needs at least 2 stages (features_per_stage), got {n_stages}")
        if attention not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {attention!r}")
        for name, value in (("kernel_sizes", kernel_sizes), ("strides", strides)):
            if len(value) != n_stages or any(len(v) != 3 for v in value):
                raise ValueError(f"{name} needs one (z, y, x) entry per stage ({n_stages} stages), got {value}")
        if any(k % 2 == 0 for kernel in kernel_sizes for k in kernel):
            raise ValueError(f"kernel sizes must be odd so that convolutions keep the size, got {kernel_sizes}")
        if any(s != 1 for s in strides[0]):
            raise ValueError(f"strides[0] must be [1, 1, 1] (no pooling before the first stage), got {strides[0]}")
        if any(s < 1 for stride in strides for s in stride):
            raise ValueError(f"strides must be positive, got {strides}")

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"GTV25DUNet expects a 5D tensor (batch, channels, z, y, x), got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        if any(size % div for size, div in zip(spatial, self.required_divisor)):
            raise ValueError(f"GTV25DUNet: spatial input shape (z, y, x) = {spatial} must be divisible by "
                             f"{self.required_divisor} per axis (the product of the pooling strides)")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if not torch.jit.is_tracing() and not torch.jit.is_scripting():
            self._check_input(x)
        # the slice-folding convolutions leave tensors in channels_last_3d memory; hand out ordinary tensors
        outputs = self.decoder(self.encoder(x))
        if isinstance(outputs, list):
            return [output.contiguous() for output in outputs]
        return outputs.contiguous()

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He initialisation as nnU-Net's default networks use it (applied by ``network.apply(initialize)``)."""
        InitWeights_He(1e-2)(module)
