"""Give files and folders made by ``tempfile`` the permissions of ordinary ones.

``tempfile.mkstemp`` and ``mkdtemp`` create private (0600 / 0700) entries; once renamed into place they would
stay unreadable for other users of a shared nnU-Net installation or data folder.
"""
from __future__ import annotations

import os


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_shareable(path: str | os.PathLike) -> None:
    """chmod ``path`` to what ``open``/``mkdir`` would have given it under the current umask."""
    full = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, full & ~_current_umask())
