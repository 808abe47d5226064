"""A plain + contrast-enhanced CT dataset end to end through the public commands: gtv-synthetic --contrast ->
nnU-Net's planning with our planner -> a sampling trainer (nnUNetv2_train) -> gtv-predict -> gtv-evaluate; a case
without its contrast CT is refused by name, with nothing written."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import SimpleITK as sitk
import torch

from conftest import clean_env, run_cli

DATASET_ID = 974
DATASET = f"Dataset{DATASET_ID}_Contrast"
TRAINER = "nnUNetTrainerGTV25DLocal_smoke"


@pytest.mark.slow
def test_two_ct_channels_through_nnunet_commands_predict_and_evaluate(tmp_path):
    dirs = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for path in dirs.values():
        path.mkdir()
    env = clean_env(**{k: str(v) for k, v in dirs.items()}, nnUNet_n_proc_DA="0")
    run_cli(["gtv-synthetic", "-d", str(DATASET_ID), "-n", "Contrast", "--num-train", "5", "--num-test", "1",
             "--size", "64", "--slices", "24", "--in-plane-mm", "1.1", "1.3", "--orientations", "mixed",
             "--contrast"], env)
    raw = dirs["nnUNet_raw"] / DATASET
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-pl", "nnUNetPlannerGTV25D", "-c", "3d_fullres",
             "-np", "1"], env)
    plans = json.loads((dirs["nnUNet_preprocessed"] / DATASET / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"] * 2
    run_cli(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], env)
    fold = dirs["nnUNet_results"] / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "regions case_" in log  # the Local region, found on channel 0
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    first_conv = next(w for name, w in weights.items() if name.endswith(".weight") and w.dim() == 5)
    assert first_conv.shape[1] == 2  # the network reads both CTs

    out = tmp_path / "out"
    run_cli(["gtv-predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-m", f"{TRAINER}:0",
             "-device", "cpu", "-np", "0"], env)
    case = "case_005"
    fused, plain = sitk.ReadImage(str(out / f"{case}.nii.gz")), sitk.ReadImage(str(raw / "imagesTs" /
                                                                                  f"{case}_0000.nii.gz"))
    assert fused.GetSize() == plain.GetSize() and fused.GetDirection() == plain.GetDirection()
    assert json.loads((out / "summary.json").read_text())["cases"][0]["case"] == case
    run_cli(["gtv-evaluate", "-p", str(out), "-r", str(raw / "labelsTs"), "--images", str(raw / "imagesTs"),
             "-o", str(tmp_path / "evaluation")], env)
    with open(tmp_path / "evaluation" / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["source"] == "fused"]
    assert [r["case"] for r in rows] == [case] and 0.0 <= float(rows[0]["dice"]) <= 1.0

    plain_only = tmp_path / "plain_only"
    plain_only.mkdir()
    shutil.copy(raw / "imagesTs" / f"{case}_0000.nii.gz", plain_only)
    refused = run_cli(["gtv-predict", "-i", str(plain_only), "-o", str(tmp_path / "refused"), "-d", str(DATASET_ID),
                       "-m", f"{TRAINER}:0", "-device", "cpu"], env, check=False)
    assert refused.returncode == 2
    assert f"case '{case}' lacks {case}_0001.nii.gz: these models take 2 CT channels" in refused.stderr
    assert not (tmp_path / "refused").exists() and sorted(p.name for p in plain_only.iterdir()) == [
        f"{case}_0000.nii.gz"]
