"""Reading the fused-output folder, the reference labels and the per-model prediction folders (files only)."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_gtv.ensemble.errors import FusionInputError
from nnunetv2_gtv.ensemble.folders import label_names, label_values

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
DERIVED_SUFFIXES = ("_entropy", "_probability")
# Geometry tolerances: spacing relative, origin in mm, direction cosines absolute (NIfTI stores float32).
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


class EvaluationInputError(ValueError):
    """An input file or folder is missing, unreadable or inconsistent; the message names it."""


@dataclass(frozen=True)
class Volume:
    """A 3D image as a (z, y, x) array with its SimpleITK geometry (spacing/origin in x, y, z order)."""

    path: Path
    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        return tuple(reversed(self.spacing))


@dataclass(frozen=True)
class ModelFolder:
    """One per-model prediction folder listed in summary.json ``inputs``."""

    name: str
    listed_as: str
    path: Path | None  # None when the folder does not exist


def read_volume(path: Path) -> Volume:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise EvaluationInputError(f"{path}: cannot be read by SimpleITK ({str(error).strip().splitlines()[-1]})")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise EvaluationInputError(f"{path}: expected a 3D single-channel image, got dimension "
                                   f"{image.GetDimension()} with {image.GetNumberOfComponentsPerPixel()} components")
    return Volume(Path(path), sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                  image.GetDirection())


def check_same_grid(volume: Volume, reference: Volume) -> None:
    """Raise naming both files when ``volume`` is not on ``reference``'s voxel grid."""
    problems = []
    if volume.array.shape != reference.array.shape:
        problems.append(f"shape (z, y, x) {volume.array.shape} vs {reference.array.shape}")
    if not np.allclose(volume.spacing, reference.spacing, rtol=SPACING_RTOL, atol=0):
        problems.append(f"spacing {volume.spacing} vs {reference.spacing}")
    if not np.allclose(volume.origin, reference.origin, rtol=0, atol=ORIGIN_ATOL_MM):
        problems.append(f"origin {volume.origin} vs {reference.origin}")
    if not np.allclose(volume.direction, reference.direction, rtol=0, atol=DIRECTION_ATOL):
        problems.append(f"direction {volume.direction} vs {reference.direction}")
    if problems:
        raise EvaluationInputError(f"{volume.path}: geometry differs from {reference.path}: " + "; ".join(problems))


def detect_file_ending(folder: Path) -> str:
    """``file_ending`` from ``folder/dataset.json`` if present, else the single supported ending of its images."""
    dataset_json = folder / "dataset.json"
    if dataset_json.is_file():
        ending = _read_json(dataset_json).get("file_ending")
        if not ending:
            raise EvaluationInputError(f"{dataset_json}: has no 'file_ending'")
        return ending
    found = {ending for path in folder.iterdir() for ending in SUPPORTED_ENDINGS
             if path.is_file() and path.name.endswith(ending)}
    if len(found) != 1:
        what = "no images" if not found else f"images with several endings {sorted(found)}"
        raise EvaluationInputError(f"{folder}: found {what}; supported endings: {', '.join(SUPPORTED_ENDINGS)} "
                                   "(or put a dataset.json with 'file_ending' there)")
    return found.pop()


def list_cases(folder: Path, file_ending: str) -> list[str]:
    """Case names of the segmentations ``<case><file_ending>`` in ``folder`` (entropy/probability maps excluded)."""
    cases = []
    for path in sorted(folder.glob(f"*{file_ending}")):
        case = path.name[: -len(file_ending)]
        if path.is_file() and not case.endswith(DERIVED_SUFFIXES):
            cases.append(case)
    return cases


def find_image(folder: Path, stem: str, file_ending: str) -> Path | None:
    """``folder/<stem><file_ending>``, else ``folder/<stem><e>`` for another supported ending, else None."""
    for ending in (file_ending, *SUPPORTED_ENDINGS):
        candidate = folder / f"{stem}{ending}"
        if candidate.is_file():
            return candidate
    return None


def _read_json(path: Path) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise EvaluationInputError(f"{path}: cannot be read as JSON ({error})")


def read_summary_json(folder: Path) -> dict | None:
    path = folder / "summary.json"
    return _read_json(path) if path.is_file() else None


def read_summary_csv(folder: Path) -> dict[str, dict[str, str]] | None:
    """Rows of ``folder/summary.csv`` keyed by case, or None when there is no such file."""
    path = folder / "summary.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "case" not in reader.fieldnames:
            raise EvaluationInputError(f"{path}: has no 'case' column")
        return {row["case"]: row for row in reader}


def model_folders(summary: dict | None, fused_dir: Path) -> list[ModelFolder]:
    """The prediction folders of summary.json ``inputs`` as model_1..model_N.

    A relative path is looked up relative to the working directory, then to the fused folder.
    """
    folders = []
    for i, listed in enumerate((summary or {}).get("inputs") or [], start=1):
        candidates = [Path(listed)] if Path(listed).is_absolute() else [Path(listed), fused_dir / listed]
        existing = next((c for c in candidates if c.is_dir()), None)
        folders.append(ModelFolder(f"model_{i}", str(listed), existing))
    return folders


@dataclass(frozen=True)
class LabelSet:
    """The label values a segmentation of the dataset may hold, their names, and where they were read."""

    values: tuple[int, ...]
    source: str
    names: tuple[str, ...] = ()  # of each value in ``values``; empty: ``label_<value>``

    def __str__(self) -> str:
        return "{" + ", ".join(str(v) for v in self.values) + "}"

    def name_of(self, value: int) -> str:
        return self.names[self.values.index(value)] if self.names and value in self.values else f"label_{value}"


def _dataset_json_candidates(fused_dir: Path, summary: dict | None, models: list[ModelFolder]) -> list[Path]:
    """Where a dataset.json may describe the predictions: their folder, the model folders of summary.json
    ``inputs`` (and the two folders above, as nnU-Net's validation folders keep it) and, for gtv-predict, the
    trained model folders of its checkpoints."""
    candidates = [fused_dir / "dataset.json"]
    for model in models:
        if model.path is not None:
            candidates += [model.path / "dataset.json", model.path.parent / "dataset.json",
                           model.path.parent.parent / "dataset.json"]
    for model in (summary or {}).get("models") or []:
        if isinstance(model, dict) and model.get("checkpoint"):
            candidates.append(Path(model["checkpoint"]).parent.parent / "dataset.json")
    return candidates


def find_label_set(fused_dir: Path, summary: dict | None, models: list[ModelFolder], label: int | None = None
                   ) -> LabelSet:
    """The ``labels`` of the first dataset.json found for the predictions, else the ``label_names`` that
    gtv-predict and gtv-uncertainty write into summary.json; without either, background and ``label`` (1 when
    None)."""
    for path in _dataset_json_candidates(fused_dir, summary, models):
        if path.is_file():
            dataset = _read_json(path)
            if "labels" in dataset:
                try:
                    return LabelSet(tuple(label_values(dataset, str(path))), str(path),
                                    tuple(label_names(dataset, str(path))))
                except FusionInputError as error:
                    raise EvaluationInputError(str(error)) from error
    names = (summary or {}).get("label_names")
    if isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names):
        return LabelSet(tuple(range(len(names))), f"{fused_dir / 'summary.json'} (label_names)", tuple(names))
    return LabelSet(tuple(sorted({0, label or 1})), "background and --label: no dataset.json with 'labels' beside "
                                                    "the predictions or their models")


def parse_float(text: str | None) -> float:
    """A CSV cell as float; empty, missing or non-numeric cells become NaN."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")
