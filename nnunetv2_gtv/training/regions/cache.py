"""Regions of preprocessed cases, cached as JSON beside nnU-Net's preprocessed data and recomputed when stale."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from nnunetv2_gtv.io.atomic import write_text
from nnunetv2_gtv.training.regions.borders import compute_regions
from nnunetv2_gtv.training.regions.orientation import anterior_axis_from_direction, superior_axis_from_direction
from nnunetv2_gtv.training.regions.records import CACHE_FOLDER, CaseRegions, Log, RegionSettings


def _write_json_atomic(path: Path, value: dict) -> None:
    """One top-level key per line, written atomically, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()) + "\n}\n", path)


def _same_threshold(a: float | None, b: float | None) -> bool:
    return (a is None) == (b is None) and (a is None or bool(np.isclose(a, b)))


def _load_cached(path: Path, shape: Sequence[int], spacing: Sequence[float], orientation: tuple[int, bool],
                 body_threshold: float, settings: RegionSettings, bone_threshold: float | None,
                 anterior: tuple[int, bool], air_threshold: float | None) -> CaseRegions | None:
    """The cached regions if they were computed for this very image and parameters, else None."""
    try:
        cached = CaseRegions.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same = (cached.shape == tuple(shape) and np.allclose(cached.spacing, spacing)
            and (cached.superior_axis, cached.superior_is_high) == orientation and cached.anterior == anterior
            and np.isclose(cached.body_threshold, body_threshold) and cached.settings == settings
            and _same_threshold(cached.bone_threshold, bone_threshold)
            and _same_threshold(cached.air_threshold, air_threshold))
    return cached if same else None


def _spacing_from_properties(properties: Mapping, shape: Sequence[int], transpose_forward: Sequence[int]
                             ) -> tuple[float, ...]:
    """Voxel spacing of a preprocessed array from the original spacing and the shapes before/after resampling."""
    original = [properties["spacing"][i] for i in transpose_forward]
    before = properties["shape_after_cropping_and_before_resampling"]
    return tuple(float(s) * b / n for s, b, n in zip(original, before, shape))


def load_or_compute_regions(preprocessed_folder: str | os.PathLike, identifier: str, body_threshold: float,
                            spacing_zyx: Sequence[float] | None = None,
                            transpose_forward: Sequence[int] = (0, 1, 2),
                            settings: RegionSettings = RegionSettings(), log: Log | None = None,
                            bone_threshold: float | None = None, air_threshold: float | None = None) -> CaseRegions:
    """Regions of one nnU-Net preprocessed case, cached in ``<folder>/gtv_regions/<identifier>.json``.

    The thresholds are in the preprocessed (normalised) units, see :func:`body_threshold_from_plans`,
    :func:`bone_threshold_from_plans` and :func:`air_threshold_from_plans` (None: that landmark is not used).
    ``spacing_zyx`` is the configuration's spacing; when None it is derived from the case's properties.
    The cache is recomputed when missing, unreadable or made for another shape, spacing or setting.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = Path(preprocessed_folder)
    data, _, _, properties = infer_dataset_class(str(folder))(str(folder), [identifier]).load_case(identifier)
    shape = tuple(data.shape[1:])
    spacing = tuple(spacing_zyx) if spacing_zyx is not None else _spacing_from_properties(
        properties, shape, transpose_forward)
    direction = properties["sitk_stuff"]["direction"]
    orientation = superior_axis_from_direction(direction, transpose_forward)
    anterior = anterior_axis_from_direction(direction, transpose_forward)
    path = folder / CACHE_FOLDER / f"{identifier}.json"
    regions = _load_cached(path, shape, spacing, orientation, body_threshold, settings, bone_threshold, anterior,
                           air_threshold)
    if regions is None:
        regions = compute_regions(np.asarray(data[0]), spacing, *orientation, body_threshold, settings,
                                  bone_threshold, anterior, air_threshold)
        _write_json_atomic(path, regions.to_json())
    if log is not None:
        log(f"regions {identifier}: {regions.describe()}")
        for warning in regions.warnings:
            log(f"WARNING regions {identifier}: {warning}")
    return regions


def regions_for_dataset(preprocessed_folder: str | os.PathLike, identifiers: Iterable[str], body_threshold: float,
                        spacing_zyx: Sequence[float] | None = None, transpose_forward: Sequence[int] = (0, 1, 2),
                        settings: RegionSettings = RegionSettings(), log: Log | None = None,
                        bone_threshold: float | None = None, air_threshold: float | None = None
                        ) -> dict[str, CaseRegions]:
    """:func:`load_or_compute_regions` for many cases, with a progress bar."""
    from tqdm import tqdm

    identifiers = list(identifiers)
    return {identifier: load_or_compute_regions(preprocessed_folder, identifier, body_threshold, spacing_zyx,
                                                transpose_forward, settings, log, bone_threshold, air_threshold)
            for identifier in tqdm(identifiers, desc="sampling regions", disable=len(identifiers) < 2)}
