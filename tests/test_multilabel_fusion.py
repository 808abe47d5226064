"""Several foreground labels (GTVp + GTVnd) in the fusion: per-label connected-component rules, the region-aware
ensemble, per-label volumes / VVC / review, post-processing files; against an independent per-label fusion."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from nnunetv2_gtv.cli.uncertainty import main
from nnunetv2_gtv.ensemble.fusion import ComponentRule, filter_components
from nnunetv2_gtv.ensemble.postprocessing import PostprocessingChoice, read_postprocessing, write_postprocessing
from nnunetv2_gtv.inference.export import region_on_image_grid
from test_uncertainty import SHAPE, nnunet_properties, read, read_csv, write_model

DATASET_3 = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "GTVp": 1, "GTVnd": 2}, "numTraining": 2,
             "file_ending": ".nii.gz"}
PLANS = {"dataset_name": "Dataset991_Test", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
         "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {}}


@pytest.fixture(scope="module")
def properties(tmp_path_factory) -> dict:
    import SimpleITK as sitk

    path = tmp_path_factory.mktemp("ct") / "ref_0000.nii.gz"
    image = sitk.GetImageFromArray(np.zeros(SHAPE, np.int16))
    image.SetSpacing((0.7, 0.9, 3.1))
    sitk.WriteImage(image, str(path))
    return nnunet_properties(path)


def one_hot(labels: np.ndarray, p: float = 1.0, num_labels: int = 3) -> np.ndarray:
    """Probability p on each voxel's label, the rest spread evenly over the other labels."""
    maps = np.full((num_labels, *labels.shape), (1 - p) / (num_labels - 1), np.float32)
    for value in range(num_labels):
        maps[value][labels == value] = p
    return maps


def write_3label_models(root: Path, maps: list[np.ndarray], properties: dict,
                        regions: list | None = None) -> list[str]:
    """One folder per model as gtv-predict saves them (``region`` beside the probabilities when given)."""
    folders = []
    for i, probabilities in enumerate(maps, start=1):
        folder = write_model(root / f"model_{i}", {"c": probabilities}, properties, PLANS, DATASET_3)
        if regions is not None and regions[i - 1] is not None:
            np.savez_compressed(folder / "c.npz", probabilities=probabilities.astype(np.float32),
                                region=np.asarray(regions[i - 1], np.int64))
        folders.append(str(folder))
    return folders


def run(folders: list[str], out: Path, *options: str) -> int:
    try:
        return main(["-i", *folders, "-o", str(out), "-np", "1", *options])
    except SystemExit as exit_:  # argparse's error exit
        return exit_.code


# ------------------------------------------------------------- against an independent fusion


def independent_fusion(maps, regions, weights):
    """Per voxel: the weighted mean over the models whose region holds it (none: background), its argmax, and the
    entropy of the label votes of those models; written with loops over models and labels, nothing shared."""
    num_labels, shape = maps[0].shape[0], maps[0].shape[1:]
    covered = []
    for region in regions:
        mask = np.zeros(shape, bool)
        mask[tuple(slice(a, b) for a, b in region)] = True
        covered.append(mask)
    weight = sum(w * c for w, c in zip(weights, covered))
    total = sum(w * c * m for w, c, m in zip(weights, covered, maps))
    mean = np.where(weight > 0, total / np.where(weight > 0, weight, 1), 0)
    labels = np.where(weight > 0, np.argmax(mean, axis=0), 0)
    own = [np.where(c, np.argmax(m, axis=0), -1) for m, c in zip(maps, covered)]
    entropy = np.zeros(shape)
    n = sum(c.astype(int) for c in covered)
    for value in range(num_labels):
        f = np.divide(sum((o == value).astype(float) for o in own), n, out=np.zeros(shape), where=n > 0)
        entropy -= np.where(f > 0, f * np.log(np.where(f > 0, f, 1)), 0)
    return labels, entropy, own


