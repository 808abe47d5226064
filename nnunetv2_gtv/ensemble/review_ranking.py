"""Which cases to check first: a run's cases ranked by a per-case risk score, and optionally a review budget.

Each summary row gets ``review_rank`` (1 = check first) by the chosen score: VVC or entropy in the fused mask
(higher = riskier), or pairwise Dice, agreement or soft Dice (lower = riskier; ``nnunetv2_gtv.ensemble.agreement``).
With several labels a case counts with its riskiest value, of the case's own column and its labels'
(``<score>_<label>``): a node the models disagree on raises the case even when the primary is certain. A case whose
score is undefined everywhere (e.g. no model marked anything) ranks before the others: nothing there vouches for the
result. Ties keep the case names' order.

With a budget (a share of the run, ``--review-budget 0.25``) ``review`` is true for exactly the ceil(budget x cases)
highest-ranked cases and false for the rest, instead of the per-case VVC threshold. With a threshold on the score
(calibrated on validation cases and stored beside the models by ``gtv-postprocessing``) ``review`` is true where the
score is on its risky side (or undefined). Per-label ``review_<label>`` columns keep their VVC threshold flags. Ranking is over the rows the summary holds when it is written: in a sharded run
the part that finishes last ranks them all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from nnunetv2_gtv.ensemble.summary import label_columns

# +1: a higher value means more disagreement; -1: a lower value does
RISK_DIRECTION = {"vvc": 1, "entropy_in_fused": 1, "pairwise_dice_mean": -1, "pairwise_dice_min": -1,
                  "agreement": -1, "soft_dice": -1}
MEANING = {  # one sentence each, for the review page
    "vvc": "how much the models' volumes differ (coefficient of variation); higher is riskier",
    "entropy_in_fused": "the mean vote entropy inside the fused mask; higher is riskier",
    "pairwise_dice_mean": "the mean Dice between every two models' masks; lower is riskier",
    "pairwise_dice_min": "the Dice of the two models that disagree most; lower is riskier",
    "agreement": "the share of the voxels some model marks that every model marks; lower is riskier",
    "soft_dice": "how sure the mean probability is of the fused mask; lower is riskier",
}


@dataclass(frozen=True)
class ReviewSelection:
    """The score cases are ranked by, and which of them are flagged for review: the riskiest ``budget`` share of
    the run, or every case on the risky side of ``threshold`` (in the score's units, calibrated on validation cases
    by gtv-postprocessing), or, with neither, the per-case VVC threshold. ``source`` says where a calibrated
    selection came from."""

    score: str = "vvc"
    budget: float | None = None
    threshold: float | None = None
    source: str | None = None

    def __post_init__(self):
        if self.score not in RISK_DIRECTION:
            raise ValueError(f"review score must be one of {', '.join(RISK_DIRECTION)}, got {self.score!r}")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"review budget is a share of the cases in (0, 1], got {self.budget}")
        if self.threshold is not None and (self.budget is not None or not math.isfinite(self.threshold)):
            raise ValueError(f"a review threshold must be a finite number and excludes a budget, got "
                             f"{self.threshold} with budget {self.budget}")

    def flag_text(self) -> str:
        if self.budget is not None:
            return f"the {self.budget:g} of cases ranked riskiest by {self.score}"
        if self.threshold is not None:
            side = ">=" if RISK_DIRECTION[self.score] > 0 else "<="
            return f"{self.score} {side} {self.threshold:.4g} (calibrated on validation cases: {self.source})"
        return "the VVC threshold (vvc_threshold), per case"

    def flags(self, case_risk: float | None) -> bool:
        """Whether a case of this risk (:func:`risk`) is over the threshold; an undefined risk is."""
        return case_risk is None or case_risk >= RISK_DIRECTION[self.score] * self.threshold

    def record(self) -> dict:
        return {"score": self.score, "meaning": MEANING[self.score], "budget": self.budget,
                "threshold": self.threshold, "flag": self.flag_text()}


def risk(row: dict, score: str, label_names: Sequence[str] = ()) -> float | None:
    """The riskiest of ``row[score]`` and ``row[f"{score}_{label}"]`` for ``label_names``, signed so that higher is
    riskier; None when none is defined."""
    values = [row.get(key) for key in (score, *(f"{score}_{name}" for name in label_names))]
    risks = [RISK_DIRECTION[score] * float(v) for v in values
             if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]
    return max(risks) if risks else None


def rank_rows(rows: Sequence[dict], selection: ReviewSelection) -> list[dict]:
    """Copies of ``rows`` with ``review_rank`` set (and ``review`` from the budget or threshold, if one is given)."""
    labels = label_columns(rows)
    risks = {row["case"]: risk(row, selection.score, labels) for row in rows}
    order = sorted(rows, key=lambda row: (risks[row["case"]] is not None, -(risks[row["case"]] or 0.0), row["case"]))
    flagged = math.ceil(selection.budget * len(order) - 1e-9) if selection.budget is not None else None
    ranked = []
    for rank, row in enumerate(order, start=1):
        if flagged is not None:
            review = rank <= flagged
        elif selection.threshold is not None:
            review = selection.flags(risks[row["case"]])
        else:
            review = row.get("review")
        copy = {}
        for key, value in row.items():  # review_rank right after review, as in summary.csv
            if key != "review_rank":
                copy[key] = review if key == "review" else value
            if key == "review":
                copy["review_rank"] = rank
        copy.setdefault("review_rank", rank)
        if flagged is not None or selection.threshold is not None:
            copy.setdefault("review", review)
        ranked.append(copy)
    return ranked
