"""Inference settings of gtv-predict and the tile each model runs on.

The network's Project & Excite blocks average over the whole tile, so the tile is a setting that can change
the output, not only the speed: ``patch`` is the training patch (nnU-Net's sliding window), ``slab`` keeps the
patch's slices and covers the whole in-plane extent, ``whole`` is one pass over the image (or its region),
as the authors ran it. An explicit (z, y, x) tile is also accepted.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

TILE_MODES = ("patch", "slab", "whole")
# CPU precision: auto = bfloat16 where the CPU computes it natively (as nnU-Net autocasts to float16 on a GPU)
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class InferenceSettings:
    """How each model runs on a preprocessed CT. The defaults were chosen with benchmarks/inference_settings.py
    and benchmarks/predict_speed.py (README, gtv-predict): the training patch, no overlap, no mirroring,
    regions on.

    tile: one of TILE_MODES or an explicit (z, y, x) size.
    step_size: sliding-window step as a fraction of the tile (nnU-Net's -step_size, 1 = no overlap).
    mirroring: test-time mirroring along the axes the trainer allows (nnU-Net's default; off = --disable_tta).
    restrict_to_region: Local and Middle models predict only inside their sampling region (head, head and
        neck), Global models inside the body's bounding box (10 mm margin); outside it the fusion leaves them out
        (``FusionSettings.outside_region``), and their own saved predictions read background probability 1.
    bfloat16: on the CPU, run the networks under bfloat16 autocast (fast on CPUs with native bfloat16, e.g.
        AVX512-BF16 or AMX; slightly different numbers, see ``PRECISIONS``). On CUDA nnU-Net autocasts to float16.
    """

    tile: str | tuple[int, int, int] = "patch"
    step_size: float = 1.0
    mirroring: bool = False
    restrict_to_region: bool = True
    bfloat16: bool = False

    def __post_init__(self):
        if isinstance(self.tile, str):
            if self.tile not in TILE_MODES:
                raise ValueError(f"tile must be one of {TILE_MODES} or a size ZxYxX, got {self.tile!r}")
        else:
            tile = tuple(int(n) for n in self.tile)
            if len(tile) != 3 or min(tile) < 1:
                raise ValueError(f"an explicit tile needs three positive sizes (z, y, x), got {self.tile}")
            object.__setattr__(self, "tile", tile)
        if not 0 < self.step_size <= 1:
            raise ValueError(f"step size must be in (0, 1], got {self.step_size}")

    def record(self) -> dict:
        """JSON-ready, for summaries and --continue fingerprints."""
        record = asdict(self)
        record["tile"] = self.tile if isinstance(self.tile, str) else list(self.tile)
        return record


# sliding-window step when none is given: half a tile on a GPU (fused Dice +0.026 in the settings benchmark,
# docs/inference.md), none on the CPU, where half-tile steps cost 4-6x the time (six models > 180 s per clinical CT)
DEFAULT_STEP_SIZE = {"cpu": 1.0, "cuda": 0.5}


def default_step_size(device_type: str) -> float:
    return DEFAULT_STEP_SIZE.get(device_type, 1.0)


def set_threads(device_type: str) -> None:
    """Torch threads as nnUNetv2_predict sets them (every core on the CPU, one beside a GPU); on the CPU the tensors
    of a tile batch stay in the process for reuse (``nnunetv2_gtv.allocator``)."""
    import os

    import torch

    from nnunetv2_gtv.allocator import LARGEST_MMAP_THRESHOLD, keep_freed_memory

    if device_type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
        keep_freed_memory(LARGEST_MMAP_THRESHOLD)
    else:
        torch.set_num_threads(1)


def cpu_has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 convolutions run natively (elsewhere they are emulated, and slower)."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def cpu_description() -> str:
    """CPU model and its kind for speed figures: native bfloat16 (AVX512-BF16 / AMX), AVX-512 only, or neither."""
    import platform
    from pathlib import Path

    flags, model = set(), platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    kind = ("native bfloat16" if cpu_has_native_bfloat16()
            else "AVX-512, no native bfloat16" if any(f.startswith("avx512") for f in flags)
            else "no AVX-512, no native bfloat16")
    return f"{model} ({kind})"


def use_cpu_bfloat16(precision: str, device_type: str) -> bool:
    """Whether ``precision`` (one of PRECISIONS) means bfloat16 autocast on ``device_type``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device_type != "cpu" or precision == "float32":
        return False
    return precision == "bfloat16" or cpu_has_native_bfloat16()


def parse_tile(text: str) -> str | tuple[int, int, int]:
    """``patch`` / ``slab`` / ``whole`` or ``ZxYxX`` (e.g. ``16x128x128``)."""
    if text in TILE_MODES:
        return text
    parts = text.lower().split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"tile must be one of {', '.join(TILE_MODES)} or ZxYxX with positive integers, got {text!r}")
    return sizes


def _round_up(n: int, divisor: int) -> int:
    return int(math.ceil(n / divisor) * divisor)


def tile_shape(tile: str | tuple[int, int, int], patch_size: Sequence[int], image_shape: Sequence[int],
               divisor: Sequence[int]) -> tuple[int, ...]:
    """The tile for an image of ``image_shape`` (z, y, x); never smaller than the patch along an axis it spans.

    Sizes are rounded up to multiples of ``divisor`` (the network's pooling); nnU-Net pads the image with
    zeros where the tile is larger.
    """
    if tile == "patch":
        return tuple(int(p) for p in patch_size)
    if tile in ("slab", "whole"):
        whole_from = 1 if tile == "slab" else 0
        return tuple(int(p) if axis < whole_from else _round_up(max(int(p), int(n)), int(d))
                     for axis, (p, n, d) in enumerate(zip(patch_size, image_shape, divisor)))
    bad = [n for n, d in zip(tile, divisor) if n % d]
    if bad:
        raise ValueError(f"tile {tile} must be a multiple of {tuple(divisor)} per axis (the network's pooling)")
    return tuple(tile)
