"""Compare several models' segmentations of the same cases against one reference, as the paper's tables.

Each input is a prediction folder (``<case><file_ending>`` segmentations, e.g. of ``nnUNetv2_predict`` or
``gtv-predict``) or a ``gtv-evaluate`` output folder (its ``metrics.csv`` rows of the fused segmentation are
used, after checking that it was evaluated against the same reference and labels). Per case and label: Dice, NSD,
ASSD, HD95, RVE (:mod:`nnunetv2_gtv.evaluation.metrics`); every foreground label is scored on its own, and the
case-level value is the case's mean over its labels. Per input: mean ± sample sd over the cases, and a paired
two-sided Wilcoxon signed-rank test (scipy) of each input against the baseline (default: the first) over the
cases where both values are finite. With fewer than 6 paired cases a two-sided Wilcoxon test cannot reach
p < 0.05 (its smallest p is 2 / 2^n), so such p-values are flagged. Inference seconds per case are taken from
``<prediction folder>/timings.csv`` (columns ``case``, ``seconds``) when a folder has one; training minutes per
input, when given, are a column of the table (they live in no prediction folder).

Every input must hold exactly the same cases, on the reference's grid, with labels from one label set; anything
else raises :class:`~nnunetv2_gtv.evaluation.folders.EvaluationInputError` naming the files.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from nnunetv2_gtv.figures import evaluation_plots as plots
from nnunetv2_gtv.evaluation.folders import (
    EvaluationInputError,
    check_same_grid,
    detect_file_ending,
    find_image,
    list_cases,
    parse_float,
    read_volume,
)
from nnunetv2_gtv.evaluation.metrics import METRIC_NAMES, compute_metrics, summarise
from nnunetv2_gtv.evaluation.pipeline import FUSED
from nnunetv2_gtv.evaluation.report import JSON_NAME as EVALUATION_JSON
from nnunetv2_gtv.evaluation.report import METRICS_CSV, markdown_table
from nnunetv2_gtv.io.atomic import write_csv, write_json, write_text
from nnunetv2_gtv.runs import TIMINGS_CSV

MIN_PAIRED_CASES = 6
SECONDS = "seconds"
TRAINING_MINUTES = "training_minutes"
OUTPUT_NAMES = ("comparison.md", "comparison.csv", "comparison.json", "comparison_per_case.csv")
# paper's units: Dice in percent, distances in mm, RVE in percent
TABLE_METRICS = {"dice": ("Dice (%)", 100.0, 2), "nsd": ("NSD (%)", 100.0, 2), "assd_mm": ("ASSD (mm)", 1.0, 2),
                 "hd95_mm": ("HD95 (mm)", 1.0, 2), "rve_percent": ("RVE (%)", 1.0, 2)}


@dataclass(frozen=True)
class CompareInput:
    """One row of the table: its name and folder (predictions or a gtv-evaluate output)."""

    name: str
    folder: Path


@dataclass
class Comparison:
    """Per-case metrics of every input (same cases for all) and what the tables are made from."""

    reference: Path
    labels: dict[int, str]  # the compared foreground labels and their names
    baseline: str
    inputs: list[CompareInput]
    cases: list[str]
    metrics: dict[str, dict[str, dict]] = field(default_factory=dict)  # name -> case -> metric -> mean over labels
    label_metrics: dict[str, dict[str, dict[str, dict]]] = field(default_factory=dict)  # name -> label -> case -> ...
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> case -> inference seconds
    training_minutes: dict[str, float] = field(default_factory=dict)  # name -> minutes its training took
    notes: list[str] = field(default_factory=list)


def parse_input(text: str) -> CompareInput:
    """``NAME=FOLDER`` or ``FOLDER`` (named after the folder)."""
    name, sep, folder = text.partition("=")
    if not sep:
        name, folder = Path(text).name, text
    if not name or not folder:
        raise EvaluationInputError(f"input '{text}': write NAME=FOLDER or FOLDER")
    return CompareInput(name, Path(folder))


def parse_minutes(text: str) -> tuple[str, float]:
    """``NAME=MINUTES`` of ``--training-minutes``."""
    name, _, minutes = text.partition("=")
    try:
        value = float(minutes)
    except ValueError:
        value = float("nan")
    if not name or not math.isfinite(value) or value < 0:
        raise EvaluationInputError(f"training minutes '{text}': write NAME=MINUTES with MINUTES >= 0")
    return name, value


def _is_evaluation(folder: Path) -> bool:
    return (folder / METRICS_CSV).is_file() and (folder / EVALUATION_JSON).is_file()


def _declared_labels(folder: Path) -> set[int] | None:
    """Label values of ``folder/dataset.json`` (nnU-Net writes one into its prediction folders), else None."""
    path = folder / "dataset.json"
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text())["labels"]
        return {int(v) for value in labels.values() for v in (value if isinstance(value, list) else [value])}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise EvaluationInputError(f"{path}: cannot read its 'labels' ({error})") from None


def _timings(folder: Path) -> dict[str, float]:
    path = folder / TIMINGS_CSV
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"case", SECONDS} <= set(reader.fieldnames):
            raise EvaluationInputError(f"{path}: needs the columns 'case' and '{SECONDS}'")
        return {row["case"]: parse_float(row[SECONDS]) for row in reader}


def _evaluation_metrics(item: CompareInput, reference: Path) -> tuple[dict[str, dict[str, dict]], set[str], Path]:
    """Fused rows of a gtv-evaluate output (label name -> case -> metric), checked to be against ``reference``;
    also the label names it evaluated and its predictions folder."""
    doc_path = item.folder / EVALUATION_JSON
    try:
        doc = json.loads(doc_path.read_text())
        evaluated_against = Path(doc["inputs"]["reference"])
        predictions = Path(doc["inputs"]["predictions"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise EvaluationInputError(f"{doc_path}: not a gtv-evaluate report ({error})") from None
    if evaluated_against.resolve() != reference.resolve():
        raise EvaluationInputError(f"{doc_path}: evaluated against {evaluated_against}, not the reference {reference}")
    by_label: dict[str, dict[str, dict]] = {}
    with open(item.folder / METRICS_CSV, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("source") == FUSED:
                by_label.setdefault(row.get("label_name") or "label_1", {})[row["case"]] = \
                    {name: parse_float(row.get(name)) for name in METRIC_NAMES}
    return by_label, set(by_label), predictions


def _check_same_cases(found: dict[str, list[str]]) -> list[str]:
    names = list(found)
    first = set(found[names[0]])
    for name in names[1:]:
        other = set(found[name])
        if other != first:
            raise EvaluationInputError(
                f"inputs '{names[0]}' and '{name}' hold different cases (only in '{names[0]}': "
                f"{', '.join(sorted(first - other)) or '-'}; only in '{name}': {', '.join(sorted(other - first)) or '-'})"
                "; compare the same cases")
    return sorted(first)


def _check_labels(declared: dict[str, set[int]], observed: dict[str, set[int]], reference_values: set[int],
                  label: int | None) -> None:
    """One label set for all inputs: the declared sets (dataset.json) agree, observed values lie within it."""
    sets = list(declared.items())
    for name, labels in sets[1:]:
        if labels != sets[0][1]:
            raise EvaluationInputError(f"'{sets[0][0]}' has labels {sorted(sets[0][1])} but '{name}' has "
                                       f"{sorted(labels)} (dataset.json): compare models of one label set")
    allowed = sets[0][1] if sets else reference_values | {0}
    for name, values in observed.items():
        if not values <= allowed:
            raise EvaluationInputError(f"'{name}' holds labels {sorted(values - allowed)} that are not in the label "
                                       f"set {sorted(allowed)}: compare models of one label set")
    if label is not None and (label not in allowed or label == 0):
        raise EvaluationInputError(f"--label {label} is not a foreground label of the label set {sorted(allowed)}")


def _declared_names(folders: Sequence[Path]) -> dict[int, str]:
    """Label value -> name from the first dataset.json among ``folders`` that has labels."""
    for folder in folders:
        path = folder / "dataset.json"
        if path.is_file():
            try:
                labels = json.loads(path.read_text()).get("labels") or {}
                return {int(v): k for k, v in labels.items() if not isinstance(v, list)}
            except (OSError, ValueError, TypeError):
                continue
    return {}


def _mean_over_labels(by_label: Mapping[str, Mapping[str, dict]], cases: Sequence[str]) -> dict[str, dict]:
    """case -> metric -> mean over the labels where it is finite (NaN where it is for none)."""
    means = {}
    for case in cases:
        means[case] = {}
        for metric in METRIC_NAMES:
            values = [rows[case][metric] for rows in by_label.values() if math.isfinite(rows[case][metric])]
            means[case][metric] = float(np.mean(values)) if values else float("nan")
    return means


def compare_folders(inputs: Sequence[CompareInput], reference: Path, label: int | None = None,
                    baseline: str | None = None, training_minutes: Mapping[str, float] | None = None) -> Comparison:
    """Per-case metrics of every input against ``reference``, for ``label`` or (None) every foreground label;
    raises EvaluationInputError on unusable inputs."""
    reference = Path(reference)
    names = [item.name for item in inputs]
    unknown = sorted(set(training_minutes or {}) - set(names))
    if unknown:
        raise EvaluationInputError(f"training minutes given for {', '.join(unknown)}, which are none of the inputs "
                                   f"{names}")
    if len(inputs) < 2:
        raise EvaluationInputError(f"gtv-compare needs at least two inputs to compare, got {len(inputs)}")
    if len(set(names)) != len(names):
        raise EvaluationInputError(f"input names must differ, got {names}")
    baseline = names[0] if baseline is None else baseline
    if baseline not in names:
        raise EvaluationInputError(f"baseline '{baseline}' is none of the inputs {names}")
    if not reference.is_dir():
        raise EvaluationInputError(f"{reference}: reference labels folder does not exist")
    for item in inputs:
        if not item.folder.is_dir():
            raise EvaluationInputError(f"{item.folder}: folder of input '{item.name}' does not exist")

    evaluations, evaluated_labels, prediction_folders, endings, found = {}, {}, {}, {}, {}
    for item in inputs:
        if _is_evaluation(item.folder):
            evaluations[item.name], evaluated_labels[item.name], prediction_folders[item.name] = \
                _evaluation_metrics(item, reference)
            found[item.name] = sorted({case for rows in evaluations[item.name].values() for case in rows})
        else:
            prediction_folders[item.name] = item.folder
            endings[item.name] = detect_file_ending(item.folder)
            found[item.name] = list_cases(item.folder, endings[item.name])
            if not found[item.name]:
                raise EvaluationInputError(f"{item.folder}: no segmentations <case>{endings[item.name]}")
    cases = _check_same_cases(found)
    ending = next(iter(endings.values()), None) or detect_file_ending(reference)
    references = {case: find_image(reference, case, ending) for case in cases}
    missing = [f"{case}{ending}" for case, path in references.items() if path is None]
    if missing:
        raise EvaluationInputError(f"{reference}: no reference label for {len(missing)} of {len(cases)} cases: "
                                   f"{', '.join(missing)}")

    declared = {item.name: labels for item in inputs
                if item.name in endings and (labels := _declared_labels(item.folder)) is not None}
    reference_values: set[int] = set()
    for case in cases:
        reference_values |= set(np.unique(read_volume(references[case]).array).tolist())
    candidates = next(iter(declared.values())) if declared else reference_values | {0}
    if label is not None and (label not in candidates or label == 0):
        raise EvaluationInputError(f"--label {label} is not a foreground label of the label set {sorted(candidates)}")
    label_names = _declared_names([prediction_folders[n] for n in endings])
    compared = [label] if label is not None else sorted(v for v in candidates if v > 0)
    labels = {value: label_names.get(value, f"label_{value}") for value in compared}
    result = Comparison(reference, labels, baseline, list(inputs), cases, training_minutes=dict(training_minutes or {}))
    observed: dict[str, set[int]] = {name: set() for name in endings}
    for name in endings:
        result.label_metrics[name] = {labels[v]: {} for v in compared}
    for case in cases:  # each prediction read once: its labels checked, its metrics computed
        ref = read_volume(references[case])
        for name, file_ending in endings.items():
            prediction = read_volume(prediction_folders[name] / f"{case}{file_ending}")
            check_same_grid(prediction, ref)
            observed[name] |= set(np.unique(prediction.array).tolist())
            for value in compared:
                metrics = compute_metrics(prediction.array == value, ref.array == value, ref.spacing_zyx)
                result.label_metrics[name][labels[value]][case] = {n: getattr(metrics, n) for n in METRIC_NAMES}
    _check_labels(declared, observed, reference_values, label)
    for name in evaluations:
        wanted = set(labels.values())
        if not wanted <= evaluated_labels[name]:
            raise EvaluationInputError(f"'{name}' (a gtv-evaluate output) evaluated labels "
                                       f"{sorted(evaluated_labels[name])}, not {sorted(wanted)}: evaluate it with the "
                                       "same labels")
        result.label_metrics[name] = {n: evaluations[name][n] for n in labels.values()}
    for name in names:
        result.metrics[name] = _mean_over_labels(result.label_metrics[name], cases)
        timings = _timings(prediction_folders[name]) if prediction_folders[name].is_dir() else {}
        if timings:
            result.seconds[name] = {case: timings.get(case, float("nan")) for case in cases}
        else:
            result.notes.append(f"'{name}': no {TIMINGS_CSV} in {prediction_folders[name]}: no inference time")
    return result


def paired_test(values: Sequence[float], baseline: Sequence[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test over the pairs where both values are finite.

    ``p`` is NaN with fewer than 2 pairs, 1.0 when every difference is 0; ``few_cases`` flags n < 6.
    """
    pairs = [(a, b) for a, b in zip(values, baseline) if math.isfinite(a) and math.isfinite(b)]
    n = len(pairs)
    if n < 2:
        p = float("nan")
    elif all(a == b for a, b in pairs):
        p = 1.0
    else:
        a, b = map(np.asarray, zip(*pairs))
        p = float(stats.wilcoxon(a, b, alternative="two-sided").pvalue)
    return {"p": p, "n": n, "few_cases": n < MIN_PAIRED_CASES}


