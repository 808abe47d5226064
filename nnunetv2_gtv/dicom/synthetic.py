"""Synthetic DICOM CT series from the project's synthetic head-and-neck CT (``nnunetv2_gtv.demo.synthetic``).

For tests and for trying gtv-predict's DICOM path without patient data: any orientation (the in-plane axes can
be rotated about the superior axis), non-square pixels, and files numbered in either slice order. Pixel data
are stored as unsigned values with RescaleIntercept -1024, so readers must apply the rescale to get HU.

``python -m nnunetv2_gtv.dicom.synthetic OUT [--rotation 30] [--spacing 0.8 1.0 3.0] [--reverse]`` writes
``OUT/ct/`` (one file per slice) and ``OUT/label.nii.gz`` (the GTV on the same grid).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from nnunetv2_gtv.demo.synthetic import CaseGeometry, render_case, to_sitk_image
from nnunetv2_gtv.dicom.series import CT_IMAGE_STORAGE
from nnunetv2_gtv.io.atomic import write_file

RESCALE_INTERCEPT = -1024


def synthetic_ct(seed: int = 0, in_plane_size: int = 64, num_slices: int = 24,
                 spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 3.0),
                 rotation_degrees: float = 0.0) -> tuple[sitk.Image, sitk.Image]:
    """(CT in HU as int16, GTV label as uint8) on one grid; ``rotation_degrees`` turns the in-plane axes about
    the superior axis (a non-identity ImageOrientationPatient)."""
    geometry = CaseGeometry((num_slices, in_plane_size, in_plane_size), tuple(spacing_xyz))
    image, label = render_case(geometry, np.random.default_rng(seed))
    angle = np.radians(rotation_degrees)
    c, s = np.cos(angle), np.sin(angle)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    result = []
    for array in (image, label):
        item = to_sitk_image(array, geometry)
        item.SetDirection(direction)
        result.append(item)
    return result[0], result[1]


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def write_ct_series(image: sitk.Image, folder: str | os.PathLike, patient_id: str = "SYNTH001",
                    series_number: int = 1, reverse_files: bool = False, study_uid: str | None = None,
                    frame_of_reference_uid: str | None = None,
                    series_description: str = "synthetic head and neck CT") -> list[Path]:
    """Write ``image`` (HU) as a CT Image Storage series into ``folder``, one file per slice, slice k of the image
    at ImagePositionPatient origin + k * spacing * direction[:, 2]. ``reverse_files`` numbers the files and
    instances from the last slice down. Returns the files in the image's slice order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing, origin = np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin())
    stored = np.clip(np.round(array) - RESCALE_INTERCEPT, 0, 4095).astype(np.uint16)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), frame_of_reference_uid or generate_uid()
    now = datetime.datetime.now()
    paths = []
    for k in range(array.shape[0]):
        number = array.shape[0] - k if reverse_files else k + 1
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber, ds.Modality, ds.Manufacturer = "", "CT", "nnunetv2_gtv synthetic"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = series_description
        ds.PatientName, ds.PatientID = f"Synthetic^{patient_id}", patient_id
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.BodyPartExamined, ds.SliceThickness, ds.KVP = "HEADNECK", _ds(spacing[2]), "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = "1", series_number, 1, number
        ds.ImagePositionPatient = [_ds(v) for v in origin + k * spacing[2] * direction[:, 2]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # between rows (y), between columns (x)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(RESCALE_INTERCEPT), "1", "HU"
        ds.PixelData = stored[k].tobytes()
        paths.append(write_file(folder / f"CT{number:04d}.dcm",
                                lambda f, ds=ds: ds.save_as(f, enforce_file_format=True)))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_gtv.dicom.synthetic",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="folder to write ct/ and label.nii.gz into (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=96, help="rows and columns (default %(default)s)")
    parser.add_argument("--slices", type=int, default=40, help="number of slices (default %(default)s)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 3.0), metavar=("X", "Y", "Z"),
                        help="column, row and slice spacing in mm (default 1 1 3)")
    parser.add_argument("--rotation", type=float, default=0.0, help="in-plane rotation in degrees (default 0)")
    parser.add_argument("--reverse", action="store_true", help="number the files from the top slice down")
    parser.add_argument("--patient-id", default="SYNTH001")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists():
        print(f"{parser.prog}: error: {output} exists; choose a new folder", file=sys.stderr)
        return 2
    image, label = synthetic_ct(args.seed, args.size, args.slices, tuple(args.spacing), args.rotation)
    write_ct_series(image, output / "ct", args.patient_id, reverse_files=args.reverse)
    sitk.WriteImage(label, str(output / "label.nii.gz"))
    print(f"wrote {output / 'ct'} ({args.slices} slices) and {output / 'label.nii.gz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
