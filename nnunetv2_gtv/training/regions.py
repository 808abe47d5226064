"""Anatomy-based sampling regions (local = head, middle = head + neck, global = whole image) for one CT case.

The regions are axis-aligned boxes in array coordinates. They are found from a body mask (threshold, in-plane
opening, largest 3D component, largest 2D piece per slice with holes filled; on an in-plane grid of about 2 mm)
and its cross-sectional area along the superior-inferior axis: walking down from the superior end, the head
ends where the area drops towards the narrowest level below it (the neck), and the shoulders begin where the
area rises well above that narrowest level. Which array end is superior comes from the image direction, never
from the slice order.

Scans without a neck narrowing (head only), without shoulders, or with an odd profile fall back to larger
regions and say so in ``CaseRegions.warnings``; nothing here raises on unusual anatomy.
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
CACHE_FORMAT = "nnunetv2_gtv.regions/1"
BODY_THRESHOLD_HU = -150.0

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
    short_head_mm: float = 40.0  # warn when the head region is shorter than this


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
        )

    def describe(self) -> str:
        """One line with every region's index ranges and size in voxels and mm."""
        parts = []
        for name, box in self.boxes.items():
            ranges = " ".join(f"{lo}-{hi}" for lo, hi in box.ranges)
            vox = "x".join(str(n) for n in box.shape)
            mm = "x".join(f"{n * s:.0f}" for n, s in zip(box.shape, self.spacing))
            parts.append(f"{name} [{ranges}] {vox} vox ({mm} mm)")
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
    first_body = int(np.nonzero(area > 0)[0][0])
    if (head_end - first_body) * slice_mm < settings.short_head_mm:
        warnings.append(f"head region only {(head_end - first_body) * slice_mm:.0f} mm long "
                        "(scan starts low, or an odd profile)")
    return Levels(head_end, neck, shoulders, tuple(warnings))


def _plausible(levels: Levels, profile: np.ndarray) -> bool:
    """Head, neck and shoulders all found, and the shoulders broader than the head."""
    if levels.neck is None or levels.shoulders is None:
        return False
    return bool(profile[levels.shoulders:].max() > profile[:levels.neck].max())


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


