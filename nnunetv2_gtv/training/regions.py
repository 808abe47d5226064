"""Anatomy-based sampling regions (local = head, middle = head + neck, global = whole image) for one CT case.

The regions are axis-aligned boxes in array coordinates, found on a body mask (threshold, in-plane opening,
largest 3D component, largest 2D piece per slice with holes filled; on an in-plane grid of about 2 mm). Which
array end is superior (and anterior) comes from the image direction, never from the slice order. Walking down
from the superior end:

- **local** (the head) ends ``head_margin_mm`` below the *mandible*: the lowest slice of the bone that runs
  continuously down from the skull in the anterior part of the body (skull, face, mandible; the cervical spine is
  posterior). The nasopharynx lies at the skull base, well above the mandible's lower border, and the parotids end
  near it, so the margin covers both whatever the area profile looks like;
- **middle** (head and neck) ends ``middle_margin_mm`` below the *lung apex*: the first slice below the mandible
  where air inside the body forms two pieces of at least ``lung_mm2`` (left and right lung; pharynx, larynx and
  trachea are one piece) that persist. The larynx lies in the neck, above the thoracic inlet; the margin covers
  larynx contours that reach down to it.

Where the anatomy does not show these (bone or air hidden by the intensity normalisation, or no direction given; no
lung in a scan that ends in the neck), the cross-sectional area profile stands in: the head ends where the area drops
towards the narrowest level below it (the neck), the shoulders begin where it rises well above it. When neither
finds a border, the region falls back to the next larger one (local to middle, middle to the body), which is
always the safe side; every fallback is named in ``CaseRegions.fallbacks`` with its reason in
``CaseRegions.warnings``. Nothing here raises on unusual anatomy.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

REGION_NAMES = ("local", "middle", "global")
CACHE_FOLDER = "gtv_regions"
CACHE_FORMAT = "nnunetv2_gtv.regions/2"
BODY_THRESHOLD_HU = -150.0
BONE_THRESHOLD_HU = 300.0  # cortical bone; at 4-5 mm in-plane the mandible's cortex still reads above it

Log = Callable[[str], None]


@dataclass(frozen=True)
class Box:
    """Half-open index ranges ((z0, z1), (y0, y1), (x0, x1)) of an axis-aligned box in array coordinates."""

    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        ranges = tuple((int(lo), int(hi)) for lo, hi in self.ranges)
        if any(lo < 0 or hi <= lo for lo, hi in ranges):
            raise ValueError(f"empty or negative box ranges {ranges}")
        object.__setattr__(self, "ranges", ranges)

    @classmethod
    def full(cls, shape: Sequence[int]) -> Box:
        return cls(tuple((0, int(n)) for n in shape))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(hi - lo for lo, hi in self.ranges)

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(lo, hi) for lo, hi in self.ranges)

    def contains(self, other: Box) -> bool:
        return all(lo <= olo and ohi <= hi for (lo, hi), (olo, ohi) in zip(self.ranges, other.ranges))

    def to_json(self) -> list[list[int]]:
        return [list(r) for r in self.ranges]

    @classmethod
    def from_json(cls, value: Sequence[Sequence[int]]) -> Box:
        return cls(tuple(tuple(r) for r in value))


@dataclass(frozen=True)
class RegionSettings:
    """Tuning of the area-profile analysis. Ratios are between smoothed cross-sectional areas."""

    mask_resolution_mm: float = 2.0  # the body mask is found on an in-plane grid about this coarse
    opening_mm: float = 3.0  # in-plane opening of the body mask; 0 turns it off
    smoothing_mm: float = 9.0  # median filter along the superior axis
    head_to_neck_ratio: float = 1.3  # a neck is at most 1/1.3 of the largest area above it ...
    neck_exit_ratio: float = 0.9  # ... and the narrowing lasts while the area stays below 0.9 of that
    min_neck_fraction: float = 0.15  # narrower than this (spine tails, chin tips) is not a neck
    min_head_fraction: float = 0.15  # the head above a neck has at least this fraction of the largest area
    shoulder_to_neck_ratio: float = 1.6  # shoulders begin where the area first reaches 1.6 x the neck's
    head_end_fraction: float = 0.3  # the head ends where the area has fallen to neck + 0.3 x (head - neck)
    z_margin_mm: float = 10.0  # added above the body and below the head
    inplane_margin_mm: float = 10.0  # added around the body's in-plane bounding box
    short_head_mm: float = 40.0  # a head region shorter than this is not trusted: local falls back to middle
    # bone and air landmarks
    anterior_fraction: float = 0.4  # the anterior 40 % of the body's depth holds skull, face and mandible, no spine
    min_bone_mm2: float = 150.0  # a slice with less anterior bone than this is a gap ...
    bone_gap_mm: float = 7.0  # ... and a gap this long ends the head's bone (below the mandible)
    min_head_bone_mm: float = 30.0  # the head's bone runs at least this far (else it is no head: clavicles, noise)
    head_margin_mm: float = 20.0  # local ends this far below the mandible (parotid tails, upper neck)
    lung_mm2: float = 500.0  # two pieces of air inside the body this large are the lungs (the airway is one piece)
    merged_lung_mm2: float = 2000.0  # ... or one piece this large: both lungs joined (the airway never is)
    lung_run_mm: float = 15.0  # ... when they stay this large for this far down (or to the end of the scan)
    middle_margin_mm: float = 10.0  # middle ends this far below the lung apex (some larynx contours reach it)


@dataclass(frozen=True)
class Levels:
    """Slice indices counted from the superior end (0 = most superior slice); None when not found."""

    head_end: int | None = None  # first slice below the head
    neck: int | None = None  # narrowest slice between head and shoulders
    shoulders: int | None = None  # first shoulder slice
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaseRegions:
    """Boxes for one case plus what they were derived from. Levels are array indices along the superior axis."""

    boxes: Mapping[str, Box]
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    superior_axis: int
    superior_is_high: bool
    body_threshold: float
    settings: RegionSettings
    levels: Mapping[str, int | None] = field(default_factory=dict)
    area_profile_mm2: tuple[float, ...] = ()  # smoothed, in array order along the superior axis
    warnings: tuple[str, ...] = ()
    body_box: Box | None = None  # the body with the margins, all its slices: where gtv-predict runs Global models
    bone_threshold: float | None = None  # None: bone landmarks not used
    anterior: tuple[int, bool] | None = None  # (array axis, anterior at the high end); None: bone not used
    air_threshold: float | None = None  # None: lungs not looked for
    rules: Mapping[str, str] = field(default_factory=dict)  # what set each region's inferior border
    fallbacks: tuple[str, ...] = ()  # regions that fell back to the next larger one (reasons in warnings)

    def to_json(self) -> dict:
        return {
            "format": CACHE_FORMAT,
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "superior_axis": self.superior_axis,
            "superior_is_high": self.superior_is_high,
            "body_threshold": self.body_threshold,
            "settings": asdict(self.settings),
            "regions": {name: box.to_json() for name, box in self.boxes.items()},
            "levels": dict(self.levels),
            "area_profile_mm2": list(self.area_profile_mm2),
            "warnings": list(self.warnings),
            "body": self.body_box.to_json() if self.body_box is not None else None,
            "bone_threshold": self.bone_threshold,
            "anterior": list(self.anterior) if self.anterior is not None else None,
            "air_threshold": self.air_threshold,
            "rules": dict(self.rules),
            "fallbacks": list(self.fallbacks),
        }

    @classmethod
    def from_json(cls, value: dict) -> CaseRegions:
        if value.get("format") != CACHE_FORMAT:
            raise ValueError(f"not a {CACHE_FORMAT} record (format={value.get('format')!r})")
        return cls(
            boxes={name: Box.from_json(box) for name, box in value["regions"].items()},
            shape=tuple(value["shape"]),
            spacing=tuple(value["spacing"]),
            superior_axis=int(value["superior_axis"]),
            superior_is_high=bool(value["superior_is_high"]),
            body_threshold=float(value["body_threshold"]),
            settings=RegionSettings(**value["settings"]),
            levels=dict(value["levels"]),
            area_profile_mm2=tuple(value["area_profile_mm2"]),
            warnings=tuple(value["warnings"]),
            body_box=Box.from_json(value["body"]) if value.get("body") is not None else None,
            bone_threshold=None if value["bone_threshold"] is None else float(value["bone_threshold"]),
            anterior=None if value["anterior"] is None else (int(value["anterior"][0]), bool(value["anterior"][1])),
            air_threshold=None if value["air_threshold"] is None else float(value["air_threshold"]),
            rules=dict(value["rules"]),
            fallbacks=tuple(value["fallbacks"]),
        )

    def describe(self) -> str:
        """One line with every region's index ranges and size in voxels and mm."""
        parts = []
        for name, box in self.boxes.items():
            ranges = " ".join(f"{lo}-{hi}" for lo, hi in box.ranges)
            vox = "x".join(str(n) for n in box.shape)
            mm = "x".join(f"{n * s:.0f}" for n, s in zip(box.shape, self.spacing))
            rule = f", ends at {self.rules[name]}" if name in self.rules else ""
            parts.append(f"{name} [{ranges}] {vox} vox ({mm} mm{rule})")
        return "; ".join(parts)


