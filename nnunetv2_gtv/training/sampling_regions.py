"""Per-case sampling boxes for the trainers, from the anatomy regions of ``nnunetv2_gtv.training.regions``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterator, Sequence

import numpy as np

from nnunetv2_gtv.training.regions import (
    air_threshold_from_plans, body_threshold_from_plans, bone_threshold_from_plans, fallback_summary,
    label_coverage_by_label, label_coverage_report, regions_for_dataset,
)


class StreamedSegmentations(Mapping):
    """Each case's segmentation, read from the dataset when asked for and not kept: a coverage check over a
    whole dataset then holds one label at a time, not all of them (several GiB for a clinical dataset)."""

    def __init__(self, dataset, identifiers: Sequence[str]):
        self.dataset = dataset
        self.identifiers = list(identifiers)

    def __getitem__(self, identifier: str) -> np.ndarray:
        if identifier not in self.identifiers:
            raise KeyError(identifier)
        return np.asarray(self.dataset.load_case(identifier)[1])

    def __iter__(self) -> Iterator[str]:
        return iter(self.identifiers)

    def __len__(self) -> int:
        return len(self.identifiers)


def training_region_boxes(preprocessed_folder: str, dataset, plans: dict, spacing_zyx: Sequence[float], region: str,
                          log: Callable[[str], None] = print, labels: Mapping[int, str] | None = None
                          ) -> dict[str, tuple[tuple[int, int], ...]]:
    """Boxes of ``region`` ("local", "middle" or "global") for every case of ``dataset``, detected once and cached
    in ``preprocessed_folder``. Logs each case's region sizes, the cases whose region fell back to a larger one,
    how many cases' labels each region holds whole, and each of ``labels`` (value -> name) the share of its voxels
    each region holds, with a warning where ``region`` holds little of a label."""
    bone_threshold, air_threshold = bone_threshold_from_plans(plans), air_threshold_from_plans(plans)
    for tissue, threshold, ending in (("bone", bone_threshold, "local"), ("air", air_threshold, "middle")):
        if threshold is None:
            log(f"WARNING: the plans' CT normalisation clips {tissue} together with soft tissue: {ending} ends by the "
                "body's area profile only")
    regions_by_case = regions_for_dataset(preprocessed_folder, dataset.identifiers, body_threshold_from_plans(plans),
                                          spacing_zyx, plans.get("transpose_forward", (0, 1, 2)), log=log,
                                          bone_threshold=bone_threshold, air_threshold=air_threshold)
    log(fallback_summary(regions_by_case))
    counts, warnings = label_coverage_report(regions_by_case, StreamedSegmentations(dataset, regions_by_case))
    log(f"training on the '{region}' region; cases whose label lies fully inside each region: {counts}")
    for line in warnings:
        log(f"WARNING: {line}")
    if labels:
        fractions, low = label_coverage_by_label(regions_by_case, StreamedSegmentations(dataset, regions_by_case),
                                                 labels, region)
        for name, shares in fractions.items():
            log(f"{name}: share of its voxels inside each region: " + ", ".join(
                f"{r} {'-' if share is None else f'{100 * share:.0f}%'}" for r, share in shares.items()))
        for line in low:
            log(f"WARNING: {line}")
    return {identifier: regions_by_case[identifier].boxes[region].ranges for identifier in regions_by_case}
