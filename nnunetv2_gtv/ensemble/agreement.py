"""Per-case agreement scores of an ensemble: how much the models agree on a structure, one number per case (and per
label), to rank the cases a clinician should check first. Computed by the fusion from what it holds anyway (each
model's own mask, the votes, the mean probability, the entropy map); no extra pass over the inputs.

Definitions, for a structure S (one foreground label; for the case's own columns every foreground label pooled)
with fused mask F (after the component rule), model i's mask A_i (its own argmax, inside its region R_i; the whole
image for a model without region), vote count v(x) (models whose mask holds x), cover count c(x) (models whose
region holds x) and mean probability p(x) of S (over the models covering x):

- **pairwise Dice**: for each pair of models i < j, the Dice of A_i and A_j within R_i ∩ R_j (1 when both are empty
  there); ``pairwise_dice_mean`` and ``pairwise_dice_min`` over the pairs (Zenk et al. 2025's ensemble-agreement
  baseline). Undefined with fewer than two models.
- **agreement**: |{x: v(x) = c(x) > 0}| / |{x: v(x) > 0}|, the share of the voxels some model marks that every model
  looking there marks. Undefined when no model marks S.
- **entropy in fused**: the mean of the case's entropy map (vote entropy, eq. 6, unless ``--entropy
  mean-probability``) over F. Undefined when F is empty.
- **soft Dice**: 2 sum_F p / (sum p + |F|), how sure the mean probability is of the fused mask (1 when p is 1 inside
  F and 0 outside; 1 when both are empty).
- **VVC** (eq. 7) stays where it was (:func:`nnunetv2_gtv.ensemble.fusion.volume_variation_coefficient`).

Undefined scores are NaN (empty cells in summary.csv). Lower agreement, pairwise Dice and soft Dice, and higher
entropy, mean more disagreement. None of them can see an error every model makes.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

SCORE_NAMES = ("pairwise_dice_mean", "pairwise_dice_min", "agreement", "entropy_in_fused", "soft_dice")


@dataclass(frozen=True)
class AgreementScores:
    pairwise_dice_mean: float = math.nan
    pairwise_dice_min: float = math.nan
    agreement: float = math.nan
    entropy_in_fused: float = math.nan
    soft_dice: float = math.nan

    def values(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SCORE_NAMES}


def pairwise_dice(masks: Sequence[np.ndarray], covers: Sequence[np.ndarray | None]) -> tuple[float, float]:
    """(mean, lowest) Dice over the pairs of flat boolean ``masks``, each pair within both models' ``covers``
    (None: everywhere); (NaN, NaN) with fewer than two masks."""
    values = []
    for (a, cover_a), (b, cover_b) in itertools.combinations(zip(masks, covers), 2):
        if cover_a is not None or cover_b is not None:
            both = np.logical_and(True if cover_a is None else cover_a, True if cover_b is None else cover_b)
            a, b = a & both, b & both
        total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
        values.append(1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total)
    return (float(np.mean(values)), float(min(values))) if values else (math.nan, math.nan)


def vote_agreement(votes: np.ndarray, cover: np.ndarray | int) -> float:
    """|votes = cover > 0| / |votes > 0| over flat arrays (``cover`` a number when every model covers every voxel)."""
    marked = int(np.count_nonzero(votes))
    if marked == 0:
        return math.nan
    return int(np.count_nonzero((votes == cover) & (votes > 0))) / marked


def mean_inside(values: np.ndarray, mask: np.ndarray) -> float:
    """Mean of ``values`` over ``mask``; NaN when the mask is empty."""
    count = int(np.count_nonzero(mask))
    return float(values[mask].astype(np.float64).sum() / count) if count else math.nan


def soft_dice(probability_inside: float, probability_total: float, mask_voxels: int) -> float:
    """2 sum_F p / (sum p + |F|) from its three sums; 1 when the probability and the mask are both empty."""
    denominator = probability_total + mask_voxels
    return 1.0 if denominator == 0 else 2.0 * probability_inside / denominator
