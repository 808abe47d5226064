"""Output-folder checks: outputs never go into, inside or around an input."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


class OutputFolderError(ValueError):
    """The output folder is an input folder, lies inside one or holds one."""


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
