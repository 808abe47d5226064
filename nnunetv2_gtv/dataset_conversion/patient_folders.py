"""An nnU-Net raw dataset from one folder per patient (a CT and target masks in each), with a fixed test split.

The layout read is the one of ``OpenKBP_anatomy`` (and of most research exports)::

    SOURCE/<patient>/ct.nii.gz          CT in HU
    SOURCE/<patient>/PTV70.nii.gz       a target, 0/1 on the CT's grid (any other names with --target)

Several co-registered CTs per patient (``--ct ct.nii.gz ct_contrast.nii.gz``: a plain and a contrast-enhanced CT, as
SegRap2023 provides them) become the channels ``<patient>_0000``, ``<patient>_0001``, ... in that order, each checked
to lie on the first CT's grid; their channel names come from the file names (``ct`` -> ``CT``, ``ct_contrast``
stays), and ``--ct-window LOW HIGH`` once per channel sets each one's HU window in ``dataset.json``
(``planning.ct_channels``; default: the paper's [-200, 700] HU for every channel).

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
from nnunetv2_gtv.io.images import geometry_mismatch
from nnunetv2_gtv.planning.ct_channels import CT_WINDOWS_KEY, check_window, is_ct_name
from nnunetv2_gtv.planning.plans_check import GTVPlansError

SPLIT_FILE = "split.json"


class PatientFolderError(ValueError):
    """A patient folder, or the whole source, that cannot become a dataset."""


OVERLAP_RULES = ("refuse", "later", "earlier")
MISSING_RULES = ("refuse", "skip", "empty")


@dataclass(frozen=True)
class Patient:
    name: str
    cts: tuple[Path, ...]  # one file per CT channel, on one grid
    targets: tuple[Path | None, ...]  # one mask per target, None where it is missing (missing="empty")
    target_ml: tuple[float, ...]


@dataclass(frozen=True)
class Skipped:
    """A patient left out because it lacks masks (missing="skip")."""

    name: str
    missing: tuple[str, ...]


def _read_mask(path: Path, ct: sitk.Image) -> np.ndarray:
    try:
        mask = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise PatientFolderError(f"{path}: cannot be read: {str(err).strip().splitlines()[-1]}")
    mismatch = geometry_mismatch(ct, mask)
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


def _check_channel(path: Path, ct: sitk.Image) -> None:
    """Another CT of the patient: readable (header), one 3D channel, on the first CT's grid."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise PatientFolderError(f"{path}: cannot be read: {str(err).strip().splitlines()[-1]}")
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise PatientFolderError(f"{path}: not a single-channel 3D image")
    mismatch = geometry_mismatch(ct, reader)
    if mismatch:
        raise PatientFolderError(f"{path}: not on the grid of the first CT: {mismatch}; the CTs of a patient must "
                                 "be co-registered and resampled to one grid")


def read_patient(folder: Path, ct_names: Sequence[str] | str, target_names: Sequence[str] | str,
                 missing: str = "refuse", overlap: str = "refuse") -> Patient | Skipped:
    """Check one patient folder; raise PatientFolderError naming the file and the problem."""
    names = [target_names] if isinstance(target_names, str) else list(target_names)
    ct_paths = [folder / name for name in ([ct_names] if isinstance(ct_names, str) else ct_names)]
    absent_cts = [path for path in ct_paths if not path.is_file()]
    if absent_cts:
        raise PatientFolderError(f"{absent_cts[0]}: missing" + (f" (and {', '.join(p.name for p in absent_cts[1:])})"
                                                                 if len(absent_cts) > 1 else ""))
    ct_path = ct_paths[0]
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
    for other in ct_paths[1:]:
        _check_channel(other, ct)
    masks = [_read_mask(path, ct) if path.is_file() else None for path in paths]
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    volumes = tuple(0.0 if m is None else int(np.count_nonzero(m)) * voxel_ml for m in masks)
    if not any(volumes):
        empty = next(path for path, mask in zip(paths, masks) if mask is not None)
        raise PatientFolderError(f"{empty}: the mask is empty" if len(names) == 1 else
                                 f"{folder}: every target mask ({', '.join(names)}) is empty")
    if len(names) > 1:
        label_map(masks, overlap, str(folder), names)
    return Patient(folder.name, tuple(ct_paths), tuple(p if p.is_file() else None for p in paths), volumes)


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
    ct = sitk.ReadImage(str(patient.cts[0]))
    masks = [None if path is None else _read_mask(path, ct) for path in patient.targets]
    image = sitk.GetImageFromArray(label_map(masks, overlap, patient.name, names))
    image.CopyInformation(ct)
    sitk.WriteImage(image, str(target), useCompression=True)