def test_fused_labels_and_entropy_equal_an_independent_per_label_fusion(tmp_path, properties):
    rng = np.random.default_rng(7)
    maps = [rng.dirichlet([1.0, 0.6, 0.6], size=SHAPE).transpose(3, 0, 1, 2).astype(np.float32) for _ in range(5)]
    regions = [((3, 8), (0, 20), (0, 24)), ((0, 8), (2, 15), (0, 24)), ((0, 8), (0, 20), (5, 24)),
               ((1, 8), (0, 20), (0, 24)), ((0, 8), (0, 20), (0, 24))]  # slice z = 8 is nobody's
    weights = [1.0, 2.0, 1.0, 1.0, 3.0]
    folders = write_3label_models(tmp_path, maps, properties, regions)
    out = tmp_path / "out"
    assert run(folders, out, "--keep-all-components", "--weights", *map(str, weights)) == 0

    labels, entropy, own = independent_fusion(maps, regions, weights)
    fused = read(out / "c.nii.gz")
    np.testing.assert_array_equal(fused, labels)
    assert set(np.unique(fused)) == {0, 1, 2} and np.all(fused[8] == 0)
    np.testing.assert_allclose(read(out / "c_entropy.nii.gz"), entropy, rtol=1e-5, atol=1e-6)

    row = read_csv(out / "summary.csv")[0]
    voxel_ml = float(np.prod(properties["spacing"])) / 1000
    for name, value in (("GTVp", 1), ("GTVnd", 2)):
        volumes = [int(np.count_nonzero(o == value)) * voxel_ml for o in own]
        mask = labels == value
        holding = [i for i, r in enumerate(regions)
                   if mask[tuple(slice(a, b) for a, b in r)].sum() >= 0.5 * mask.sum()]
        holding = holding if len(holding) >= 2 else list(range(5))
        assert row[f"vvc_models_{name}"] == ";".join(str(i + 1) for i in holding)
        for i, volume in enumerate(volumes, start=1):
            assert float(row[f"volume_ml_model_{i}_{name}"]) == pytest.approx(volume, abs=1e-6)
        chosen = [volumes[i] for i in holding]
        vvc = np.std(chosen) / np.mean(chosen) if len(chosen) > 1 else math.nan
        assert float(row[f"vvc_{name}"] or "nan") == pytest.approx(vvc, abs=1e-6, nan_ok=True)
        assert float(row[f"volume_ml_fused_{name}"]) == pytest.approx(np.count_nonzero(labels == value) * voxel_ml,
                                                                      abs=1e-6)


# ------------------------------------------------------------- connected components per label


def primary_node_and_blob() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[4:8, 4:12, 4:12] = 1  # GTVp, 256 voxels
    labels[0:2, 15:18, 18:21] = 2  # a node far from it, 18 voxels
    labels[1:2, 2:4, 20:22] = 1  # a stray GTVp blob
    return labels


def test_several_labels_keep_every_component_unless_asked(tmp_path, properties):
    labels = primary_node_and_blob()
    folders = write_3label_models(tmp_path, [one_hot(labels, 0.9)] * 3, properties)
    assert run(folders, tmp_path / "auto") == 0
    np.testing.assert_array_equal(read(tmp_path / "auto" / "c.nii.gz"), labels)
    row = read_csv(tmp_path / "auto" / "summary.csv")[0]
    assert row["components_removed"] == "0" and row["components_removed_GTVnd"] == "0"

    assert run(folders, tmp_path / "largest", "--largest-component") == 0
    largest = read(tmp_path / "largest" / "c.nii.gz")
    assert np.count_nonzero(largest == 2) == 18  # the node is its label's largest component: kept
    assert np.count_nonzero(largest == 1) == 256  # the stray GTVp blob is gone
    row = read_csv(tmp_path / "largest" / "summary.csv")[0]
    assert (row["components_removed_GTVp"], row["components_removed_GTVnd"], row["components_removed"]) == \
        ("1", "0", "1")


def test_filter_components_works_on_each_labels_own_mask():
    labels = np.zeros((3, 10, 10), np.uint8)
    labels[1, 1:5, 1:5] = 1
    labels[1, 5:7, 1:5] = 2  # touches GTVp: one component of the foreground, its own label's only one
    labels[1, 8, 8] = 2
    removed = filter_components(labels, 6, {1: ComponentRule("largest"), 2: ComponentRule("largest")}, 1.0)
    assert removed == {1: 0, 2: 1}
    assert np.count_nonzero(labels == 1) == 16 and np.count_nonzero(labels == 2) == 8
    removed = filter_components(labels, 6, {2: ComponentRule("min_volume", 10.0)}, 1.0)
    assert removed == {2: 1} and np.count_nonzero(labels == 2) == 0


def test_postprocessing_file_sets_each_labels_rule(tmp_path, properties):
    labels = primary_node_and_blob()
    labels[7, 17:19, 1:3] = 2  # a second node: both must stay
    folders = write_3label_models(tmp_path, [one_hot(labels, 0.9)] * 3, properties)
    rules = write_postprocessing(PostprocessingChoice(6, {1: ComponentRule("largest"), 2: ComponentRule("all")},
                                                      {1: "GTVp", 2: "GTVnd"}), tmp_path / "pp.json")
    assert read_postprocessing(rules).rules == {1: ComponentRule("largest"), 2: ComponentRule("all")}
    assert run(folders, tmp_path / "out", "--postprocessing", str(rules)) == 0
    fused = read(tmp_path / "out" / "c.nii.gz")
    assert np.count_nonzero(fused == 1) == 256 and np.count_nonzero(fused == 2) == 22
    settings = json.loads((tmp_path / "out" / "summary.json").read_text())["settings"]
    assert settings["label_rules"] == {"1": "largest", "2": "all"}


