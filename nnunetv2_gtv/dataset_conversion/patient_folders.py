"""An nnU-Net raw dataset from one folder per patient (a CT and a target mask in each), with a fixed test split.

The layout read is the one of ``OpenKBP_anatomy`` (and of most research exports)::

    SOURCE/<patient>/ct.nii.gz          CT in HU
    SOURCE/<patient>/PTV70.nii.gz       the target, 0/1 on the CT's grid (any other name with --target)

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

from nnunetv2_gtv.dataset_conversion.staging import existing_datasets, staged_dataset

SPLIT_FILE = "split.json"
GEOMETRY_TOLERANCE = 1e-3  # mm (spacing, origin) and direction cosines: a mask must lie on its CT's grid


class PatientFolderError(ValueError):
    """A patient folder, or the whole source, that cannot become a dataset."""


@dataclass(frozen=True)
class Patient:
    name: str
    ct: Path
    target: Path
    target_ml: float


def _geometry_mismatch(ct: sitk.Image, mask: sitk.Image) -> str | None:
    if ct.GetSize() != mask.GetSize():
        return f"size {mask.GetSize()} is not the CT's {ct.GetSize()}"
    for what, a, b in (("spacing", ct.GetSpacing(), mask.GetSpacing()), ("origin", ct.GetOrigin(), mask.GetOrigin()),
                       ("direction", ct.GetDirection(), mask.GetDirection())):
        if not np.allclose(a, b, atol=GEOMETRY_TOLERANCE):
            return f"{what} {tuple(round(v, 4) for v in b)} is not the CT's {tuple(round(v, 4) for v in a)}"
    return None


def read_patient(folder: Path, ct_name: str, target_name: str) -> Patient:
    """Check one patient folder; raise PatientFolderError naming the file and the problem."""
    ct_path, target_path = folder / ct_name, folder / f"{target_name}.nii.gz"
    for path in (ct_path, target_path):
        if not path.is_file():
            raise PatientFolderError(f"{path}: missing")
    try:
        ct = sitk.ReadImage(str(ct_path))
        mask = sitk.ReadImage(str(target_path))
    except RuntimeError as err:
        raise PatientFolderError(f"{folder}: cannot read the CT or the mask: {str(err).strip().splitlines()[-1]}")
    if ct.GetDimension() != 3 or ct.GetNumberOfComponentsPerPixel() != 1:
        raise PatientFolderError(f"{ct_path}: not a single-channel 3D image")
    mismatch = _geometry_mismatch(ct, mask)
    if mismatch:
        raise PatientFolderError(f"{target_path}: not on the CT's grid: {mismatch}")
    mask_array = sitk.GetArrayViewFromImage(mask)
    values = np.unique(mask_array)
    if not set(values.tolist()) <= {0, 1}:
        raise PatientFolderError(f"{target_path}: a mask must hold only 0 and 1, found {values[:10].tolist()}")
    voxels = int(np.count_nonzero(mask_array))
    if voxels == 0:
        raise PatientFolderError(f"{target_path}: the mask is empty")
    return Patient(folder.name, ct_path, target_path, voxels * float(np.prod(mask.GetSpacing())) / 1000.0)


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


def write_dataset(source: str | os.PathLike, raw_dir: str | os.PathLike, dataset_id: int, name: str,
                  target_name: str = "PTV70", ct_name: str = "ct.nii.gz", num_test: int = 16, seed: int = 2026,
                  split_file: str | os.PathLike | None = None, overwrite: bool = False,
                  log=print) -> Path:
    """Check every patient of ``source``, split them, and write ``<raw_dir>/DatasetXXX_<name>``; return its path."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

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
    log(f"checking {len(folders)} patient folders in {source} (CT {ct_name}, target {target_name}.nii.gz)")
    patients, problems = {}, []
    for folder in folders:
        try:
            patients[folder.name] = read_patient(folder, ct_name, target_name)
        except PatientFolderError as err:
            problems.append(str(err))
    if problems:
        raise PatientFolderError(f"{len(problems)} of {len(folders)} patient folders cannot be used:\n  "
                                 + "\n  ".join(problems))
    split = read_split(Path(split_file), list(patients)) if split_file else draw_split(list(patients), num_test, seed)
    unused = sorted(set(patients) - set(split["train"]) - set(split["test"]))
    with staged_dataset(target, existing) as staging:
        for part, suffix in (("train", "Tr"), ("test", "Ts")):
            (staging / f"images{suffix}").mkdir()
            (staging / f"labels{suffix}").mkdir()
            for patient_name in split[part]:
                patient = patients[patient_name]
                shutil.copyfile(patient.ct, staging / f"images{suffix}" / f"{patient_name}_0000.nii.gz")
                shutil.copyfile(patient.target, staging / f"labels{suffix}" / f"{patient_name}.nii.gz")
        generate_dataset_json(
            str(staging), channel_names={0: "CT"}, labels={"background": 0, target_name: 1},
            num_training_cases=len(split["train"]), file_ending=".nii.gz", dataset_name=target.name,
            description=f"{target_name} on CT, from the patient folders of {source.name} (nnunetv2_gtv gtv-dataset)")
        record = {"source": source.name, "target": target_name, "seed": None if split_file else seed,
                  "split_from": Path(split_file).name if split_file else "seeded permutation of the sorted names",
                  "num_train": len(split["train"]), "num_test": len(split["test"]), "unused": unused,
                  "target_ml": {n: round(p.target_ml, 1) for n, p in sorted(patients.items())}, **split}
        (staging / SPLIT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    test_ml = [patients[n].target_ml for n in split["test"]]
    log(f"wrote {target}: {len(split['train'])} training CTs (imagesTr), {len(split['test'])} held-out test CTs "
        f"(imagesTs, target median {np.median(test_ml) if test_ml else 0:.0f} ml); split in {target / SPLIT_FILE}"
        + (f"; {len(unused)} patients not in the split file left out" if unused else ""))
    return target
