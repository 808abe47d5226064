"""Reference computations for tests, written from the files and the paper's definitions with nothing of the
package's own fusion or post-processing, so that a test comparing against them can fail."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage


def region_aware_fusion(folders: list[Path], case: str) -> np.ndarray:
    """The models' saved probabilities averaged over the models whose region holds each voxel, argmax: written
    here from the npz files, nothing of the package's fusion."""
    total, count = _region_aware_sum(folders, case)
    return np.where(count > 0, np.argmax(total, axis=0), 0)


def near_ties(folders: list[Path], case: str, tolerance: float = 1e-3) -> np.ndarray:
    """Voxels whose two most probable labels (region-aware mean) lie within ``tolerance``: there the argmax may
    differ between two correct fusions that only add the float16 probabilities in another precision or order."""
    total, count = _region_aware_sum(folders, case)
    top_two = np.sort(total / np.maximum(count, 1), axis=0)[-2:]
    return (count > 0) & (top_two[1] - top_two[0] < tolerance)


def _region_aware_sum(folders: list[Path], case: str) -> tuple[np.ndarray, np.ndarray]:
    total, count = None, None
    for folder in folders:
        with np.load(folder / f"{case}.npz") as saved:
            probabilities = saved["probabilities"].astype(np.float64)
            covered = np.ones(probabilities.shape[1:], bool)
            if "region" in saved:
                covered[:] = False
                covered[tuple(slice(a, b) for a, b in saved["region"])] = True
        total = probabilities * covered if total is None else total + probabilities * covered
        count = covered.astype(int) if count is None else count + covered
    return total, count


def largest_component(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The largest 6-connected component of ``mask`` and how many components it has."""
    components, count = ndimage.label(mask)
    if not count:
        return mask.astype(bool), 0
    return components == np.argmax(np.bincount(components.ravel())[1:]) + 1, count
