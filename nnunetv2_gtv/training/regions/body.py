"""The body mask the regions are found on, and the HU thresholds in the units of a plans' normalisation."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from nnunetv2_gtv.training.regions.records import BODY_THRESHOLD_HU, BONE_THRESHOLD_HU


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


def _threshold_inside_clip(plans: Mapping, hu: float, channel: int) -> float | None:
    """``hu`` in normalised units, or None when the plans' clip range does not hold it strictly inside (the tissues on
    its far side then share one value with those near it) or the channel is not CT-normalised."""
    try:
        threshold = body_threshold_from_plans(plans, hu, channel)
    except ValueError:
        return None
    props = plans["foreground_intensity_properties_per_channel"][str(channel)]
    return threshold if props["percentile_00_5"] < hu < props["percentile_99_5"] else None


def bone_threshold_from_plans(plans: Mapping, hu: float = BONE_THRESHOLD_HU, channel: int = 0) -> float | None:
    """Bone threshold in normalised units; None when the normalisation clips bone together with soft tissue."""
    return _threshold_inside_clip(plans, hu, channel)


def air_threshold_from_plans(plans: Mapping, hu: float = BODY_THRESHOLD_HU, channel: int = 0) -> float | None:
    """Air threshold (lungs) in normalised units; None when the normalisation clips air together with fat."""
    return _threshold_inside_clip(plans, hu, channel)
