"""Uncertainty against error: pixel error rate per entropy level (Mei et al., Table 4) and VVC against 1 - Dice.

Error rate. Entropy values are rounded to ``decimals`` places; every distinct rounded value is one level (with
six binary models: 0, 0.4506, 0.6365, 0.6931). A voxel is an error when its predicted label differs from the
reference label. Voxels are counted inside a region, chosen with ``kind``:

- ``bbox`` (default): the bounding box of every voxel that the prediction or the reference labels as
  foreground or that has entropy > 0, grown by ``margin_mm`` on each side and clipped to the image;
- ``body``: CT > ``body_threshold_hu`` (default -300 HU), holes filled slice by slice along the first array
  axis (so the air of the airway inside the body is counted);
- ``image``: the whole image.

Whatever the kind, the region always contains every foreground voxel of the prediction or reference and
every voxel with entropy > 0, so no error and no uncertain voxel is ever left out. Level 1 (entropy 0) is
dominated by easy background, so its rate depends on the region; the paper used a box around the head.

A case's rate at a level is errors / voxels at that level (undefined when the case has no voxel there).
Two summaries over cases are given: the mean of the per-case rates (as in Table 4's "Average" row, cases
without voxels at that level left out and counted) and the pooled rate (all errors / all voxels).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

REGION_KINDS = ("bbox", "body", "image")
MAX_DENSE_LEVEL_CODES = 10**6  # wider ranges of rounded entropy codes are counted by sorting instead


@dataclass(frozen=True)
class LevelCount:
    """Voxels and errors at one entropy level of one case."""

    level: float
    voxels: int
    errors: int

    @property
    def rate(self) -> float:
        return self.errors / self.voxels if self.voxels else float("nan")


def _body_mask(ct: np.ndarray, threshold_hu: float) -> np.ndarray:
    body = ct > threshold_hu
    return np.stack([ndimage.binary_fill_holes(section) for section in body])


def _margin_box(core: np.ndarray, spacing: tuple[float, ...], margin_mm: float) -> np.ndarray:
    box = np.zeros(core.shape, dtype=bool)
    if not core.any():
        return box
    found = ndimage.find_objects(core.astype(np.uint8))[0]
    grown = tuple(
        slice(max(0, s.start - int(np.ceil(margin_mm / sp))), min(n, s.stop + int(np.ceil(margin_mm / sp))))
        for s, sp, n in zip(found, spacing, core.shape)
    )
    box[grown] = True
    return box


def error_region(
    kind: str,
    prediction: np.ndarray,
    reference: np.ndarray,
    entropy: np.ndarray,
    spacing: tuple[float, ...],
    margin_mm: float = 10.0,
    ct: np.ndarray | None = None,
    body_threshold_hu: float = -300.0,
) -> np.ndarray:
    """Boolean mask of the voxels in which errors are counted (see the module docstring for ``kind``)."""
    if kind not in REGION_KINDS:
        raise ValueError(f"unknown error region {kind!r}; choose one of {', '.join(REGION_KINDS)}")
    core = (prediction > 0) | (reference > 0) | (entropy > 0)
    if kind == "image":
        return np.ones(core.shape, dtype=bool)
    if kind == "bbox":
        return core | _margin_box(core, spacing, margin_mm)
    if ct is None:
        raise ValueError("the body error region needs the CT image")
    return core | _body_mask(ct, body_threshold_hu)


def level_counts(
    entropy: np.ndarray, prediction: np.ndarray, reference: np.ndarray, region: np.ndarray, decimals: int = 4
) -> list[LevelCount]:
    """Voxels and errors (prediction != reference) inside ``region`` at each rounded entropy level, ascending."""
    values = entropy[region].astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("the entropy map has NaN or infinite values")
    scale = 10.0**decimals
    codes = np.rint(values * scale).astype(np.int64)
    errors = (prediction != reference)[region]
    if codes.size == 0:
        return []
    if np.ptp(codes) < MAX_DENSE_LEVEL_CODES:  # count integer codes directly: no sort over every voxel
        offset = int(codes.min())
        voxels = np.bincount(codes - offset)
        wrong = np.bincount(codes - offset, weights=errors, minlength=voxels.size)
        present = np.flatnonzero(voxels)
        levels = present + offset
    else:
        levels, inverse = np.unique(codes, return_inverse=True)
        voxels, wrong = np.bincount(inverse), np.bincount(inverse, weights=errors)
        present = np.arange(levels.size)
    return [LevelCount(int(code) / scale + 0.0, int(voxels[i]), int(wrong[i])) for code, i in zip(levels, present)]


def error_rate_table(per_case: dict[str, list[LevelCount]]) -> dict:
    """Combine per-case level counts into a table over the union of levels (rates as fractions).

    Returns ``levels`` (ascending), ``per_case`` (case -> rate per level, NaN where the case has no voxel),
    ``mean_over_cases``, ``n_cases`` (cases with voxels at each level) and ``pooled``.
    """
    levels = sorted({count.level for counts in per_case.values() for count in counts})
    index = {level: i for i, level in enumerate(levels)}
    rates = np.full((len(per_case), len(levels)), np.nan)
    voxels = np.zeros(len(levels))
    errors = np.zeros(len(levels))
    for row, counts in enumerate(per_case.values()):
        for count in counts:
            rates[row, index[count.level]] = count.rate
            voxels[index[count.level]] += count.voxels
            errors[index[count.level]] += count.errors
    n_cases = np.isfinite(rates).sum(axis=0)
    with np.errstate(invalid="ignore"):
        mean = np.where(n_cases > 0, np.nansum(rates, axis=0) / np.maximum(n_cases, 1), np.nan)
    return {
        "levels": levels,
        "per_case": {case: rates[row].tolist() for row, case in enumerate(per_case)},
        "mean_over_cases": mean.tolist(),
        "n_cases": n_cases.tolist(),
        "pooled": (errors / np.maximum(voxels, 1)).tolist(),
        "voxels": voxels.astype(int).tolist(),
        "errors": errors.astype(int).tolist(),
    }


def correlation(x: list[float], y: list[float]) -> dict:
    """Pearson and Spearman correlation (with two-sided p-values) over the pairs where both values are finite.

    With fewer than three pairs, or a constant variable, the coefficients are NaN and ``note`` says why.
    """
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x_arr) & np.isfinite(y_arr)
    x_arr, y_arr = x_arr[keep], y_arr[keep]
    result = {"n": int(keep.sum()), "n_excluded": int((~keep).sum()), "pearson_r": float("nan"),
              "pearson_p": float("nan"), "spearman_rho": float("nan"), "spearman_p": float("nan"), "note": ""}
    if x_arr.size < 3:
        result["note"] = f"needs at least 3 cases with both values, got {x_arr.size}"
        return result
    if np.ptp(x_arr) == 0 or np.ptp(y_arr) == 0:
        result["note"] = "one of the variables is constant"
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        pearson = stats.pearsonr(x_arr, y_arr)
        spearman = stats.spearmanr(x_arr, y_arr)
    result.update(pearson_r=float(pearson.statistic), pearson_p=float(pearson.pvalue),
                  spearman_rho=float(spearman.statistic), spearman_p=float(spearman.pvalue))
    return result