def channel_name(ct_file: str) -> str:
    """A CT channel's name from its file name: ``ct.nii.gz`` -> ``CT``, ``ct_contrast.nii.gz`` -> ``ct_contrast``,
    ``plain.nii.gz`` -> ``CT_plain`` (a channel name must say CT, ``planning.ct_channels``)."""
    stem = Path(ct_file).name.split(".")[0]
    if stem.lower() == "ct":
        return "CT"
    return stem if is_ct_name(stem) else f"CT_{stem}"


def ct_channels(ct_names: Sequence[str], windows: Sequence[Sequence[float]] | None = None) -> dict:
    """dataset.json entries for the CT channels: ``channel_names`` and, with ``windows``, ``ct_windows_hu``."""
    if not ct_names or len(set(ct_names)) != len(ct_names):
        raise PatientFolderError(f"--ct needs one or more distinct file names, got {list(ct_names)}")
    names = ["CT"] if len(ct_names) == 1 else [channel_name(n) for n in ct_names]
    if len(set(names)) != len(names):
        raise PatientFolderError(f"--ct {' '.join(ct_names)}: the files give the same channel name twice ({names})")
    entries: dict = {"channel_names": dict(enumerate(names))}
    if windows:
        if len(windows) != len(ct_names):
            raise PatientFolderError(f"--ct-window: give one window per CT channel ({len(ct_names)}: "
                                     f"{', '.join(ct_names)}), got {len(windows)}")
        try:
            entries[CT_WINDOWS_KEY] = {str(i): list(check_window(w, f"--ct-window for {n}"))
                                       for i, (w, n) in enumerate(zip(windows, ct_names))}
        except GTVPlansError as err:
            raise PatientFolderError(str(err)) from None
    return entries


def write_dataset(source: str | os.PathLike, raw_dir: str | os.PathLike, dataset_id: int, name: str,
                  target_names: Sequence[str] | str = "PTV70", ct_names: Sequence[str] | str = "ct.nii.gz",
                  num_test: int = 16, seed: int = 2026, split_file: str | os.PathLike | None = None,
                  overwrite: bool = False, log=print, missing: str = "refuse", overlap: str = "refuse",
                  ct_windows: Sequence[Sequence[float]] | None = None) -> Path:
    """Check every patient of ``source``, split them, and write ``<raw_dir>/DatasetXXX_<name>``; return its path.
    ``target_names`` become labels 1..K in their order, ``ct_names`` channels 0..C-1 (``ct_windows``: one HU window
    per channel); ``missing`` and ``overlap`` as the module docstring says."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    names = [target_names] if isinstance(target_names, str) else list(target_names)
    if not names or len(set(names)) != len(names) or "background" in names:
        raise PatientFolderError(f"--target needs distinct names other than 'background', got {names}")
    ct_names = [ct_names] if isinstance(ct_names, str) else list(ct_names)
    channels = ct_channels(ct_names, ct_windows)
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
    log(f"checking {len(folders)} patient folders in {source} (CT {', '.join(ct_names)}, "
        f"target{'s' if len(names) > 1 else ''} {', '.join(n + '.nii.gz' for n in names)})")
    patients, skipped, problems = {}, {}, []
    for folder in folders:
        try:
            found = read_patient(folder, ct_names, names, missing, overlap)
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
                for channel, ct in enumerate(patient.cts):
                    shutil.copyfile(ct, staging / f"images{suffix}" / f"{patient_name}_{channel:04d}.nii.gz")
                _write_labels(patient, staging / f"labels{suffix}" / f"{patient_name}.nii.gz", names, overlap)
        generate_dataset_json(
            str(staging), **channels, labels={"background": 0, **{n: i for i, n in enumerate(names, 1)}},
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
                  **({"ct_files": ct_names} if len(ct_names) > 1 else {}),
                  "target_ml": volumes, **split}
        (staging / SPLIT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    test_ml = [sum(patients[n].target_ml) for n in split["test"]]
    log(f"wrote {target}: {len(split['train'])} training CTs (imagesTr), {len(split['test'])} held-out test CTs "
        f"(imagesTs, targets median {np.median(test_ml) if test_ml else 0:.0f} ml); split in {target / SPLIT_FILE}"
        + (f"; {len(unused)} patients not in the split file left out" if unused else ""))
    return target
