"""Evaluate a fused-output folder case by case against a folder of reference labels."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunetv2_gtv.evaluation.folders import (
    EvaluationInputError,
    LabelSet,
    ModelFolder,
    Volume,
    check_same_grid,
    detect_file_ending,
    find_image,
    find_label_set,
    list_cases,
    model_folders,
    parse_float,
    read_summary_csv,
    read_summary_json,
    read_volume,
)
from nnunetv2_gtv.evaluation.metrics import NSD_TOLERANCE_MM, compute_metrics
from nnunetv2_gtv.figures.overlay import Overlay, overlay_views
from nnunetv2_gtv.evaluation.uncertainty_analysis import REGION_KINDS, LevelCount, error_region, level_counts

FUSED = "fused"
UNKNOWN_LABEL_RULES = ("refuse", "background")


@dataclass(frozen=True)
class EvaluationSettings:
    """Options of one evaluation; see :mod:`nnunetv2_gtv.evaluation.uncertainty_analysis` for the regions.

    ``label`` is the one foreground label to evaluate; None (the default) evaluates every foreground label of the
    label set, each on its own, and their mean. ``nsd_tolerance_mm`` is the NSD's tolerance. ``images_dir`` holds
    the CT images as ``<case>_0000<file_ending>`` (nnU-Net naming); it is needed by the ``body`` region, and
    whenever it is given every case gets an overlay figure. ``unknown_labels``: what a segmentation value outside
    the dataset's label set does, ``refuse`` (an error naming the file) or ``background`` (counted as background
    everywhere: Dice, volumes, distances and error rates, and listed).
    """

    label: int | None = None
    error_region: str = "bbox"
    margin_mm: float = 10.0
    images_dir: Path | None = None
    body_threshold_hu: float = -300.0
    entropy_decimals: int = 4
    skip_missing: bool = False
    unknown_labels: str = "refuse"
    nsd_tolerance_mm: float = NSD_TOLERANCE_MM


@dataclass
class EvaluationResult:
    """Everything the report is made from. ``metrics`` rows hold ``case``, ``source``, ``label``, ``label_name`` and
    the metric fields, one per evaluated label; ``vvc`` holds each label's VVC per case, ``case_vvc`` the case's
    (every foreground label pooled; the same as the label's with one label)."""

    fused_dir: Path
    labels_dir: Path
    file_ending: str
    settings: EvaluationSettings
    models: list[ModelFolder]
    label_set: LabelSet | None = None
    cases: list[str] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    level_counts: dict[str, list[LevelCount]] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)  # evaluated label -> name
    vvc: dict[int, dict[str, float]] = field(default_factory=dict)  # label -> case -> that label's VVC
    case_vvc: dict[str, float] = field(default_factory=dict)
    summary_rows: list[dict] = field(default_factory=list)  # the fusion's summary.csv rows of the evaluated cases
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    overlays: dict[str, Overlay] = field(default_factory=dict)
    mapped: list[dict] = field(default_factory=list)  # files whose unknown labels became background


def unknown_labels_text(entry: dict, label_set: LabelSet) -> str:
    """``<file>: label 2 (6 voxels) is not in the label set {0, 1}`` for one ``mapped`` entry."""
    found = ", ".join(f"{value:g} ({count} voxel{'s' if count != 1 else ''})"
                      for value, count in zip(entry["labels"], entry["voxels"]))
    several = len(entry["labels"]) > 1
    return (f"{entry['file']}: label{'s' if several else ''} {found} {'are' if several else 'is'} not in the label "
            f"set {label_set}")


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise EvaluationInputError(f"{path}: {what} folder does not exist")


def _check_settings(settings: EvaluationSettings) -> None:
    if settings.error_region not in REGION_KINDS:
        raise EvaluationInputError(f"unknown error region {settings.error_region!r}; choose {', '.join(REGION_KINDS)}")
    if settings.error_region == "body" and settings.images_dir is None:
        raise EvaluationInputError("the body error region needs the CT images folder (--images)")
    if settings.images_dir is not None:
        _require_dir(settings.images_dir, "CT images")
    if settings.margin_mm < 0:
        raise EvaluationInputError(f"the bounding-box margin must be >= 0 mm, got {settings.margin_mm}")
    if not settings.nsd_tolerance_mm > 0:
        raise EvaluationInputError(f"the NSD tolerance must be > 0 mm, got {settings.nsd_tolerance_mm}")
    if settings.unknown_labels not in UNKNOWN_LABEL_RULES:
        raise EvaluationInputError(f"unknown rule {settings.unknown_labels!r} for labels outside the label set; "
                                   f"choose {', '.join(UNKNOWN_LABEL_RULES)}")


