"""Write an evaluation as metrics.csv, error_rates.csv, evaluation.json, report.md, the PNG plots and, when
the CT images were given, one overlay PNG per case.

Units in every output: Dice and NSD as fractions (0-1), distances in mm, RVE and error rates in percent,
volumes in ml. Mean ± std are over cases (sample std, ddof=1); undefined values (NaN, written as empty
CSV cells / JSON null) are left out of a mean and counted in ``n_undefined``. With several labels every label is
scored on its own (a row per label), and the case-level numbers are each case's mean over its labels.
"""
from __future__ import annotations

import math
import platform
from dataclasses import asdict
from pathlib import Path
from urllib.parse import quote

import numpy as np
import scipy
import SimpleITK as sitk

from nnunetv2_gtv import __version__
from nnunetv2_gtv.figures import evaluation_plots as plots
from nnunetv2_gtv.figures import overlay
from nnunetv2_gtv.io.atomic import write_csv, write_json, write_text
from nnunetv2_gtv.evaluation.metrics import METRIC_NAMES, summarise
from nnunetv2_gtv.evaluation.pipeline import FUSED, EvaluationResult, EvaluationSettings
from nnunetv2_gtv.evaluation.review_scores import REVIEW_SHARE, SIZE_BASELINE, best_score, validate_scores
from nnunetv2_gtv.evaluation.uncertainty_analysis import correlation, error_rate_table

METRICS_CSV = "metrics.csv"
ERROR_RATES_CSV = "error_rates.csv"
JSON_NAME = "evaluation.json"
REPORT_NAME = "report.md"
ERROR_RATE_PNG = "error_rate_per_level.png"
VVC_PNG = "vvc_vs_1_minus_dice.png"
DICE_PNG = "dice_per_case.png"
OVERLAY_CAPTION = (
    f"Per case: CT (window {overlay.HU_WINDOW[0]:g} to {overlay.HU_WINDOW[1]:g} HU), fused segmentation "
    f"({overlay.FUSED_COLOUR}), reference ({overlay.REFERENCE_COLOUR}, dashed) and the entropy map where > 0 (heat "
    "map), in an axial and a coronal view through the centre of the fused GTV (else of the reference, else of "
    "the volume); physical aspect ratio, patient right on the image left, anterior / superior up.")
MANY_LEVELS = 20  # more distinct entropy values than N-model votes give in practice
DIGITS = {"dice": 4, "nsd": 4, "assd_mm": 2, "hd95_mm": 2, "rve_percent": 1}
METRIC_HEADERS = {"dice": "Dice", "nsd": "NSD", "assd_mm": "ASSD (mm)", "hd95_mm": "HD95 (mm)",
                  "rve_percent": "RVE (%)"}
DEFINITIONS = {
    "dice": "2|P&G| / (|P|+|G|)",
    "nsd": "share of both surfaces' voxels within the tolerance (settings.nsd_tolerance_mm) of the other surface",
    "assd_mm": "mean of all surface-to-surface distances, both directions pooled (paper eq. 9); surface = mask "
               "XOR its 6-connected erosion; exact EDT with the voxel spacing",
    "hd95_mm": "max of the two directed 95th percentiles of surface-to-surface distances",
    "rve_percent": "100 |V_pred - V_ref| / V_ref",
    "empty_masks": "both empty: Dice 1, NSD 1, ASSD 0, HD95 0, RVE 0; one empty: Dice 0, NSD 0, ASSD = HD95 = image "
                   "diagonal (mm), RVE 100 (empty prediction) or undefined (empty reference, left out of the RVE "
                   "mean)",
    "labels": "each label scored on its own mask; the case-level row is each case's mean over the evaluated labels",
    "error": "a voxel whose predicted label differs from the reference label",
    "levels": "distinct entropy values after rounding",
    "std": "sample standard deviation over cases (ddof=1)",
}


def overlay_png(case: str) -> str:
    """File name of a case's overlay figure."""
    return f"overlay_{case}.png"


