"""CT inputs of gtv-predict: one image file, or a folder of them, in NIfTI, NRRD or MHA, any orientation.

A case is named after its file without the ending and without nnU-Net's channel suffix ``_0000``. Models trained on
several CT channels (a plain and a contrast-enhanced CT) take a folder in which each case has one file per channel,
``<case>_0000``, ``<case>_0001``, ... as nnU-Net names them, all on one grid. Headers are checked before any work
(3D, one component, more than one slice, the channels of a case on one grid), intensities when a case is read.

Images are read with the models' reader class. Plans of ``nnUNetPlannerGTV25D`` name nnU-Net's
``SimpleITKIOWithReorient``: every CT is reoriented to RAS when read, so the same physical CT gives the same array,
the same tiles and the same contour whatever its storage order or axis flips, and the outputs are written back in
the file's own orientation. Models whose plans read with plain ``SimpleITKIO`` see a CT as stored: a CT with
another axis first (e.g. sagittal or coronal slices) is then permuted so that the superior-inferior axis (the
3 mm axis of the plans) comes first before preprocessing, and its outputs are permuted back onto the input's own
grid.

A folder holding DICOM files (and no image files of the endings above) is read as DICOM: each CT series under
it is a case (``nnunetv2_gtv.dicom.series``), its outputs are NIfTI.
"""
from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from nnunetv2_gtv.dicom.outputs import grid_mismatch
from nnunetv2_gtv.dicom.series import DicomInputError, DicomSeries, find_dicom_series, is_dicom_folder, \
    read_dicom_series, read_series
from nnunetv2_gtv.io.images import geometry_mismatch
from nnunetv2_gtv.training.regions import superior_axis_from_direction

FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
DICOM_OUTPUT_ENDING = ".nii.gz"
CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")
REORIENTED_TO = "RAS"  # SimpleITKIOWithReorient's default orientation


class InputError(ValueError):
    """An input image cannot be segmented; the message names the file."""


@dataclass(frozen=True)
class InputCase:
    case: str
    path: Path  # the image file (channel 0), or the folder of a DICOM series
    series: DicomSeries | None = None  # a DICOM CT series
    extra_channels: tuple[Path, ...] = ()  # the files of channels 1, 2, ... (``<case>_0001``, ...)

    @property
    def file_ending(self) -> str:
        """Of the input, and of the outputs (NIfTI for a DICOM series)."""
        return DICOM_OUTPUT_ENDING if self.series is not None else _ending(self.path.name)

    @property
    def files(self) -> tuple[Path, ...]:
        """One image file per channel, in channel order."""
        return (self.path, *self.extra_channels)


def _ending(name: str) -> str | None:
    return next((e for e in FILE_ENDINGS if name.lower().endswith(e)), None)


def _stem(path: Path) -> str:
    return path.name[:-len(_ending(path.name))]


def _case_and_channel(stem: str, stems: set[str]) -> tuple[str, int]:
    """``a_0000`` -> (a, 0); ``a_0001`` -> (a, 1) where ``a_0000`` exists, else (a_0001, 0); ``a`` -> (a, 0)."""
    match = CHANNEL_SUFFIX.search(stem)
    if match and (match.group(1) == "0000" or stem[:match.start()] + "_0000" in stems):
        return stem[:match.start()], int(match.group(1))
    return stem, 0


def dicom_cases(folder: Path, log: Callable[[str], None] = print) -> list[InputCase]:
    """One case per CT series under ``folder``, listed through ``log``; InputError for unusable series."""
    try:
        found = find_dicom_series(folder)
    except DicomInputError as err:
        raise InputError(str(err)) from err
    log(f"DICOM input {folder}: {len(found.series)} CT series")
    for series in found.series:
        log(f"  {series.describe()}")
    for item in found.ignored:
        log(f"  ignored: {item}")
    return [InputCase(s.case, s.folder, s) for s in found.series]


def find_cases(input_path: str | os.PathLike, log: Callable[[str], None] = print) -> list[InputCase]:
    """The cases in a file or folder (not recursive), sorted by name; a folder with DICOM files and no image
    files: its CT series (recursive)."""
    path = Path(input_path)
    if path.is_file():
        if _ending(path.name) is None:
            raise InputError(f"{path}: not a supported image file (endings: {', '.join(FILE_ENDINGS)})")
        return [InputCase(_case_and_channel(_stem(path), set())[0], path)]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _ending(p.name))
    if not files and is_dicom_folder(path):
        return dicom_cases(path, log)
    if not files:
        raise InputError(f"{path}: no images found (endings: {', '.join(FILE_ENDINGS)})")
    stems = {_stem(p) for p in files}
    cases: dict[str, dict[int, Path]] = {}
    for file in files:
        case, channel = _case_and_channel(_stem(file), stems)
        channels = cases.setdefault(case, {})
        if channel in channels:
            raise InputError(f"{path}: {channels[channel].name} and {file.name} are both case '{case}'"
                             + (f", channel {channel}" if channel else ""))
        channels[channel] = file
    found = []
    for case, channels in sorted(cases.items()):
        gaps = [f"{case}_{i:04d}" for i in range(max(channels)) if i not in channels]
        if gaps:
            raise InputError(f"{path}: case '{case}' has {', '.join(sorted(f.name for f in channels.values()))} but "
                             f"no {', '.join(gaps)}: a case's channels are numbered _0000, _0001, ... without gaps")
        endings = {_ending(f.name) for f in channels.values()}
        if len(endings) > 1:
            raise InputError(f"{path}: the channels of case '{case}' are stored as {', '.join(sorted(endings))}; "
                             "store them in one format")
        found.append(InputCase(case, channels[0], extra_channels=tuple(channels[i] for i in range(1, len(channels)))))
    return found


