"""What the regions cover: label fractions inside each box and the summary of fallbacks, for the training log."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from nnunetv2_gtv.training.regions.records import REGION_NAMES, Box, CaseRegions


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