def _region_description(settings: EvaluationSettings) -> str:
    return {
        "bbox": f"bounding box of prediction ∪ reference ∪ entropy > 0, grown by {settings.margin_mm} mm",
        "body": f"body (CT > {settings.body_threshold_hu} HU, holes filled per slice) ∪ prediction ∪ reference ∪ "
                "entropy > 0",
        "image": "whole image",
    }[settings.error_region]


def _sources(result: EvaluationResult) -> list[str]:
    return [FUSED] + [m.name for m in result.models if any(r["source"] == m.name for r in result.metrics)]


def _rows(result: EvaluationResult, source: str, label: int | None = None) -> list[dict]:
    return [row for row in result.metrics if row["source"] == source and (label is None or row["label"] == label)]


def case_means(result: EvaluationResult, source: str) -> dict[str, dict[str, float]]:
    """case -> metric -> the case's mean over the evaluated labels (its label's value with one label); a metric
    undefined for every label stays NaN."""
    means = {}
    for case in dict.fromkeys(row["case"] for row in _rows(result, source)):
        rows = [row for row in _rows(result, source) if row["case"] == case]
        means[case] = {}
        for name in METRIC_NAMES:
            values = [row[name] for row in rows if math.isfinite(row[name])]
            means[case][name] = float(np.mean(values)) if values else float("nan")
    return means


def _vvc_pairs(vvc: dict[str, float], dice: dict[str, float], cases: list[str]
               ) -> tuple[list[str], list[float], list[float]]:
    cases = [case for case in cases if case in vvc and case in dice]
    return cases, [vvc[c] for c in cases], [1.0 - dice[c] for c in cases]


def _vvc_analysis(vvc: dict[str, float], dice: dict[str, float], cases: list[str]) -> dict:
    cases, values, one_minus_dice = _vvc_pairs(vvc, dice, cases)
    return {"cases": cases, "vvc": values, "one_minus_dice": one_minus_dice, **correlation(values, one_minus_dice)}


def vvc_png(label_name: str | None = None) -> str:
    """File name of the VVC plot: the case-level one, or one label's."""
    return VVC_PNG if label_name is None else VVC_PNG.replace(".png", f"_{label_name}.png")


def build_summary(result: EvaluationResult, command: str) -> dict:
    """The JSON document: settings, per-case rows, mean ± std per source (case level and per label), error-rate
    table, VVC correlations (case level and per label)."""
    summary = {source: {name: summarise([m[name] for m in case_means(result, source).values()])
                        for name in METRIC_NAMES} for source in _sources(result)}
    per_label = {name: {source: {metric: summarise([row[metric] for row in _rows(result, source, label)])
                                 for metric in METRIC_NAMES} for source in _sources(result)}
                 for label, name in result.labels.items()}
    table = error_rate_table(result.level_counts)
    fused_dice = {case: m["dice"] for case, m in case_means(result, FUSED).items()}
    label_dice = {label: {row["case"]: row["dice"] for row in _rows(result, FUSED, label)} for label in result.labels}
    empty = [{"case": r["case"], "source": r["source"], "label": r["label_name"], "empty": r["empty"]}
             for r in result.metrics if r["empty"] != "none"]
    notes = list(result.notes)
    if len(table["levels"]) > MANY_LEVELS:
        notes.append(f"{len(table['levels'])} entropy levels: the entropy looks continuous (not N-model votes); "
                     "a smaller --entropy-decimals (e.g. 1) groups it into fewer levels")
    return {
        "command": command,
        "versions": {"nnunetv2_gtv": __version__, "python": platform.python_version(), "numpy": np.__version__,
                     "scipy": scipy.__version__, "SimpleITK": sitk.Version_VersionString()},
        "inputs": {"predictions": str(result.fused_dir), "reference": str(result.labels_dir),
                   "file_ending": result.file_ending,
                   "models": [{"name": m.name, "listed_as": m.listed_as, "found": m.path is not None}
                              for m in result.models]},
        "settings": {key: (str(value) if isinstance(value, Path) else value)
                     for key, value in asdict(result.settings).items()},
        "definitions": DEFINITIONS,
        "labels": None if result.label_set is None else {
            "values": list(result.label_set.values), "source": result.label_set.source,
            "evaluated": {str(label): name for label, name in result.labels.items()},
            "unknown_labels": result.settings.unknown_labels, "mapped": result.mapped},
        "cases": result.cases,
        "metrics": result.metrics,
        "summary": summary,
        "summary_per_label": per_label,
        "empty_masks": empty,
        "error_rate": {
            "region": result.settings.error_region,
            "region_description": _region_description(result.settings),
            "levels": table["levels"],
            "per_case_percent": {case: [100 * r for r in rates] for case, rates in table["per_case"].items()},
            "mean_over_cases_percent": [100 * r for r in table["mean_over_cases"]],
            "n_cases": table["n_cases"],
            "pooled_percent": [100 * r for r in table["pooled"]],
            "voxels": table["voxels"],
            "errors": table["errors"],
        },
        "vvc_vs_1_minus_dice": _vvc_analysis(result.case_vvc, fused_dice, result.cases),
        "vvc_vs_1_minus_dice_per_label": {name: _vvc_analysis(result.vvc.get(label, {}), label_dice[label],
                                                              result.cases)
                                          for label, name in result.labels.items()},
        "review_scores": _review_scores(result.summary_rows, fused_dice),
        "overlays": {case: overlay_png(case) for case in result.overlays},
        "skipped_cases": result.skipped,
        "notes": notes,
    }