def test_unusable_postprocessing_files_are_refused_by_name(tmp_path, properties, capsys):
    folders = write_3label_models(tmp_path, [one_hot(primary_node_and_blob())] * 2, properties)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    assert run(folders, tmp_path / "out", "--postprocessing", str(bad)) == 2
    assert f"{bad}: not a post-processing file" in capsys.readouterr().err
    wrong = write_postprocessing(PostprocessingChoice(6, {3: ComponentRule("largest")}), tmp_path / "wrong.json")
    assert run(folders, tmp_path / "out", "--postprocessing", str(wrong)) == 2
    assert "rules for labels [3], but the dataset's labels are 0..2" in capsys.readouterr().err
    assert run(folders, tmp_path / "out", "--postprocessing", str(wrong), "--connectivity", "26") == 2
    assert not (tmp_path / "out" / "c.nii.gz").exists()


# ------------------------------------------------------------- per-label uncertainty


def test_models_that_swap_labels_are_flagged_per_label(tmp_path, properties):
    """Overall volumes agree (VVC 0), the labels do not: each label's VVC and the review flag show it."""
    first, second = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    first[2:6, 2:12, 2:6], first[2:6, 2:7, 15:19] = 1, 2  # 160 GTVp, 80 GTVnd
    second[2:6, 2:12, 2:6], second[2:6, 2:7, 15:19] = 2, 1  # swapped
    folders = write_3label_models(tmp_path, [one_hot(first), one_hot(first), one_hot(second)], properties)
    assert run(folders, tmp_path / "out", "--vvc-threshold", "0.1") == 0
    row = read_csv(tmp_path / "out" / "summary.csv")[0]
    assert float(row["vvc"]) == pytest.approx(0.0, abs=1e-9)
    volumes = [160, 160, 80]
    assert float(row["vvc_GTVp"]) == pytest.approx(np.std(volumes) / np.mean(volumes), abs=1e-6)
    assert row["review_GTVp"] == "true" and row["review_GTVnd"] == "true" and row["review"] == "true"
    assert row["vvc_models_GTVp"] == "1;2;3"
    entropy = read(tmp_path / "out" / "c_entropy.nii.gz")
    assert entropy[3, 5, 3] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3), rel=1e-5)


# ------------------------------------------------------------- region-aware ensemble


def node_below_local(p_node: float) -> tuple[list[np.ndarray], list]:
    """Six models of a head-to-neck CT (z = 0 is the lowest slice): a primary at z 6-7 that all mark, a node at
    z 2-3, below the Local region (z >= 4) and inside the Middle one (z >= 2), marked with probability
    ``p_node`` by the Middle and Global models. Local models predicted background below their region, as
    gtv-predict's saved predictions read."""
    truth = np.zeros(SHAPE, np.uint8)
    truth[6:8, 5:10, 5:10] = 1
    truth[2:4, 12:15, 14:17] = 2
    local, regional = one_hot(np.where(truth == 2, 0, truth)), one_hot(truth)
    regional[:, truth == 2] = [[1 - p_node], [0.0], [p_node]]
    local_region, middle_region = ((4, 9), (0, 20), (0, 24)), ((2, 9), (0, 20), (0, 24))
    return [local, local, regional, regional, regional, regional], [local_region, local_region, middle_region,
                                                                    middle_region, None, None]


@pytest.mark.parametrize("p_node", [0.7, 1.0])
def test_a_node_below_the_local_region_is_kept_by_the_models_that_see_it(tmp_path, properties, p_node):
    maps, regions = node_below_local(p_node)
    folders = write_3label_models(tmp_path, maps, properties, regions)
    assert run(folders, tmp_path / "aware") == 0
    fused = read(tmp_path / "aware" / "c.nii.gz")
    assert np.count_nonzero(fused[2:4] == 2) == 18 and np.count_nonzero(fused == 1) == 50
    row = read_csv(tmp_path / "aware" / "summary.csv")[0]
    assert row["vvc_models_GTVnd"] == "3;4;5;6" and row["vvc_models_GTVp"] == "1;2;3;4;5;6"
    assert float(row["vvc_GTVnd"]) == 0.0 and row["review"] == "false"
    # the rule before region-aware fusion: the Local models' background outvotes it (p 0.7: 2.8 of 6 against 3.2)
    assert run(folders, tmp_path / "background", "--outside-region", "background") == 0
    outvoted = read(tmp_path / "background" / "c.nii.gz")
    assert np.count_nonzero(outvoted == 2) == (0 if p_node == 0.7 else 18)


