"""An nnU-Net raw dataset from one folder per patient (a CT and target masks in each), with a fixed test split.

The layout read is the one of ``OpenKBP_anatomy`` (and of most research exports)::

    SOURCE/<patient>/ct.nii.gz          CT in HU
    SOURCE/<patient>/PTV70.nii.gz       a target, 0/1 on the CT's grid (any other names with --target)

Several targets (``--target GTVp GTVnd``) become labels 1..K in that order, written as one label map per patient.
Where two masks mark the same voxel the ``overlap`` rule decides: ``refuse`` (the default: an error naming the
patient, the labels and the voxels), ``later`` (the later target in --target wins) or ``earlier``. A patient that
lacks a mask is refused by name (``missing="refuse"``), left out and listed in split.json (``skip``), or given an
empty label (``empty``: e.g. a node-negative patient without a GTVnd file). With several targets an empty mask is
allowed as long as the patient has some target.

Written: ``<nnUNet_raw>/DatasetXXX_<name>/`` with ``imagesTr``/``labelsTr`` (the training patients, over which
nnU-Net makes its own folds), ``imagesTs``/``labelsTs`` (the held-out test patients), ``dataset.json`` and
``split.json`` (which patient went where, the seed, the source). The split is drawn once from the sorted patient
names with a seeded permutation, so the same folder and seed always give the same split; ``--split FILE``
reuses a written one (e.g. to rebuild a dataset on another machine). Every patient is checked before anything is
written: missing files, a mask on another grid, a mask that is not 0/1, an empty mask are errors naming the file.
The dataset is assembled in a hidden folder next to the target and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from nnunetv2_gtv.dataset_conversion.staging import existing_datasets
from nnunetv2_gtv.io.atomic import staged_folder

SPLIT_FILE = "split.json"
GEOMETRY_TOLERANCE = 1e-3  # mm (spacing, origin) and direction cosines: a mask must lie on its CT's grid


class PatientFolderError(ValueError):
    """A patient folder, or the whole source, that cannot become a dataset."""


OVERLAP_RULES = ("refuse", "later", "earlier")
MISSING_RULES = ("refuse", "skip", "empty")


@dataclass(frozen=True)
class Patient:
    name: str
    ct: Path
    targets: tuple[Path | None, ...]  # one mask per target, None where it is missing (missing="empty")
    target_ml: tuple[float, ...]


@dataclass(frozen=True)
class Skipped:
    """A patient left out because it lacks masks (missing="skip")."""

    name: str
    missing: tuple[str, ...]


def _geometry_mismatch(ct: sitk.Image, mask: sitk.Image) -> str | None:
    if ct.GetSize() != mask.GetSize():
        return f"size {mask.GetSize()} is not the CT's {ct.GetSize()}"
    for what, a, b in (("spacing", ct.GetSpacing(), mask.GetSpacing()), ("origin", ct.GetOrigin(), mask.GetOrigin()),
                       ("direction", ct.GetDirection(), mask.GetDirection())):
        if not np.allclose(a, b, atol=GEOMETRY_TOLERANCE):
            return f"{what} {tuple(round(v, 4) for v in b)} is not the CT's {tuple(round(v, 4) for v in a)}"
    return None


def _read_mask(path: Path, ct: sitk.Image) -> np.ndarray:
    try:
        mask = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise PatientFolderError(f"{path}: cannot be read: {str(err).strip().splitlines()[-1]}")
    mismatch = _geometry_mismatch(ct, mask)
    if mismatch:
        raise PatientFolderError(f"{path}: not on the CT's grid: {mismatch}")
    array = sitk.GetArrayFromImage(mask)
    values = np.unique(array)
    if not set(values.tolist()) <= {0, 1}:
        raise PatientFolderError(f"{path}: a mask must hold only 0 and 1, found {values[:10].tolist()}")
    return array.astype(bool)


def label_map(masks: Sequence[np.ndarray | None], overlap: str, where: str, names: Sequence[str]) -> np.ndarray:
    """Labels 1..K from K masks (None: empty); ``overlap`` decides shared voxels (see the module docstring)."""
    shape = next(m.shape for m in masks if m is not None)
    labels = np.zeros(shape, np.uint8)
    order = range(len(masks)) if overlap != "earlier" else reversed(range(len(masks)))
    for index in order:
        mask = masks[index]
        if mask is None:
            continue
        if overlap == "refuse":
            shared = labels[mask]
            if shared.any():
                other = int(shared[shared > 0][0]) - 1
                raise PatientFolderError(f"{where}: {names[other]} and {names[index]} overlap in "
                                         f"{int(np.count_nonzero(shared))} voxels; choose --overlap later or earlier")
        labels[mask] = index + 1
    return labels


def read_patient(folder: Path, ct_name: str, target_names: Sequence[str] | str, missing: str = "refuse",
                 overlap: str = "refuse") -> Patient | Skipped:
    """Check one patient folder; raise PatientFolderError naming the file and the problem."""
    names = [target_names] if isinstance(target_names, str) else list(target_names)
    ct_path = folder / ct_name
    if not ct_path.is_file():
        raise PatientFolderError(f"{ct_path}: missing")
    paths = [folder / f"{name}.nii.gz" for name in names]
    absent = [name for name, path in zip(names, paths) if not path.is_file()]
    if absent and missing == "skip":
        return Skipped(folder.name, tuple(absent))
    if absent and (missing == "refuse" or len(absent) == len(names)):
        raise PatientFolderError(f"{folder / (absent[0] + '.nii.gz')}: missing"
                                 + (f" (and {', '.join(absent[1:])})" if len(absent) > 1 else ""))
    try:
        ct = sitk.ReadImage(str(ct_path))
    except RuntimeError as err:
        raise PatientFolderError(f"{folder}: cannot read the CT: {str(err).strip().splitlines()[-1]}")
    if ct.GetDimension() != 3 or ct.GetNumberOfComponentsPerPixel() != 1:
        raise PatientFolderError(f"{ct_path}: not a single-channel 3D image")
    masks = [_read_mask(path, ct) if path.is_file() else None for path in paths]
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    volumes = tuple(0.0 if m is None else int(np.count_nonzero(m)) * voxel_ml for m in masks)
    if not any(volumes):
        empty = next(path for path, mask in zip(paths, masks) if mask is not None)
        raise PatientFolderError(f"{empty}: the mask is empty" if len(names) == 1 else
                                 f"{folder}: every target mask ({', '.join(names)}) is empty")
    if len(names) > 1:
        label_map(masks, overlap, str(folder), names)
    return Patient(folder.name, ct_path, tuple(p if p.is_file() else None for p in paths), volumes)


def patient_folders(source: Path) -> list[Path]:
    if not source.is_dir():
        raise PatientFolderError(f"{source}: not a folder")
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise PatientFolderError(f"{source}: no patient folders in it")
    return folders


def draw_split(names: Sequence[str], num_test: int, seed: int) -> dict[str, list[str]]:
    """A seeded permutation of the sorted names: the first ``num_test`` are the test patients."""
    names = sorted(names)
    if not 0 <= num_test < len(names):
        raise PatientFolderError(f"--num-test {num_test} must leave at least one of the {len(names)} patients for "
                                 "training")
    order = np.random.default_rng(seed).permutation(len(names))
    test = sorted(names[i] for i in order[:num_test])
    return {"train": sorted(set(names) - set(test)), "test": test}


def read_split(path: Path, names: Sequence[str]) -> dict[str, list[str]]:
    try:
        split = json.loads(path.read_text())
        train, test = list(split["train"]), list(split["test"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PatientFolderError(f"{path}: not a split file (a JSON object with 'train' and 'test' lists): {err}")
    unknown = sorted(set(train + test) - set(names))
    overlap = sorted(set(train) & set(test))
    if unknown or overlap:
        raise PatientFolderError(f"{path}: " + "; ".join(
            part for part in (f"patients not in the source: {unknown}" if unknown else "",
                              f"patients in both train and test: {overlap}" if overlap else "") if part))
    return {"train": sorted(train), "test": sorted(test)}


def _write_labels(patient: Patient, target: Path, names: Sequence[str], overlap: str) -> None:
    """One target: its mask file as it is; several: their label map, on the CT's grid."""
    if len(names) == 1:
        shutil.copyfile(patient.targets[0], target)
        return
    ct = sitk.ReadImage(str(patient.ct))
    masks = [None if path is None else _read_mask(path, ct) for path in patient.targets]
    image = sitk.GetImageFromArray(label_map(masks, overlap, patient.name, names))
    image.CopyInformation(ct)
    sitk.WriteImage(image, str(target), useCompression=True)


