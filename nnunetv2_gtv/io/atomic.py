"""Atomic output files and folders: nothing half-written ever appears under its final name.

A file is written to a temporary name in the target folder and renamed with ``os.replace``; a crash or an error
leaves at most the temporary file, never a truncated target. The temporary name says which process on which
machine writes it (``.<name>.<pid>@<host>.<random>.tmp<ending>``), so that a later run can remove what a killed
process left (:func:`remove_stale_temporaries`) without touching a file that a live one is writing. Folders (a
dataset) are assembled in a hidden sibling folder and renamed the same way (:func:`staged_folder`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

from nnunetv2_gtv.io.file_modes import make_shareable

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMPORARY_NAME = re.compile(r"\..+\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[0-9a-f]{8}\.tmp")


def temporary_path(target: str | os.PathLike, ending: str = "") -> Path:
    """Unique hidden name beside ``target``; ``ending`` is kept last (writers that pick a format by the file's
    ending, nnU-Net's and matplotlib's, need it)."""
    target = Path(target)
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


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, ending: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target`` for a writer that wants a file name (matplotlib, nnU-Net's image
    writers); it becomes ``target`` only if the block succeeds, and is removed otherwise."""
    target = Path(target)
    tmp = temporary_path(target, ending)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(target: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a new binary file beside ``target``, then rename it to ``target``."""
    target = Path(target)
    with atomic_path(target) as tmp:
        with open(tmp, "xb") as f:
            write(f)
    return target


def write_text(text: str, target: str | os.PathLike) -> Path:
    return write_file(target, lambda f: f.write(text.encode()))


def json_safe(value):
    """NaN and infinities become None (null): strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(value: object, target: str | os.PathLike, indent: int | None = 1, strict: bool = False) -> Path:
    """``value`` as JSON, keys in their order; ``strict``: NaN and infinities written as null."""
    if strict:
        return write_text(json.dumps(json_safe(value), indent=indent, allow_nan=False), target)
    return write_text(json.dumps(value, indent=indent) + "\n", target)


def _csv_cell(value) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def write_csv(target: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """A CSV table; floats with 6 significant digits, NaN and infinities as empty cells."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([[_csv_cell(v) for v in row] for row in rows])
    return write_text(buffer.getvalue(), target)


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove a file can be written there; OSError otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = temporary_path(folder / "write-test")
    probe.open("xb").close()
    probe.unlink()
    return folder


@contextlib.contextmanager
def staged_folder(target: Path, replaces: Sequence[Path] = ()) -> Iterator[Path]:
    """A hidden folder beside ``target`` to write into. When the block ends without an error the folders
    ``replaces`` are removed and the staging folder becomes ``target``; on any error it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    make_shareable(staging)
    try:
        yield staging
        for old in replaces:
            shutil.rmtree(old)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
