"""Sampling regions on real head-and-neck anatomy: the issue-14 criteria on every case of OpenKBP_anatomy.

Each CT (``../shared/data/OpenKBP_anatomy/<case>/ct.nii.gz``, in HU) goes through
``nnunetv2_gtv.training.regions.compute_regions`` twice: on its own grid, and resampled (linear, as a CT) to the
trainers' 3 x 1 x 1 mm (z, y, x) grid over the same field of view. The organ masks stay on the native grid; a voxel
counts as inside a region when its centre lies inside the region's box in world coordinates, so both grids are
judged against the same contours. Criteria (per grid, count and per cent of the cases that have the organ):

- local holds every Brainstem voxel and reaches >= 20 mm below the brainstem's lower end;
- local holds >= 90 % of each parotid the case has;
- middle holds every Larynx voxel; middle contains local;
- no fallback (a region replaced by the next larger one because its landmark was not found);
- the inferior borders of local and middle move <= 10 mm between the native and the 3 x 1 x 1 mm grid.

Run: ``python benchmarks/regions_real.py`` (about 3-4 minutes on 2 cores; ``--csv FILE`` adds a per-case table).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_gtv.training.regions import (
    BODY_THRESHOLD_HU, BONE_THRESHOLD_HU, CaseRegions, anterior_axis_from_direction, compute_regions,
    superior_axis_from_direction,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "OpenKBP_anatomy"
TRAINER_SPACING_XYZ = (1.0, 1.0, 3.0)
GRIDS = ("native", "3x1x1")
BELOW_BRAINSTEM_MM = 20.0
PAROTID_FRACTION = 0.9
MAX_SHIFT_MM = 10.0


@dataclass
class CaseResult:
    case: str
    below_brainstem_mm: dict[str, float | None] = field(default_factory=dict)  # local's border below its lower end
    brainstem_inside: dict[str, bool | None] = field(default_factory=dict)
    parotid_fraction: dict[str, float | None] = field(default_factory=dict)  # the smaller of the two
    larynx_fraction: dict[str, float | None] = field(default_factory=dict)
    below_larynx_mm: dict[str, float | None] = field(default_factory=dict)  # middle's border below its lower end
    nested: dict[str, bool] = field(default_factory=dict)
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    warnings: dict[str, tuple[str, ...]] = field(default_factory=dict)
    border_z_mm: dict[str, dict[str, float]] = field(default_factory=dict)  # grid -> region -> world z
    seconds: dict[str, float] = field(default_factory=dict)


def resample_ct(image: sitk.Image, spacing_xyz: tuple[float, ...]) -> sitk.Image:
    """``image`` on a grid of ``spacing_xyz`` covering its whole field of view (first voxel edges aligned, air
    beyond the last edge), linear."""
    old = image.GetSpacing()
    size = [max(1, int(np.ceil(n * s / t - 1e-6))) for n, s, t in zip(image.GetSize(), old, spacing_xyz)]
    origin = [o + (t - s) / 2 for o, s, t in zip(image.GetOrigin(), old, spacing_xyz)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin, spacing_xyz, image.GetDirection(),
                         -1000.0, image.GetPixelID())


def detect(image: sitk.Image) -> CaseRegions:
    """The regions of a CT in HU, as gtv-regions finds them on a raw image."""
    direction = image.GetDirection()
    return compute_regions(sitk.GetArrayFromImage(image), image.GetSpacing()[::-1],
                           *superior_axis_from_direction(direction), BODY_THRESHOLD_HU,
                           bone_threshold=BONE_THRESHOLD_HU, anterior=anterior_axis_from_direction(direction),
                           air_threshold=BODY_THRESHOLD_HU)


def world_box(regions: CaseRegions, name: str, image: sitk.Image) -> np.ndarray:
    """(3, 2) world interval per axis (x, y, z) of a region box (identity direction only)."""
    ranges = regions.boxes[name].ranges[::-1]  # (x, y, z)
    origin, spacing = np.array(image.GetOrigin()), np.array(image.GetSpacing())
    return np.array([[o + (lo - 0.5) * s, o + (hi - 0.5) * s] for (lo, hi), o, s in zip(ranges, origin, spacing)])


def fraction_inside(points: np.ndarray, box: np.ndarray) -> float:
    inside = np.all((points >= box[:, 0]) & (points < box[:, 1]), axis=1)
    return float(inside.mean())


def organ_points(folder: Path, organ: str, image: sitk.Image) -> np.ndarray | None:
    """World (x, y, z) centres of an organ mask's voxels, None if the case has no such mask or it is empty."""
    path = folder / f"{organ}.nii.gz"
    if not path.is_file():
        return None
    zyx = np.argwhere(sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0)
    if zyx.size == 0:
        return None
    return np.asarray(image.GetOrigin()) + zyx[:, ::-1] * np.asarray(image.GetSpacing())


