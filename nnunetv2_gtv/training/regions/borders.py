"""The boxes: where each region ends (landmark, area profile or a fallback to the next larger region)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from nnunetv2_gtv.training.regions.body import body_mask
from nnunetv2_gtv.training.regions.landmarks import (
    anterior_bone_profile, detect_levels, mandible_and_lung_levels, plausible_levels, smoothed_profile,
)
from nnunetv2_gtv.training.regions.records import REGION_NAMES, Box, CaseRegions, Levels, RegionSettings


def _inplane_box(mask_sup_first: np.ndarray, z_range: tuple[int, int], strides: Sequence[int],
                 shape: Sequence[int], margins: Sequence[int]) -> list[tuple[int, int]]:
    """Bounding box of the body in slices z_range (on a grid subsampled by ``strides``) in full-grid voxels,
    plus margins, clipped to the image of in-plane ``shape``; the whole plane if no body is there."""
    part = mask_sup_first[z_range[0]:z_range[1]]
    ranges = []
    for axis, stride, n, margin in zip((1, 2), strides, shape, margins):
        present = np.nonzero(part.any(axis=tuple(a for a in (0, 1, 2) if a != axis)))[0]
        if present.size == 0:
            ranges.append((0, n))
        else:
            ranges.append((max(0, int(present[0]) * stride - margin),
                           min(n, (int(present[-1]) + 1) * stride + margin)))
    return ranges


@dataclass(frozen=True)
class _Ends:
    """Exclusive inferior ends (superior-first slice indices) of local and middle, with how each was found."""

    local: int
    middle: int
    rules: dict[str, str]
    fallbacks: tuple[str, ...]
    warnings: tuple[str, ...]


def shoulders_below(profile: np.ndarray, start: int, settings: RegionSettings = RegionSettings()) -> int | None:
    """First slice below the narrowest level under ``start`` (the neck below the mandible) where the smoothed area
    reaches shoulder_to_neck_ratio times the neck's; None if it never does."""
    below = np.asarray(profile[start:], float)
    if not (below > 0).any():
        return None
    neck = int(np.argmin(np.where(below > 0, below, np.inf)))
    rise = np.nonzero(below[neck + 1:] >= settings.shoulder_to_neck_ratio * below[neck])[0]
    return start + neck + 1 + int(rise[0]) if rise.size else None


def _region_ends(levels: Levels, profile: np.ndarray, mandible: int | None, lungs: int | None, first_body: int,
                 body_end: int, slice_mm: float, settings: RegionSettings) -> _Ends:
    """Where local and middle end: bone and air landmarks first, the area profile second, else the next larger
    region (never a smaller one). Middle always holds local."""
    rules, fallbacks, warnings = {}, [], []
    shoulders = levels.shoulders if mandible is None else shoulders_below(profile, mandible + 1, settings)
    if lungs is not None:
        middle = lungs + int(np.ceil(settings.middle_margin_mm / slice_mm))
        rules["middle"] = f"the lung apex + {settings.middle_margin_mm:g} mm"
    elif shoulders is not None:
        middle, rules["middle"] = shoulders, "the shoulders (area profile; no lung in the scan)"
    else:
        middle = body_end
        fallbacks.append("middle")
        below = "below the head (scan ends in the neck, or shows no head?)" if levels.neck is not None or \
            mandible is not None else "and no neck narrowing below the head (head-only scan?)"
        warnings.append(f"no lung and no shoulders {below}: middle covers the whole body")
    if mandible is not None:
        local = mandible + 1 + int(np.ceil(settings.head_margin_mm / slice_mm))
        rules["local"] = f"the mandible + {settings.head_margin_mm:g} mm"
    elif levels.head_end is not None:
        local = levels.head_end + int(np.ceil(settings.z_margin_mm / slice_mm))
        rules["local"] = f"the head's narrowing + {settings.z_margin_mm:g} mm (area profile; no bone landmark)"
    else:
        local = middle
        fallbacks.append("local")
        warnings.append("no mandible and no neck narrowing below the head (head-only scan, bone hidden by the "
                        "normalisation, or unusual anatomy): local covers the middle region")
    if "local" not in fallbacks and (local - first_body) * slice_mm < settings.short_head_mm:
        warnings.append(f"head region only {(local - first_body) * slice_mm:.0f} mm long (scan starts low, a "
                        f"masked top or an odd profile): local covers the middle region")
        local = middle
        fallbacks.append("local")
    local, middle = min(local, body_end), min(middle, body_end)
    if local > middle:  # never for a fallen-back middle: that is the whole body
        middle = local
        rules["middle"] += ", lowered to hold local"
    return _Ends(local, middle, rules, tuple(fallbacks), tuple(warnings))