def _read_labels(path: Path, result: EvaluationResult) -> Volume:
    """A segmentation whose values are checked against the label set: refused, or mapped to background."""
    volume = read_volume(path)
    unknown = ~np.isin(volume.array, result.label_set.values)
    if not unknown.any():
        return volume
    values, counts = np.unique(volume.array[unknown], return_counts=True)
    entry = {"file": str(path), "labels": [v.item() for v in values], "voxels": [int(c) for c in counts]}
    text = unknown_labels_text(entry, result.label_set)
    if result.settings.unknown_labels == "refuse":
        raise EvaluationInputError(f"{text} ({result.label_set.source}); correct the file, or pass "
                                   "--unknown-labels background to count such voxels as background")
    result.mapped.append(entry)
    result.notes.append(f"{text}: mapped to background")
    return replace(volume, array=np.where(unknown, 0, volume.array).astype(volume.array.dtype, copy=False))


def _references(cases: list[str], result: EvaluationResult) -> dict[str, Path]:
    found = {case: find_image(result.labels_dir, case, result.file_ending) for case in cases}
    missing = [case for case, path in found.items() if path is None]
    if missing and not result.settings.skip_missing:
        raise EvaluationInputError(
            f"{result.labels_dir}: no reference label for {len(missing)} of {len(cases)} cases: {', '.join(missing)} "
            f"(expected <case>{result.file_ending}; pass --skip-missing to evaluate the others)")
    for case in missing:
        result.skipped.append({"case": case, "reason": f"no reference in {result.labels_dir}"})
    return {case: path for case, path in found.items() if path is not None}


def _entropy(case: str, fused: Volume, result: EvaluationResult) -> Volume | None:
    path = result.fused_dir / f"{case}_entropy{result.file_ending}"
    if not path.is_file():
        result.notes.append(f"{case}: no entropy map ({path.name}); left out of the error-rate table")
        return None
    entropy = read_volume(path)
    check_same_grid(entropy, fused)
    return entropy


def _ct(case: str, reference: Volume, result: EvaluationResult) -> Volume | None:
    """The case's CT when --images is given; a missing one fails the body region and only notes otherwise."""
    images_dir, stem = result.settings.images_dir, f"{case}_0000"
    if images_dir is None:
        return None
    path = find_image(images_dir, stem, result.file_ending)
    if path is None:
        if result.settings.error_region == "body":
            raise EvaluationInputError(f"{images_dir}: no CT image {stem}{result.file_ending} "
                                       "for the body error region")
        result.notes.append(f"{case}: no CT image {stem}{result.file_ending} in {images_dir}; no overlay figure")
        return None
    ct = read_volume(path)
    check_same_grid(ct, reference)
    return ct


def _level_counts(fused: Volume, reference: Volume, entropy: Volume, ct: Volume | None, settings: EvaluationSettings
                  ) -> list[LevelCount]:
    region = error_region(settings.error_region, fused.array, reference.array, entropy.array, reference.spacing_zyx,
                          settings.margin_mm, None if ct is None else ct.array, settings.body_threshold_hu)
    try:
        return level_counts(entropy.array, fused.array, reference.array, region, settings.entropy_decimals)
    except ValueError as error:
        raise EvaluationInputError(f"{entropy.path}: {error}")


def _label_metrics(case: str, source: str, prediction: Volume, reference: Volume, result: EvaluationResult) -> None:
    """One metrics row per evaluated label of ``prediction`` against ``reference``."""
    for label, name in result.labels.items():
        metrics = compute_metrics(prediction.array == label, reference.array == label, reference.spacing_zyx,
                                  result.settings.nsd_tolerance_mm)
        result.metrics.append({"case": case, "source": source, "label": label, "label_name": name,
                               **metrics.as_dict()})


