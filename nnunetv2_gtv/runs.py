"""Run bookkeeping shared by the commands: the seconds per case of a gtv-predict run and ``timings.csv``, written as
each case finishes and rebuilt from the cases' records at the end of a run, so that a run killed and continued
(``--continue``) or sharded (``-num_parts``) ends with one row per finished case, as the summary does."""
from __future__ import annotations

import csv
import fcntl
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from nnunetv2_gtv.io.atomic import write_text

TIMINGS_CSV = "timings.csv"
TIMINGS_COLUMNS = ("case", "seconds", "preprocessing", "models", "export")


@dataclass
class CaseTiming:
    """Seconds spent on one case: reading + preprocessing + regions, each model, export (resampling + fusion).

    Exported in an overlapping thread, ``export`` is only the wait after the last model: the rest overlapped
    the models' prediction. Otherwise it is the export's whole time for the case.
    """

    preprocessing: float = 0.0
    models: list[float] = field(default_factory=list)
    export: float = 0.0

    @property
    def total(self) -> float:
        return self.preprocessing + sum(self.models) + self.export

    def describe(self) -> str:
        models = " + ".join(f"{s:.1f}" for s in self.models)
        return (f"{self.total:.1f} s: reading and preprocessing {self.preprocessing:.1f} s, models {models} s, "
                f"export {self.export:.1f} s")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Mapping) -> "CaseTiming":
        return cls(float(value["preprocessing"]), [float(m) for m in value["models"]], float(value["export"]))


def write_timings(output_folder: Path, timings: Mapping[str, CaseTiming], model_folders: Sequence[Path] = ()) -> None:
    """Merge ``timings`` into ``timings.csv`` of the output folder (seconds = the whole case, then its parts) and of
    each model's own folder (seconds = reading and preprocessing + that model's network time). Rows of other cases
    (earlier runs, other parts or export processes sharing the folder) are kept; a lock on the output folder
    serialises the writers."""
    if not timings:
        return
    tables = [(Path(output_folder), lambda t: t.total)]
    tables += [(Path(folder), lambda t, i=i: t.preprocessing + t.models[i]) for i, folder in enumerate(model_folders)]
    folder_handle = os.open(output_folder, os.O_RDONLY)
    try:
        fcntl.flock(folder_handle, fcntl.LOCK_EX)
        for folder, seconds in tables:
            _merge_timings(folder / TIMINGS_CSV, timings, seconds)
    finally:
        os.close(folder_handle)


def _merge_timings(path: Path, timings: Mapping[str, CaseTiming], seconds: Callable[[CaseTiming], float]) -> None:
    rows = {}
    if path.is_file():
        with open(path, newline="") as handle:
            rows = {row["case"]: row for row in csv.DictReader(handle) if row.get("case")}
    for case, timing in timings.items():
        rows[case] = {"case": case, "seconds": f"{seconds(timing):.2f}", "preprocessing": f"{timing.preprocessing:.2f}",
                      "models": " ".join(f"{m:.2f}" for m in timing.models), "export": f"{timing.export:.2f}"}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, TIMINGS_COLUMNS)
    writer.writeheader()
    writer.writerows(rows[case] for case in sorted(rows))
    write_text(buffer.getvalue(), path)