# ---------------------------------------------------------------- orientation


def _direction_matrix(direction: Sequence[float]) -> np.ndarray:
    matrix = np.asarray(direction, dtype=float)
    if matrix.size != 9:
        raise ValueError(f"expected a 3D direction with 9 entries, got {matrix.size}")
    return matrix.reshape(3, 3)


def superior_axis_from_direction(direction: Sequence[float], transpose_forward: Sequence[int] = (0, 1, 2)
                                 ) -> tuple[int, bool]:
    """(array axis closest to superior, whether superior is at the high index end of that axis).

    ``direction`` is SimpleITK's row-major 3x3 matrix in LPS; its column j is the world direction of image
    index j (i, j, k). A SimpleITK array is indexed (k, j, i) and nnU-Net then applies ``transpose_forward``,
    so array axis a is image index 2 - transpose_forward[a]. The superior axis is the one with the largest
    superior component.
    """
    superior_components = _direction_matrix(direction)[2]
    image_axis = int(np.argmax(np.abs(superior_components)))
    axis = list(transpose_forward).index(2 - image_axis)
    return axis, bool(superior_components[image_axis] > 0)


def array_axis_orientation(direction: Sequence[float], transpose_forward: Sequence[int] = (0, 1, 2)
                           ) -> list[tuple[int, int]]:
    """For each array axis, (world axis, sign) with LPS world axes 0 = left, 1 = posterior, 2 = superior.

    The superior axis is chosen as in :func:`superior_axis_from_direction`; the other two array axes get left
    and posterior, whichever assignment is better aligned, so every world axis is used once.
    """
    matrix = _direction_matrix(direction)
    columns = [matrix[:, 2 - int(a)] for a in transpose_forward]
    superior_axis, _ = superior_axis_from_direction(direction, transpose_forward)
    first, second = [a for a in range(3) if a != superior_axis]
    straight = abs(columns[first][0]) + abs(columns[second][1])
    crossed = abs(columns[first][1]) + abs(columns[second][0])
    world = {superior_axis: 2, first: 0 if straight >= crossed else 1, second: 1 if straight >= crossed else 0}
    return [(world[a], 1 if columns[a][world[a]] > 0 else -1) for a in range(3)]