def _model_metrics(case: str, reference: Volume, result: EvaluationResult) -> None:
    for model in result.models:
        if model.path is None:
            continue
        path = find_image(model.path, case, result.file_ending)
        if path is None:
            result.notes.append(f"{case}: no prediction in {model.name} ({model.path}); not in {model.name}'s means")
            continue
        prediction = _read_labels(path, result)
        check_same_grid(prediction, reference)
        _label_metrics(case, model.name, prediction, reference, result)


def _vvc_columns(labels: dict[int, str], summary_rows: dict[str, dict[str, str]]) -> dict[int, str]:
    """The summary.csv column of each label's VVC: ``vvc_<name>`` where the fusion wrote per-label columns (several
    labels), else the case's ``vvc`` (one label)."""
    columns = next(iter(summary_rows.values()), {}).keys()
    return {label: f"vvc_{name}" if f"vvc_{name}" in columns else "vvc" for label, name in labels.items()}


def _evaluated_labels(settings: EvaluationSettings, label_set: LabelSet) -> dict[int, str]:
    if settings.label is None:
        foreground = [value for value in label_set.values if value > 0]
        return {value: label_set.name_of(value) for value in foreground}
    if settings.label not in label_set.values or settings.label == 0:
        raise EvaluationInputError(f"--label {settings.label} is not a foreground label of the label set {label_set} "
                                   f"({label_set.source})")
    return {settings.label: label_set.name_of(settings.label)}


def evaluate_folder(fused_dir: Path, labels_dir: Path, settings: EvaluationSettings = EvaluationSettings()
                    ) -> EvaluationResult:
    """Compute all per-case numbers; raises :class:`EvaluationInputError` naming the offending file."""
    fused_dir, labels_dir = Path(fused_dir), Path(labels_dir)
    _require_dir(fused_dir, "predictions")
    _require_dir(labels_dir, "reference labels")
    _check_settings(settings)
    file_ending = detect_file_ending(fused_dir)
    cases = list_cases(fused_dir, file_ending)
    if not cases:
        raise EvaluationInputError(f"{fused_dir}: no segmentations <case>{file_ending}")
    summary = read_summary_json(fused_dir)
    models = model_folders(summary, fused_dir)
    result = EvaluationResult(fused_dir, labels_dir, file_ending, settings, models,
                              find_label_set(fused_dir, summary, models, settings.label))
    result.labels = _evaluated_labels(settings, result.label_set)
    for model in result.models:
        if model.path is None:
            result.notes.append(f"{model.name}: folder {model.listed_as} (summary.json inputs) not found; "
                                "no per-model metrics for it")
    summary_rows = read_summary_csv(fused_dir)
    if summary_rows is None:
        result.notes.append(f"{fused_dir / 'summary.csv'} not found: no VVC analysis")
    vvc_columns = _vvc_columns(result.labels, summary_rows or {})
    references = _references(cases, result)
    if not references:
        raise EvaluationInputError(f"{labels_dir}: none of the {len(cases)} cases has a reference label")
    for case in tqdm(list(references), desc="gtv-evaluate", unit="case"):
        reference = _read_labels(references[case], result)
        fused = _read_labels(fused_dir / f"{case}{file_ending}", result)
        check_same_grid(fused, reference)
        result.cases.append(case)
        _label_metrics(case, FUSED, fused, reference, result)
        entropy, ct = _entropy(case, fused, result), _ct(case, reference, result)
        if entropy is not None:
            result.level_counts[case] = _level_counts(fused, reference, entropy, ct, settings)
        if ct is not None:
            evaluated = list(result.labels)
            result.overlays[case] = overlay_views(ct.array, np.where(np.isin(fused.array, evaluated), fused.array, 0),
                                                  np.where(np.isin(reference.array, evaluated), reference.array, 0),
                                                  None if entropy is None else entropy.array,
                                                  reference.spacing_zyx, reference.direction, result.labels)
        if summary_rows is not None:
            row = summary_rows.get(case, {})
            if row:
                result.summary_rows.append(row)
            result.case_vvc[case] = parse_float(row.get("vvc"))
            for label, column in vvc_columns.items():
                result.vvc.setdefault(label, {})[case] = parse_float(row.get(column))
        _model_metrics(case, reference, result)
    return result
