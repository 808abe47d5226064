"""The review-score validation (nnunetv2_gtv.evaluation.review_scores) against independent computations."""
import itertools
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from nnunetv2_gtv.evaluation import review_scores


def rows_and_dice(n=20, seed=3):
    rng = np.random.default_rng(seed)
    dice = {f"c{i:02d}": float(d) for i, d in enumerate(rng.uniform(0.2, 0.95, n))}
    rows = []
    for case, d in dice.items():  # VVC that follows the error with noise; pairwise Dice that does not
        rows.append({"case": case, "vvc": f"{(1 - d) * 0.5 + rng.normal(0, 0.05):.6f}",
                     "pairwise_dice_mean": f"{rng.uniform(0.5, 0.9):.6f}", "volume_ml_fused": f"{100 * d:.3f}"})
    return rows, dice


def brute_force_auroc(risk, positive):
    pairs = [(p, q) for p, q in itertools.product(np.flatnonzero(positive), np.flatnonzero(~positive))]
    return sum(1.0 if risk[p] > risk[q] else 0.5 if risk[p] == risk[q] else 0.0 for p, q in pairs) / len(pairs)


def test_auroc_matches_sklearn_and_a_pair_count_with_ties():
    risk = np.array([0.1, 0.4, 0.4, 0.8, 0.2, 0.4, 0.9, 0.05])
    positive = np.array([False, True, False, True, False, True, False, False])
    assert review_scores.auroc(risk, positive) == pytest.approx(roc_auc_score(positive, risk))
    assert review_scores.auroc(risk, positive) == pytest.approx(brute_force_auroc(risk, positive))
    assert math.isnan(review_scores.auroc(risk, np.zeros(8, dtype=bool)))


def test_validate_score_on_a_perfect_and_a_reversed_ranking():
    dice = {f"c{i}": 0.1 * i for i in range(1, 9)}  # c1 worst
    perfect = {case: 1.0 - d for case, d in dice.items()}
    result = review_scores.validate_score(perfect, dice, resamples=200)
    assert result["spearman_rho"] == pytest.approx(1.0)
    assert result["auroc"] == pytest.approx(1.0)
    assert (result["worst"], result["caught"], result["caught_share"]) == (2, 2, 1.0)
    reversed_ = review_scores.validate_score({c: -r for c, r in perfect.items()}, dice, resamples=200)
    assert reversed_["spearman_rho"] == pytest.approx(-1.0)
    assert reversed_["auroc"] == pytest.approx(0.0) and reversed_["caught"] == 0


def test_validate_scores_against_scipy_and_sklearn():
    rows, dice = rows_and_dice()
    result = review_scores.validate_scores(rows, dice, resamples=300)
    assert set(result) == {"vvc", "pairwise_dice_mean", review_scores.SIZE_BASELINE}
    cases = sorted(dice)
    one_minus_dice = [1 - dice[c] for c in cases]
    worst_cases = set(sorted(cases, key=lambda c: dice[c])[:5])  # ceil(20 / 4)
    positive = np.array([c in worst_cases for c in cases])
    expected_risk = {"vvc": [float(r["vvc"]) for r in rows],  # rows are in case order
                     "pairwise_dice_mean": [-float(r["pairwise_dice_mean"]) for r in rows],
                     review_scores.SIZE_BASELINE: [-float(r["volume_ml_fused"]) for r in rows]}
    for score, risk in expected_risk.items():
        assert result[score]["spearman_rho"] == pytest.approx(stats.spearmanr(risk, one_minus_dice).statistic)
        assert result[score]["auroc"] == pytest.approx(roc_auc_score(positive, risk))
        top = set(sorted(cases, key=lambda c: -risk[cases.index(c)])[:5])
        assert result[score]["caught"] == len(top & worst_cases)
        low, high = result[score]["rho_interval"]
        assert low <= result[score]["spearman_rho"] <= high
    assert result[review_scores.SIZE_BASELINE]["spearman_rho"] == pytest.approx(1.0)  # volume = 100 x Dice here
    assert result["vvc"]["rho_interval"][0] > 0.5  # VVC built to follow the error
    assert review_scores.best_score(result) is None  # volume = 100 x Dice: no score beats the size baseline here
    without_baseline = {k: v for k, v in result.items() if k != review_scores.SIZE_BASELINE}
    assert review_scores.best_score(without_baseline) == "vvc"


def test_no_score_is_chosen_when_none_beats_chance():
    """Scores that rank the failures last (AUROC < 0.5), as on the real-CT validation CTs, choose nothing, and no
    review flag is calibrated from them."""
    dice = {f"c{i:02d}": 0.05 * i for i in range(1, 13)}
    rows = [{"case": c, "vvc": str(d), "pairwise_dice_mean": str(1.0 - d)} for c, d in dice.items()]  # backwards
    result = review_scores.validate_scores(rows, dice, resamples=50)
    assert result["vvc"]["auroc"] == pytest.approx(0.0) and result["pairwise_dice_mean"]["auroc"] == pytest.approx(0.0)
    assert review_scores.best_score(result) is None
    assert review_scores.calibrate_review(rows, dice) is None


def test_calibrated_threshold_flags_the_riskiest_quarter_of_the_validation_cases():
    dice = {f"c{i:02d}": 0.05 * i for i in range(1, 13)}
    rows = [{"case": c, "pairwise_dice_mean": str(0.5 + d / 2), "volume_ml_fused": "10"} for c, d in dice.items()]
    calibration = review_scores.calibrate_review(rows, dice)
    assert calibration["score"] == "pairwise_dice_mean" and calibration["cases"] == 12
    assert calibration["threshold"] == pytest.approx(0.5 + 0.15 / 2)  # the 3rd lowest: ceil(12 / 4) = 3 flagged
    assert review_scores.calibrate_review(rows[:7], {c: dice[c] for c in list(dice)[:7]}) is None  # < 8 cases


def test_undefined_scores_count_as_riskiest_and_labels_take_the_riskiest_value():
    rows = [{"case": "a", "vvc": "", "volume_ml_fused_GTVp": "1", "vvc_GTVp": "", "vvc_GTVnd": ""},
            {"case": "b", "vvc": "0.05", "volume_ml_fused_GTVp": "1", "vvc_GTVp": "0.05", "vvc_GTVnd": "0.6"},
            {"case": "c", "vvc": "0.1", "volume_ml_fused_GTVp": "1", "vvc_GTVp": "0.1", "vvc_GTVnd": "0.1"}]
    risks = review_scores.case_risks(rows, "vvc", ["GTVp", "GTVnd"])
    assert risks == {"a": math.inf, "b": 0.6, "c": 0.1}
    result = review_scores.validate_score(risks, {"a": 0.2, "b": 0.5, "c": 0.9}, resamples=50)
    assert result["spearman_rho"] == pytest.approx(1.0) and result["caught"] == 1


def test_too_few_cases_give_undefined_statistics():
    result = review_scores.validate_score({"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.9})
    assert result["n"] == 2 and math.isnan(result["spearman_rho"]) and math.isnan(result["auroc"])