def anterior_axis_from_direction(direction: Sequence[float], transpose_forward: Sequence[int] = (0, 1, 2)
                                 ) -> tuple[int, bool]:
    """(array axis closest to anterior-posterior, whether anterior is at the high index end of that axis)."""
    for axis, (world, sign) in enumerate(array_axis_orientation(direction, transpose_forward)):
        if world == 1:  # LPS: +1 = posterior
            return axis, sign < 0
    raise AssertionError("array_axis_orientation assigns every world axis")


# ---------------------------------------------------------------- body mask


def _disk(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """In-plane elliptical structuring element of about radius_mm (at least one voxel per side)."""
    ry, rx = (max(1, int(round(radius_mm / s))) for s in spacing)
    y, x = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    return (y / ry) ** 2 + (x / rx) ** 2 <= 1.0


def body_mask(image: np.ndarray, threshold: float, slice_axis: int = 0,
              inplane_spacing: Sequence[float] = (1.0, 1.0), opening_mm: float = 3.0) -> np.ndarray:
    """The patient's body: voxels above ``threshold``, opened in-plane by ``opening_mm`` (detaches thin couch shells
    and immobilisation masks), the largest 3D component, and per slice only its largest piece with holes filled
    (drops raised arms and other pieces beside the head and neck). ``inplane_spacing``: mm of the two other axes.
    """
    mask = np.moveaxis(np.asarray(image) > threshold, slice_axis, 0)
    if opening_mm > 0:
        mask = ndimage.binary_opening(mask, structure=_disk(opening_mm, inplane_spacing)[None])
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.moveaxis(mask, 0, slice_axis)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    eight = np.ones((3, 3), dtype=bool)
    for index in np.nonzero(mask.any(axis=(1, 2)))[0]:
        pieces, n = ndimage.label(mask[index], structure=eight)
        if n > 1:
            piece_sizes = np.bincount(pieces.ravel())
            piece_sizes[0] = 0
            mask[index] = pieces == int(np.argmax(piece_sizes))
        mask[index] = ndimage.binary_fill_holes(mask[index])
    return np.moveaxis(mask, 0, slice_axis)


def body_mask_from_hu(image_hu: np.ndarray, slice_axis: int = 0, inplane_spacing: Sequence[float] = (1.0, 1.0),
                      threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Body mask of a CT in Hounsfield units (fat is about -90 HU, air -1000, so -150 HU separates them)."""
    return body_mask(image_hu, threshold_hu, slice_axis, inplane_spacing)


def body_threshold_from_plans(plans: Mapping, hu: float = BODY_THRESHOLD_HU, channel: int = 0) -> float:
    """``hu`` in the units of an nnU-Net preprocessed image normalised with CTNormalization under ``plans``.

    CTNormalization clips to the plans' 0.5 / 99.5 percentiles and z-scores with the plans' mean and std; a
    threshold below the lower clip becomes the clip value itself, so ``image > threshold`` still finds the body.
    """
    schemes = {tuple(cfg.get("normalization_schemes", ())) for cfg in plans.get("configurations", {}).values()}
    schemes.discard(())
    if any(scheme[channel] != "CTNormalization" for scheme in schemes):
        raise ValueError(f"plans normalise channel {channel} with {sorted(schemes)}, not CTNormalization: "
                         "pass the body threshold in normalised units yourself")
    props = plans["foreground_intensity_properties_per_channel"][str(channel)]
    clipped = float(np.clip(hu, props["percentile_00_5"], props["percentile_99_5"]))
    return (clipped - props["mean"]) / max(props["std"], 1e-8)


def _threshold_inside_clip(plans: Mapping, hu: float, channel: int) -> float | None:
    """``hu`` in normalised units, or None when the plans' clip range does not hold it strictly inside (the tissues on
    its far side then share one value with those near it) or the channel is not CT-normalised."""
    try:
        threshold = body_threshold_from_plans(plans, hu, channel)
    except ValueError:
        return None
    props = plans["foreground_intensity_properties_per_channel"][str(channel)]
    return threshold if props["percentile_00_5"] < hu < props["percentile_99_5"] else None


def bone_threshold_from_plans(plans: Mapping, hu: float = BONE_THRESHOLD_HU, channel: int = 0) -> float | None:
    """Bone threshold in normalised units; None when the normalisation clips bone together with soft tissue."""
    return _threshold_inside_clip(plans, hu, channel)


def air_threshold_from_plans(plans: Mapping, hu: float = BODY_THRESHOLD_HU, channel: int = 0) -> float | None:
    """Air threshold (lungs) in normalised units; None when the normalisation clips air together with fat."""
    return _threshold_inside_clip(plans, hu, channel)


# ---------------------------------------------------------------- profile analysis


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Half-open (start, end) of every run of True."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.diff(padded)
    return list(zip(np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist()))


def _narrowings(area: np.ndarray, settings: RegionSettings) -> list[tuple[int, int]]:
    """Runs where the area stays well below the largest area above it: neck candidates, superior first.

    A run starts once the area falls to 1/head_to_neck_ratio of the running maximum and lasts while it stays
    below neck_exit_ratio of it (hysteresis, so a dip in the face and the neck below it form one run).
    """
    running_max = np.maximum.accumulate(area)
    ratio = area / np.maximum(running_max, 1e-9)
    eligible = ((area > 0) & (ratio >= settings.min_neck_fraction)
                & (running_max >= settings.min_head_fraction * area.max()))
    loose = _runs(eligible & (ratio <= settings.neck_exit_ratio))
    strict = eligible & (ratio <= 1.0 / settings.head_to_neck_ratio)
    return [(start, end) for start, end in loose if strict[start:end].any()]


def _smoothed_profile(area: np.ndarray, slice_mm: float, settings: RegionSettings) -> np.ndarray:
    """Median filter (keeps the steps between head, neck and shoulders sharp) over about smoothing_mm."""
    size = max(1, int(round(settings.smoothing_mm / slice_mm)))
    return ndimage.median_filter(np.asarray(area, float), size=size + 1 - size % 2, mode="nearest")


def detect_levels(area: np.ndarray, slice_mm: float, settings: RegionSettings = RegionSettings()) -> Levels:
    """Find head end, neck and shoulders in a cross-sectional area profile ordered superior first."""
    area = np.asarray(area, dtype=float)
    if not (area > 0).any():
        return Levels(warnings=("no body found: every region is the whole image",))
    area = _smoothed_profile(area, slice_mm, settings)
    neck = shoulders = None
    narrowings = _narrowings(area, settings)
    for i, (start, end) in enumerate(narrowings):
        candidate = start + int(np.argmin(area[start:end]))
        if neck is None or area[candidate] < area[neck]:
            neck = candidate
        rise = np.nonzero(area[neck + 1:] >= settings.shoulder_to_neck_ratio * area[neck])[0]
        shoulders = neck + 1 + int(rise[0]) if rise.size else None
        next_start = narrowings[i + 1][0] if i + 1 < len(narrowings) else len(area)
        if shoulders is None or shoulders <= next_start:
            break
    if neck is None:
        return Levels(warnings=("no neck narrowing below the head (head-only scan or unusual anatomy): "
                                "local and middle cover the whole body",))
    head_peak = int(np.argmax(area[:neck + 1]))
    head_level = area[neck] + settings.head_end_fraction * (area[head_peak] - area[neck])
    head_end = head_peak + int(np.nonzero(area[head_peak:neck + 1] <= head_level)[0][0])
    warnings = []
    if shoulders is None:
        warnings.append("no shoulders below the neck (scan ends in the neck?): middle covers the whole body")
    return Levels(head_end, neck, shoulders, tuple(warnings))


def _plausible(levels: Levels, profile: np.ndarray) -> bool:
    """Head, neck and shoulders all found, and the shoulders broader than the head."""
    if levels.neck is None or levels.shoulders is None:
        return False
    return bool(profile[levels.shoulders:].max() > profile[:levels.neck].max())


# ---------------------------------------------------------------- bone and air landmarks


def anterior_bone_profile(image: np.ndarray, mask: np.ndarray, bone_threshold: float, anterior_axis: int,
                          anterior_is_high: bool, fraction: float, pixel_mm2: float) -> np.ndarray:
    """mm² of bone (``image > bone_threshold``) inside the body in the anterior ``fraction`` of the body's depth, per
    slice of a (slice, row, column) array; ``anterior_axis`` (1 or 2) runs anterior-posterior."""
    bone = np.moveaxis((image > bone_threshold) & mask, anterior_axis, 1)
    body = np.moveaxis(mask, anterior_axis, 1)
    if anterior_is_high:
        bone, body = bone[:, ::-1], body[:, ::-1]  # anterior first
    rows = body.any(axis=2)  # (slice, depth)
    depth = rows.shape[1]
    first = np.argmax(rows, axis=1)
    last = depth - 1 - np.argmax(rows[:, ::-1], axis=1)
    cut = first + np.ceil(fraction * (last - first + 1)).astype(int)
    index = np.arange(depth)[None, :]
    anterior = (index >= first[:, None]) & (index < cut[:, None]) & rows.any(axis=1)[:, None]
    return (bone.sum(axis=2) * anterior).sum(axis=1) * pixel_mm2


def mandible_level(bone_mm2: np.ndarray, slice_mm: float, settings: RegionSettings = RegionSettings(),
                   gap_mm: float | None = None) -> int | None:
    """Last slice (superior first) of the head's anterior bone: the first run of slices with at least min_bone_mm2,
    gaps shorter than ``gap_mm`` (default bone_gap_mm) bridged, that is at least min_head_bone_mm long. The skull,
    the face and the mandible form one such run; the gap below it (only hyoid and cartilage, if anything) ends it."""
    gap = max(1, int(np.ceil((settings.bone_gap_mm if gap_mm is None else gap_mm) / slice_mm)))
    merged: list[tuple[int, int]] = []
    for start, end in _runs(np.asarray(bone_mm2) >= settings.min_bone_mm2):
        if merged and start - merged[-1][1] < gap:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    for start, end in merged:
        if (end - start) * slice_mm >= settings.min_head_bone_mm:
            return end - 1
    return None


def _mandible_above(bone_mm2: np.ndarray, first_gap: int, lungs: int, settings: RegionSettings) -> int:
    """The last slice before the deepest bone gap between ``first_gap`` and the lung apex (``first_gap - 1`` if none
    is deeper): the head's bone when it seemed to run on into the thorax."""
    gaps = [start for start, _ in _runs(np.asarray(bone_mm2[:lungs]) < settings.min_bone_mm2) if start >= first_gap]
    return (gaps[-1] if gaps else first_gap) - 1


def lung_level(image: np.ndarray, mask: np.ndarray, air_threshold: float, start: int, slice_mm: float,
               pixel_mm2: float, settings: RegionSettings = RegionSettings()) -> int | None:
    """First slice at or below ``start`` (superior first) where air inside the body (not above ``air_threshold``)
    forms two pieces of at least lung_mm2 each (left and right lung; pharynx, larynx and trachea are one piece), or
    one of merged_lung_mm2 (both lungs joined), that stay so for lung_run_mm (or to the end of the scan), one slice
    excepted (a slice where the body mask lost the chest to an arm or the field of view)."""
    n = mask.shape[0]
    large = np.zeros(n, bool)
    for index in range(max(0, start), n):
        air = mask[index] & ~(image[index] > air_threshold)
        if air.sum() * pixel_mm2 < 2 * settings.lung_mm2:
            continue
        pieces, _ = ndimage.label(air)
        sizes = np.sort(np.bincount(pieces.ravel())[1:])[::-1] * pixel_mm2
        large[index] = sizes[0] >= settings.merged_lung_mm2 or (sizes.size > 1 and sizes[1] >= settings.lung_mm2)
    run = max(1, int(np.ceil(settings.lung_run_mm / slice_mm)))
    for index in np.nonzero(large)[0]:
        following = large[index:index + run]
        if following.sum() >= max(following.size - 1, 1) and following.size >= min(run, 2):
            return int(index)
    return None


def _mandible_and_lungs(image: np.ndarray, mask: np.ndarray, bone_mm2: np.ndarray | None,
                        air_threshold: float | None, neck: int, slice_mm: float, pixel_mm2: float,
                        settings: RegionSettings) -> tuple[int | None, int | None]:
    """(mandible, lung apex), superior-first slice indices or None. Without bone the lungs are looked for below
    ``neck`` (the area profile's neck, or the top of the body)."""
    def lungs_below(level: int | None) -> int | None:
        if air_threshold is None:
            return None
        search = neck if level is None else level
        return lung_level(image, mask, air_threshold, search + 1, slice_mm, pixel_mm2, settings)

    mandible = None if bone_mm2 is None else mandible_level(bone_mm2, slice_mm, settings)
    lungs = lungs_below(mandible)
    first_run = None if mandible is None else mandible_level(bone_mm2, slice_mm, settings, gap_mm=0.0)
    if lungs is None and first_run is not None:
        # a flexed neck can bring hyoid, cartilage and clavicles so close below the mandible that the bone seems
        # to run on into the thorax: look for the lungs below the first gap of any length, and end the head at
        # the deepest gap above them
        lungs = lungs_below(first_run)
        if lungs is not None:
            mandible = _mandible_above(bone_mm2, first_run + 1, lungs, settings)
    return mandible, lungs


# ---------------------------------------------------------------- boxes


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
    profile = _smoothed_profile(area, slice_mm, settings)
    upside_down = (not _plausible(levels, profile)
                   and _plausible(detect_levels(area[::-1], slice_mm, settings), profile[::-1]))

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
        mandible, lungs = _mandible_and_lungs(coarse, mask, bone_mm2, air_threshold,
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


# ---------------------------------------------------------------- cache of preprocessed cases


def _write_json_atomic(path: Path, value: dict) -> None:
    """One top-level key per line, written to a temporary name and renamed, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()) + "\n}\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _same_threshold(a: float | None, b: float | None) -> bool:
    return (a is None) == (b is None) and (a is None or bool(np.isclose(a, b)))


def _load_cached(path: Path, shape: Sequence[int], spacing: Sequence[float], orientation: tuple[int, bool],
                 body_threshold: float, settings: RegionSettings, bone_threshold: float | None,
                 anterior: tuple[int, bool], air_threshold: float | None) -> CaseRegions | None:
    """The cached regions if they were computed for this very image and parameters, else None."""
    try:
        cached = CaseRegions.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same = (cached.shape == tuple(shape) and np.allclose(cached.spacing, spacing)
            and (cached.superior_axis, cached.superior_is_high) == orientation and cached.anterior == anterior
            and np.isclose(cached.body_threshold, body_threshold) and cached.settings == settings
            and _same_threshold(cached.bone_threshold, bone_threshold)
            and _same_threshold(cached.air_threshold, air_threshold))
    return cached if same else None


def _spacing_from_properties(properties: Mapping, shape: Sequence[int], transpose_forward: Sequence[int]
                             ) -> tuple[float, ...]:
    """Voxel spacing of a preprocessed array from the original spacing and the shapes before/after resampling."""
    original = [properties["spacing"][i] for i in transpose_forward]
    before = properties["shape_after_cropping_and_before_resampling"]
    return tuple(float(s) * b / n for s, b, n in zip(original, before, shape))


def load_or_compute_regions(preprocessed_folder: str | os.PathLike, identifier: str, body_threshold: float,
                            spacing_zyx: Sequence[float] | None = None,
                            transpose_forward: Sequence[int] = (0, 1, 2),
                            settings: RegionSettings = RegionSettings(), log: Log | None = None,
                            bone_threshold: float | None = None, air_threshold: float | None = None) -> CaseRegions:
    """Regions of one nnU-Net preprocessed case, cached in ``<folder>/gtv_regions/<identifier>.json``.

    The thresholds are in the preprocessed (normalised) units, see :func:`body_threshold_from_plans`,
    :func:`bone_threshold_from_plans` and :func:`air_threshold_from_plans` (None: that landmark is not used).
    ``spacing_zyx`` is the configuration's spacing; when None it is derived from the case's properties.
    The cache is recomputed when missing, unreadable or made for another shape, spacing or setting.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = Path(preprocessed_folder)
    data, _, _, properties = infer_dataset_class(str(folder))(str(folder), [identifier]).load_case(identifier)
    shape = tuple(data.shape[1:])
    spacing = tuple(spacing_zyx) if spacing_zyx is not None else _spacing_from_properties(
        properties, shape, transpose_forward)
    direction = properties["sitk_stuff"]["direction"]
    orientation = superior_axis_from_direction(direction, transpose_forward)
    anterior = anterior_axis_from_direction(direction, transpose_forward)
    path = folder / CACHE_FOLDER / f"{identifier}.json"
    regions = _load_cached(path, shape, spacing, orientation, body_threshold, settings, bone_threshold, anterior,
                           air_threshold)
    if regions is None:
        regions = compute_regions(np.asarray(data[0]), spacing, *orientation, body_threshold, settings,
                                  bone_threshold, anterior, air_threshold)
        _write_json_atomic(path, regions.to_json())
    if log is not None:
        log(f"regions {identifier}: {regions.describe()}")
        for warning in regions.warnings:
            log(f"WARNING regions {identifier}: {warning}")
    return regions


def regions_for_dataset(preprocessed_folder: str | os.PathLike, identifiers: Iterable[str], body_threshold: float,
                        spacing_zyx: Sequence[float] | None = None, transpose_forward: Sequence[int] = (0, 1, 2),
                        settings: RegionSettings = RegionSettings(), log: Log | None = None,
                        bone_threshold: float | None = None, air_threshold: float | None = None
                        ) -> dict[str, CaseRegions]:
    """:func:`load_or_compute_regions` for many cases, with a progress bar."""
    from tqdm import tqdm

    identifiers = list(identifiers)
    return {identifier: load_or_compute_regions(preprocessed_folder, identifier, body_threshold, spacing_zyx,
                                                transpose_forward, settings, log, bone_threshold, air_threshold)
            for identifier in tqdm(identifiers, desc="sampling regions", disable=len(identifiers) < 2)}


# ---------------------------------------------------------------- label coverage


def fallback_summary(regions_by_case: Mapping[str, CaseRegions]) -> str:
    """One line for the training log: how many cases' regions fell back to a larger one, and which."""
    parts = []
    for name in REGION_NAMES:
        cases = sorted(case for case, regions in regions_by_case.items() if name in regions.fallbacks)
        if cases:
            shown = ", ".join(cases[:10]) + (" ..." if len(cases) > 10 else "")
            parts.append(f"{name} in {len(cases)}/{len(regions_by_case)} cases ({shown})")
    return "region fallbacks (to the next larger region; reasons in the warnings above): " + (
        "; ".join(parts) if parts else f"none in {len(regions_by_case)} cases")


def label_fraction_inside(box: Box, seg: np.ndarray) -> float | None:
    """Fraction of label voxels (seg > 0) inside ``box``; None when the case has no label."""
    seg = np.asarray(seg)
    if seg.ndim == len(box.ranges) + 1:
        seg = seg[0]
    total = int(np.count_nonzero(seg > 0))
    if total == 0:
        return None
    return int(np.count_nonzero(seg[box.slices] > 0)) / total


def label_coverage_report(regions_by_case: Mapping[str, CaseRegions | Mapping[str, Box]],
                          seg_by_case: Mapping[str, np.ndarray]) -> tuple[dict[str, int], list[str]]:
    """How many cases have all their label voxels inside each region, and a warning line per miss.

    Segmentations may be (z, y, x) or (1, z, y, x); voxels > 0 are label (nnU-Net's -1 outside the crop is not).
    Cases without any label count as covered. The returned counts also hold "cases", the number of cases.
    """
    counts = {name: 0 for name in REGION_NAMES}
    warnings = []
    for case, regions in regions_by_case.items():
        boxes = regions.boxes if isinstance(regions, CaseRegions) else regions
        seg = np.asarray(seg_by_case[case])
        for name in REGION_NAMES:
            fraction = label_fraction_inside(boxes[name], seg)
            if fraction is None or fraction >= 1.0:
                counts[name] += 1
            else:
                warnings.append(f"{case}: only {100 * fraction:.1f}% of the label lies inside the {name} region; "
                                f"the {name} model never sees the rest")
    n = len(regions_by_case)
    counts["cases"] = n
    short = [f"{name} {counts[name]}/{n}" for name in REGION_NAMES if counts[name] < n]
    if short:
        warnings.append(f"labels fully inside the region: {', '.join(short)} cases")
    return counts, warnings
