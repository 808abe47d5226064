"""Run bookkeeping shared by gtv-predict and gtv-uncertainty (and their Python API): the output folder, which cases
a part does and which were finished before (``--continue``, ``-num_parts``), the summary files and exit code at the
end of a run, and ``timings.csv``.

A finished case leaves a record (``ensemble.summary.write_record``) holding its summary row and the run's fingerprint
(inputs, models and settings, each settings class recording itself); a run continued or sharded over the same output
folder ends with one summary row and one timings row per finished case."""
from __future__ import annotations

import csv
import fcntl
import io
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

from nnunetv2_gtv.ensemble.fusion import FusionSettings
from nnunetv2_gtv.ensemble.review_ranking import ReviewSelection, rank_rows
from nnunetv2_gtv.ensemble.summary import load_row, package_versions, write_summaries
from nnunetv2_gtv.io.atomic import check_writable, remove_stale_temporaries, write_text
from nnunetv2_gtv.io.folders import OutputFolderError

Case = TypeVar("Case")

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


@dataclass
class RunResult:
    """What a run of :func:`nnunetv2_gtv.api.predict` or :func:`~nnunetv2_gtv.api.fuse` did: its output folder,
    the cases it finished, the cases that failed (one message each), every finished case's summary row in the
    folder (this run's, earlier runs' and other parts'), and the command's exit code (0 all done, 1 some failed)."""

    output_folder: Path
    done: list[str]
    failures: list[str]
    rows: list[dict]
    exit_code: int


def part_of(cases: Sequence[Case], num_parts: int = 1, part_id: int = 0) -> list[Case]:
    """The cases of part ``part_id`` of ``num_parts`` (nnUNetv2_predict's split: every num_parts-th case)."""
    if not 0 <= part_id < num_parts:
        raise ValueError(f"part_id must be in 0..{num_parts - 1} (got {part_id}); parts count from 0")
    return list(cases)[part_id::num_parts]


def finished_row(output_folder: Path, case: str, fingerprint: dict, outputs: Iterable[Path]) -> dict | None:
    """The summary row of ``case`` if it was finished in ``output_folder`` with this fingerprint and all of its
    ``outputs`` exist (``--continue`` skips it), else None."""
    row = load_row(output_folder, case, fingerprint)
    return row if row is not None and all(p.is_file() for p in outputs) else None


def open_output_folder(prog: str, folder: str | os.PathLike, num_models: int) -> Path:
    """``folder`` created if needed and checked writable (OutputFolderError otherwise); removes the temporary
    files that killed runs left there; warns when a single model cannot give any uncertainty."""
    try:
        output_folder = check_writable(folder)
        removed = remove_stale_temporaries(output_folder)
    except OSError as err:
        raise OutputFolderError(f"output folder {folder} is not writable ({err})") from err
    if removed:
        print(f"{prog}: removed {len(removed)} temporary file(s) that interrupted runs left in {output_folder}")
    if num_models == 1:
        print(f"{prog}: warning: only one model given; uncertainty needs N >= 2: the entropy maps are all zeros "
              "and VVC is left empty", file=sys.stderr)
    return output_folder


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command as typed (``argv`` None: this process's arguments), for summary headers and reports."""
    return shlex.join([prog, *(sys.argv[1:] if argv is None else argv)])


def components_removed_text(rows: Sequence[dict], settings: FusionSettings, names: Sequence[str]) -> str:
    """What the connected-component rules removed over ``rows``, per foreground label with its rule."""
    rules = settings.component_rules(max(len(names), 2))
    several = len(rules) > 1
    parts = []
    for label, rule in rules.items():
        name = names[label] if label < len(names) else f"label_{label}"
        column = f"components_removed_{name}" if several else "components_removed"
        removed = sum(int(row.get(column) or 0) for row in rows)
        cases = sum(1 for row in rows if row.get(column))
        parts.append(f"{name} ({rule.describe()}): {removed} in {cases} case(s)")
    return "components removed per label: " + "; ".join(parts)


def finish_run(prog: str, command: str, output_folder: Path, rows: Mapping[str, dict], num_models: int,
               fingerprint: dict, done: Sequence[str], failures: Sequence[str], settings: FusionSettings,
               label_names: Sequence[str], review: ReviewSelection = ReviewSelection()) -> RunResult:
    """Rank the cases for review, write summary.json / summary.csv, say where everything went and what the
    component rules removed per label, list failures."""
    header = {"command": command, "versions": package_versions(), "label_names": list(label_names), **fingerprint,
              "review": review.record()}
    row_list = rank_rows(list(rows.values()), review)
    json_file, csv_file = write_summaries(output_folder, row_list, num_models, header)
    print(f"{prog}: wrote {len(done)} cases' segmentations and uncertainty maps to {output_folder}; "
          f"summary: {json_file.name}, {csv_file.name} ({len(row_list)} cases)")
    if review.budget is not None or review.threshold is not None:
        flagged = sum(1 for row in row_list if row["review"])
        print(f"{prog}: review: {flagged} of {len(row_list)} cases flagged, {review.flag_text()} "
              f"(review_rank in {csv_file.name})")
    print(f"{prog}: {components_removed_text(row_list, settings, label_names)}")
    code = list_failures(prog, "failed", failures)
    return RunResult(output_folder, list(done), list(failures), sorted(row_list, key=lambda r: r["case"]), code)


def list_failures(prog: str, what: str, messages: Sequence[str]) -> int:
    """Print the case-level failures under one error line; returns exit code 1 if there are any, else 0."""
    if not messages:
        return 0
    print(f"{prog}: error: {len(messages)} case(s) {what}:", file=sys.stderr)
    for message in messages:
        print(f"  {message}", file=sys.stderr)
    return 1
