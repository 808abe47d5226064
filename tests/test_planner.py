"""nnUNetPlannerGTV25D: plans JSON, preprocessing to 3 x 1 x 1 mm and the CT window, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_gtv.demo.synthetic import write_dataset
from nnunetv2_gtv.planning.nnUNetPlannerGTV25D import nnUNetPlannerGTV25D
from nnunetv2_gtv.planning.plans_check import GTVPlansError, assert_gtv_plans

from conftest import clean_env, run_cli


def _plan(dataset_id: int, planner=nnUNetPlannerGTV25D) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiment_dataset

    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True)
    plan_experiment_dataset(dataset_id, experiment_planner_class=planner)
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.paths import nnUNet_preprocessed

    return json.loads((Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset_id) / "nnUNetPlans.json")
                      .read_text())


def _clipped_body_mean_std(raw: Path) -> tuple[float, float]:
    values = []
    for image in sorted((raw / "imagesTr").glob("*.nii.gz")):
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float64)
        values.append(np.clip(hu[hu > -500], -200, 700))
    values = np.concatenate(values)
    return float(values.mean()), float(values.std())


@pytest.mark.parametrize("slice_mm", [(0.5, 0.5), (2.5, 3.5), (5.0, 5.0)])
def test_plans_force_spacing_patch_batch_network_and_window(nnunet_dirs, slice_mm):
    from nnunetv2_gtv.network.gtv_unet import NETWORK_CLASS_PATH, default_arch_kwargs

    raw = write_dataset(nnunet_dirs["nnUNet_raw"], 995, num_train=2, num_test=0, in_plane_size=40,
                        num_slices=int(36 / slice_mm[0]), slice_mm=slice_mm, in_plane_mm=(0.6, 1.4))
    plans = _plan(995)
    assert sorted(plans["configurations"]) == ["3d_fullres"]  # no 2d, no 3d_lowres
    config = plans["configurations"]["3d_fullres"]
    assert config["spacing"] == [3.0, 1.0, 1.0]
    assert config["patch_size"] == [16, 64, 64] and config["batch_size"] == 16
    assert config["normalization_schemes"] == ["CTNormalization"] and config["use_mask_for_norm"] == [False]
    assert config["architecture"]["network_class_name"] == NETWORK_CLASS_PATH
    assert config["architecture"]["arch_kwargs"] == json.loads(json.dumps(default_arch_kwargs()))
    assert plans["transpose_forward"] == [0, 1, 2]
    intensity = plans["foreground_intensity_properties_per_channel"]["0"]
    assert (intensity["percentile_00_5"], intensity["percentile_99_5"]) == (-200, 700)
    mean, std = _clipped_body_mean_std(raw)
    assert intensity["mean"] == pytest.approx(mean, rel=1e-6) and intensity["std"] == pytest.approx(std, rel=1e-6)
    assert_gtv_plans(plans, "3d_fullres")


def test_foreground_statistics_option_uses_nnunet_fingerprint(nnunet_dirs):
    class ForegroundPlanner(nnUNetPlannerGTV25D):
        intensity_statistics = "foreground"

    write_dataset(nnunet_dirs["nnUNet_raw"], 996, num_train=2, num_test=0, in_plane_size=40, num_slices=12)
    plans = _plan(996, ForegroundPlanner)
    fingerprint = json.loads((Path(nnunet_dirs["nnUNet_preprocessed"]) / "Dataset996_SyntheticGTV" /
                              "dataset_fingerprint.json").read_text())
    expected = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    intensity = plans["foreground_intensity_properties_per_channel"]["0"]
    assert intensity["mean"] == pytest.approx(expected["mean"]) and intensity["std"] == pytest.approx(expected["std"])
    assert plans["nnunetv2_gtv"]["intensity_statistics"] == "foreground"


@pytest.mark.slow
def test_stock_cli_plans_and_preprocesses_to_3x1x1_and_clips_the_window(nnunet_dirs):
    raw = write_dataset(nnunet_dirs["nnUNet_raw"], 997, num_train=2, num_test=0, in_plane_size=48, num_slices=14)
    # put extreme values into a block of the first case: -1000 HU air and +2000 HU metal
    image_file = raw / "imagesTr" / "case_000_0000.nii.gz"
    image = sitk.ReadImage(str(image_file))
    hu = sitk.GetArrayFromImage(image)
    hu[4:10, 10:24, 10:24] = 2000
    modified = sitk.GetImageFromArray(hu)
    modified.CopyInformation(image)
    sitk.WriteImage(modified, str(image_file))

    run_cli(["nnUNetv2_plan_and_preprocess", "-d", "997", "-pl", "nnUNetPlannerGTV25D", "-c", "3d_fullres",
             "-np", "1", "--verify_dataset_integrity"], clean_env(**nnunet_dirs))
    folder = Path(nnunet_dirs["nnUNet_preprocessed"]) / "Dataset997_SyntheticGTV"
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    intensity = plans["foreground_intensity_properties_per_channel"]["0"]
    low = (-200 - intensity["mean"]) / intensity["std"]
    high = (700 - intensity["mean"]) / intensity["std"]

    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    data_folder = folder / "nnUNetPlans_3d_fullres"
    dataset = infer_dataset_class(str(data_folder))(str(data_folder))
    data, seg, _, properties = dataset.load_case("case_000")
    data = np.asarray(data)
    original_spacing = np.array(image.GetSpacing())[::-1]
    expected_shape = np.round(np.array(hu.shape) * original_spacing / np.array([3.0, 1.0, 1.0])).astype(int)
    np.testing.assert_array_equal(data.shape[1:], expected_shape)
    assert np.asarray(seg).shape == data.shape
    assert data.max() == pytest.approx(high, abs=1e-3)  # +2000 HU is clipped to 700 HU
    assert data.min() == pytest.approx(low, abs=1e-3)  # -1000 HU air is clipped to -200 HU
    assert np.isclose(data, high, atol=1e-3).sum() > 50 and np.isclose(data, low, atol=1e-3).sum() > 1000


@pytest.mark.parametrize("channel_names, message", [
    ({"0": "CT", "2": "CT"}, "must number the channels 0, 1, ..."),
    ({"0": "MRI"}, "channel 0: 'MRI' is not named as a CT"),
])
def test_non_ct_or_misnumbered_channels_are_refused(nnunet_dirs, channel_names, message):
    raw = write_dataset(nnunet_dirs["nnUNet_raw"], 998, num_train=1, num_test=0, in_plane_size=32, num_slices=10)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints

    extract_fingerprints([998], num_processes=1)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    dataset_json["channel_names"] = channel_names
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    with pytest.raises(GTVPlansError, match=message) as error:
        nnUNetPlannerGTV25D(998)
    assert "dataset.json" in str(error.value)
    assert not (Path(nnunet_dirs["nnUNet_preprocessed"]) / raw.name / "nnUNetPlans.json").exists()


def test_stock_plans_are_refused_with_the_planning_command():
    plans = {"plans_name": "nnUNetPlans", "experiment_planner_used": "ExperimentPlanner",
             "configurations": {"3d_fullres": {"architecture": {"network_class_name": "x.PlainConvUNet"}}}}
    with pytest.raises(GTVPlansError, match="-pl nnUNetPlannerGTV25D"):
        assert_gtv_plans(plans, "3d_fullres")


def test_overwrite_plans_name_keeps_a_stock_plan_beside_ours(nnunet_dirs):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiment_dataset

    write_dataset(nnunet_dirs["nnUNet_raw"], 987, num_train=2, num_test=0, in_plane_size=40, num_slices=12)
    extract_fingerprints([987], num_processes=1)
    folder = Path(nnunet_dirs["nnUNet_preprocessed"]) / "Dataset987_SyntheticGTV"
    stock = {"plans_name": "nnUNetPlans", "experiment_planner_used": "ExperimentPlanner", "configurations": {}}
    (folder / "nnUNetPlans.json").write_text(json.dumps(stock))
    plan_experiment_dataset(987, experiment_planner_class=nnUNetPlannerGTV25D, overwrite_plans_name="nnUNetPlansGTV25D")
    assert json.loads((folder / "nnUNetPlans.json").read_text()) == stock
    ours = json.loads((folder / "nnUNetPlansGTV25D.json").read_text())
    assert ours["plans_name"] == "nnUNetPlansGTV25D"
    assert ours["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlansGTV25D_3d_fullres"
    assert_gtv_plans(ours, "3d_fullres")


@pytest.mark.slow
def test_overwrite_target_spacing_plans_the_coarser_grid_without_transpose(nnunet_dirs):
    """The CPU recipe's grid (docs/results/real_ct.md): in-plane spacing coarser than the slices', axis 0 stays z."""
    write_dataset(nnunet_dirs["nnUNet_raw"], 985, num_train=2, num_test=0, in_plane_size=40, num_slices=12)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", "985", "-pl", "nnUNetPlannerGTV25D", "-c", "3d_fullres", "-np", "1",
             "--no_pp", "-overwrite_target_spacing", "3", "4", "4", "-overwrite_plans_name", "nnUNetPlansGTV25D_3x4x4"],
            clean_env(**nnunet_dirs))
    plans = json.loads((Path(nnunet_dirs["nnUNet_preprocessed"]) / "Dataset985_SyntheticGTV" /
                        "nnUNetPlansGTV25D_3x4x4.json").read_text())
    assert plans["configurations"]["3d_fullres"]["spacing"] == [3.0, 4.0, 4.0]
    assert plans["transpose_forward"] == [0, 1, 2] and plans["nnunetv2_gtv"]["target_spacing_zyx"] == [3.0, 4.0, 4.0]
    assert_gtv_plans(plans, "3d_fullres")


@pytest.mark.parametrize("spacing", [[3.0, 0.0, 4.0], [3.0, 4.0]])
def test_bad_overwrite_target_spacing_is_refused(spacing):
    with pytest.raises(GTVPlansError, match="three positive numbers"):
        nnUNetPlannerGTV25D(1, overwrite_target_spacing=spacing)