def _review_scores(rows: list[dict], fused_dice: dict[str, float]) -> dict:
    """Every review score of the summary rows against the fused Dice (nnunetv2_gtv.evaluation.review_scores)."""
    scores = validate_scores(rows, fused_dice) if rows else {}
    return {"review_share": REVIEW_SHARE, "scores": scores, "best": best_score(scores)}


def _review_scores_lines(review: dict) -> list[str]:
    if not review["scores"]:
        return ["No summary.csv with scores: no table."]
    share = review["review_share"]
    rows = [[f"{score}{' (size only)' if score == SIZE_BASELINE else ''}", str(v["n"]),
             f"{_fmt(v['spearman_rho'], 2)} [{_fmt(v['rho_interval'][0], 2)}, {_fmt(v['rho_interval'][1], 2)}]",
             f"{_fmt(v['auroc'], 2)} [{_fmt(v['auroc_interval'][0], 2)}, {_fmt(v['auroc_interval'][1], 2)}]",
             f"{v['caught']} of {v['worst']}"] for score, v in review["scores"].items()]
    return [f"Each score's risk (higher = check first) against 1 - the case's fused Dice; the worst cases are the "
            f"{share * 100:g} % with the lowest Dice; caught = how many of them the {share * 100:g} % riskiest "
            "cases hold. "
            "Bootstrap 95 % intervals in brackets. Ranking the cases of this folder: use it to choose "
            "`--review-score` on validation cases, never on the cases you report.", "",
            *markdown_table(["Score", "Cases", "Spearman rho", f"AUROC, worst {share * 100:g} %", "Caught"], rows), "",
            f"Chosen (AUROC above chance and the size baseline): {review['best'] or 'none'}.", ""]


def _fmt(value: float, digits: int) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean_std(stats: dict, digits: int) -> str:
    text = _fmt(stats["mean"], digits)
    if math.isfinite(stats["std"]):
        text += f" ± {_fmt(stats['std'], digits)}"
    if stats["n_undefined"]:
        text += f" ({stats['n_undefined']} undefined)"
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]



def _correlation_sentence(stats: dict) -> str:
    def p_value(p: float) -> str:
        return "–" if not math.isfinite(p) else f"{p:.2g}"

    text = (f"Pearson r = {_fmt(stats['pearson_r'], 3)} (p = {p_value(stats['pearson_p'])}), "
            f"Spearman rho = {_fmt(stats['spearman_rho'], 3)} (p = {p_value(stats['spearman_p'])}), n = {stats['n']}")
    if stats["n_excluded"]:
        text += f", {stats['n_excluded']} cases without a finite VVC left out"
    if stats["note"]:
        text += f". {stats['note']}"
    return text + "."


