"""gtv-attention on a model whose attention maps are known: a constant map must come out, on the CT's grid."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATASET_ID
from test_paper_variants import write_untrained_model

BOTTOM_BLOCK = "encoder.stages.4.attention"  # the AM in the bottom block (1/8 in-plane resolution)


def _constant_map(network, block: str, value: float) -> None:
    """Zero the block's last attention convolution and set its bias so that sigmoid gives ``value`` everywhere."""
    conv = network.get_submodule(block).attention_map[2]
    conv.weight.zero_()
    conv.bias.fill_(math.log(value / (1 - value)))


def test_attention_map_of_a_block_is_stitched_onto_the_ct_grid(gtv_dataset, tmp_path, monkeypatch, capsys):
    from nnunetv2_gtv.cli.attention import main
    from nnunetv2_gtv.training.short_runs import nnUNetTrainerGTV25DLocal_smoke
    from nnunetv2_gtv.training.paper_variants import nnUNetTrainerGTVLocal_UNet25D_smoke

    results = tmp_path / "results"
    write_untrained_model(nnUNetTrainerGTV25DLocal_smoke, gtv_dataset, results, monkeypatch,
                          lambda network: _constant_map(network, BOTTOM_BLOCK, 0.25))
    ct_path = next((Path(gtv_dataset["raw"]) / "imagesTs").iterdir())
    case = ct_path.name.replace("_0000.nii.gz", "")
    common = ["-d", str(DATASET_ID), "-device", "cpu", "--disable_tta", "-precision", "float32"]
    out = tmp_path / "out"
    assert main(["-i", str(ct_path), "-o", str(out), "-m", "Local:0", "-tr_suffix", "_smoke", "--block",
                 BOTTOM_BLOCK, "--no-region-restriction", *common]) == 0
    attention, ct = sitk.ReadImage(str(out / f"{case}_attention.nii.gz")), sitk.ReadImage(str(ct_path))
    assert attention.GetSize() == ct.GetSize() and attention.GetOrigin() == pytest.approx(ct.GetOrigin())
    assert attention.GetSpacing() == pytest.approx(ct.GetSpacing())
    assert attention.GetDirection() == pytest.approx(ct.GetDirection())
    # sigmoid(log(1/3)) = 0.25 in every tile, at the block's resolution: stitched and resampled it stays 0.25
    assert np.allclose(sitk.GetArrayFromImage(attention), 0.25, atol=1e-5)
    segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
    assert segmentation.shape == sitk.GetArrayFromImage(ct).shape and set(np.unique(segmentation)) <= {0, 1}
    assert (out / f"{case}_attention.png").read_bytes()[:4] == b"\x89PNG"

    # the default block is the last decoder AM; with the region restriction the map is 0 outside the head region
    out = tmp_path / "out_region"
    assert main(["-i", str(ct_path), "-o", str(out), "-m", "Local:0", "-tr_suffix", "_smoke", *common]) == 0
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_attention.nii.gz")))
    assert values.min() == 0 and 0 < values.max() <= 1 and not np.allclose(values, 0.25, atol=1e-3)

    capsys.readouterr()
    assert main(["-i", str(ct_path), "-o", str(tmp_path / "x"), "-m", "Local:0", "-tr_suffix", "_smoke",
                 "--block", "decoder.stages.9.attention", *common]) == 2
    err = capsys.readouterr().err
    assert "no attention block 'decoder.stages.9.attention'" in err and BOTTOM_BLOCK in err
    write_untrained_model(nnUNetTrainerGTVLocal_UNet25D_smoke, gtv_dataset, results, monkeypatch)
    assert main(["-i", str(ct_path), "-o", str(tmp_path / "y"), "-m", "nnUNetTrainerGTVLocal_UNet25D_smoke:0",
                 *common]) == 2
    assert "has no attention module (AM) or gate (AG)" in capsys.readouterr().err
