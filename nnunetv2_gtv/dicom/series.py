"""DICOM CT series as gtv-predict inputs: found under a folder, checked from their headers, read in HU.

Every ``SeriesInstanceUID`` under the folder (searched recursively) is one case, named PatientID + series
number (or PatientID + series UID when that name is not unique). Slices are sorted by their position along
the slice normal (``ImageOrientationPatient`` row x column), whatever the file names or instance numbers, so
the volume's third axis always points along the normal and its origin is the lowest slice's position.

Refused, naming the series' folder, before any work: image series that are not CT, a series mixing modalities,
a single slice, multi-frame objects, duplicated or missing slices, slice spacing varying by more than
``max(0.05 mm, 1 %)`` from a regular grid, slices whose positions do not lie along the slice normal (gantry
tilt or shear, or a ``GantryDetectorTilt`` other than 0), varying orientation, size or pixel spacing, and
compressed pixel data that pydicom cannot decode here. Non-image objects (RTSTRUCT, RTPLAN, RTDOSE, SEG, SR
...) and files that are not DICOM are ignored and listed.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
NON_IMAGE_MODALITIES = {"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "SEG", "SR", "PR", "KO", "REG",
                        "RWV", "DOC", "PLAN", "FID", "RESP", "ECG", "AU"}
ORIENTATION_TOLERANCE = 1e-4  # direction cosines
SPACING_TOLERANCE_MM = 0.05  # pixel spacing, and slice positions against a regular grid (or 1 % of the spacing)
SPACING_TOLERANCE_RELATIVE = 0.01
TILT_TOLERANCE = 1e-3  # in-plane drift of the slice positions per mm along the normal (0.06 degrees)


class DicomInputError(ValueError):
    """A DICOM folder or series cannot be segmented; the message names the folder."""


@dataclass(frozen=True)
class DicomSlice:
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    position: tuple[float, float, float]  # ImagePositionPatient, mm


@dataclass(frozen=True)
class DicomSeries:
    """One CT series, its slices sorted by position along the slice normal (ascending)."""

    folder: Path  # the folder holding its files (their common parent)
    series_uid: str
    case: str
    slices: tuple[DicomSlice, ...]
    orientation: tuple[float, ...]  # ImageOrientationPatient: row direction (x), column direction (y)
    pixel_spacing: tuple[float, float]  # DICOM order: between rows (y), between columns (x)
    slice_spacing: float
    rows: int
    columns: int
    frame_of_reference_uid: str
    description: str

    @property
    def normal(self) -> np.ndarray:
        row, column = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        return np.cross(row, column)

    @property
    def direction(self) -> tuple[float, ...]:
        """SimpleITK direction (row-major 3 x 3, columns = x, y, z axes in LPS)."""
        axes = np.stack([np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:]), self.normal], axis=1)
        return tuple(float(v) for v in axes.reshape(-1))

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        return self.pixel_spacing[1], self.pixel_spacing[0], self.slice_spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.slices[0].position

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        return self.columns, self.rows, len(self.slices)

    def describe(self) -> str:
        x, y, z = self.spacing_xyz
        return (f"{self.case}: {len(self.slices)} slices of {self.rows} x {self.columns}, {x:.4g} x {y:.4g} x "
                f"{z:.4g} mm, {self.description or 'no description'} ({self.folder}, series {self.series_uid})")


@dataclass(frozen=True)
class DicomFolder:
    """What a folder holds: the CT series to segment, and what was left aside (one line each)."""

    series: tuple[DicomSeries, ...]
    ignored: tuple[str, ...]


def _float_list(ds: Dataset, keyword: str) -> list[float]:
    return [float(v) for v in ds.get(keyword)]


def _common_folder(paths: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "x"


def _read_headers(root: Path) -> tuple[dict[str, list[tuple[Path, Dataset]]], int]:
    """Headers of every DICOM file under ``root`` grouped by SeriesInstanceUID, and the number of other files."""
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    others = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError):
                others += 1
                continue
            uid = str(ds.get("SeriesInstanceUID", ""))
            if not uid:
                others += 1
                continue
            groups[uid].append((path, ds))
    return groups, others


def _check_decodable(where: str, path: Path) -> None:
    """Decode one slice when its pixel data is compressed, so that a syntax without a decoder here fails now."""
    ds = pydicom.dcmread(path)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return
    try:
        ds.pixel_array
    except Exception as err:  # noqa: BLE001 - pydicom's decoders raise many types
        raise DicomInputError(f"{where}: pixel data in transfer syntax {syntax.name} ({syntax}) cannot be decoded "
                              f"here ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                              "convert the series to an uncompressed syntax (e.g. dcmdjpeg, gdcmconv --raw)") from err


def _check_slice_positions(where: str, positions: np.ndarray, normal: np.ndarray) -> float:
    """The slice spacing of positions sorted along ``normal``; DicomInputError when the slices are duplicated,
    missing, unevenly spaced or not stacked along the normal (gantry tilt)."""
    if len(positions) < 2:
        raise DicomInputError(f"{where}: a single slice; a CT volume is needed")
    along = positions @ normal
    steps = np.diff(along)
    duplicated = np.flatnonzero(steps < SPACING_TOLERANCE_MM)
    if duplicated.size:
        raise DicomInputError(f"{where}: duplicated slices: {duplicated.size + 1} or more slices at the same "
                              f"position along the slice normal ({along[duplicated[0]]:.3f} mm)")
    spacing = float(np.median(steps))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_RELATIVE * spacing)
    gaps = np.flatnonzero(steps > 1.5 * spacing)
    if gaps.size:
        first = gaps[0]
        missing = int(round(steps[first] / spacing)) - 1
        raise DicomInputError(f"{where}: missing slices: a gap of {steps[first]:.3f} mm between slices at "
                              f"{along[first]:.3f} and {along[first + 1]:.3f} mm along the normal where the spacing "
                              f"is {spacing:.3f} mm (about {missing} slice(s) missing; {len(gaps)} gap(s) in all)")
    regular = (along[-1] - along[0]) / (len(along) - 1)
    deviation = np.abs(along - (along[0] + regular * np.arange(len(along))))
    if deviation.max() > tolerance:
        raise DicomInputError(f"{where}: slice spacing varies from {steps.min():.3f} to {steps.max():.3f} mm "
                              f"(positions up to {deviation.max():.3f} mm off a regular grid; tolerance "
                              f"{tolerance:.3f} mm)")
    drift = positions[-1] - positions[0] - (along[-1] - along[0]) * normal
    if np.linalg.norm(drift) > TILT_TOLERANCE * (along[-1] - along[0]):
        angle = np.degrees(np.arctan2(np.linalg.norm(drift), along[-1] - along[0]))
        raise DicomInputError(f"{where}: the slice positions do not lie along the slice normal (gantry tilt or "
                              f"shear of {angle:.2f} degrees); resample the series to an untilted grid first")
    return float(regular)


def _series(uid: str, files: list[tuple[Path, Dataset]]) -> DicomSeries:
    """Check one CT series from its headers and sort its slices; DicomInputError names its folder."""
    folder = _common_folder([p for p, _ in files])
    where = f"{folder}: series {uid} ({len(files)} files)"
    modalities = sorted({str(ds.get("Modality", "")) for _, ds in files})
    if len(modalities) > 1:
        raise DicomInputError(f"{where}: mixed modalities in one series ({', '.join(modalities)})")
    if modalities[0] != "CT":
        raise DicomInputError(f"{where}: modality {modalities[0] or 'missing'}, not CT; the models segment CT only "
                              "(point -i at the CT series' folder)")
    for path, ds in files:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                               "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID") if k not in ds]
        if missing:
            raise DicomInputError(f"{where}: {path.name} lacks {', '.join(missing)}")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DicomInputError(f"{where}: {path.name} is a multi-frame (enhanced) CT; single-frame CT Image "
                                  "Storage is needed")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise DicomInputError(f"{where}: {path.name} has {ds.SamplesPerPixel} samples per pixel; CT has one")
        tilt = float(ds.get("GantryDetectorTilt", 0) or 0)
        if abs(tilt) > 1e-3:
            raise DicomInputError(f"{where}: gantry tilt of {tilt:g} degrees ({path.name}); resample the series to an "
                                  "untilted grid first")
    instances = [str(ds.SOPInstanceUID) for _, ds in files]
    if len(set(instances)) != len(instances):
        raise DicomInputError(f"{where}: duplicated slices: the same SOPInstanceUID in more than one file")
    first = files[0][1]
    orientation = np.asarray(_float_list(first, "ImageOrientationPatient"))
    pixel_spacing = np.asarray(_float_list(first, "PixelSpacing"))
    for path, ds in files:
        if np.abs(np.asarray(_float_list(ds, "ImageOrientationPatient")) - orientation).max() > ORIENTATION_TOLERANCE:
            raise DicomInputError(f"{where}: ImageOrientationPatient varies between slices ({path.name})")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise DicomInputError(f"{where}: slice size varies ({first.Rows} x {first.Columns}, {path.name}: "
                                  f"{ds.Rows} x {ds.Columns})")
        if np.abs(np.asarray(_float_list(ds, "PixelSpacing")) - pixel_spacing).max() > 1e-4:
            raise DicomInputError(f"{where}: PixelSpacing varies between slices ({path.name})")
    row, column = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 or abs(row @ column) > 1e-3:
        raise DicomInputError(f"{where}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit "
                              "vectors")
    normal = np.cross(row, column)
    positions = np.asarray([_float_list(ds, "ImagePositionPatient") for _, ds in files])
    order = np.argsort(positions @ normal, kind="stable")
    slice_spacing = _check_slice_positions(where, positions[order], normal)
    _check_decodable(where, files[0][0])
    frames = {str(ds.get("FrameOfReferenceUID", "")) for _, ds in files}
    if len(frames) != 1 or not next(iter(frames)):
        raise DicomInputError(f"{where}: FrameOfReferenceUID {'varies' if len(frames) > 1 else 'is missing'}; "
                              "structures could not be placed on this CT")
    slices = tuple(DicomSlice(files[i][0], instances[i], str(files[i][1].SOPClassUID),
                              tuple(float(v) for v in positions[i])) for i in order)
    return DicomSeries(folder, uid, "", slices, tuple(float(v) for v in orientation),
                       (float(pixel_spacing[0]), float(pixel_spacing[1])), slice_spacing, int(first.Rows),
                       int(first.Columns), next(iter(frames)), str(first.get("SeriesDescription", "")))


def _case_names(series: list[tuple[str, Dataset]]) -> list[str]:
    """PatientID + series number; PatientID + series UID for the series whose name would not be unique."""
    names = [f"{_sanitise(str(ds.get('PatientID', '') or 'patient'))}_{ds.get('SeriesNumber', '') or 'x'}"
             for _, ds in series]
    return [name if names.count(name) == 1 else
            f"{_sanitise(str(ds.get('PatientID', '') or 'patient'))}_{_sanitise(uid)}"
            for name, (uid, ds) in zip(names, series)]


def find_dicom_series(folder: str | os.PathLike) -> DicomFolder:
    """The CT series under ``folder``; DicomInputError listing every series that cannot be used."""
    root = Path(folder)
    if not root.is_dir():
        raise DicomInputError(f"{root}: no such folder")
    groups, others = _read_headers(root)
    found, problems, ignored = [], [], []
    if others:
        ignored.append(f"{others} file(s) that are not DICOM images")
    for uid, files in sorted(groups.items(), key=lambda item: str(item[1][0][0])):
        modalities = {str(ds.get("Modality", "")) for _, ds in files}
        if modalities <= NON_IMAGE_MODALITIES:
            ignored.append(f"{'/'.join(sorted(modalities))} series {uid} ({len(files)} files, "
                           f"{_common_folder([p for p, _ in files])})")
            continue
        try:
            found.append((uid, files, _series(uid, files)))
        except DicomInputError as err:
            problems.append(str(err))
    if problems:
        raise DicomInputError("\n".join(problems))
    if not found:
        raise DicomInputError(f"{root}: no DICOM CT series found"
                              + (f" (ignored: {'; '.join(ignored)})" if ignored else ""))
    names = _case_names([(uid, files[0][1]) for uid, files, _ in found])
    series = tuple(replace(s, case=name) for (_, _, s), name in zip(found, names))
    return DicomFolder(tuple(sorted(series, key=lambda s: s.case)), tuple(ignored))


def is_dicom_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` (searched recursively) holds a DICOM file, judged by the 'DICM' marker at byte 128."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                with open(Path(dirpath) / name, "rb") as f:
                    if f.read(132)[128:] == b"DICM":
                        return True
            except OSError:
                continue
    return False


def read_series(series: DicomSeries) -> sitk.Image:
    """The series as a float32 SimpleITK image in HU (RescaleSlope/Intercept of each slice applied), with the
    series' spacing, origin and direction; DicomInputError on unreadable pixel data."""
    volume = np.empty((len(series.slices), series.rows, series.columns), dtype=np.float32)
    for k, item in enumerate(series.slices):
        try:
            ds = pydicom.dcmread(item.path)
            pixels = ds.pixel_array
        except Exception as err:  # noqa: BLE001 - pydicom's decoders raise many types
            raise DicomInputError(f"{series.folder}: cannot read the pixel data of {item.path.name} "
                                  f"({type(err).__name__}: {err})") from err
        if pixels.shape != (series.rows, series.columns):
            raise DicomInputError(f"{series.folder}: {item.path.name}: pixel data of shape {pixels.shape}, expected "
                                  f"{series.rows} x {series.columns}")
        volume[k] = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(series.spacing_xyz)
    image.SetOrigin(series.origin)
    image.SetDirection(series.direction)
    return image


def reference_image(series: DicomSeries) -> sitk.Image:
    """An empty uint8 image on the series' grid (for resampling masks onto it)."""
    image = sitk.Image(list(series.size_xyz), sitk.sitkUInt8)
    image.SetSpacing(series.spacing_xyz)
    image.SetOrigin(series.origin)
    image.SetDirection(series.direction)
    return image


def read_dicom_series(folder: str | os.PathLike) -> DicomSeries:
    """The one CT series under ``folder`` (for --dicom-reference); DicomInputError when there are several."""
    found = find_dicom_series(folder).series
    if len(found) != 1:
        raise DicomInputError(f"{folder}: {len(found)} CT series ({', '.join(s.case for s in found)}); a reference "
                              "must be one series")
    return found[0]
