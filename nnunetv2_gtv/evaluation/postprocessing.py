"""Choosing each label's connected-component rule on cross-validation, as nnU-Net's ``determine_postprocessing``.

Input: a fused folder of out-of-fold predictions made with every component kept (``--keep-all-components``), and
their reference labels. For each foreground label the mean Dice over the cases is computed with the label's
components as they are (``all``) and with its largest component only (``largest``); ``largest`` is kept only where
it raises that label's mean Dice, as nnU-Net keeps a removal only where the label's Dice improves
(nnunetv2/postprocessing/remove_connected_components.py). A label whose mean does not improve keeps ``all``: a
second node, a second parotid lobe, are never deleted by default.

When the folder has the fusion's ``summary.csv`` and at least MIN_CALIBRATION_CASES cases, the review flag is
calibrated there too (:func:`nnunetv2_gtv.evaluation.review_scores.calibrate_review`): each case's Dice with the
chosen rules (mean over its labels) against the scores of the summary (computed with every component kept).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from nnunetv2_gtv.ensemble.fusion import ComponentRule, filter_components
from nnunetv2_gtv.ensemble.postprocessing import PostprocessingChoice
from nnunetv2_gtv.evaluation.folders import EvaluationInputError, check_same_grid, detect_file_ending, find_image, \
    find_label_set, list_cases, read_summary_csv, read_summary_json, read_volume
from nnunetv2_gtv.evaluation.metrics import dice_score
from nnunetv2_gtv.evaluation.review_scores import MIN_CALIBRATION_CASES, calibrate_review

CANDIDATES = ("all", "largest")


def _check_all_components_kept(fused_dir: Path, summary: dict | None) -> None:
    settings = (summary or {}).get("settings") or {}
    rules = set((settings.get("label_rules") or {}).values())
    if settings.get("components") != "all" or rules - {"all"}:
        raise EvaluationInputError(
            f"{fused_dir / 'summary.json'}: the predictions must keep every component to choose a rule on them "
            f"(components {settings.get('components')!r}); fuse them with --keep-all-components")


def choose_postprocessing(fused_dir: str | Path, labels_dir: str | Path, connectivity: int = 6,
                          log: Callable[[str], None] = print) -> PostprocessingChoice:
    """Each foreground label's rule, chosen on the cases of ``fused_dir`` against ``labels_dir``."""
    fused_dir, labels_dir = Path(fused_dir), Path(labels_dir)
    for folder, what in ((fused_dir, "predictions"), (labels_dir, "reference labels")):
        if not folder.is_dir():
            raise EvaluationInputError(f"{folder}: {what} folder does not exist")
    summary = read_summary_json(fused_dir)
    _check_all_components_kept(fused_dir, summary)
    label_set = find_label_set(fused_dir, summary, [])
    foreground = [value for value in label_set.values if value > 0]
    ending = detect_file_ending(fused_dir)
    cases = [case for case in list_cases(fused_dir, ending) if find_image(labels_dir, case, ending) is not None]
    if not cases:
        raise EvaluationInputError(f"{labels_dir}: no reference label for any case of {fused_dir}")
    dice = {label: {rule: [] for rule in CANDIDATES} for label in foreground}
    for case in cases:
        fused = read_volume(fused_dir / f"{case}{ending}")
        reference = read_volume(find_image(labels_dir, case, ending))
        check_same_grid(fused, reference)
        voxel_ml = float(np.prod(reference.spacing)) / 1000.0
        kept = fused.array.copy()  # each label's components are found on its own mask: one pass serves all labels
        filter_components(kept, connectivity, {label: ComponentRule("largest") for label in foreground}, voxel_ml)
        for label in foreground:
            dice[label]["all"].append(dice_score(fused.array == label, reference.array == label))
            dice[label]["largest"].append(dice_score(kept == label, reference.array == label))
    rules, record = {}, {}
    for label in foreground:
        means = {rule: float(np.mean(values)) for rule, values in dice[label].items()}
        rules[label] = ComponentRule("largest" if means["largest"] > means["all"] else "all")
        record[label_set.name_of(label)] = {"mean_dice": means, "chosen": rules[label].rule}
        log(f"{label_set.name_of(label)}: mean Dice {means['all']:.4f} with every component, {means['largest']:.4f} "
            f"with the largest only -> {rules[label].rule}")
    chosen_on = {"predictions": str(fused_dir.resolve()), "reference": str(labels_dir.resolve()),
                 "cases": len(cases), "labels": record,
                 "rule": "largest component kept only where it raises the label's mean Dice (nnU-Net's criterion)"}
    case_dice = {case: float(np.mean([dice[label][rules[label].rule][i] for label in foreground]))
                 for i, case in enumerate(cases)}
    return PostprocessingChoice(connectivity, rules, {v: label_set.name_of(v) for v in foreground}, chosen_on,
                                _review_flag(fused_dir, case_dice, log))


def _review_flag(fused_dir: Path, case_dice: dict[str, float], log: Callable[[str], None]) -> dict | None:
    rows = read_summary_csv(fused_dir)
    if rows is None or len(case_dice) < MIN_CALIBRATION_CASES:
        log(f"review flag: not calibrated ({'no summary.csv' if rows is None else f'{len(case_dice)} cases'}; "
            f"needs the fusion's summary.csv and {MIN_CALIBRATION_CASES} cases); gtv-predict keeps VVC > threshold")
        return None
    review = calibrate_review([rows[case] for case in case_dice if case in rows], case_dice)
    if review is None:
        log("review flag: not calibrated (no score picks the worst of these cases better than chance and the "
            "size baseline); gtv-predict keeps VVC > threshold")
        return review
    log(f"review flag: {review['score']} (AUROC {review['auroc']:.2f} for the worst quarter, Spearman rho "
        f"{review['spearman_rho']:.2f}, {review['cases']} cases); flagged at {review['threshold']:.4g}, the riskiest "
        f"{review['share']:g} of these cases")
    return review
