"""Two CT channels (plain + contrast-enhanced, as SegRap2023): the synthetic contrast channel, gtv-dataset --ct,
the planner's windows and statistics per channel, gtv-predict's grouping of a case's channel files and its
refusals. End to end through nnU-Net's commands: test_ct_channels_e2e.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_gtv.cli.dataset import main as gtv_dataset
from nnunetv2_gtv.demo import synthetic
from nnunetv2_gtv.demo.synthetic import CaseGeometry, render_case, render_contrast_case, write_dataset
from nnunetv2_gtv.inference.inputs import InputCase, InputError, check_channels, check_inputs, find_cases
from nnunetv2_gtv.planning.ct_channels import CT_WINDOW_HU, channel_names, ct_windows, is_ct_name
from nnunetv2_gtv.planning.nnUNetPlannerGTV25D import nnUNetPlannerGTV25D
from nnunetv2_gtv.planning.plans_check import GTVPlansError

from test_dataset_conversion import _image, _patients
from test_planner import _plan


def test_contrast_case_hides_the_tumour_on_the_plain_ct_and_enhances_it_on_the_contrast_ct():
    geometry = CaseGeometry((36, 72, 72), (1.8, 1.8, 3.0))
    plain, contrast, label = render_contrast_case(geometry, np.random.default_rng(4), nodes=True)
    _, single_label = render_case(geometry, np.random.default_rng(4), nodes=True)
    np.testing.assert_array_equal(label, single_label)  # the same anatomy as the one-channel case of that seed
    tumour, nodes = label == 1, label == 2
    soft = (np.abs(plain - synthetic.SOFT_TISSUE_HU) < 4 * synthetic.NOISE_SD_HU) & (label == 0)
    for target in (tumour, nodes):
        assert abs(plain[target].mean() - plain[soft].mean()) < 3  # iso-dense without contrast
        assert contrast[target].mean() - contrast[soft & (contrast < 200)].mean() > 50  # enhances
    assert (contrast > 250).sum() > (plain > 250).sum() + 50  # the arteries light up
    assert plain.dtype == contrast.dtype == np.int16 and not np.array_equal(plain - contrast, np.zeros_like(plain))


def test_synthetic_contrast_dataset_has_two_channel_files_per_case(tmp_path):
    path = write_dataset(tmp_path, 975, num_train=2, num_test=1, in_plane_size=40, num_slices=12, contrast=True,
                         orientations="mixed")
    dataset = json.loads((path / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT", "1": "CT_contrast"}
    assert sorted(p.name for p in (path / "imagesTs").iterdir()) == ["case_002_0000.nii.gz", "case_002_0001.nii.gz"]
    plain, contrast = (sitk.ReadImage(str(path / "imagesTr" / f"case_001_000{c}.nii.gz")) for c in (0, 1))
    assert plain.GetSize() == contrast.GetSize() and plain.GetDirection() == contrast.GetDirection()
    assert plain.GetOrigin() == contrast.GetOrigin() and plain.GetSpacing() == contrast.GetSpacing()


@pytest.mark.parametrize("name, is_ct", [("CT", True), ("ct_contrast", True), ("CECT", True), ("contrast CT", True),
                                         ("NCCT", True), ("T1", False), ("MRI", False), ("PET", False)])
def test_ct_channel_names(name, is_ct):
    assert is_ct_name(name) is is_ct


def test_windows_per_channel_default_to_the_papers_and_bad_ones_are_named():
    two = {"channel_names": {"0": "CT", "1": "CT_contrast"}}
    assert ct_windows(two, "d.json") == [CT_WINDOW_HU, CT_WINDOW_HU]
    assert ct_windows({**two, "ct_windows_hu": {"1": [-600, 600]}}, "d.json") == [CT_WINDOW_HU, (-600.0, 600.0)]
    assert channel_names(two, "d.json") == ["CT", "CT_contrast"]
    for bad, message in (({**two, "ct_windows_hu": {"2": [0, 1]}}, r"names channels \['2'\]"),
                         ({**two, "ct_windows_hu": {"0": [700, -200]}}, "finite low < high"),
                         ({**two, "ct_windows_hu": {"0": [1]}}, r"\[low, high\]"),
                         ({"channel_names": {"0": "CT", "2": "CT"}}, "number the channels"),
                         ({"channel_names": {"0": "CT", "1": "T1"}}, "channel 1: 'T1' is not named as a CT")):
        with pytest.raises(GTVPlansError, match=message) as error:
            ct_windows(bad, "d.json")
        assert "d.json" in str(error.value)


def _clipped_body_mean_std(raw: Path, channel: int, window: tuple[float, float]) -> tuple[float, float]:
    values = []
    for image in sorted((raw / "imagesTr").glob(f"*_000{channel}.nii.gz")):
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float64)
        values.append(np.clip(hu[hu > -500], *window))
    values = np.concatenate(values)
    return float(values.mean()), float(values.std())


def test_planner_writes_a_window_and_statistics_per_channel(nnunet_dirs):
    raw = write_dataset(nnunet_dirs["nnUNet_raw"], 976, num_train=2, num_test=0, in_plane_size=40, num_slices=12,
                        contrast=True)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    dataset_json["ct_windows_hu"] = {"0": [-1000, 1000]}  # channel 1 keeps the paper's window
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    plans = _plan(976)
    config = plans["configurations"]["3d_fullres"]
    assert config["normalization_schemes"] == ["CTNormalization"] * 2 and config["use_mask_for_norm"] == [False] * 2
    assert plans["nnunetv2_gtv"]["ct_windows_hu"] == [[-1000, 1000], [-200, 700]]
    assert plans["nnunetv2_gtv"]["ct_window_hu"] == [-1000, 1000] and plans["nnunetv2_gtv"]["region_channel"] == 0
    for channel, window in ((0, (-1000.0, 1000.0)), (1, CT_WINDOW_HU)):
        intensity = plans["foreground_intensity_properties_per_channel"][str(channel)]
        assert (intensity["percentile_00_5"], intensity["percentile_99_5"]) == window
        mean, std = _clipped_body_mean_std(raw, channel, window)
        assert intensity["mean"] == pytest.approx(mean, rel=1e-6) and intensity["std"] == pytest.approx(std, rel=1e-6)


def test_planner_refuses_a_non_ct_channel(nnunet_dirs):
    raw = write_dataset(nnunet_dirs["nnUNet_raw"], 977, num_train=1, num_test=0, in_plane_size=32, num_slices=10,
                        contrast=True)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints

    extract_fingerprints([977], num_processes=1)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "CT", "1": "PET"}
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    with pytest.raises(GTVPlansError, match="channel 1: 'PET' is not named as a CT") as error:
        nnUNetPlannerGTV25D(977)
    assert str(raw / "dataset.json") in str(error.value)


def _two_ct_patients(source: Path, count: int = 3) -> Path:
    """test_dataset_conversion's patients (ct.nii.gz, PTV70) with a contrast CT beside each CT."""
    _patients(source, count)
    for index in range(count):
        sitk.WriteImage(_image(np.full((8, 8, 8), 100 + index, np.int16)),
                        str(source / f"patient_{index}" / "ct_contrast.nii.gz"))
    return source


