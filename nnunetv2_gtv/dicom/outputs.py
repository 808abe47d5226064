"""DICOM outputs of a case: ``<case>_RTSTRUCT.dcm`` (one ROI per label, named as in ``dataset.json``, plus
``<label>_uncertain``, or ``uncertain`` with several labels: where the models disagree) and ``<case>_SEG.dcm``
(one segment per label), from the fused segmentation and vote-entropy images on the CT series' grid. Codes and
colours per label: :mod:`nnunetv2_gtv.dicom.labels`.

The images may be stored in another axis order or with flipped axes (e.g. a NIfTI converted from the series):
they are taken onto the series' grid by nearest-neighbour resampling, which is exact when every CT voxel
centre is a voxel centre of the image; any other grid is refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from nnunetv2_gtv.dicom.labels import label_coding
from nnunetv2_gtv.dicom.rtstruct import Roi, write_rtstruct
from nnunetv2_gtv.dicom.seg import write_seg
from nnunetv2_gtv.dicom.series import DicomInputError, DicomSeries, reference_image
from nnunetv2_gtv.ensemble.fusion import ENTROPY_SUFFIX
from nnunetv2_gtv.label_colours import UNCERTAIN_COLOUR

RTSTRUCT_SUFFIX = "_RTSTRUCT.dcm"
SEG_SUFFIX = "_SEG.dcm"
BINARY_LABEL_NAMES = ("background", "GTV")
GRID_TOLERANCE_VOXELS = 0.01  # NIfTI stores its geometry in float32


def dicom_output_files(case: str, folder: str | os.PathLike) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f"{case}{RTSTRUCT_SUFFIX}", folder / f"{case}{SEG_SUFFIX}"


def grid_mismatch(size: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                  direction: Sequence[float], series: DicomSeries) -> str | None:
    """None when an image grid (SimpleITK order) holds exactly the series' voxel centres, in any axis order or
    direction; else what differs."""
    if int(np.prod(size)) != int(np.prod(series.size_xyz)):
        return f"size {tuple(size)} against the series' {series.size_xyz} (columns, rows, slices)"
    to_world = np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag(spacing)
    series_to_world = np.asarray(series.direction).reshape(3, 3) @ np.diag(series.spacing_xyz)
    corners = np.array([[i, j, k] for i in (0, series.size_xyz[0] - 1) for j in (0, series.size_xyz[1] - 1)
                        for k in (0, series.size_xyz[2] - 1)], dtype=float)
    world = np.asarray(series.origin)[None] + corners @ series_to_world.T
    try:
        index = np.linalg.solve(to_world, (world - np.asarray(origin)[None]).T).T
    except np.linalg.LinAlgError:
        return "a singular direction matrix"
    if np.abs(index - np.round(index)).max() > GRID_TOLERANCE_VOXELS or index.min() < -GRID_TOLERANCE_VOXELS \
            or (index - (np.asarray(size) - 1)[None]).max() > GRID_TOLERANCE_VOXELS:
        return (f"spacing {tuple(round(s, 4) for s in spacing)}, origin {tuple(round(o, 3) for o in origin)} do not "
                f"place the voxels on the series' (spacing {tuple(round(s, 4) for s in series.spacing_xyz)}, origin "
                f"{tuple(round(o, 3) for o in series.origin)})")
    return None


def on_series_grid(image: sitk.Image, series: DicomSeries, name: str) -> np.ndarray:
    """``image`` as a (slices, rows, columns) array in the series' slice order."""
    problem = grid_mismatch(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(), series)
    if problem:
        raise DicomInputError(f"{name}: not on the grid of the CT series in {series.folder}: {problem}")
    resampled = sitk.Resample(image, reference_image(series), sitk.Transform(), sitk.sitkNearestNeighbor, 0.0,
                              image.GetPixelID())
    return sitk.GetArrayFromImage(resampled)


def write_dicom_outputs(series: DicomSeries, segmentation: sitk.Image, entropy: sitk.Image | None,
                        folder: str | os.PathLike, case: str, label_names: Sequence[str] = BINARY_LABEL_NAMES
                        ) -> tuple[Path, Path]:
    """Write ``<case>_RTSTRUCT.dcm`` and ``<case>_SEG.dcm`` into ``folder``; returns their paths. ``label_names``
    names label values 0..K (dataset.json's labels in value order); a value beyond them is an error."""
    rtstruct_file, seg_file = dicom_output_files(case, folder)
    labels = on_series_grid(segmentation, series, f"{case} segmentation")
    unknown = sorted(set(np.unique(labels).tolist()) - set(range(len(label_names))))
    if unknown:
        raise DicomInputError(f"{case} segmentation: labels {unknown} are not in the dataset's labels "
                              f"{list(label_names)}")
    codings = [label_coding(name, value) for value, name in enumerate(label_names) if value > 0]
    rois = [Roi(c.name, labels == value, c.colour, c.interpreted_type,
                f"{c.name}: fused label {value} of the multi-scale ensemble")
            for value, c in enumerate(codings, start=1)]
    if entropy is not None:
        uncertain = on_series_grid(entropy, series, f"{case} entropy") > 1e-6
        name = f"{codings[0].name}_uncertain" if len(codings) == 1 else "uncertain"
        rois.append(Roi(name, uncertain, UNCERTAIN_COLOUR, "",
                        "voxels where the ensemble's models disagree (vote entropy > 0); not a treatment volume"))
    write_rtstruct(series, rois, rtstruct_file)
    write_seg(series, labels, codings, seg_file)
    return rtstruct_file, seg_file


def write_run_outputs(series_by_case: dict[str, DicomSeries], output_folder: str | os.PathLike, file_ending: str,
                      done: Sequence[str], skipped: Sequence[str], label_names: Sequence[str] = BINARY_LABEL_NAMES,
                      log: Callable[[str], None] = print) -> list[str]:
    """RTSTRUCT and SEG of every case with a series that this run finished (``done``), or finished before
    (``skipped`` by --continue) without its DICOM files; from the fused images in ``output_folder``. Returns one
    error message per case that failed (its DICOM files are removed)."""
    folder = Path(output_folder)
    failures, written = [], 0
    for case in [*done, *skipped]:
        series = series_by_case.get(case)
        files = dicom_output_files(case, folder)
        if series is None or (case in skipped and all(f.is_file() for f in files)):
            continue
        try:
            entropy_file = folder / f"{case}{ENTROPY_SUFFIX}{file_ending}"
            entropy = sitk.ReadImage(str(entropy_file)) if entropy_file.is_file() else None
            write_dicom_outputs(series, sitk.ReadImage(str(folder / f"{case}{file_ending}")), entropy, folder, case,
                                label_names)
            written += 1
        except Exception as err:  # noqa: BLE001 - pydicom/highdicom/SimpleITK: that case fails, the run goes on
            for file in files:
                file.unlink(missing_ok=True)
            failures.append(f"{case}: DICOM outputs not written ({type(err).__name__}: {err})")
    if written:
        log(f"DICOM: wrote {written} case(s)' {RTSTRUCT_SUFFIX[1:]} and {SEG_SUFFIX[1:]} to {folder}")
    return failures