def evaluate_case(folder: Path) -> CaseResult:
    native = sitk.ReadImage(str(folder / "ct.nii.gz"))
    if not np.allclose(native.GetDirection(), np.eye(3).ravel()):
        raise ValueError(f"{folder / 'ct.nii.gz'}: expected an identity direction (see the dataset README)")
    organs = {name: organ_points(folder, name, native)
              for name in ("Brainstem", "RightParotid", "LeftParotid", "Larynx")}
    half_slice = native.GetSpacing()[2] / 2
    result = CaseResult(folder.name)
    for grid in GRIDS:
        start = time.perf_counter()
        image = native if grid == "native" else resample_ct(native, TRAINER_SPACING_XYZ)
        regions = detect(image)
        result.seconds[grid] = time.perf_counter() - start
        local, middle = world_box(regions, "local", image), world_box(regions, "middle", image)
        result.border_z_mm[grid] = {"local": float(local[2, 0]), "middle": float(middle[2, 0])}
        brainstem = organs["Brainstem"]
        if brainstem is None:
            result.brainstem_inside[grid] = result.below_brainstem_mm[grid] = None
        else:
            result.brainstem_inside[grid] = fraction_inside(brainstem, local) == 1.0
            result.below_brainstem_mm[grid] = float(brainstem[:, 2].min() - half_slice - local[2, 0])
        parotids = [fraction_inside(organs[p], local) for p in ("RightParotid", "LeftParotid")
                    if organs[p] is not None]
        result.parotid_fraction[grid] = min(parotids) if parotids else None
        larynx = organs["Larynx"]
        result.larynx_fraction[grid] = None if larynx is None else fraction_inside(larynx, middle)
        result.below_larynx_mm[grid] = None if larynx is None else float(larynx[:, 2].min() - half_slice
                                                                        - middle[2, 0])
        result.nested[grid] = regions.boxes["middle"].contains(regions.boxes["local"])
        result.fallbacks[grid] = regions.fallbacks
        result.warnings[grid] = regions.warnings
    return result


def _row(label: str, outcomes: list[tuple[str, bool, str]], target: str) -> str:
    """One table row: how many of the cases hold, their share, and the worst cases (already sorted worst first)."""
    n = len(outcomes)
    held = sum(ok for _, ok, _ in outcomes)
    def named(case: str, detail: str) -> str:
        return f"{case} ({detail})" if detail else case

    failed = [named(case, detail) for case, ok, detail in outcomes if not ok]
    worst = failed[:4] or [named(case, detail) for case, _, detail in outcomes[:2]]
    share = f"{100 * held / n:.1f}" if n else "-"
    return f"| {label} | {held}/{n} | {share} | {target} | {'fail: ' if failed else 'closest: '}" \
           f"{', '.join(worst)}{' ...' if len(failed) > 4 else ''} |"


