"""Atomic output files: images through nnU-Net's reader/writer class, and text files.

Everything is written to a temporary name in the target folder and renamed with ``os.replace``, so a crash
or an error never leaves a half-written file under the final name.
"""
from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name


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


def _temporary_path(target: Path, ending: str) -> Path:
    """Unique hidden name beside ``target`` that keeps the file ending (writers pick the format by it)."""
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{ending}"


def write_image(array: np.ndarray, target: str | os.PathLike, file_ending: str, properties: dict,
                reader_writer: str) -> Path:
    """Write ``array`` (z, y, x) like nnU-Net writes a segmentation; float arrays stay float."""
    target = Path(target)
    tmp = _temporary_path(target, file_ending)
    try:
        writer = recursive_find_reader_writer_by_name(reader_writer)()
        data = array.view(_FloatImage) if np.issubdtype(array.dtype, np.floating) else array
        try:
            writer.write_seg(data, str(tmp), properties)
        except RuntimeError as err:  # SimpleITK reports I/O failures as RuntimeError
            raise OSError(f"cannot write {target}: {err}") from err
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_file(target: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a new binary file beside ``target``, then rename it to ``target``."""
    target = Path(target)
    tmp = _temporary_path(target, "")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_text(text: str, target: str | os.PathLike) -> Path:
    return write_file(target, lambda f: f.write(text.encode()))


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove a file can be written there; OSError otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    os.close(fd)
    os.unlink(name)
    return folder
