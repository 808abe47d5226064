"""Images written like nnU-Net writes a segmentation (its reader/writer class, the case's geometry), atomically;
whether two images share one voxel grid."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

from nnunetv2_gtv.io.atomic import atomic_path

GEOMETRY_TOLERANCE = 1e-3  # mm (spacing, origin) and direction cosines: images of one case share their grid


class Grid(Protocol):
    """What SimpleITK's ``Image`` and ``ImageFileReader`` (after ``ReadImageInformation``) both tell of a grid."""

    def GetSize(self) -> tuple: ...
    def GetSpacing(self) -> tuple: ...
    def GetOrigin(self) -> tuple: ...
    def GetDirection(self) -> tuple: ...


def geometry_mismatch(reference: Grid, other: Grid, tolerance: float = GEOMETRY_TOLERANCE) -> str | None:
    """None when ``other`` lies on ``reference``'s voxel grid; else what differs, in words."""
    if tuple(reference.GetSize()) != tuple(other.GetSize()):
        return f"size {tuple(other.GetSize())} is not {tuple(reference.GetSize())}"
    for what, a, b in (("spacing", reference.GetSpacing(), other.GetSpacing()),
                       ("origin", reference.GetOrigin(), other.GetOrigin()),
                       ("direction", reference.GetDirection(), other.GetDirection())):
        if not np.allclose(a, b, atol=tolerance):
            return f"{what} {tuple(round(v, 4) for v in b)} is not {tuple(round(v, 4) for v in a)}"
    return None


class _FloatImage(np.ndarray):
    """Array view that survives nnU-Net's ``write_seg`` as float.

    Every nnU-Net writer casts with ``seg.astype(np.uint8 if np.max(seg) < 255 else np.uint16, copy=False)``
    before handing the array to its library; integer casts of this view are no-ops, so a float map goes
    through the very same geometry handling (spacing, origin, direction, reorientation) as a segmentation.
    """

    def astype(self, dtype, *args, **kwargs):
        if np.issubdtype(np.dtype(dtype), np.integer):
            return self.view(np.ndarray)
        return super().astype(dtype, *args, **kwargs)


def write_image(array: np.ndarray, target: str | os.PathLike, file_ending: str, properties: dict,
                reader_writer: str) -> Path:
    """Write ``array`` (z, y, x) like nnU-Net writes a segmentation; float arrays stay float."""
    target = Path(target)
    with atomic_path(target, file_ending) as tmp:
        writer = recursive_find_reader_writer_by_name(reader_writer)()
        data = array.view(_FloatImage) if np.issubdtype(array.dtype, np.floating) else array
        try:
            writer.write_seg(data, str(tmp), properties)
        except RuntimeError as err:  # SimpleITK reports I/O failures as RuntimeError
            raise OSError(f"cannot write {target}: {err}") from err
    return target
