"""DICOM RT Structure Set of masks on a CT series, written with pydicom and our own contour extraction.

Why not rt-utils (the writer TotalSegmentator and platipy use): measured here (facts.md, 2026-11-30), version
1.2.7 writes ContourData values longer than the 16 characters DICOM allows for DS, leaves out Type 2 attributes
(dciodvfy: 428 errors), and places contours wrongly on non-square pixels (it scales the column index by the row
spacing). Here:

- contours per slice by marching squares at level 0.5 on the zero-padded slice (``skimage.measure.find_contours``,
  a dependency of nnU-Net): every contour is closed and separates inside from outside pixel centres exactly;
  points on straight runs are dropped; contours of fewer than 3 points are dropped;
- holes are separate contours inside the outer one on the same slice (even-odd rule, how TPSs and SlicerRT read
  nested CLOSED_PLANAR contours);
- points in patient coordinates (mm) from each slice's own ImagePositionPatient, the row direction times the
  column spacing (PixelSpacing[1]) and the column direction times the row spacing (PixelSpacing[0]); every DS
  value formatted by ``pydicom.valuerep.format_number_as_ds`` (at most 16 characters);
- the CT's FrameOfReferenceUID, patient and study attributes; references to the CT series and to each slice's
  SOPInstanceUID (ContourImageSequence); Type 2 attributes present (empty where unknown).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid
from pydicom.valuerep import format_number_as_ds
from skimage.measure import find_contours

from nnunetv2_gtv import __version__
from nnunetv2_gtv.dicom.common import MANUFACTURER, MODEL_NAME, ct_header, series_description
from nnunetv2_gtv.dicom.series import DicomSeries
from nnunetv2_gtv.io.atomic import write_file

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SERIES_NUMBER = 901
# copied from the CT; Type 2 ones are written empty when the CT lacks them
PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")
PATIENT_STUDY_OPTIONAL = ("IssuerOfPatientID", "PatientAge", "PatientWeight", "PatientSize", "StudyDescription",
                          "PatientIdentityRemoved", "DeidentificationMethod")
DECIMALS_MM = 4  # 0.1 micrometre: far below any CT's resolution, keeps the DS strings short


@dataclass(frozen=True)
class Roi:
    """One structure: ``mask`` (slices, rows, columns) in the series' slice order (ascending along the normal)."""

    name: str
    mask: np.ndarray
    color: tuple[int, int, int]
    interpreted_type: str = ""  # RTROIInterpretedType; empty = not given (Type 2)
    description: str = ""


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D mask as (n, 2) arrays of (row, column) pixel coordinates, first point not
    repeated, collinear points dropped; outer boundaries and holes alike (even-odd rule)."""
    padded = np.pad(mask.astype(np.float32), 1)
    contours = []
    for contour in find_contours(padded, 0.5):
        points = contour[:-1] - 1.0 if np.allclose(contour[0], contour[-1]) else contour - 1.0
        previous, following = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
        before, after = points - previous, following - points
        turning = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9
        points = points[turning]
        if len(points) >= 3:
            contours.append(points)
    return contours


def contour_to_patient(points: np.ndarray, series: DicomSeries, slice_index: int) -> np.ndarray:
    """(row, column) pixel coordinates on one slice -> (n, 3) patient coordinates in mm."""
    row_direction, column_direction = np.asarray(series.orientation[:3]), np.asarray(series.orientation[3:])
    row_spacing, column_spacing = series.pixel_spacing
    origin = np.asarray(series.slices[slice_index].position)
    return (origin[None] + points[:, 1:2] * column_spacing * row_direction[None]
            + points[:, 0:1] * row_spacing * column_direction[None])


def _ds_values(values: np.ndarray) -> list[str]:
    return [format_number_as_ds(float(round(v, DECIMALS_MM)) + 0.0) for v in values.reshape(-1)]


def _image_reference(series: DicomSeries, index: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = series.slices[index].sop_class_uid
    item.ReferencedSOPInstanceUID = series.slices[index].sop_instance_uid
    return item


def _referenced_frame_of_reference(series: DicomSeries, ct: Dataset) -> Dataset:
    series_item = Dataset()
    series_item.SeriesInstanceUID = series.series_uid
    series_item.ContourImageSequence = DicomSequence([_image_reference(series, k) for k in range(len(series.slices))])
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired, as PS3.3 asks)
    study.ReferencedSOPInstanceUID = ct.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series_item])
    frame = Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _roi_items(series: DicomSeries, number: int, roi: Roi) -> tuple[Dataset, Dataset, Dataset]:
    """StructureSetROISequence, ROIContourSequence and RTROIObservationsSequence items of one ROI."""
    if roi.mask.shape != (len(series.slices), series.rows, series.columns):
        raise ValueError(f"ROI {roi.name}: mask of shape {roi.mask.shape}, the series is "
                         f"{(len(series.slices), series.rows, series.columns)}")
    structure = Dataset()
    structure.ROINumber = number
    structure.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
    structure.ROIName = roi.name
    if roi.description:
        structure.ROIDescription = roi.description[:1024]
    structure.ROIGenerationAlgorithm = "AUTOMATIC"
    contours = []
    for k in np.flatnonzero(roi.mask.reshape(roi.mask.shape[0], -1).any(axis=1)):
        for points in slice_contours(roi.mask[k]):
            item = Dataset()
            item.ContourImageSequence = DicomSequence([_image_reference(series, int(k))])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourNumber = len(contours) + 1
            item.ContourData = _ds_values(contour_to_patient(points, series, int(k)))
            contours.append(item)
    contour = Dataset()
    contour.ROIDisplayColor = list(roi.color)
    contour.ReferencedROINumber = number
    if contours:
        contour.ContourSequence = DicomSequence(contours)
    observation = Dataset()
    observation.ObservationNumber = number
    observation.ReferencedROINumber = number
    observation.ROIObservationLabel = roi.name[:16]
    observation.RTROIInterpretedType = roi.interpreted_type
    observation.ROIInterpreter = ""
    return structure, contour, observation


def build_rtstruct(series: DicomSeries, rois: Sequence[Roi]) -> Dataset:
    """The RT Structure Set (with file meta) of ``rois`` on ``series``."""
    ct = ct_header(series)
    now = datetime.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = ct.get("SpecificCharacterSet", "ISO_IR 100")
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SOPClassUID, ds.SOPInstanceUID = RT_STRUCTURE_SET_STORAGE, meta.MediaStorageSOPInstanceUID
    for keyword in PATIENT_STUDY_TYPE2:
        setattr(ds, keyword, ct.get(keyword, ""))
    for keyword in PATIENT_STUDY_OPTIONAL:
        if keyword in ct:
            setattr(ds, keyword, ct.get(keyword))
    ds.StudyInstanceUID = ct.StudyInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), SERIES_NUMBER
    ds.SeriesDate, ds.SeriesTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.SeriesDescription = series_description("RTSTRUCT")
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ct.get("PositionReferenceIndicator", "")
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, MODEL_NAME
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "GTV"
    ds.StructureSetName = "GTV nnunetv2_gtv"
    ds.StructureSetDescription = f"automatic GTV by nnunetv2_gtv {__version__} on CT series {series.series_uid}"[:1024]
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame_of_reference(series, ct)])
    items = [_roi_items(series, number, roi) for number, roi in enumerate(rois, start=1)]
    ds.StructureSetROISequence = DicomSequence([s for s, _, _ in items])
    ds.ROIContourSequence = DicomSequence([c for _, c, _ in items])
    ds.RTROIObservationsSequence = DicomSequence([o for _, _, o in items])
    return ds


def write_rtstruct(series: DicomSeries, rois: Sequence[Roi], target: str | os.PathLike) -> Path:
    """Write the RT Structure Set to ``target`` under a temporary name, then rename it."""
    ds = build_rtstruct(series, rois)
    return write_file(target, lambda f: ds.save_as(f, enforce_file_format=True))
