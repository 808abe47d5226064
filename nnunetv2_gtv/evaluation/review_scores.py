"""Do the per-case review scores pick the cases that went wrong? Each score against the fused Dice, on cases with a
reference (a validation fold, held-out CTs).

Definitions (fixed before any held-out number was looked at; docs/uncertainty.md#validating-a-review-score):

- **risk**: a summary row's score signed so that higher is riskier, the riskiest of the case's and its labels'
  values (:func:`nnunetv2_gtv.ensemble.review_ranking.risk`, what ``review_rank`` orders by); a case whose score is
  undefined counts as the riskiest (``review_rank`` puts it first). The size-only baseline ``volume_ml_fused``: the
  smaller the fused mask, the riskier (small structures score lower Dice).
- **Spearman's rho** between risk and 1 - Dice (the case's mean Dice over its labels), with a bootstrap 95 %
  percentile interval (cases drawn with replacement).
- **worst quarter**: the ceil(n / 4) cases with the lowest Dice (ties: the case names' order). **AUROC** of risk
  for telling them from the rest (ties count one half), with a bootstrap interval over cases (the worst quarter
  stays the one of the full set; draws without both kinds of case are skipped).
- **caught**: how many of the worst quarter are among the ceil(n / 4) riskiest cases, the ones a review of a quarter
  of the run would check (ties in risk broken by the case names, as ``review_rank`` does).
- **choice** (:func:`best_score`): the highest AUROC among the scores better than chance and than the size baseline;
  none when no score is (the bar was added after the real-CT run of docs/results/review_scores.md, whose best score
  on the validation CTs had AUROC 0.39: a flag by it would mark the cases least likely to have failed).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from nnunetv2_gtv.ensemble.review_ranking import RISK_DIRECTION, risk
from nnunetv2_gtv.ensemble.summary import label_columns

SIZE_BASELINE = "volume_ml_fused"
MIN_CALIBRATION_CASES = 8  # fewer validation cases set no threshold: a quarter of them would be one or two
SCORES = (*RISK_DIRECTION, SIZE_BASELINE)
REVIEW_SHARE = 0.25
RESAMPLES = 2000


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def case_risks(rows: Sequence[Mapping], score: str, label_names: Sequence[str] = ()) -> dict[str, float]:
    """Case -> risk by ``score`` from summary rows (summary.json's numbers or summary.csv's text); undefined ->
    +inf."""
    risks = {}
    for text_row in rows:
        row = {key: value if key == "case" else _number(value) for key, value in text_row.items()}
        if score == SIZE_BASELINE:
            value = -row[SIZE_BASELINE] if math.isfinite(row.get(SIZE_BASELINE, math.nan)) else None
        else:
            value = risk(row, score, label_names)
        risks[row["case"]] = math.inf if value is None else value
    return risks


def auroc(risk_values: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive case has a higher risk than a negative one (ties one half); NaN without both."""
    positives, negatives = risk_values[positive], risk_values[~positive]
    if positives.size == 0 or negatives.size == 0:
        return math.nan
    ranks = stats.rankdata(np.where(np.isinf(risk_values), np.finfo(float).max, risk_values))
    u = ranks[positive].sum() - positives.size * (positives.size + 1) / 2.0
    return float(u / (positives.size * negatives.size))


def _spearman(risk_values: np.ndarray, one_minus_dice: np.ndarray) -> float:
    if np.ptp(stats.rankdata(risk_values)) == 0 or np.ptp(one_minus_dice) == 0:
        return math.nan
    return float(stats.spearmanr(np.where(np.isinf(risk_values), np.finfo(float).max, risk_values),
                                 one_minus_dice).statistic)


def _interval(values: list[float]) -> list[float]:
    finite = np.asarray([v for v in values if math.isfinite(v)])
    return [math.nan, math.nan] if finite.size == 0 else np.percentile(finite, [2.5, 97.5]).tolist()