def test_gtv_dataset_writes_ct_channels_in_the_order_given(tmp_path, capsys):
    source = _two_ct_patients(tmp_path / "source")
    code = gtv_dataset([str(a) for a in ("-i", source, "-o", tmp_path / "raw", "-d", 903, "--num-test", 1,
                                         "--ct", "ct.nii.gz", "ct_contrast.nii.gz",
                                         "--ct-window", -1000, 1000, "--ct-window", -600, 600)])
    assert code == 0, capsys.readouterr().err
    dataset = tmp_path / "raw" / "Dataset903_HeadNeckPTV70"
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "ct_contrast"}
    assert meta["ct_windows_hu"] == {"0": [-1000.0, 1000.0], "1": [-600.0, 600.0]}
    for image in (dataset / "imagesTr").iterdir():
        patient, channel = image.name[:-len("_0000.nii.gz")], int(image.name[-len("0000.nii.gz"):-len(".nii.gz")])
        expected = (-1000 if channel == 0 else 100) + int(patient[-1])
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(image))).max() == expected
    assert len(list((dataset / "imagesTr").iterdir())) == 4 and len(list((dataset / "imagesTs").iterdir())) == 2
    assert json.loads((dataset / "split.json").read_text())["ct_files"] == ["ct.nii.gz", "ct_contrast.nii.gz"]


