"""From each model's logits on the preprocessed grid to the fused outputs on the CT's own grid.

Every model's logits go through nnU-Net's own export (``convert_predicted_logits_to_segmentation_with_correct_shape``:
resampling, softmax, un-cropping, transpose), exactly as ``nnUNetv2_predict --save_probabilities`` computes its
npz, and straight into gtv-uncertainty's fusion: one model's probability map exists at a time. A model that ran in
a region (its sampling region, or the body's box) hands fusion that box on the CT's grid too, so that the ensemble
leaves it out where it did not look (:func:`region_on_image_grid`).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from nnunetv2_gtv.ensemble.errors import SingleModelWarning
from nnunetv2_gtv.ensemble.folders import DatasetInfo
from nnunetv2_gtv.ensemble.fusion import CaseResult, FusionSettings, ModelMap, Ranges, fuse_probability_maps
from nnunetv2_gtv.ensemble.summary import fuse_and_record
from nnunetv2_gtv.io.atomic import write_file, write_text
from nnunetv2_gtv.io.images import write_image
from nnunetv2_gtv.runs import CaseTiming, write_timings

MODEL_PREDICTIONS_FOLDER = "model_predictions"


@dataclass
class ExportJob:
    """Everything a (spawned) export worker needs for one case. ``logits`` is consumed: emptied as it goes."""

    case: str
    logits: Iterable[np.ndarray]  # one (C, z, y, x) array per model, preprocessed grid: a list (emptied as it
    # goes) or a stream that yields each model's logits when it is predicted
    model_labels: list[str]
    model_folders: list[Path | None]  # where to save each model's own prediction too (None: nowhere)
    properties: dict  # nnU-Net's, of the image the models saw
    output_properties: dict  # of the input image (the same unless ``permutation``)
    permutation: tuple[int, int, int] | None  # axis order the models saw, undone before fusion
    plans: dict
    configuration: dict  # the configuration's entries in the plans (inheritance resolved)
    dataset_json: dict
    output_folder: Path
    dataset: DatasetInfo
    fusion: FusionSettings
    fingerprint: dict
    model_regions: list[Ranges | None] | None = None  # each model's box on the preprocessed grid (None: whole)
    preprocessed_shape: tuple[int, ...] = ()
    timing: CaseTiming = field(default_factory=CaseTiming)  # filled by the prediction loop before the export ends


def _covered_range(start: int, stop: int, preprocessed: int, cropped: int) -> tuple[int, int]:
    """The voxels of a resampled axis (``cropped`` long) whose interpolation reads only samples ``start..stop-1``
    of the preprocessed axis (``preprocessed`` long), with nnU-Net's (skimage's) centre mapping
    u = (i + 0.5) * preprocessed / cropped - 0.5; a box that reaches an end of the axis keeps that end."""
    scale = preprocessed / cropped
    low = 0 if start <= 0 else math.ceil((start + 0.5) / scale - 0.5 - 1e-9)
    high = cropped if stop >= preprocessed else math.floor((stop - 0.5) / scale - 0.5 + 1e-9) + 1
    low, high = min(max(low, 0), cropped), min(max(high, 0), cropped)
    return low, max(low, high)


def region_on_image_grid(region: Ranges, preprocessed_shape: Sequence[int], properties: dict,
                         transpose_backward: Sequence[int], permutation: Sequence[int] | None = None) -> Ranges:
    """A box on the preprocessed grid -> the box of the CT's own grid whose voxels the model's prediction there
    determines: resampling undone (only voxels interpolated from inside the box), nnU-Net's crop undone (a box that
    reaches the crop's edge reaches the image's edge: nnU-Net gives background outside the crop), then its axis
    order (``transpose_backward``) and gtv-predict's reordering of non-axial CTs (``permutation``) undone."""
    cropped_shape = properties["shape_after_cropping_and_before_resampling"]
    full_shape = properties["shape_before_cropping"]
    crop = properties["bbox_used_for_cropping"]
    transposed = []
    for axis, (start, stop) in enumerate(region):
        low, high = _covered_range(start, stop, int(preprocessed_shape[axis]), int(cropped_shape[axis]))
        offset = int(crop[axis][0])
        transposed.append((0 if start <= 0 else offset + low,
                           int(full_shape[axis]) if stop >= preprocessed_shape[axis] else offset + high))
    ranges = [transposed[a] for a in transpose_backward]
    if permutation is not None:
        ranges = [ranges[a] for a in np.argsort(permutation)]
    return tuple((int(low), int(high)) for low, high in ranges)


