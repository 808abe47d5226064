"""Images written like nnU-Net writes a segmentation (its reader/writer class, the case's geometry), atomically."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

from nnunetv2_gtv.io.atomic import atomic_path


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
