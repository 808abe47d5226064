"""Per-case sampling boxes for the trainers, from the anatomy regions of ``nnunetv2_gtv.training.regions``."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from nnunetv2_gtv.training.regions import body_threshold_from_plans, label_coverage_report, regions_for_dataset


def training_region_boxes(preprocessed_folder: str, dataset, plans: dict, spacing_zyx: Sequence[float], region: str,
                          log: Callable[[str], None] = print) -> dict[str, tuple[tuple[int, int], ...]]:
    """Boxes of ``region`` ("local", "middle" or "global") for every case of ``dataset``, detected once and cached
    in ``preprocessed_folder``. Logs each case's region sizes and how many cases' labels each region holds whole."""
    regions_by_case = regions_for_dataset(preprocessed_folder, dataset.identifiers, body_threshold_from_plans(plans),
                                          spacing_zyx, plans.get("transpose_forward", (0, 1, 2)), log=log)
    seg_by_case = {identifier: np.asarray(dataset.load_case(identifier)[1]) for identifier in dataset.identifiers}
    counts, warnings = label_coverage_report(regions_by_case, seg_by_case)
    log(f"training on the '{region}' region; cases whose label lies fully inside each region: {counts}")
    for line in warnings:
        log(f"WARNING: {line}")
    return {identifier: regions_by_case[identifier].boxes[region].ranges for identifier in regions_by_case}