@pytest.mark.parametrize("damage, arguments, message", [
    ("grid", [], "patient_1/ct_contrast.nii.gz: not on the grid of the first CT: spacing"),
    ("missing", [], "patient_1/ct_contrast.nii.gz: missing"),
    (None, ["--ct-window", "-1000", "1000"], "one window per CT channel (2: ct.nii.gz, ct_contrast.nii.gz), got 1"),
    (None, ["--ct-window", "1", "0", "--ct-window", "0", "1"], "--ct-window for ct.nii.gz: a CT window needs finite"),
])
def test_gtv_dataset_refuses_bad_channels_and_writes_nothing(tmp_path, capsys, damage, arguments, message):
    source = _two_ct_patients(tmp_path / "source")
    contrast = source / "patient_1" / "ct_contrast.nii.gz"
    if damage == "grid":
        sitk.WriteImage(_image(np.zeros((8, 8, 8), np.int16), spacing=(2.0, 2.0, 2.5)), str(contrast))
    elif damage == "missing":
        contrast.unlink()
    code = gtv_dataset([str(a) for a in ("-i", source, "-o", tmp_path / "raw", "-d", 904, "--num-test", 1,
                                         "--ct", "ct.nii.gz", "ct_contrast.nii.gz", *arguments)])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "raw").exists() or not list((tmp_path / "raw").iterdir())


def _write(path: Path, spacing=(1.0, 1.0, 3.0)) -> None:
    sitk.WriteImage(_image(np.zeros((4, 5, 6), np.int16), spacing), str(path))


def test_predict_inputs_group_a_cases_channel_files(tmp_path):
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", "c_0001.nii.gz"):
        _write(tmp_path / name)
    cases = find_cases(tmp_path)
    assert [(c.case, [f.name for f in c.files]) for c in cases] == [
        ("a", ["a_0000.nii.gz", "a_0001.nii.gz"]), ("b", ["b_0000.nii.gz", "b_0001.nii.gz"]),
        ("c_0001", ["c_0001.nii.gz"])]  # without c_0000, c_0001 is a case of its own name, as for one channel
    check_inputs(cases)
    check_channels(cases[:2], ["CT", "CT_contrast"])
    with pytest.raises(InputError) as error:
        check_channels(cases, ["CT", "CT_contrast"])
    assert "case 'c_0001' lacks c_0001_0001.nii.gz: these models take 2 CT channels (_0000 CT, _0001 CT_contrast)" \
        in str(error.value)
    with pytest.raises(InputError, match="a_0001.nii.gz look like extra input channels of case 'a'; these models "
                                         "take 1 channel"):
        check_channels(cases, ["CT"])
    dicom = InputCase("p", tmp_path, series=object())
    with pytest.raises(InputError, match="a DICOM series is one CT, but these models take 2 CT channels"):
        check_channels([dicom], ["CT", "CT_contrast"])


def test_predict_inputs_refuse_channel_gaps_and_channels_off_the_grid(tmp_path):
    _write(tmp_path / "a_0000.nii.gz")
    _write(tmp_path / "a_0002.nii.gz")
    with pytest.raises(InputError, match="case 'a' has a_0000.nii.gz, a_0002.nii.gz but no a_0001"):
        find_cases(tmp_path)
    (tmp_path / "a_0002.nii.gz").unlink()
    _write(tmp_path / "a_0001.nii.gz", spacing=(1.0, 1.0, 2.5))
    with pytest.raises(InputError, match=r"a_0001.nii.gz: not on the grid of a_0000.nii.gz \(channel 0 of case 'a'\): "
                                         "spacing"):
        check_inputs(find_cases(tmp_path))