def _metric_row(result: Comparison, name: str, per_case: Mapping[str, dict], base: Mapping[str, dict]) -> dict:
    row = {}
    for metric, (_, scale, _) in TABLE_METRICS.items():
        values = [per_case[case][metric] * scale for case in result.cases]
        base_values = [base[case][metric] * scale for case in result.cases]
        row[metric] = summarise(values)
        row[f"{metric}_test"] = None if name == result.baseline else paired_test(values, base_values)
    return row


def summary_rows(result: Comparison) -> list[dict]:
    """Per input: mean/sd per metric (paper units; each case's mean over the labels), the test against the
    baseline, mean inference seconds; with several labels also each label's (``per_label``)."""
    rows = []
    for item in result.inputs:
        row = {"name": item.name, "folder": str(item.folder), "cases": len(result.cases),
               "baseline": item.name == result.baseline}
        row.update(_metric_row(result, item.name, result.metrics[item.name], result.metrics[result.baseline]))
        seconds = result.seconds.get(item.name)
        row[SECONDS] = summarise([seconds[c] for c in result.cases]) if seconds else None
        row[TRAINING_MINUTES] = result.training_minutes.get(item.name)
        if len(result.labels) > 1:
            row["per_label"] = {label: _metric_row(result, item.name, result.label_metrics[item.name][label],
                                                   result.label_metrics[result.baseline][label])
                                for label in result.labels.values()}
        rows.append(row)
    return rows


