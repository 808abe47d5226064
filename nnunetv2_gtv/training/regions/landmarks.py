"""Levels along the superior axis: the area profile's head end, neck and shoulders; the mandible and the lung apex."""
from __future__ import annotations


import numpy as np
from scipy import ndimage

from nnunetv2_gtv.training.regions.records import Levels, RegionSettings


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


def smoothed_profile(area: np.ndarray, slice_mm: float, settings: RegionSettings) -> np.ndarray:
    """Median filter (keeps the steps between head, neck and shoulders sharp) over about smoothing_mm."""
    size = max(1, int(round(settings.smoothing_mm / slice_mm)))
    return ndimage.median_filter(np.asarray(area, float), size=size + 1 - size % 2, mode="nearest")


def detect_levels(area: np.ndarray, slice_mm: float, settings: RegionSettings = RegionSettings()) -> Levels:
    """Find head end, neck and shoulders in a cross-sectional area profile ordered superior first."""
    area = np.asarray(area, dtype=float)
    if not (area > 0).any():
        return Levels(warnings=("no body found: every region is the whole image",))
    area = smoothed_profile(area, slice_mm, settings)
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


def plausible_levels(levels: Levels, profile: np.ndarray) -> bool:
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


def mandible_and_lung_levels(image: np.ndarray, mask: np.ndarray, bone_mm2: np.ndarray | None,
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