def model_predictions_folder(output_folder: str | os.PathLike, trainer: str, fold: int | str) -> Path:
    return Path(output_folder) / MODEL_PREDICTIONS_FOLDER / f"{trainer}__fold_{fold}"


def prepare_model_predictions_folder(folder: Path, plans: dict, dataset_json: dict) -> None:
    """A folder laid out like an nnUNetv2_predict --save_probabilities output (gtv-uncertainty reads it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("plans.json", plans), ("dataset.json", dataset_json)):
        write_text(json.dumps(content, indent=2), folder / name)


def _save_model_prediction(folder: Path, case: str, segmentation: np.ndarray, probabilities: np.ndarray,
                           region: Ranges | None, properties: dict, dataset: DatasetInfo) -> None:
    """What nnUNetv2_predict --save_probabilities writes: ``<case>.npz``, ``<case>.pkl``, the segmentation; the npz
    also holds ``region`` (the box the model predicted in) when it ran in one, which gtv-uncertainty reads."""
    write_image(segmentation, folder / f"{case}{dataset.file_ending}", dataset.file_ending, properties,
                dataset.reader_writer)
    arrays = {"probabilities": probabilities}
    if region is not None:
        arrays["region"] = np.asarray(region, dtype=np.int64)
    write_file(folder / f"{case}.npz", lambda f: np.savez_compressed(f, **arrays))
    write_file(folder / f"{case}.pkl", lambda f: pickle.dump(properties, f))


def _each_once(logits: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Each model's logits, not kept here afterwards (a list is emptied as it goes)."""
    if isinstance(logits, list):
        while logits:
            yield logits.pop(0)
    else:
        yield from logits


def _probability_maps(job: ExportJob) -> Iterator[ModelMap]:
    """Yield each model's probabilities on the CT's grid (with its region there), releasing its logits first."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

    plans_manager = PlansManager(job.plans)
    configuration_manager = ConfigurationManager(job.configuration)
    label_manager = plans_manager.get_label_manager(job.dataset_json)
    regions = job.model_regions or [None] * len(job.model_folders)
    for folder, region, logits in zip(job.model_folders, regions, _each_once(job.logits)):
        if region is not None:
            region = region_on_image_grid(region, job.preprocessed_shape, job.properties,
                                          plans_manager.transpose_backward, job.permutation)
        segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, plans_manager, configuration_manager, label_manager, job.properties,
            return_probabilities=True, num_threads_torch=torch.get_num_threads())
        del logits
        if job.permutation is not None:
            inverse = [int(a) for a in np.argsort(job.permutation)]
            segmentation = np.ascontiguousarray(segmentation.transpose(inverse))
            probabilities = np.ascontiguousarray(probabilities.transpose(0, *(1 + a for a in inverse)))
        if folder is not None:
            _save_model_prediction(folder, job.case, segmentation, probabilities, region, job.output_properties,
                                   job.dataset)
        del segmentation
        yield ModelMap(probabilities, region)


def export_case(job: ExportJob) -> tuple[str, dict | None, str | None, float]:
    """Fuse and write one case, its record (with its seconds) and its timings row; returns (case, summary row,
    error message, seconds)."""
    start = time.perf_counter()

    def fuse() -> CaseResult:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SingleModelWarning)  # gtv-predict says so once, not per case
            return fuse_probability_maps(job.case, _probability_maps(job), job.model_labels,
                                         job.output_properties, job.output_folder, job.dataset, job.fusion)

    def timing() -> dict:
        # exported beside the models (a stream): only the wait after the last model counts as export
        models_done = getattr(job.logits, "closed_at", None)
        job.timing.export = time.perf_counter() - (start if models_done is None else models_done)
        return job.timing.to_json()

    row, error = fuse_and_record(job.case, fuse, job.output_folder, job.dataset.file_ending, job.fusion,
                                 job.fingerprint, timing)
    if error is None:
        write_timings(job.output_folder, {job.case: job.timing}, [f for f in job.model_folders if f is not None])
    return job.case, row, error, time.perf_counter() - start
