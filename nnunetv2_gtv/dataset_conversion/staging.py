"""Which raw datasets already use an id (nnU-Net allows one folder per id); new ones are staged by
:func:`nnunetv2_gtv.io.atomic.staged_folder`."""
from __future__ import annotations

from pathlib import Path


def existing_datasets(raw_dir: Path, dataset_id: int) -> list[Path]:
    """The folders of ``raw_dir`` that already use ``dataset_id`` (nnU-Net allows one name per id)."""
    return sorted(raw_dir.glob(f"Dataset{dataset_id:03d}_*")) if raw_dir.is_dir() else []
