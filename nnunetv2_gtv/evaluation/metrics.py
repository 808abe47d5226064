"""Overlap, surface-distance and volume metrics of one binary segmentation against its reference.

Definitions (Mei et al., eqs. 8-9; distances in mm from the physical voxel spacing):

- Dice = 2 |P & G| / (|P| + |G|).
- Surface of a mask = its voxels with at least one 6-neighbour outside the mask (mask XOR its erosion with
  the 6-connected structuring element); voxels on the image border count as surface. A surface point is the
  voxel centre.
- d(s, G) = Euclidean distance from surface point s to the nearest surface point of G, computed exactly with
  ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``.
- ASSD (eq. 9) = the mean of all surface-to-surface distances with both directions pooled:
  (sum_s d(s, G) + sum_g d(g, P)) / (|S| + |G|).
- HD95 = max(p95 of d(s, G) over s, p95 of d(g, P) over g), the larger of the two directed 95th percentiles
  (numpy's default linear interpolation).
- NSD (normalised surface Dice at tolerance tau, SegRap2023's second metric, default tau = 1 mm) =
  (|{s: d(s, G) <= tau}| + |{g: d(g, P) <= tau}|) / (|S| + |G|): the share of both surfaces within tau of the
  other, counting surface voxels (SegRap's script weights surface elements by their area instead).
- RVE = |V_pred - V_ref| / V_ref, reported in percent.

Empty masks never raise and are never dropped silently:

- both empty: Dice 1, NSD 1, ASSD 0, HD95 0, RVE 0 (SegRap scores a structure absent from both as 1);
- exactly one empty: Dice 0, NSD 0, ASSD = HD95 = the diagonal of the image's physical extent (a finite penalty
  that stays in the mean); RVE is 100 % for an empty prediction, undefined (NaN) for an empty reference. A NaN is
  excluded from that metric's mean and counted as ``n_undefined`` by :func:`summarise`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

EMPTY_STATES = ("none", "both", "prediction", "reference")
METRIC_NAMES = ("dice", "nsd", "assd_mm", "hd95_mm", "rve_percent")
NSD_TOLERANCE_MM = 1.0  # SegRap2023's


@dataclass(frozen=True)
class CaseMetrics:
    """Metrics of one prediction; ``empty`` is one of :data:`EMPTY_STATES` (which mask, if any, was empty)."""

    dice: float
    nsd: float
    assd_mm: float
    hd95_mm: float
    rve_percent: float
    volume_pred_ml: float
    volume_ref_ml: float
    empty: str

    def as_dict(self) -> dict:
        return asdict(self)


def image_diagonal_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """Length of the diagonal of the image's physical extent (shape times spacing): the empty-mask penalty."""
    return float(np.sqrt(np.sum((np.asarray(shape) * np.asarray(spacing, dtype=float)) ** 2)))


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it (outside the image counts as outside the mask)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union, padded by one background voxel.

    Exact for surface distances: every surface point lies in the box, the padding plays the role of the
    background outside the image, and the EDT is exact within the array it is given.
    """
    box = ndimage.find_objects((a | b).astype(np.uint8))[0]
    return np.pad(a[box], 1), np.pad(b[box], 1)


def directed_surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Return (d(s, G) for every surface point s of ``pred``, d(g, P) for every surface point g of ``ref``) in mm.

    Both masks must be non-empty; ``spacing`` is in array axis order (z, y, x for SimpleITK arrays).
    """
    pred, ref = _crop_to_union(pred.astype(bool), ref.astype(bool))
    pred_surface, ref_surface = surface(pred), surface(ref)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_ref[pred_surface], to_pred[ref_surface]


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """2 |P & G| / (|P| + |G|) of two boolean masks; 1 when both are empty."""
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & ref)) / total


def compute_metrics(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...],
                    nsd_tolerance_mm: float = NSD_TOLERANCE_MM) -> CaseMetrics:
    """Metrics of boolean mask ``pred`` against boolean mask ``ref`` on the same grid (spacing in array order)."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    pred, ref = pred.astype(bool), ref.astype(bool)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    volume_pred, volume_ref = n_pred * voxel_ml, n_ref * voxel_ml
    if n_pred == 0 and n_ref == 0:
        return CaseMetrics(1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, "both")
    if n_pred == 0 or n_ref == 0:
        penalty = image_diagonal_mm(pred.shape, spacing)
        rve = 100.0 if n_pred == 0 else float("nan")
        return CaseMetrics(0.0, 0.0, penalty, penalty, rve, volume_pred, volume_ref,
                           "prediction" if n_pred == 0 else "reference")
    to_ref, to_pred = directed_surface_distances(pred, ref, spacing)
    assd = float((to_ref.sum() + to_pred.sum()) / (to_ref.size + to_pred.size))
    hd95 = float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))
    within = np.count_nonzero(to_ref <= nsd_tolerance_mm) + np.count_nonzero(to_pred <= nsd_tolerance_mm)
    nsd = float(within / (to_ref.size + to_pred.size))
    rve = 100.0 * abs(n_pred - n_ref) / n_ref
    return CaseMetrics(dice_score(pred, ref), nsd, assd, hd95, rve, volume_pred, volume_ref, "none")


def summarise(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values) over the finite values.

    ``n`` is the number of values that entered the mean, ``n_undefined`` the number of NaN values left out.
    """
    array = np.asarray(values, dtype=float)
    finite = array[np.isfinite(array)]
    return {
        "mean": float(finite.mean()) if finite.size else float("nan"),
        "std": float(finite.std(ddof=1)) if finite.size > 1 else float("nan"),
        "n": int(finite.size),
        "n_undefined": int(array.size - finite.size),
    }
