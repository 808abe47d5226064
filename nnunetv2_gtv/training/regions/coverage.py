"""What the regions cover: label fractions inside each box (all labels together, and each label on its own) and
the summary of fallbacks, for the training log."""
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


LOW_COVERAGE = 0.5  # a region holding less of a label's voxels than this gets a warning in the training log


def label_coverage_by_label(regions_by_case: Mapping[str, CaseRegions | Mapping[str, Box]],
                            seg_by_case: Mapping[str, np.ndarray], labels: Mapping[int, str], region: str
                            ) -> tuple[dict[str, dict[str, float | None]], list[str]]:
    """Each label's share of voxels (pooled over the cases) inside each region, and a warning for each label of
    which ``region`` holds less than LOW_COVERAGE: that scale's models never see the rest of it in training and
    abstain there in gtv-predict's fusion. A label no case has gets None."""
    inside = {name: {region_name: 0 for region_name in REGION_NAMES} for name in labels.values()}
    total = {name: 0 for name in labels.values()}
    for case, regions in regions_by_case.items():
        boxes = regions.boxes if isinstance(regions, CaseRegions) else regions
        seg = np.asarray(seg_by_case[case])
        if seg.ndim == 4:
            seg = seg[0]
        for value, name in labels.items():
            mask = seg == value
            total[name] += int(np.count_nonzero(mask))
            for region_name in REGION_NAMES:
                inside[name][region_name] += int(np.count_nonzero(mask[boxes[region_name].slices]))
    fractions = {name: {r: (inside[name][r] / total[name] if total[name] else None) for r in REGION_NAMES}
                 for name in labels.values()}
    warnings = [f"the {region} region holds only {100 * shares[region]:.0f}% of {name}'s voxels in the training "
                f"cases: the {region} models learn little of it and are left out of the fusion outside their region"
                for name, shares in fractions.items() if shares[region] is not None and shares[region] < LOW_COVERAGE]
    return fractions, warnings