def test_regions_on_the_image_grid_hold_only_voxels_interpolated_from_inside():
    """The box gtv-predict hands fusion, against nnU-Net's own resampling of the box's indicator: every voxel in
    it is interpolated from inside the box only, and it misses at most one voxel per side of those that are."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    pre_shape, cropped_shape, full_shape = (20, 30, 30), (14, 47, 41), (16, 50, 45)
    crop = [[1, 15], [2, 49], [0, 41]]
    properties = {"shape_after_cropping_and_before_resampling": cropped_shape, "shape_before_cropping": full_shape,
                  "bbox_used_for_cropping": crop}
    for box in (((3, 12), (0, 30), (5, 24)), ((0, 20), (7, 30), (0, 9))):
        indicator = np.zeros((1, *pre_shape), np.float32)
        indicator[(0, *[slice(a, b) for a, b in box])] = 1
        resampled = resample_data_or_seg_to_shape(indicator, cropped_shape, (3.0, 1.0, 1.0), (2.1, 0.64, 0.73),
                                                  is_seg=False, order=1, order_z=0, force_separate_z=None)[0]
        inside = np.zeros(full_shape, bool)
        inside[tuple(slice(a, b) for a, b in crop)] = resampled > 1 - 1e-5
        ranges = region_on_image_grid(box, pre_shape, properties, (0, 1, 2))
        ours = np.zeros(full_shape, bool)
        ours[tuple(slice(a, b) for a, b in ranges)] = True
        cropped = tuple(slice(a, b) for a, b in crop)
        assert np.all(inside[cropped][ours[cropped]])
        exact = ndimage.find_objects(inside.astype(np.uint8))[0]
        for axis, ((low, high), found) in enumerate(zip(ranges, exact)):
            if box[axis][0] > 0:
                assert 0 <= low - found.start <= 1
            else:
                assert low == 0  # reaches the image's edge beyond the crop
            if box[axis][1] < pre_shape[axis]:
                assert 0 <= found.stop - high <= 1
            else:
                assert high == full_shape[axis]
    transposed = region_on_image_grid(((3, 12), (0, 30), (5, 24)), pre_shape, properties, (2, 0, 1))
    straight = region_on_image_grid(((3, 12), (0, 30), (5, 24)), pre_shape, properties, (0, 1, 2))
    assert transposed == (straight[2], straight[0], straight[1])


# ------------------------------------------------------------- choosing the rules on cross-validation


def test_gtv_postprocessing_keeps_largest_only_where_it_raises_the_labels_dice(tmp_path, properties, monkeypatch,
                                                                               capsys):
    """Out-of-fold predictions: a stray GTVp blob (the largest-component rule removes a false positive) and two
    true nodes (it would remove a true one): largest for GTVp, all for GTVnd."""
    import SimpleITK as sitk

    from nnunetv2_gtv.cli.postprocessing import main as postprocessing_main

    truth = np.zeros(SHAPE, np.uint8)
    truth[4:8, 4:12, 4:12] = 1
    truth[0:2, 15:18, 18:21] = 2
    truth[6:8, 16:19, 1:4] = 2
    predicted = truth.copy()
    predicted[1:2, 2:4, 20:22] = 1
    folders = write_3label_models(tmp_path / "models", [one_hot(predicted, 0.9)] * 2, properties)
    assert run(folders, tmp_path / "cv", "--keep-all-components") == 0
    (tmp_path / "labels").mkdir()
    reference = sitk.GetImageFromArray(truth)
    reference.CopyInformation(sitk.ReadImage(str(tmp_path / "cv" / "c.nii.gz")))
    sitk.WriteImage(reference, str(tmp_path / "labels" / "c.nii.gz"))

    results = tmp_path / "results"
    (results / "Dataset991_Test").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_results", str(results))
    assert postprocessing_main(["-p", str(tmp_path / "cv"), "-r", str(tmp_path / "labels"), "-d", "991"]) == 0
    assert "GTVnd: mean Dice 1.0000 with every component" in capsys.readouterr().out
    choice = read_postprocessing(results / "Dataset991_Test" / "gtv_postprocessing.json")
    assert choice.rules == {1: ComponentRule("largest"), 2: ComponentRule("all")}
    assert choice.names == {1: "GTVp", 2: "GTVnd"} and choice.chosen_on["cases"] == 1

    assert run(folders, tmp_path / "largest", "--largest-component") == 0
    assert postprocessing_main(["-p", str(tmp_path / "largest"), "-r", str(tmp_path / "labels"),
                                "-o", str(tmp_path / "pp.json")]) == 2
    assert "fuse them with --keep-all-components" in capsys.readouterr().err
    assert postprocessing_main(["-p", str(tmp_path / "cv"), "-r", str(tmp_path / "labels"),
                                "-o", str(tmp_path / "cv" / "pp.json")]) == 2
    assert "lies inside the input folder" in capsys.readouterr().err and not (tmp_path / "pp.json").exists()
