"""What the region finder produces (boxes per case, with the levels and rules behind them) and its settings."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence



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