def compute_regions(image_zyx: np.ndarray, spacing_zyx: Sequence[float], superior_axis: int,
                    superior_is_high: bool, body_threshold: float,
                    settings: RegionSettings = RegionSettings()) -> CaseRegions:
    """Local, middle and global boxes of one image (any intensity units; ``body_threshold`` in those units)."""
    image = np.asarray(image_zyx)
    if image.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {image.shape}")
    spacing = tuple(float(s) for s in spacing_zyx)
    inplane_spacing = [s for a, s in enumerate(spacing) if a != superior_axis]
    inplane_shape = [n for a, n in enumerate(image.shape) if a != superior_axis]
    # the body outline needs no sub-millimetre detail: subsample in-plane to about mask_resolution_mm
    strides = [max(1, int(settings.mask_resolution_mm // s)) for s in inplane_spacing]
    coarse = np.moveaxis(image, superior_axis, 0)[:, ::strides[0], ::strides[1]]
    coarse_spacing = [s * k for s, k in zip(inplane_spacing, strides)]
    mask = body_mask(coarse, body_threshold, 0, coarse_spacing, settings.opening_mm)
    if superior_is_high:
        mask = mask[::-1]  # superior first from here on
    slice_mm = spacing[superior_axis]
    area = mask.sum(axis=(1, 2)) * float(np.prod(coarse_spacing))
    levels = detect_levels(area, slice_mm, settings)
    warnings = list(levels.warnings)
    profile = _smoothed_profile(area, slice_mm, settings)
    if not _plausible(levels, profile) and _plausible(detect_levels(area[::-1], slice_mm, settings), profile[::-1]):
        warnings.append("the profile looks upside down (a head above broader shoulders is found only from the "
                        "other end): check the image direction")

    n = mask.shape[0]
    body_slices = np.nonzero(area > 0)[0]
    top, bottom = (int(body_slices[0]), int(body_slices[-1]) + 1) if body_slices.size else (0, n)
    z_margin = int(np.ceil(settings.z_margin_mm / slice_mm))
    inplane_margins = [int(np.ceil(settings.inplane_margin_mm / s)) for s in inplane_spacing]
    start = max(0, top - z_margin)
    body_end = min(n, bottom + z_margin)
    middle_end = levels.shoulders if levels.shoulders is not None else body_end
    local_end = min(levels.head_end + z_margin, middle_end) if levels.head_end is not None else middle_end

    boxes = {"global": Box.full(image.shape)}
    for name, end in (("local", local_end), ("middle", middle_end), ("body", body_end)):
        z = (n - end, n - start) if superior_is_high else (start, end)
        ranges = _inplane_box(mask, (start, end), strides, inplane_shape, inplane_margins)
        ranges.insert(superior_axis, z)
        boxes[name] = Box(tuple(ranges))

    def to_array_index(level: int | None) -> int | None:
        return None if level is None else (n - 1 - level if superior_is_high else level)

    return CaseRegions(
        boxes={name: boxes[name] for name in REGION_NAMES},
        shape=tuple(image.shape), spacing=spacing, superior_axis=superior_axis,
        superior_is_high=bool(superior_is_high), body_threshold=float(body_threshold), settings=settings,
        levels={"head_end": to_array_index(levels.head_end), "neck": to_array_index(levels.neck),
                "shoulders": to_array_index(levels.shoulders)},
        area_profile_mm2=tuple(round(float(a), 1) for a in (profile[::-1] if superior_is_high else profile)),
        warnings=tuple(warnings),
        body_box=boxes["body"],
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


def _load_cached(path: Path, shape: Sequence[int], spacing: Sequence[float], orientation: tuple[int, bool],
                 body_threshold: float, settings: RegionSettings) -> CaseRegions | None:
    """The cached regions if they were computed for this very image and parameters, else None."""
    try:
        cached = CaseRegions.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same = (cached.shape == tuple(shape) and np.allclose(cached.spacing, spacing)
            and (cached.superior_axis, cached.superior_is_high) == orientation
            and np.isclose(cached.body_threshold, body_threshold) and cached.settings == settings)
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
                            settings: RegionSettings = RegionSettings(), log: Log | None = None) -> CaseRegions:
    """Regions of one nnU-Net preprocessed case, cached in ``<folder>/gtv_regions/<identifier>.json``.

    ``body_threshold`` is in the preprocessed (normalised) units, see :func:`body_threshold_from_plans`.
    ``spacing_zyx`` is the configuration's spacing; when None it is derived from the case's properties.
    The cache is recomputed when missing, unreadable or made for another shape, spacing or setting.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = Path(preprocessed_folder)
    data, _, _, properties = infer_dataset_class(str(folder))(str(folder), [identifier]).load_case(identifier)
    shape = tuple(data.shape[1:])
    spacing = tuple(spacing_zyx) if spacing_zyx is not None else _spacing_from_properties(
        properties, shape, transpose_forward)
    orientation = superior_axis_from_direction(properties["sitk_stuff"]["direction"], transpose_forward)
    path = folder / CACHE_FOLDER / f"{identifier}.json"
    regions = _load_cached(path, shape, spacing, orientation, body_threshold, settings)
    if regions is None:
        regions = compute_regions(np.asarray(data[0]), spacing, *orientation, body_threshold, settings)
        _write_json_atomic(path, regions.to_json())
    if log is not None:
        log(f"regions {identifier}: {regions.describe()}")
        for warning in regions.warnings:
            log(f"WARNING regions {identifier}: {warning}")
    return regions


def regions_for_dataset(preprocessed_folder: str | os.PathLike, identifiers: Iterable[str], body_threshold: float,
                        spacing_zyx: Sequence[float] | None = None, transpose_forward: Sequence[int] = (0, 1, 2),
                        settings: RegionSettings = RegionSettings(), log: Log | None = None
                        ) -> dict[str, CaseRegions]:
    """:func:`load_or_compute_regions` for many cases, with a progress bar."""
    from tqdm import tqdm

    identifiers = list(identifiers)
    return {identifier: load_or_compute_regions(preprocessed_folder, identifier, body_threshold, spacing_zyx,
                                                transpose_forward, settings, log)
            for identifier in tqdm(identifiers, desc="sampling regions", disable=len(identifiers) < 2)}


# ---------------------------------------------------------------- label coverage


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
