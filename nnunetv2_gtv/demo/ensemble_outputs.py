"""Fused outputs of a simulated ensemble, for showing and testing the review page without trained models.

Each of ``num_models`` "models" segments a case's reference label shifted by a voxel, and, depending on how hard
the case is drawn to be, grown or shrunk in-plane by up to 1 or 3 mm and sometimes with a false-positive blob; the votes are fused as
gtv-uncertainty fuses them (majority, largest component, vote entropy, VVC) and written with gtv-uncertainty's
file names and summary files: outputs that look like those of models that roughly found the GTV, for the review
page's tests and benchmark without training. One foreground label only (refused otherwise).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunetv2_gtv.ensemble.fusion import CaseResult, FusionSettings, filter_components, volume_variation_coefficient
from nnunetv2_gtv.ensemble.review_ranking import ReviewSelection, rank_rows
from nnunetv2_gtv.ensemble.summary import case_row, write_summaries

ENDING = ".nii.gz"


SPREAD_MM = (0.0, 1.0, 3.0)  # easy, medium, hard case: largest in-plane growth or shrinkage of a model's mask


def _model_mask(label: np.ndarray, spacing_zyx: tuple[float, ...], spread_mm: float, rng: np.random.Generator
                ) -> np.ndarray:
    grow_mm = rng.uniform(-spread_mm, spread_mm)
    radius = [0, *(max(0, round(abs(grow_mm) / s)) for s in spacing_zyx[1:])]
    structure = np.ones([2 * r + 1 for r in radius], bool)
    operation = ndimage.binary_dilation if grow_mm > 0 else ndimage.binary_erosion
    mask = operation(label, structure=structure) if max(radius) else label.copy()
    mask = np.roll(mask, tuple(int(v) for v in rng.integers(-1, 2, size=3)), axis=(0, 1, 2))
    if spread_mm == SPREAD_MM[-1] and rng.random() < 0.3:  # a false positive: a small blob
        centre = [int(rng.integers(n // 5, n // 2)) if a == 0 else int(rng.integers(n // 3, 2 * n // 3))
                  for a, n in enumerate(mask.shape)]
        box = tuple(slice(max(0, c - max(1, round(6 / s))), c + max(1, round(6 / s)))
                    for c, s in zip(centre, spacing_zyx))
        mask[box] = True
    return mask


def simulate_case(label_path: Path, output_folder: Path, num_models: int, rng: np.random.Generator,
                  settings: FusionSettings = FusionSettings()) -> dict:
    """Write ``<case>`` and ``<case>_entropy`` next to each other in ``output_folder``; return the summary row."""
    reference = sitk.ReadImage(str(label_path))
    values = sitk.GetArrayFromImage(reference)
    if values.max() > 1:
        raise ValueError(f"{label_path}: labels {sorted(set(values.ravel().tolist()) - {0})}; the simulated ensemble "
                         "segments one foreground label (a dataset without --nodes)")
    label = values > 0
    spacing_zyx = reference.GetSpacing()[::-1]
    votes = np.zeros(label.shape, np.uint8)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    volumes = []
    spread_mm = float(rng.choice(SPREAD_MM))
    for _ in range(num_models):
        mask = _model_mask(label, spacing_zyx, spread_mm, rng)
        votes += mask
        volumes.append(int(np.count_nonzero(mask)) * voxel_ml)
    share = votes.astype(np.float32) / num_models
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(np.nan_to_num(share * np.log(share)) + np.nan_to_num((1 - share) * np.log(1 - share)))
    fused = (share > 0.5).astype(np.uint8)
    removed = sum(filter_components(fused, settings.connectivity, settings.component_rules(2), voxel_ml).values())
    case = label_path.name[: -len(ENDING)]
    for array, name in ((fused, case), (entropy.astype(np.float32), f"{case}_entropy")):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(reference)
        sitk.WriteImage(image, str(output_folder / f"{name}{ENDING}"))
    vvc = volume_variation_coefficient(volumes)
    return case_row(CaseResult(case, num_models, tuple(volumes), int(np.count_nonzero(fused)) * voxel_ml, vvc,
                               removed, bool(vvc > settings.vvc_threshold or not any(volumes)), ()))


def write_ensemble_outputs(labels_dir: str | os.PathLike, output_folder: str | os.PathLike, num_models: int = 6,
                           seed: int = 0) -> Path:
    """gtv-uncertainty-like outputs (images, summary.json, summary.csv) for every label in ``labels_dir``."""
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = [simulate_case(path, output_folder, num_models, rng) for path in sorted(Path(labels_dir).glob(f"*{ENDING}"))]
    header = {"command": f"simulated ensemble of {num_models} models (nnunetv2_gtv.demo.ensemble_outputs)",
              "settings": {"vvc_threshold": FusionSettings().vvc_threshold}}
    write_summaries(output_folder, rank_rows(rows, ReviewSelection()), num_models, header)
    return output_folder