def criteria_table(results: list[CaseResult]) -> list[str]:
    lines = ["| criterion | cases | % | target | worst cases |", "|---|---:|---:|---:|---|"]
    for grid in GRIDS:
        brainstem = sorted([r for r in results if r.below_brainstem_mm[grid] is not None],
                           key=lambda r: r.below_brainstem_mm[grid] if r.brainstem_inside[grid] else -1e9)
        lines.append(_row(f"{grid}: local holds the brainstem and >= {BELOW_BRAINSTEM_MM:g} mm below it", [
            (r.case, bool(r.brainstem_inside[grid] and r.below_brainstem_mm[grid] >= BELOW_BRAINSTEM_MM),
             f"{r.below_brainstem_mm[grid]:.0f} mm") for r in brainstem], ">= 98 %"))
        parotid = sorted([r for r in results if r.parotid_fraction[grid] is not None],
                         key=lambda r: r.parotid_fraction[grid])
        lines.append(_row(f"{grid}: local holds >= {100 * PAROTID_FRACTION:g} % of each parotid", [
            (r.case, r.parotid_fraction[grid] >= PAROTID_FRACTION, f"{100 * r.parotid_fraction[grid]:.0f} %")
            for r in parotid], ">= 95 %"))
        larynx = sorted([r for r in results if r.larynx_fraction[grid] is not None],
                        key=lambda r: (r.larynx_fraction[grid], r.below_larynx_mm[grid]))
        lines.append(_row(f"{grid}: middle holds the whole larynx", [
            (r.case, r.larynx_fraction[grid] == 1.0,
             f"{100 * r.larynx_fraction[grid]:.0f} %, border {r.below_larynx_mm[grid]:.0f} mm below it")
            for r in larynx], ">= 95 %"))
        lines.append(_row(f"{grid}: middle contains local", [(r.case, r.nested[grid], "") for r in results],
                          "100 %"))
        fallback = sorted(results, key=lambda r: -len(r.fallbacks[grid]))
        lines.append(_row(f"{grid}: no fallback", [
            (r.case, not r.fallbacks[grid], "+".join(r.fallbacks[grid]) or "none") for r in fallback], "100 %"))
    for region in ("local", "middle"):
        def shift(r: CaseResult) -> float:
            return abs(r.border_z_mm["native"][region] - r.border_z_mm["3x1x1"][region])

        lines.append(_row(f"{region}'s inferior border moves <= {MAX_SHIFT_MM:g} mm native vs 3x1x1", [
            (r.case, shift(r) <= MAX_SHIFT_MM, f"{shift(r):.0f} mm") for r in sorted(results, key=shift, reverse=True)],
            ">= 95 %"))
    return lines


def write_csv(path: Path, results: list[CaseResult]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "grid", "below_brainstem_mm", "brainstem_inside", "parotid_fraction",
                         "larynx_fraction", "below_larynx_mm", "nested", "fallbacks", "local_border_z_mm",
                         "middle_border_z_mm", "seconds", "warnings"])
        for r in results:
            for grid in GRIDS:
                writer.writerow([r.case, grid, r.below_brainstem_mm[grid], r.brainstem_inside[grid],
                                 r.parotid_fraction[grid], r.larynx_fraction[grid], r.below_larynx_mm[grid],
                                 r.nested[grid],
                                 "+".join(r.fallbacks[grid]), r.border_z_mm[grid]["local"],
                                 r.border_z_mm[grid]["middle"], round(r.seconds[grid], 3),
                                 " | ".join(r.warnings[grid])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="OpenKBP_anatomy folder")
    parser.add_argument("--cases", nargs="*", help="only these cases (default: every case in index.json)")
    parser.add_argument("--csv", type=Path, help="also write a per-case table here")
    args = parser.parse_args(argv)
    index_path = args.data / "index.json"
    if not index_path.is_file():
        print(f"regions_real: no {index_path} (the OpenKBP_anatomy data set is not there)", file=sys.stderr)
        return 2
    index = json.loads(index_path.read_text())
    cases = args.cases or sorted(case for case, entry in index.items() if "organs" in entry)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    start = time.perf_counter()
    results = []
    for case in cases:
        results.append(evaluate_case(args.data / case))
    elapsed = time.perf_counter() - start
    print(f"{len(results)} cases of {args.data.name}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{elapsed:.0f} s in all (detection: native {np.median([r.seconds['native'] for r in results]):.2f} s, "
          f"3x1x1 incl. resampling {np.median([r.seconds['3x1x1'] for r in results]):.2f} s per case, median)")
    print("\n".join(criteria_table(results)))
    for r in results:
        for grid in GRIDS:
            for warning in r.warnings[grid]:
                print(f"warning {r.case} {grid}: {warning}")
    if args.csv:
        write_csv(args.csv, results)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
