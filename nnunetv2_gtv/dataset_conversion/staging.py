"""Datasets assembled beside their target and renamed into place: a crash never leaves a half-written dataset."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from nnunetv2_gtv.file_modes import make_shareable


def existing_datasets(raw_dir: Path, dataset_id: int) -> list[Path]:
    """The folders of ``raw_dir`` that already use ``dataset_id`` (nnU-Net allows one name per id)."""
    return sorted(raw_dir.glob(f"Dataset{dataset_id:03d}_*")) if raw_dir.is_dir() else []


@contextlib.contextmanager
def staged_dataset(target: Path, replaces: Sequence[Path] = ()) -> Iterator[Path]:
    """A hidden folder beside ``target`` to write the dataset into. When the block ends without an error the
    folders ``replaces`` are removed and the staging folder becomes ``target``; on any error it is removed."""
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
