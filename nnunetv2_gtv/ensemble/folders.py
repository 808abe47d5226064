"""Reading and cross-checking the nnU-Net folders that hold per-model probabilities.

Accepted layouts (all hold ``<case>.npz`` + ``<case>.pkl`` pairs written by nnU-Net's export):

- ``nnUNetv2_predict ... --save_probabilities`` output: the pairs plus ``plans.json`` and ``dataset.json``;
- ``nnUNetv2_train ... --val --npz`` output: ``<model>/fold_X/validation`` (pass that folder or ``fold_X``);
  ``plans.json``/``dataset.json`` live in ``<model>``, two levels up;
- a trained model folder ``<model>``: the validation folders of all its ``fold_*`` are joined (each case
  must come from exactly one fold), as ``nnUNetv2_ensemble``'s cross-validation ensembling does.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunetv2_gtv.ensemble.errors import FusionInputError

# dataset.json entries that change what the probability channels or the written files mean
_MUST_MATCH = ("labels", "file_ending", "channel_names", "regions_class_order")
_MAX_LISTED = 10


@dataclass(frozen=True)
class DatasetInfo:
    """What fusion needs from plans.json and dataset.json."""

    file_ending: str
    num_labels: int
    reader_writer: str = "SimpleITKIO"
    transpose_backward: tuple[int, ...] = (0, 1, 2)
    label_names: tuple[str, ...] = ()  # name of label value 0..C-1 (dataset.json); empty: "label_<value>"

    @classmethod
    def from_jsons(cls, plans: dict, dataset_json: dict, where: str = "dataset.json") -> "DatasetInfo":
        return cls(
            file_ending=dataset_json["file_ending"],
            num_labels=len(label_values(dataset_json, where)),
            reader_writer=plans["image_reader_writer"],
            transpose_backward=tuple(plans["transpose_backward"]),
            label_names=tuple(label_names(dataset_json, where)),
        )

    def name_of(self, label: int) -> str:
        """The label's name in dataset.json (``label_<value>`` when unknown)."""
        return self.label_names[label] if label < len(self.label_names) else f"label_{label}"


@dataclass(frozen=True)
class PredictionFolder:
    """One model's probability folder as given on the command line."""

    path: Path
    plans: dict
    dataset_json: dict
    cases: dict[str, Path]  # case id -> .npz file (the .pkl sits beside it)

    @property
    def dataset_info(self) -> DatasetInfo:
        return DatasetInfo.from_jsons(self.plans, self.dataset_json, f"{self.path}: dataset.json")


def label_values(dataset_json: dict, where: str = "dataset.json") -> list[int]:
    """Label values 0..C-1 in channel order; region-based datasets are rejected."""
    labels = {k: v for k, v in dataset_json["labels"].items() if k != "ignore"}
    regions = any(isinstance(v, (list, tuple)) for v in labels.values())
    if regions or dataset_json.get("regions_class_order") is not None:
        raise FusionInputError(f"{where}: region-based labels are not supported (probabilities are sigmoids "
                               "per region, not a distribution over labels)")
    values = sorted(int(v) for v in labels.values())
    if values != list(range(len(values))) or len(values) < 2:
        raise FusionInputError(f"{where}: labels must be consecutive integers 0..C-1 with C >= 2, got {values}")
    return values


def label_names(dataset_json: dict, where: str = "dataset.json") -> list[str]:
    """The names of label values 0..C-1 in dataset.json, in value order (checked as ``label_values``)."""
    label_values(dataset_json, where)
    by_value = {int(v): k for k, v in dataset_json["labels"].items() if k != "ignore"}
    return [by_value[value] for value in sorted(by_value)]


def _npz_dirs(path: Path) -> list[Path]:
    if any(path.glob("*.npz")):
        return [path]
    if (path / "validation").is_dir():
        return [path / "validation"]
    folds = sorted(p / "validation" for p in path.glob("fold_*") if (p / "validation").is_dir())
    if folds:
        return folds
    raise FusionInputError(f"{path}: no .npz probability files found; run nnUNetv2_predict with "
                           "--save_probabilities (or nnUNetv2_train --val --npz)")


