"""Atomic output files: images through nnU-Net's reader/writer class, and text files; the output folder's checks.

Everything is written to a temporary name in the target folder and renamed with ``os.replace``, so a crash
or an error never leaves a half-written file under the final name. The temporary name says which process on
which machine writes it (``.<name>.<pid>@<host>.<random>.tmp<ending>``), so that a later run can remove what a
killed process left (:func:`remove_stale_temporaries`) without touching a file that a live one is writing.
"""
from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

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


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMPORARY_NAME = re.compile(r"\..+\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[0-9a-f]{8}\.tmp")


class OutputFolderError(ValueError):
    """The output folder is an input folder, lies inside one or holds one."""


def _temporary_path(target: Path, ending: str) -> Path:
    """Unique hidden name beside ``target`` that keeps the file ending (writers pick the format by it)."""
    return target.parent / f".{target.name}.{os.getpid()}@{_HOST}.{secrets.token_hex(4)}.tmp{ending}"


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine exists; True where that cannot be asked safely (Windows, where
    ``os.kill(pid, 0)`` would end the process)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files under ``folder`` that this module's writers left when their process was killed
    (named by a process of this machine that no longer exists); returns them. Files of live processes, of other
    machines (shards sharing a network folder) and of other naming schemes are kept."""
    removed = []
    for path in sorted(Path(folder).rglob(".*")):
        match = _TEMPORARY_NAME.match(path.name)
        if (match and match["host"] == _HOST and path.is_file() and not path.is_symlink()
                and not _process_alive(int(match["pid"]))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_outside_inputs(output_folder: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Raise OutputFolderError when ``output_folder`` is an input folder, lies inside one, or holds an input
    (file or folder): outputs could overwrite inputs or be read as inputs by the next run."""
    output = Path(output_folder).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if source.is_dir() and output == source:
            problem = f"is the input folder {given}"
        elif source.is_dir() and output.is_relative_to(source):
            problem = f"lies inside the input folder {given}"
        elif source.is_relative_to(output):
            problem = f"holds the input {'folder ' if source.is_dir() else ''}{given}"
        else:
            continue
        raise OutputFolderError(f"output folder {output_folder} {problem}; nothing is written into an input "
                                "folder (outputs could overwrite inputs or be read as inputs): choose another one")


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
    probe = _temporary_path(folder / "write-test", "")
    probe.open("xb").close()
    probe.unlink()
    return folder
