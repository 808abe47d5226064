"""DICOM Segmentation (binary, one segment per label) of a label map on a CT series, written with highdicom.

highdicom copies patient, study and frame of reference from the CT and references each source slice. It may
order frames differently from the CT files (facts.md: the top slice can be frame 1), so a reader must place
frames by their position or referenced SOPInstanceUID, never by frame order. Empty frames are left out when
any label is present.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from nnunetv2_gtv import __version__
from nnunetv2_gtv.dicom.common import MANUFACTURER, MODEL_NAME, ct_header, series_description
from nnunetv2_gtv.dicom.labels import LabelCoding
from nnunetv2_gtv.dicom.series import DicomSeries
from nnunetv2_gtv.io.atomic import write_file

SERIES_NUMBER = 902


def build_seg(series: DicomSeries, labels: np.ndarray, codings: Sequence[LabelCoding]) -> hd.seg.Segmentation:
    """``labels`` (slices, rows, columns; values 0..K) in the series' slice order -> a binary SEG with one segment
    per coding (segment k = label k), named and coded as the coding says."""
    if labels.shape != (len(series.slices), series.rows, series.columns):
        raise ValueError(f"SEG: mask of shape {labels.shape}, the series is "
                         f"{(len(series.slices), series.rows, series.columns)}")
    sources = [ct_header(series, k) for k in range(len(series.slices))]
    algorithm = hd.AlgorithmIdentificationSequence(name="nnunetv2_gtv", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=coding.name[:64], segmented_property_category=coding.category,
        segmented_property_type=coding.type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=generate_uid(), tracking_id=coding.name[:64],
        display_color=hd.color.CIELabColor.from_rgb(*coding.colour))
        for number, coding in enumerate(codings, start=1)]
    planes = np.stack([labels == number for number in range(1, len(codings) + 1)], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=planes, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=generate_uid(), series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME, software_versions=__version__, device_serial_number="0",
        series_description=series_description("SEG"), omit_empty_frames=bool(labels.any()))
    return seg


def write_seg(series: DicomSeries, labels: np.ndarray, codings: Sequence[LabelCoding], target: str | os.PathLike
              ) -> Path:
    """Write the SEG to ``target`` under a temporary name, then rename it."""
    seg = build_seg(series, labels, codings)
    return write_file(target, lambda f: seg.save_as(f, enforce_file_format=True))