def check_channels(cases: Sequence[InputCase], channel_names: Sequence[str]) -> None:
    """Every case has one image per channel the models take (``channel_names``, in order); InputError naming the
    cases otherwise, all of them at once."""
    wanted = len(channel_names)
    described = ", ".join(f"_{i:04d} {name}" for i, name in enumerate(channel_names))
    problems = []
    for case in cases:
        if case.series is not None and wanted > 1:
            problems.append(f"{case.path}: a DICOM series is one CT, but these models take {wanted} CT channels "
                            f"({described}); write each case's CTs as <case>_0000, <case>_0001, ... image files "
                            "on one grid")
        elif len(case.files) > wanted:
            extra = ", ".join(f.name for f in case.files[wanted:])
            problems.append(f"{case.path.parent}: {extra} look like extra input channels of case '{case.case}'; "
                            f"these models take {wanted} channel{'s' if wanted > 1 else ''} ({described})")
        elif len(case.files) < wanted:
            missing = ", ".join(f"{case.case}_{i:04d}{case.file_ending}" for i in range(len(case.files), wanted))
            problems.append(f"{case.path}: case '{case.case}' lacks {missing}: these models take {wanted} CT "
                            f"channels ({described})")
    if problems:
        raise InputError("\n".join(problems))


def _header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        last_line = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise InputError(f"{path}: cannot read the image ({last_line})") from err
    return reader


def check_header(path: Path) -> None:
    """Refuse files that are unreadable or not one 3D scalar volume, reading the header only."""
    reader = _header(path)
    size = reader.GetSize()
    if reader.GetDimension() != 3:
        raise InputError(f"{path}: a {reader.GetDimension()}D image of size {size}; a CT volume (3D) is needed")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{path}: {reader.GetNumberOfComponents()} components per voxel; a scalar CT is needed")
    if min(size) < 2:
        raise InputError(f"{path}: size {size} is a single slice (2D); a CT volume is needed")


def check_inputs(cases: Sequence[InputCase]) -> None:
    """Check every header first, so that a bad file stops the run before any work; lists every bad file. A case's
    channels must lie on its channel 0's grid."""
    problems = []
    for case in cases:
        if case.series is not None:  # checked from its headers when found
            continue
        try:
            for file in case.files:
                check_header(file)
            reference = _header(case.path) if case.extra_channels else None
            for file in case.extra_channels:
                mismatch = geometry_mismatch(reference, _header(file))
                if mismatch:
                    raise InputError(f"{file}: not on the grid of {case.path.name} (channel 0 of case "
                                     f"'{case.case}'): {mismatch}; a case's CTs must be co-registered on one grid")
        except InputError as err:
            problems.append(str(err))
    if problems:
        raise InputError("\n".join(problems))


def dicom_series_of_cases(cases: Sequence[InputCase], reference: str | os.PathLike | None) -> dict[str, DicomSeries]:
    """The DICOM CT series each case's RTSTRUCT and SEG refer to: its own series for a DICOM case, or the series in
    ``reference`` for one image file on that series' grid (checked from the header)."""
    if reference is None:
        return {c.case: c.series for c in cases if c.series is not None}
    if len(cases) != 1 or cases[0].series is not None:
        raise InputError(f"--dicom-reference {reference}: needs exactly one image file as input (got "
                         f"{'DICOM series' if any(c.series for c in cases) else f'{len(cases)} cases'})")
    try:
        series = read_dicom_series(reference)
    except DicomInputError as err:
        raise InputError(f"--dicom-reference: {err}") from err
    reader = _header(cases[0].path)
    problem = grid_mismatch(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), series)
    if problem:
        raise InputError(f"{cases[0].path}: not on the grid of the DICOM reference series in {series.folder}: "
                         f"{problem}")
    return {cases[0].case: series}