def _mean_sd(stats_: dict | None, digits: int) -> str:
    if stats_ is None or not math.isfinite(stats_["mean"]):
        return "–"
    sd = f" ± {stats_['std']:.{digits}f}" if math.isfinite(stats_["std"]) else ""
    return f"{stats_['mean']:.{digits}f}{sd}"


def _p_text(test: dict | None) -> str:
    if test is None:
        return "baseline"
    text = "–" if not math.isfinite(test["p"]) else f"{test['p']:.3g}"
    return text + (f" (n={test['n']} < {MIN_PAIRED_CASES})" if test["few_cases"] else "")


def markdown(result: Comparison, rows: list[dict], command: str) -> str:
    """comparison.md: the table (mean ± sd) and the p-values against the baseline; per label with several labels."""
    header = ["Method"] + [label for label, _, _ in TABLE_METRICS.values()] + ["Time per case (s)"]
    table = [[row["name"]] + [_mean_sd(row[m], digits) for m, (_, _, digits) in TABLE_METRICS.items()]
             + [_mean_sd(row[SECONDS], 2)] for row in rows]
    if result.training_minutes:
        header.append("Training (min)")
        for line, row in zip(table, rows):
            line.append("–" if row[TRAINING_MINUTES] is None else f"{row[TRAINING_MINUTES]:.1f}")
    p_header = ["Method"] + [f"p {label}" for label, _, _ in TABLE_METRICS.values()]
    p_table = [[row["name"]] + [_p_text(row[f"{m}_test"]) for m in TABLE_METRICS] for row in rows]
    several = len(result.labels) > 1
    labels = ("labels " + ", ".join(result.labels.values()) + " (each case's mean over them)" if several
              else f"label {next(iter(result.labels))}")
    lines = ["# Comparison", "", f"`{command}`", "",
             f"{len(result.cases)} cases, {labels}, reference `{result.reference}`; mean ± sample sd over cases.", ""]
    lines += markdown_table(header, table)
    if several:
        label_table = [[label, row["name"]] + [_mean_sd(row["per_label"][label][m], digits)
                                               for m, (_, _, digits) in TABLE_METRICS.items()]
                       for label in result.labels.values() for row in rows]
        lines += ["", "Per label:", ""]
        lines += markdown_table(["Label", "Method"] + [label for label, _, _ in TABLE_METRICS.values()], label_table)
    lines += ["", f"Paired two-sided Wilcoxon signed-rank tests against **{result.baseline}** (scipy); with fewer "
              f"than {MIN_PAIRED_CASES} paired cases p cannot fall below 0.05 and is flagged.", ""]
    lines += markdown_table(p_header, p_table)
    lines += [""] + [f"![{label}](box_{metric}.png)" for metric, (label, _, _) in TABLE_METRICS.items()]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def write_comparison(result: Comparison, output_dir: Path, command: str) -> list[Path]:
    """comparison.md/.csv/.json, comparison_per_case.csv and box_<metric>.png in ``output_dir`` (each atomic)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(result)
    md, summary_csv, json_file, per_case_csv = (output_dir / name for name in OUTPUT_NAMES)
    header = ["method", "cases"] + [f"{m}_{k}" for m in TABLE_METRICS for k in ("mean", "sd", "p", "n_paired")]
    write_csv(summary_csv, header + ["seconds_mean", "seconds_sd", TRAINING_MINUTES], [
        [row["name"], row["cases"]]
        + [v for m in TABLE_METRICS for v in (row[m]["mean"], row[m]["std"],
                                              *((row[f"{m}_test"]["p"], row[f"{m}_test"]["n"])
                                                if row[f"{m}_test"] else ("", "")))]
        + ([row[SECONDS]["mean"], row[SECONDS]["std"]] if row[SECONDS] else ["", ""])
        + ["" if row[TRAINING_MINUTES] is None else row[TRAINING_MINUTES]] for row in rows])
    write_csv(per_case_csv, ["method", "case", "label", *METRIC_NAMES, SECONDS], [
        [item.name, case, label] + [metrics[case][m] for m in METRIC_NAMES]
        + [result.seconds.get(item.name, {}).get(case, float("nan"))]
        for item in result.inputs for label, metrics in result.label_metrics[item.name].items()
        for case in result.cases])
    doc = {"command": command, "reference": str(result.reference),
           "labels": {str(value): name for value, name in result.labels.items()},
           "baseline": result.baseline, "cases": result.cases, "units": {m: label for m, (label, _, _)
                                                                         in TABLE_METRICS.items()},
           "min_paired_cases": MIN_PAIRED_CASES, "summary": rows, "per_case": result.metrics,
           "per_case_per_label": result.label_metrics,
           "seconds": result.seconds, TRAINING_MINUTES: result.training_minutes, "notes": result.notes}
    write_json(doc, json_file, indent=2, strict=True)
    pngs = []
    for metric, (label, scale, _) in TABLE_METRICS.items():
        pngs.append(output_dir / f"box_{metric}.png")
        plots.box_plot({item.name: [result.metrics[item.name][c][metric] * scale for c in result.cases]
                        for item in result.inputs}, pngs[-1], label, f"{label} per case")
    write_text(markdown(result, rows, command), md)
    return [md, summary_csv, json_file, per_case_csv, *pngs]