def validate_score(risks: Mapping[str, float], dice: Mapping[str, float], share: float = REVIEW_SHARE,
                   resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """How well ``risks`` (case -> risk) rank the cases of ``dice`` (case -> fused Dice) by error: rho, AUROC for
    the worst ``share``, and how many of them a review of the riskiest ``share`` catches (module docstring)."""
    cases = sorted(case for case in dice if case in risks and math.isfinite(dice[case]))
    n = len(cases)
    result = {"n": n, "spearman_rho": math.nan, "rho_interval": [math.nan, math.nan], "auroc": math.nan,
              "auroc_interval": [math.nan, math.nan], "worst": 0, "caught": 0, "caught_share": math.nan}
    if n < 3:
        return result
    risk_values = np.asarray([risks[c] for c in cases], dtype=float)
    one_minus_dice = 1.0 - np.asarray([dice[c] for c in cases], dtype=float)
    flagged = math.ceil(share * n - 1e-9)
    worst = np.zeros(n, dtype=bool)
    worst[sorted(range(n), key=lambda i: (-one_minus_dice[i], cases[i]))[:flagged]] = True
    riskiest = sorted(range(n), key=lambda i: (-risk_values[i], cases[i]))[:flagged]
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, n, n) for _ in range(resamples)]
    caught = int(worst[riskiest].sum())
    result.update(spearman_rho=_spearman(risk_values, one_minus_dice),
                  rho_interval=_interval([_spearman(risk_values[d], one_minus_dice[d]) for d in draws]),
                  auroc=auroc(risk_values, worst), auroc_interval=_interval([auroc(risk_values[d], worst[d])
                                                                             for d in draws]),
                  worst=int(worst.sum()), caught=caught, caught_share=caught / flagged)
    return result


def validate_scores(rows: Sequence[Mapping], dice: Mapping[str, float], scores: Sequence[str] = SCORES,
                    **options) -> dict[str, dict]:
    """:func:`validate_score` for every score of ``scores`` that some summary row holds (with several labels, the
    riskiest of the case's and its labels' values)."""
    label_names = label_columns(rows)
    present = [score for score in scores if any(score in row or any(key.startswith(f"{score}_") for key in row)
                                                for row in rows)]
    return {score: validate_score(case_risks(rows, score, label_names), dice, **options) for score in present}


def best_score(validation: Mapping[str, Mapping]) -> str | None:
    """The score with the highest AUROC for the worst cases (ties: the higher rho, then the order of SCORES), among
    those that pick them better than chance (AUROC > 0.5) and better than the size baseline where it was measured;
    None when no score does. The size baseline itself never wins: it is the bar."""
    bar = max(0.5, _finite_or(validation.get(SIZE_BASELINE, {}).get("auroc", math.nan), 0.5))
    candidates = [s for s in validation if s != SIZE_BASELINE and _finite_or(validation[s]["auroc"]) > bar]
    if not candidates:
        return None
    return max(candidates, key=lambda s: (validation[s]["auroc"], _finite_or(validation[s]["spearman_rho"]),
                                          -SCORES.index(s)))


def _finite_or(value: float, default: float = -math.inf) -> float:
    return value if math.isfinite(value) else default


def calibrate_review(rows: Sequence[Mapping], dice: Mapping[str, float], share: float = REVIEW_SHARE
                     ) -> dict | None:
    """The review flag chosen on validation cases: the best score (:func:`best_score`) and the threshold, in the
    score's units, that flags the ``share`` riskiest of these cases (the value of the last one flagged); None with
    fewer than MIN_CALIBRATION_CASES cases or no score that picks the worst cases better than chance and the size
    baseline."""
    validation = validate_scores(rows, dice)
    score = best_score(validation)
    if score is None or validation[score]["n"] < MIN_CALIBRATION_CASES:
        return None
    risks = sorted((r for case, r in case_risks(rows, score, label_columns(rows)).items() if case in dice),
                   reverse=True)
    finite = [r for r in risks[:math.ceil(share * len(risks) - 1e-9)] if math.isfinite(r)]
    if not finite:
        return None
    table = {name: {key: (v[key] if math.isfinite(v[key]) else None) for key in ("auroc", "spearman_rho")}
             for name, v in validation.items()}  # JSON-ready
    return {"score": score, "threshold": RISK_DIRECTION[score] * finite[-1], "share": share,
            "cases": validation[score]["n"], "auroc": validation[score]["auroc"],
            "spearman_rho": _finite_or(validation[score]["spearman_rho"], None), "validation": table}