def check_nifti_data(path: Path) -> None:
    """Refuse a NIfTI whose voxel data ends early: SimpleITK fills the missing voxels with zeros, silently."""
    reader = _header(path)
    expected = int(float(reader.GetMetaData("vox_offset"))) + \
        int(np.prod(reader.GetSize())) * reader.GetNumberOfComponents() * int(reader.GetMetaData("bitpix")) // 8
    if path.name.lower().endswith(".gz"):
        actual = 0
        try:
            with gzip.open(path) as f:
                while chunk := f.read(1 << 24):
                    actual += len(chunk)
        except (EOFError, OSError, zlib.error) as err:
            raise InputError(f"{path}: cannot read the image (corrupt or truncated gzip data: {err})") from err
    else:
        actual = path.stat().st_size
    if actual < expected:
        raise InputError(f"{path}: cannot read the image (truncated: {actual} of {expected} bytes)")


def intensity_warning(image: np.ndarray, path: Path) -> str | None:
    """A warning when the intensities do not look like Hounsfield units; None when they do."""
    low, high = float(np.min(image)), float(np.max(image))
    if low >= -1.0 and high <= 1.0:
        return (f"{path}: intensities lie in [{low:.3g}, {high:.3g}], not Hounsfield units (air -1000, soft tissue "
                "0-100, bone > 300); is the CT normalised? The models expect HU")
    if low >= 0:
        return (f"{path}: no intensity below 0 (range [{low:.4g}, {high:.4g}]); CT air is about -1000 HU. Are the "
                "values raw scanner units without the rescale intercept, or is this not a CT?")
    return None


def axial_permutation(direction: Sequence[float]) -> tuple[int, int, int] | None:
    """The array axis order (z, y, x indices) that puts the superior-inferior axis first, the other two
    keeping their order; None when it already is first (an axial CT)."""
    superior, _ = superior_axis_from_direction(direction)
    if superior == 0:
        return None
    return (superior, *(a for a in range(3) if a != superior))


def permute_case(image: np.ndarray, properties: dict, order: Sequence[int]) -> tuple[np.ndarray, dict]:
    """``image`` (c, z, y, x) with its axes in ``order`` and nnU-Net's properties of that permuted image: the
    same voxels in the same place in the world (SimpleITK's PermuteAxes)."""
    stuff = properties["sitk_stuff"]
    matrix = np.asarray(stuff["direction"], dtype=float).reshape(3, 3)
    # array axis a is SimpleITK index 2 - a: the permuted index i takes old index 2 - order[2 - i]
    index_order = [2 - order[2 - i] for i in range(3)]
    permuted = {**properties,
                "spacing": [properties["spacing"][a] for a in order],
                "sitk_stuff": {**stuff, "spacing": tuple(stuff["spacing"][i] for i in index_order),
                               "direction": tuple(matrix[:, index_order].reshape(-1))}}
    return np.ascontiguousarray(image.transpose(0, *(1 + a for a in order))), permuted


def read_case(case: InputCase, reader_writer_class: type) -> tuple[np.ndarray, dict]:
    """Read with the models' reader/writer class: (channels, z, y, x) float32 array and nnU-Net's properties."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    if case.series is not None:
        return _read_dicom_case(case.series, reader_writer_class)

    if case.file_ending in (".nii", ".nii.gz"):
        for file in case.files:
            check_nifti_data(file)
    supported = getattr(reader_writer_class, "supported_file_endings", [])
    if not issubclass(reader_writer_class, SimpleITKIO) and case.file_ending not in supported:
        raise InputError(f"{case.path}: the models read images with {reader_writer_class.__name__}, which supports "
                         f"{', '.join(supported)}")
    try:
        return reader_writer_class().read_images([str(file) for file in case.files])
    except (RuntimeError, OSError, EOFError) as err:
        raise InputError(f"{', '.join(str(f) for f in case.files)}: cannot read the image ({err})") from err


def _read_dicom_case(series: DicomSeries, reader_writer_class: type) -> tuple[np.ndarray, dict]:
    """A DICOM series as the plans' SimpleITK reader returns a NIfTI of it, so that its outputs are NIfTI."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO, SimpleITKIOWithReorient

    if not issubclass(reader_writer_class, SimpleITKIO):
        raise InputError(f"{series.folder}: DICOM input needs models whose plans read images with SimpleITKIO (these "
                         f"use {reader_writer_class.__name__}); convert the series to NIfTI")
    try:
        image = read_series(series)
    except DicomInputError as err:
        raise InputError(str(err)) from err
    stuff = {}
    if issubclass(reader_writer_class, SimpleITKIOWithReorient):  # as the reader does with a NIfTI of the series
        stuff["original_orientation"] = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(
            image.GetDirection())
        image = sitk.DICOMOrient(image, REORIENTED_TO)
    properties = {"sitk_stuff": {"spacing": image.GetSpacing(), "origin": image.GetOrigin(),
                                 "direction": image.GetDirection(), **stuff},
                  "spacing": list(np.abs(image.GetSpacing()[::-1]))}
    return sitk.GetArrayFromImage(image)[None].astype(np.float32), properties