def compute_regions(image_zyx: np.ndarray, spacing_zyx: Sequence[float], superior_axis: int,
                    superior_is_high: bool, body_threshold: float, settings: RegionSettings = RegionSettings(),
                    bone_threshold: float | None = None, anterior: tuple[int, bool] | None = None,
                    air_threshold: float | None = None) -> CaseRegions:
    """Local, middle and global boxes of one image (any intensity units; thresholds in those units).

    ``anterior``: (array axis, anterior at its high end), see :func:`anterior_axis_from_direction`. The mandible
    is looked for only when both it and ``bone_threshold`` are given, the lungs only when ``air_threshold`` is
    (for a CT in HU both are :data:`BONE_THRESHOLD_HU` and :data:`BODY_THRESHOLD_HU`); otherwise the area profile
    ends local and middle.
    """
    image = np.asarray(image_zyx)
    if image.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {image.shape}")
    spacing = tuple(float(s) for s in spacing_zyx)
    inplane_axes = [a for a in range(3) if a != superior_axis]
    inplane_spacing = [spacing[a] for a in inplane_axes]
    inplane_shape = [image.shape[a] for a in inplane_axes]
    # the body outline needs no sub-millimetre detail: subsample in-plane to about mask_resolution_mm
    strides = [max(1, int(settings.mask_resolution_mm // s)) for s in inplane_spacing]
    coarse = np.moveaxis(image, superior_axis, 0)[:, ::strides[0], ::strides[1]]
    coarse_spacing = [s * k for s, k in zip(inplane_spacing, strides)]
    mask = body_mask(coarse, body_threshold, 0, coarse_spacing, settings.opening_mm)
    if superior_is_high:
        mask, coarse = mask[::-1], coarse[::-1]  # superior first from here on
    slice_mm = spacing[superior_axis]
    pixel_mm2 = float(np.prod(coarse_spacing))
    area = mask.sum(axis=(1, 2)) * pixel_mm2
    levels = detect_levels(area, slice_mm, settings)
    profile = smoothed_profile(area, slice_mm, settings)
    upside_down = (not plausible_levels(levels, profile)
                   and plausible_levels(detect_levels(area[::-1], slice_mm, settings), profile[::-1]))

    n = mask.shape[0]
    body_slices = np.nonzero(area > 0)[0]
    top, bottom = (int(body_slices[0]), int(body_slices[-1]) + 1) if body_slices.size else (0, n)
    z_margin = int(np.ceil(settings.z_margin_mm / slice_mm))
    start = max(0, top - z_margin)
    body_end = min(n, bottom + z_margin)
    mandible = lungs = None
    if body_slices.size:
        bone_mm2 = None if bone_threshold is None or anterior is None else anterior_bone_profile(
            coarse, mask, bone_threshold, 1 + inplane_axes.index(anterior[0]), anterior[1],
            settings.anterior_fraction, pixel_mm2)
        mandible, lungs = mandible_and_lung_levels(coarse, mask, bone_mm2, air_threshold,
                                              levels.neck if levels.neck is not None else top, slice_mm, pixel_mm2,
                                              settings)
    ends = _region_ends(levels, profile, mandible, lungs, top, body_end, slice_mm, settings)
    warnings = list(ends.warnings) if body_slices.size else list(levels.warnings)
    if upside_down:
        warnings.append("the profile looks upside down (a head above broader shoulders is found only from the "
                        "other end): check the image direction")

    inplane_margins = [int(np.ceil(settings.inplane_margin_mm / s)) for s in inplane_spacing]
    boxes = {"global": Box.full(image.shape)}
    for name, end in (("local", ends.local), ("middle", ends.middle), ("body", body_end)):
        z = (n - end, n - start) if superior_is_high else (start, end)
        ranges = _inplane_box(mask, (start, end), strides, inplane_shape, inplane_margins)
        ranges.insert(superior_axis, z)
        boxes[name] = Box(tuple(ranges))

    def to_array_index(level: int | None) -> int | None:
        return None if level is None else (n - 1 - level if superior_is_high else level)

    found = {"head_end": levels.head_end, "neck": levels.neck, "shoulders": levels.shoulders,
             "mandible": mandible, "lungs": lungs}
    return CaseRegions(
        boxes={name: boxes[name] for name in REGION_NAMES},
        shape=tuple(image.shape), spacing=spacing, superior_axis=superior_axis,
        superior_is_high=bool(superior_is_high), body_threshold=float(body_threshold), settings=settings,
        levels={name: to_array_index(level) for name, level in found.items()},
        area_profile_mm2=tuple(round(float(a), 1) for a in (profile[::-1] if superior_is_high else profile)),
        warnings=tuple(warnings),
        body_box=boxes["body"],
        bone_threshold=None if bone_threshold is None else float(bone_threshold),
        anterior=None if anterior is None else (int(anterior[0]), bool(anterior[1])),
        air_threshold=None if air_threshold is None else float(air_threshold),
        rules=ends.rules, fallbacks=ends.fallbacks,
    )
