"""Streaming reader for the ``probabilities`` array in nnU-Net's ``<case>.npz`` files.

nnU-Net writes ``np.savez_compressed(file, probabilities=p)`` with ``p`` float32, shape (C, z, y, x) and
C-order (gtv-predict adds ``region``, the box a model predicted in). ``np.load`` would inflate the whole member
into a fresh array; reading the member here once, in chunks of one channel's flat voxel range, lets the caller
accumulate without ever holding a second map.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from nnunetv2_gtv.ensemble.errors import FusionInputError

MEMBER = "probabilities.npy"
REGION_MEMBER = "region.npy"  # written by gtv-predict beside the probabilities of a model run in a region
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


class ProbabilityStream:
    """Header facts and chunked access to one opened ``probabilities`` member."""

    def __init__(self, path: Path, fp, shape: tuple[int, ...], dtype: np.dtype):
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self._fp = fp

    def read(self, count: int) -> np.ndarray:
        """Next ``count`` values in C order, as float32 (zipfile checks the CRC when the last byte is read)."""
        nbytes = count * self.dtype.itemsize
        try:
            data = self._fp.read(nbytes)
        except _READ_ERRORS as err:
            raise FusionInputError(f"{self.path}: corrupt npz data ({err})") from err
        if len(data) != nbytes:
            raise FusionInputError(f"{self.path}: truncated npz, 'probabilities' ends early")
        return np.frombuffer(data, dtype=self.dtype).astype(np.float32, copy=False)


@contextmanager
def open_probabilities(path: str | os.PathLike) -> Iterator[ProbabilityStream]:
    """Open ``path`` and parse the npy header of its ``probabilities`` member (no data is inflated yet)."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise FusionInputError(f"{path}: not a readable npz file ({err})") from err
    with archive:
        if MEMBER not in archive.namelist():
            keys = ", ".join(n.removesuffix(".npy") for n in archive.namelist()) or "nothing"
            raise FusionInputError(f"{path}: no 'probabilities' array (holds {keys}); "
                                   "was it written by nnU-Net with --save_probabilities?")
        try:
            fp = archive.open(MEMBER)
            version = np.lib.format.read_magic(fp)
            if version not in _HEADER_READERS:
                raise ValueError(f"unsupported npy format version {version}")
            shape, fortran_order, dtype = _HEADER_READERS[version](fp)
        except _READ_ERRORS as err:
            raise FusionInputError(f"{path}: corrupt npz header ({err})") from err
        with fp:
            if fortran_order or dtype.kind != "f" or len(shape) != 4:
                raise FusionInputError(
                    f"{path}: 'probabilities' must be a C-order float array (C, z, y, x) as nnU-Net writes it; "
                    f"found shape {shape}, dtype {dtype}, fortran_order={fortran_order}")
            yield ProbabilityStream(path, fp, tuple(int(s) for s in shape), dtype)


def read_region(path: str | os.PathLike) -> tuple[tuple[int, int], ...] | None:
    """The box a model predicted in, as gtv-predict records it beside the probabilities (``region``: half-open
    (start, stop) per axis of the image grid); None when the file has none (the model saw the whole image)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            if REGION_MEMBER not in archive.namelist():
                return None
            with archive.open(REGION_MEMBER) as fp:
                region = np.lib.format.read_array(fp, allow_pickle=False)
    except _READ_ERRORS as err:
        raise FusionInputError(f"{path}: corrupt 'region' array ({err})") from err
    if region.shape != (3, 2) or region.dtype.kind not in "iu":
        raise FusionInputError(f"{path}: 'region' must be 3 x 2 integers (start, stop per axis), found "
                               f"{region.dtype} {region.shape}")
    return tuple((int(lo), int(hi)) for lo, hi in region)
