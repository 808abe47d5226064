"""The per-case agreement scores (pairwise Dice, agreement, entropy in the fused mask, soft Dice): each formula on
small masks worked out by hand, and the columns gtv-uncertainty writes against a computation made here from the
models' masks."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from nnunetv2_gtv.ensemble.agreement import SCORE_NAMES, mean_inside, pairwise_dice, soft_dice, vote_agreement
from test_multilabel_fusion import one_hot, properties, run, write_3label_models  # noqa: F401 (fixture)
from test_uncertainty import SHAPE, binary, read_csv, write_models


def test_pairwise_dice_by_hand():
    a = np.array([1, 1, 1, 1, 0, 0], bool)
    b = np.array([0, 0, 1, 1, 1, 1], bool)
    c = np.array([1, 1, 0, 0, 0, 0], bool)
    # a-b: 2*2/8, a-c: 2*2/6, b-c: 0
    mean, lowest = pairwise_dice([a, b, c], [None, None, None])
    assert mean == pytest.approx((0.5 + 2 / 3 + 0.0) / 3) and lowest == 0.0
    # b looked only at the last four voxels: a-b within them 2*2/6, b-c there 0 (c is empty there)
    cover_b = np.array([0, 0, 1, 1, 1, 1], bool)
    mean, lowest = pairwise_dice([a, b, c], [None, cover_b, None])
    assert mean == pytest.approx((2 * 2 / 6 + 2 / 3 + 0.0) / 3) and lowest == 0.0
    empty = np.zeros(6, bool)
    assert pairwise_dice([empty, empty], [None, None]) == (1.0, 1.0)
    assert all(math.isnan(v) for v in pairwise_dice([a], [None]))


def test_vote_agreement_mean_inside_and_soft_dice_by_hand():
    votes = np.array([0, 1, 2, 3, 3, 2])
    assert vote_agreement(votes, 3) == pytest.approx(2 / 5)
    assert vote_agreement(votes, np.array([3, 1, 3, 3, 3, 2])) == pytest.approx(4 / 5)  # voxels 1 and 5: all covering
    assert math.isnan(vote_agreement(np.zeros(4, int), 3))
    assert mean_inside(np.array([0.0, 0.5, 1.0]), np.array([False, True, True])) == pytest.approx(0.75)
    assert math.isnan(mean_inside(np.ones(3), np.zeros(3, bool)))
    assert soft_dice(3.0, 4.0, 4) == pytest.approx(0.75) and soft_dice(0.0, 0.0, 0) == 1.0


def _boxes() -> list[np.ndarray]:
    """Three overlapping boxes of different sizes; where two or three overlap is one connected block."""
    masks = []
    for z0, y0, x0 in ((2, 4, 4), (3, 6, 6), (2, 5, 8)):
        mask = np.zeros(SHAPE, bool)
        mask[z0:z0 + 5, y0:y0 + 8, x0:x0 + 9] = True
        masks.append(mask)
    return masks


def test_binary_scores_in_the_summary_equal_a_computation_from_the_masks(tmp_path, properties):
    masks = _boxes()
    folders = write_models(tmp_path, [{"c": binary(np.where(m, 0.9, 0.1))} for m in masks], properties)
    assert run(folders, tmp_path / "out") == 0
    row = read_csv(tmp_path / "out" / "summary.csv")[0]

    k = sum(m.astype(int) for m in masks)  # votes; the mean foreground probability is (0.9 k + 0.1 (3 - k)) / 3
    fused = k >= 2
    dice = [2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
            for a, b in itertools.combinations(masks, 2)]
    f = k / 3
    entropy = -(np.where(f > 0, f * np.log(np.where(f > 0, f, 1)), 0)
                + np.where(f < 1, (1 - f) * np.log(np.where(f < 1, 1 - f, 1)), 0))
    p = (0.9 * k + 0.1 * (3 - k)) / 3
    expected = {"pairwise_dice_mean": np.mean(dice), "pairwise_dice_min": min(dice),
                "agreement": np.count_nonzero(k == 3) / np.count_nonzero(k > 0),
                "entropy_in_fused": entropy[fused].mean(),
                "soft_dice": 2 * p[fused].sum() / (p.sum() + np.count_nonzero(fused))}
    for name in SCORE_NAMES:
        assert float(row[name]) == pytest.approx(expected[name], abs=2e-6), name


def test_labels_and_regions_enter_each_labels_scores(tmp_path, properties):
    """Three labels, a model that looked at a box only: each label's pairwise Dice is taken where both models
    looked, the case's pools the labels."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:5, 2:9, 3:12] = 1
    labels[5:8, 10:16, 10:20] = 2
    other = labels.copy()
    other[1:5, 2:9, 3:8] = 0  # model 2 misses a part of label 1
    third = labels.copy()
    third[5:8, 10:16, 15:20] = 0  # model 3 misses a part of label 2, but only outside its region
    region_3 = ((0, 9), (0, 20), (0, 15))
    maps = [one_hot(labels), one_hot(other), one_hot(third)]
    folders = write_3label_models(tmp_path, maps, properties, [None, None, region_3])
    assert run(folders, tmp_path / "out", "--keep-all-components") == 0
    row = read_csv(tmp_path / "out" / "summary.csv")[0]

    cover_3 = np.zeros(SHAPE, bool)
    cover_3[tuple(slice(a, b) for a, b in region_3)] = True
    covers = [np.ones(SHAPE, bool), np.ones(SHAPE, bool), cover_3]
    models = [labels, other, third * cover_3]

    def dice_within(value_of, i, j):
        both = covers[i] & covers[j]
        a, b = value_of(models[i]) & both, value_of(models[j]) & both
        total = np.count_nonzero(a) + np.count_nonzero(b)
        return 1.0 if total == 0 else 2 * np.count_nonzero(a & b) / total

    for name, value_of in (("GTVp", lambda m: m == 1), ("GTVnd", lambda m: m == 2), (None, lambda m: m > 0)):
        pairs = [dice_within(value_of, i, j) for i, j in itertools.combinations(range(3), 2)]
        suffix = f"_{name}" if name else ""
        assert float(row[f"pairwise_dice_mean{suffix}"]) == pytest.approx(np.mean(pairs), abs=2e-6)
        assert float(row[f"pairwise_dice_min{suffix}"]) == pytest.approx(min(pairs), abs=2e-6)
    assert float(row["pairwise_dice_min_GTVnd"]) == 1.0  # model 3's miss lies outside its region: no disagreement
    assert float(row["pairwise_dice_min_GTVp"]) < 1.0