def _labels_sentence(labels: dict) -> str:
    """The label set, where it came from, and what was done with values outside it."""
    values = "{" + ", ".join(str(v) for v in labels["values"]) + "}"
    text = f"Label set {values} ({labels['source']}). Values outside it "
    if labels["unknown_labels"] == "refuse":
        return text + "are refused (an error naming the file; `--unknown-labels background` maps them instead)."
    mapped = len(labels["mapped"])
    return text + (f"are mapped to background in every metric and the error rates: {mapped} file(s), listed in "
                   "the notes." if mapped else "would be mapped to background; none were found.")


def _metricmarkdown_table(summary: dict, first: list[str]) -> list[list[str]]:
    return [first + [source, str(stats["dice"]["n"] + stats["dice"]["n_undefined"])]
            + [_mean_std(stats[name], DIGITS[name]) for name in METRIC_NAMES] for source, stats in summary.items()]


def markdown(doc: dict) -> str:
    """report.md: tables of the JSON document and links to the PNGs."""
    inputs, settings = doc["inputs"], doc["settings"]
    per_label = doc["summary_per_label"]
    several = len(per_label) > 1
    evaluated = ", ".join(per_label) if several else f"label {next(iter(doc['labels']['evaluated']), '1')}" \
        if doc["labels"] else "label 1"
    lines = ["# GTV evaluation", "",
             f"Predictions `{inputs['predictions']}` against reference `{inputs['reference']}`: "
             f"{len(doc['cases'])} cases, {'labels ' if several else ''}{evaluated}, files `*{inputs['file_ending']}`; "
             f"NSD at {settings['nsd_tolerance_mm']:g} mm.", "",
             *([_labels_sentence(doc["labels"]), ""] if doc["labels"] else []),
             "## Segmentation metrics (mean ± sample std over cases)", ""]
    if several:
        lines += ["Each case's mean over its labels:", ""]
    lines += markdown_table(["Source", "Cases"] + list(METRIC_HEADERS.values()), _metricmarkdown_table(doc["summary"], []))
    if several:
        rows = [row for name, summary in per_label.items() for row in _metricmarkdown_table(summary, [name])]
        lines += ["", "Per label:", ""]
        lines += markdown_table(["Label", "Source", "Cases"] + list(METRIC_HEADERS.values()), rows)
    lines += ["", "Per case (fused):", ""]
    per_case = [[row["case"]] + ([row["label_name"]] if several else [])
                + [_fmt(row[name], DIGITS[name]) for name in METRIC_NAMES]
                + [_fmt(row["volume_pred_ml"], 2), _fmt(row["volume_ref_ml"], 2), row["empty"]]
                for row in doc["metrics"] if row["source"] == FUSED]
    lines += markdown_table(["Case"] + (["Label"] if several else []) + list(METRIC_HEADERS.values())
                    + ["V pred (ml)", "V ref (ml)", "Empty"], per_case)
    lines += ["", f"![Dice per case]({DICE_PNG})", ""]

    rate = doc["error_rate"]
    lines += ["## Pixel error rate per uncertainty level (%)", "",
              f"Error = predicted label ≠ reference label, counted in: {rate['region_description']}. "
              f"Levels = entropy rounded to {settings['entropy_decimals']} decimals.", ""]
    if len(rate["levels"]) > MANY_LEVELS:
        lines.append(f"{len(rate['levels'])} levels: table left out here, see {ERROR_RATES_CSV} (and Notes).")
    elif rate["levels"]:
        header = ["Case"] + [f"level {i + 1} (H={level:.4f})" for i, level in enumerate(rate["levels"])]
        rows = [[case] + [_fmt(r, 2) for r in rates] for case, rates in rate["per_case_percent"].items()]
        rows.append(["Mean over cases"] + [_fmt(r, 2) for r in rate["mean_over_cases_percent"]])
        rows.append(["Pooled (all voxels)"] + [_fmt(r, 2) for r in rate["pooled_percent"]])
        lines += markdown_table(header, rows)
    else:
        lines.append("No entropy maps: no table.")
    lines += ["", f"![Error rate per level]({ERROR_RATE_PNG})", ""]

    lines += ["## VVC against 1 - Dice (fused)", ""]
    if several:
        lines += ["Case level (VVC of every foreground label pooled, against 1 - the case's mean Dice): "
                  + _correlation_sentence(doc["vvc_vs_1_minus_dice"]), "", f"![VVC against 1 - Dice]({VVC_PNG})", ""]
        for name, stats in doc["vvc_vs_1_minus_dice_per_label"].items():
            lines += [f"{name} (its own VVC against 1 - its Dice): " + _correlation_sentence(stats), "",
                      f"![VVC against 1 - Dice, {name}]({quote(vvc_png(name))})", ""]
    else:
        lines += [_correlation_sentence(doc["vvc_vs_1_minus_dice"]), "", f"![VVC against 1 - Dice]({VVC_PNG})", ""]

    lines += ["## Review scores against 1 - Dice (fused)", "", *_review_scores_lines(doc["review_scores"])]

    if doc["overlays"]:
        lines += ["## Cases", "", OVERLAY_CAPTION, ""]
        for case, png in doc["overlays"].items():
            lines += [f"### {case}", "", f"![{case}]({quote(png)})", ""]

    notes = [f"{e['case']} ({e['source']}{', ' + e['label'] if several else ''}): empty {e['empty']}"
             + (" mask" if e["empty"] != "both" else " masks") for e in doc["empty_masks"]]
    notes += [f"{s['case']}: skipped, {s['reason']}" for s in doc["skipped_cases"]] + doc["notes"]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines) + "\n"


