"""What the RTSTRUCT and SEG writers share: this package's name and version as the writing software, and the
CT's own attributes read once."""
from __future__ import annotations

import pydicom
from pydicom.dataset import Dataset

from nnunetv2_gtv import __version__
from nnunetv2_gtv.dicom.series import DicomSeries

MANUFACTURER = "nnunetv2_gtv"
MODEL_NAME = "nnunetv2_gtv multi-scale GTV ensemble (Mei et al.)"


def series_description(kind: str) -> str:
    """At most 64 characters (LO)."""
    return f"GTV {kind} nnunetv2_gtv {__version__}"[:64]


def ct_header(series: DicomSeries, index: int = 0) -> Dataset:
    """The header of one CT slice (no pixel data)."""
    return pydicom.dcmread(series.slices[index].path, stop_before_pixels=True)