def _find_json(npz_dir: Path, name: str) -> Path:
    searched = [npz_dir, npz_dir.parent, npz_dir.parent.parent]
    for folder in searched:
        if (folder / name).is_file():
            return folder / name
    raise FusionInputError(f"{npz_dir}: no {name} found in {', '.join(str(f) for f in searched)}")


def _load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise FusionInputError(f"{path}: cannot read JSON ({err})") from err


def open_prediction_folder(path: str | os.PathLike) -> PredictionFolder:
    """Index one folder's cases and load its plans.json/dataset.json."""
    path = Path(path)
    if not path.is_dir():
        raise FusionInputError(f"{path}: input folder does not exist")
    dirs = _npz_dirs(path)
    cases: dict[str, Path] = {}
    for npz_dir in dirs:
        for npz in sorted(npz_dir.glob("*.npz")):
            case = npz.name[:-4]
            if case.startswith("."):
                continue
            if not npz.with_suffix(".pkl").is_file():
                raise FusionInputError(f"{path}: case {case} has {npz.name} but no {case}.pkl beside it")
            if case in cases:
                raise FusionInputError(f"{path}: case {case} is present in both {cases[case].parent} and {npz_dir}")
            cases[case] = npz
    plans = _load_json(_find_json(dirs[0], "plans.json"))
    dataset_json = _load_json(_find_json(dirs[0], "dataset.json"))
    for key in ("image_reader_writer", "transpose_backward"):
        if key not in plans:
            raise FusionInputError(f"{path}: plans.json has no '{key}'")
    if "labels" not in dataset_json or "file_ending" not in dataset_json:
        raise FusionInputError(f"{path}: dataset.json needs 'labels' and 'file_ending'")
    label_values(dataset_json, f"{path}: dataset.json")
    return PredictionFolder(path, plans, dataset_json, cases)


def check_compatible(folders: Sequence[PredictionFolder]) -> list[str]:
    """Raise if the folders disagree on labels, file ending, channels or reader/writer.

    Returns warnings for other dataset.json differences (e.g. a description), which do not affect fusion.
    """
    first = folders[0]
    warnings = []
    for other in folders[1:]:
        for key in _MUST_MATCH:
            if first.dataset_json.get(key) != other.dataset_json.get(key):
                raise FusionInputError(
                    f"dataset.json '{key}' differs between {first.path} ({first.dataset_json.get(key)!r}) and "
                    f"{other.path} ({other.dataset_json.get(key)!r}); models of different label sets cannot be fused")
        if first.plans["image_reader_writer"] != other.plans["image_reader_writer"]:
            raise FusionInputError(
                f"plans.json 'image_reader_writer' differs between {first.path} ({first.plans['image_reader_writer']}) "
                f"and {other.path} ({other.plans['image_reader_writer']})")
        others = sorted(k for k in set(first.dataset_json) | set(other.dataset_json)
                        if k not in _MUST_MATCH and first.dataset_json.get(k) != other.dataset_json.get(k))
        if others:
            warnings.append(f"dataset.json of {other.path} differs from {first.path} in {', '.join(others)} "
                            "(not used for fusion)")
    return warnings


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def match_cases(folders: Sequence[PredictionFolder], allow_missing: bool = False) -> dict[str, list[Path | None]]:
    """Case id -> one .npz per folder (None where a folder lacks the case), sorted by case id.

    Without ``allow_missing`` every folder must hold the same cases; the error lists what each one lacks.
    """
    all_cases = sorted(set().union(*(f.cases for f in folders)))
    lacking = {f.path: [c for c in all_cases if c not in f.cases] for f in folders}
    if not allow_missing and any(lacking.values()):
        lines = [f"  {path} lacks {len(missing)} case(s): {_listed(missing)}"
                 for path, missing in lacking.items() if missing]
        raise FusionInputError("the input folders hold different cases (pass --allow-missing to fuse what "
                               "exists):\n" + "\n".join(lines))
    return {case: [f.cases.get(case) for f in folders] for case in all_cases}