def write_report(result: EvaluationResult, output_dir: Path, command: str) -> list[Path]:
    """Write every output into ``output_dir`` (each file atomically); return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    doc = build_summary(result, command)
    fields = ["case", "source", "label", "label_name", *METRIC_NAMES, "volume_pred_ml", "volume_ref_ml", "empty"]
    write_csv(output_dir / METRICS_CSV, fields + ["vvc"],
               [[row[f] for f in fields] + [result.vvc.get(row["label"], {}).get(row["case"], float("nan"))
                                             if row["source"] == FUSED else float("nan")] for row in result.metrics])
    level_number = {level: i + 1 for i, level in enumerate(doc["error_rate"]["levels"])}
    write_csv(output_dir / ERROR_RATES_CSV, ["case", "level", "entropy", "voxels", "errors", "error_rate_percent"],
               [[case, level_number[c.level], c.level, c.voxels, c.errors, 100 * c.rate]
                for case, counts in result.level_counts.items() for c in counts])
    write_json(doc, output_dir / JSON_NAME, indent=2, strict=True)
    rate = doc["error_rate"]
    plots.error_rate_plot(rate["levels"], rate["per_case_percent"], rate["mean_over_cases_percent"],
                          output_dir / ERROR_RATE_PNG)
    pngs = [ERROR_RATE_PNG, VVC_PNG, DICE_PNG]
    vvc = doc["vvc_vs_1_minus_dice"]
    plots.vvc_plot(vvc["one_minus_dice"], vvc["vvc"], vvc, output_dir / VVC_PNG)
    if len(result.labels) > 1:
        for name, stats in doc["vvc_vs_1_minus_dice_per_label"].items():
            plots.vvc_plot(stats["one_minus_dice"], stats["vvc"], stats, output_dir / vvc_png(name), name)
            pngs.append(vvc_png(name))
    plots.dice_box_plot({source: [m["dice"] for m in case_means(result, source).values()]
                         for source in _sources(result)}, output_dir / DICE_PNG)
    for case, views in result.overlays.items():
        overlay.overlay_plot(case, views, output_dir / doc["overlays"][case])
    write_text(markdown(doc), output_dir / REPORT_NAME)
    return [output_dir / name for name in (METRICS_CSV, ERROR_RATES_CSV, JSON_NAME, REPORT_NAME, *pngs,
                                           *doc["overlays"].values())]