def write_dataset(source: str | os.PathLike, raw_dir: str | os.PathLike, dataset_id: int, name: str,
                  target_names: Sequence[str] | str = "PTV70", ct_name: str = "ct.nii.gz", num_test: int = 16,
                  seed: int = 2026, split_file: str | os.PathLike | None = None, overwrite: bool = False,
                  log=print, missing: str = "refuse", overlap: str = "refuse") -> Path:
    """Check every patient of ``source``, split them, and write ``<raw_dir>/DatasetXXX_<name>``; return its path.
    ``target_names`` become labels 1..K in their order; ``missing`` and ``overlap`` as the module docstring says."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    names = [target_names] if isinstance(target_names, str) else list(target_names)
    if not names or len(set(names)) != len(names) or "background" in names:
        raise PatientFolderError(f"--target needs distinct names other than 'background', got {names}")
    if missing not in MISSING_RULES or overlap not in OVERLAP_RULES:
        raise PatientFolderError(f"missing must be one of {MISSING_RULES} and overlap one of {OVERLAP_RULES}")
    if not 1 <= dataset_id <= 999:
        raise PatientFolderError(f"dataset id must be between 1 and 999, got {dataset_id}")
    source, raw_dir = Path(source).resolve(), Path(raw_dir).resolve()
    target = raw_dir / f"Dataset{dataset_id:03d}_{name}"
    if source in target.parents:
        raise PatientFolderError(f"{target}: the dataset would be written inside the source folder {source}")
    existing = existing_datasets(raw_dir, dataset_id)
    if existing and not overwrite:
        raise PatientFolderError(f"{existing[0]} exists; pass --overwrite to replace it (dataset id {dataset_id})")
    folders = patient_folders(source)
    log(f"checking {len(folders)} patient folders in {source} (CT {ct_name}, "
        f"target{'s' if len(names) > 1 else ''} {', '.join(n + '.nii.gz' for n in names)})")
    patients, skipped, problems = {}, {}, []
    for folder in folders:
        try:
            found = read_patient(folder, ct_name, names, missing, overlap)
        except PatientFolderError as err:
            problems.append(str(err))
            continue
        if isinstance(found, Skipped):
            skipped[found.name] = list(found.missing)
        else:
            patients[found.name] = found
    if problems:
        raise PatientFolderError(f"{len(problems)} of {len(folders)} patient folders cannot be used:\n  "
                                 + "\n  ".join(problems))
    if skipped:
        log(f"left out {len(skipped)} patients that lack a mask (listed in {SPLIT_FILE}): "
            + "; ".join(f"{n} ({', '.join(m)})" for n, m in sorted(skipped.items())))
    if split_file:
        split = read_split(Path(split_file), list(patients) + list(skipped))
        split = {part: [n for n in split[part] if n in patients] for part in ("train", "test")}
    else:
        split = draw_split(list(patients), num_test, seed)
    unused = sorted(set(patients) - set(split["train"]) - set(split["test"]))
    with staged_folder(target, existing) as staging:
        for part, suffix in (("train", "Tr"), ("test", "Ts")):
            (staging / f"images{suffix}").mkdir()
            (staging / f"labels{suffix}").mkdir()
            for patient_name in split[part]:
                patient = patients[patient_name]
                shutil.copyfile(patient.ct, staging / f"images{suffix}" / f"{patient_name}_0000.nii.gz")
                _write_labels(patient, staging / f"labels{suffix}" / f"{patient_name}.nii.gz", names, overlap)
        generate_dataset_json(
            str(staging), channel_names={0: "CT"}, labels={"background": 0, **{n: i for i, n in enumerate(names, 1)}},
            num_training_cases=len(split["train"]), file_ending=".nii.gz", dataset_name=target.name,
            description=f"{', '.join(names)} on CT, from the patient folders of {source.name} (nnunetv2_gtv "
                        "gtv-dataset)")
        volumes = {n: (round(p.target_ml[0], 1) if len(names) == 1 else
                       {label: round(ml, 1) for label, ml in zip(names, p.target_ml)})
                   for n, p in sorted(patients.items())}
        record = {"source": source.name, "target": names[0] if len(names) == 1 else names,
                  "seed": None if split_file else seed,
                  "split_from": Path(split_file).name if split_file else "seeded permutation of the sorted names",
                  "num_train": len(split["train"]), "num_test": len(split["test"]), "unused": unused,
                  **({"overlap": overlap, "missing": missing, "skipped": skipped} if len(names) > 1 or skipped
                     else {}),
                  "target_ml": volumes, **split}
        (staging / SPLIT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    test_ml = [sum(patients[n].target_ml) for n in split["test"]]
    log(f"wrote {target}: {len(split['train'])} training CTs (imagesTr), {len(split['test'])} held-out test CTs "
        f"(imagesTs, targets median {np.median(test_ml) if test_ml else 0:.0f} ml); split in {target / SPLIT_FILE}"
        + (f"; {len(unused)} patients not in the split file left out" if unused else ""))
    return target
