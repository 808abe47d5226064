"""summary.csv / summary.json (fixed column contract) and the per-case records behind them.

Each finished case leaves ``per_case/<case>.json`` (its summary row plus the inputs and settings that made
it). The summaries are rebuilt from these records, so ``--continue`` and sharded runs (``-num_parts``) that
share one output folder always end with one row per finished case.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Sequence

from nnunetv2_gtv.ensemble.agreement import SCORE_NAMES
from nnunetv2_gtv.errors import CaseError
from nnunetv2_gtv.ensemble.fusion import CaseResult, FusionSettings, output_files
from nnunetv2_gtv.io.atomic import write_text

RECORD_FOLDER = "per_case"
DECIMALS = 6
VERSIONED_DISTRIBUTIONS = {"nnunetv2_gtv": "nnunetv2-gtv", "nnunetv2": "nnunetv2", "torch": "torch",
                           "numpy": "numpy", "SimpleITK": "SimpleITK"}


def csv_columns(num_models: int, label_names: Sequence[str] = ()) -> list[str]:
    """The summary's columns: the case-level ones (every foreground label pooled), then, with more than one
    foreground label (``label_names``), each label's own (``<column>_<label name>``)."""
    columns = (["case", "n_models"] + [f"volume_ml_model_{i}" for i in range(1, num_models + 1)]
               + ["volume_ml_fused", "vvc", "components_removed", "review", "review_rank", "missing_models",
                  *SCORE_NAMES])
    for name in label_names:
        columns += ([f"volume_ml_model_{i}_{name}" for i in range(1, num_models + 1)]
                    + [f"volume_ml_fused_{name}", f"vvc_{name}", f"vvc_models_{name}", f"components_removed_{name}",
                       f"review_{name}"] + [f"{score}_{name}" for score in SCORE_NAMES])
    return columns


def label_columns(rows: Sequence[dict]) -> list[str]:
    """The label names of the per-label columns that summary rows hold (none for one foreground label)."""
    return [key[len("volume_ml_fused_"):] for key in (rows[0] if rows else {}) if key.startswith("volume_ml_fused_")]


def _rounded(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, DECIMALS)


def case_row(result: CaseResult) -> dict:
    """JSON-ready summary row: NaN VVC and volumes of missing models become None; numbers rounded to 1e-6."""
    row = {"case": result.case, "n_models": result.n_models}
    row.update({f"volume_ml_model_{i}": _rounded(v) for i, v in enumerate(result.model_volumes_ml, start=1)})
    row.update({
        "volume_ml_fused": _rounded(result.fused_volume_ml),
        "vvc": _rounded(result.vvc),
        "components_removed": result.components_removed,
        "review": result.review,
        "missing_models": list(result.missing_models),
    })
    row.update({name: _rounded(value) for name, value in result.scores.values().items()})
    if len(result.labels) > 1:  # one foreground label: its numbers are the case's
        for label in result.labels:
            row.update({f"volume_ml_model_{i}_{label.name}": _rounded(v)
                        for i, v in enumerate(label.model_volumes_ml, start=1)})
            row.update({
                f"volume_ml_fused_{label.name}": _rounded(label.fused_volume_ml),
                f"vvc_{label.name}": _rounded(label.vvc),
                f"vvc_models_{label.name}": list(label.vvc_models),
                f"components_removed_{label.name}": label.components_removed,
                f"review_{label.name}": label.review,
            })
            row.update({f"{name}_{label.name}": _rounded(value) for name, value in label.scores.values().items()})
    return row


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    return str(value)


def package_versions() -> dict[str, str | None]:
    found = {}
    for name, distribution in VERSIONED_DISTRIBUTIONS.items():
        try:
            found[name] = version(distribution)
        except PackageNotFoundError:
            found[name] = None
    return found


def record_path(output_folder: str | os.PathLike, case: str) -> Path:
    return Path(output_folder) / RECORD_FOLDER / f"{case}.json"


def write_record(output_folder: str | os.PathLike, row: dict, fingerprint: dict, timing: dict | None = None) -> Path:
    """Mark a case finished: written after all its images; ``timing``: its seconds (gtv-predict)."""
    target = record_path(output_folder, row["case"])
    target.parent.mkdir(exist_ok=True)
    record = {"fingerprint": fingerprint, "row": row, **({"timing": timing} if timing is not None else {})}
    return write_text(json.dumps(record, indent=1), target)


def load_record(output_folder: str | os.PathLike, case: str, fingerprint: dict) -> dict | None:
    """The case's record if one made with the same inputs and settings exists, else None."""
    try:
        record = json.loads(record_path(output_folder, case).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("fingerprint") == fingerprint else None


def load_row(output_folder: str | os.PathLike, case: str, fingerprint: dict) -> dict | None:
    """The case's row if a record made with the same inputs and settings exists, else None."""
    record = load_record(output_folder, case, fingerprint)
    return None if record is None else record.get("row")


def fuse_and_record(case: str, fuse: Callable[[], CaseResult], output_folder: str | os.PathLike, file_ending: str,
                    settings: FusionSettings, fingerprint: dict, timing: Callable[[], dict] | None = None
                    ) -> tuple[dict | None, str | None]:
    """Run ``fuse`` (which writes ``case``'s images) and mark the case finished: (summary row, None), or on a
    fusion or file error (None, message) with the case's images removed, since OUT keeps images only of the
    cases its summary lists. ``timing`` gives the case's seconds for its record once it is fused."""
    record_path(output_folder, case).unlink(missing_ok=True)  # the case is redone: its old row is void
    try:
        row = case_row(fuse())
        write_record(output_folder, row, fingerprint, None if timing is None else timing())
    except (CaseError, OSError) as err:
        for path in output_files(case, Path(output_folder), file_ending, settings):
            path.unlink(missing_ok=True)
        return None, str(err)
    return row, None


def write_summaries(output_folder: str | os.PathLike, rows: Sequence[dict], num_models: int,
                    header: dict) -> tuple[Path, Path]:
    """Write summary.json (``header`` + ``cases``) and summary.csv, sorted by case; ``rows`` are ranked
    (``review_ranking.rank_rows``)."""
    rows = sorted(rows, key=lambda r: r["case"])
    folder = Path(output_folder)
    json_file = write_text(json.dumps({**header, "cases": rows}, indent=2, allow_nan=False) + "\n",
                           folder / "summary.json")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = csv_columns(num_models, label_columns(rows))
    writer.writerow(columns)
    writer.writerows([[_csv_cell(row[c]) for c in columns] for row in rows])
    csv_file = write_text(buffer.getvalue(), folder / "summary.csv")
    return json_file, csv_file
