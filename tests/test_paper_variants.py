"""Trainers of the paper's Tables 1-2: their networks, refusal of unfit plans, checkpoints through nnU-Net's
predictor and gtv-predict, and each variant end to end through nnUNetv2_train / nnUNetv2_predict / gtv-predict."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import DATASET_ID, DATASET_NAME, run_cli

VARIANTS = ("UNet3D", "VNet3D", "UNet25D", "UNet25D_PE", "UNet25D_PE_AG", "UNet25D_PE_AM")


def _plans(gtv_dataset) -> tuple[dict, dict]:
    folder = Path(gtv_dataset["dirs"]["nnUNet_preprocessed"]) / DATASET_NAME
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # set by nnU-Net's run_training before it builds a trainer
    return plans, json.loads((folder / "dataset.json").read_text())


def _count(network: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in network.modules())


def test_each_variant_builds_its_tables_network(gtv_dataset):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_gtv.network import AttentionGate, AttentionModule, GTV25DUNet, ProjectExcite
    from nnunetv2_gtv.network.vnet import VNet3D
    from nnunetv2_gtv.registration import PAPER_VARIANT_NAMES
    from nnunetv2_gtv.training import nnUNetTrainerGTV25D, paper_variants

    plans, _ = _plans(gtv_dataset)
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    defined = {name for name, obj in vars(paper_variants).items()
               if isinstance(obj, type) and name.startswith("nnUNetTrainerGTVLocal_")}
    assert defined == set(PAPER_VARIANT_NAMES)  # every trainer is registered with nnU-Net, nothing else

    networks = {v: getattr(paper_variants, f"nnUNetTrainerGTVLocal_{v}").build_network_architecture(
        manager, configuration, 1, 2, enable_deep_supervision=False) for v in VARIANTS}
    default = nnUNetTrainerGTV25D.nnUNetTrainerGTV25DLocal.build_network_architecture(manager, configuration, 1, 2,
                                                                                      False)
    counts = {v: (_count(n, AttentionModule), _count(n, AttentionGate), _count(n, ProjectExcite))
              for v, n in networks.items()}
    assert counts == {"UNet3D": (0, 0, 0), "VNet3D": (0, 0, 0), "UNet25D": (0, 0, 0), "UNet25D_PE": (0, 0, 8),
                      "UNet25D_PE_AG": (0, 4, 8), "UNet25D_PE_AM": (5, 0, 8)}
    kernels = {v: {m.kernel_size for m in n.modules() if isinstance(m, nn.Conv3d) and m.kernel_size != (1, 1, 1)
                   and m.stride == (1, 1, 1)} for v, n in networks.items()}
    assert kernels["UNet3D"] == {(3, 3, 3)}
    assert kernels["UNet25D"] == {(1, 3, 3), (3, 3, 3)}  # 3x3x3 only in the bottom block
    # V-Net: 5x5x5 convolutions, strided-convolution down-sampling (no max-pool), PReLU
    vnet = networks["VNet3D"]
    assert isinstance(vnet, VNet3D) and kernels["VNet3D"] == {(5, 5, 5)}
    assert _count(vnet, nn.MaxPool3d) == 0 and _count(vnet, nn.PReLU) > 0 and _count(vnet, nn.LeakyReLU) == 0
    assert {m.stride for m in vnet.modules() if isinstance(m, nn.Conv3d) and m.stride != (1, 1, 1)} == \
        {(1, 2, 2), (2, 2, 2)}
    assert vnet.required_divisor == (4, 16, 16)  # 16 slices halved twice, 64 pixels four times
    assert all(isinstance(n, GTV25DUNet) for v, n in networks.items() if v != "VNet3D")
    params = {v: sum(p.numel() for p in n.parameters()) for v, n in networks.items()}
    assert params["UNet25D_PE_AM"] == sum(p.numel() for p in default.parameters())  # = the paper's network
    assert params["UNet25D"] < params["UNet25D_PE"] < params["UNet25D_PE_AG"] < params["UNet25D_PE_AM"]
    for variant, network in networks.items():
        shape = (4, 16, 16) if variant == "VNet3D" else (2, 16, 16)  # small inputs the networks can pool: quick
        network.eval()
        with torch.no_grad():
            assert network(torch.randn(1, 1, *shape)).shape == (1, 2, *shape), variant
    vnet.decoder.deep_supervision = True  # nnU-Net's switch works on the V-Net too
    with torch.no_grad():
        assert [o.shape[2:] for o in vnet(torch.randn(1, 1, 4, 16, 16))] == [(4, 16, 16), (4, 8, 8), (4, 4, 4),
                                                                              (2, 2, 2)]


def test_variant_refuses_plans_whose_patch_it_cannot_pool(gtv_dataset, monkeypatch):
    from nnunetv2_gtv.planning.plans_check import GTVPlansError
    from nnunetv2_gtv.training.paper_variants import nnUNetTrainerGTVLocal_UNet25D, nnUNetTrainerGTVLocal_VNet3D

    for name, path in gtv_dataset["dirs"].items():
        monkeypatch.setenv(name, path)
    def start(trainer: type, patch: list[int]):
        plans, dataset_json = _plans(gtv_dataset)
        plans["configurations"]["3d_fullres"]["patch_size"] = patch
        return trainer(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))

    with pytest.raises(GTVPlansError, match=r"VNet3D.*patch \[6, 64, 64\].*z = 6 voxels cannot be halved"):
        start(nnUNetTrainerGTVLocal_VNet3D, [6, 64, 64])
    start(nnUNetTrainerGTVLocal_UNet25D, [6, 64, 64])  # pools in-plane only: fine
    with pytest.raises(GTVPlansError, match=r"UNet25D.*patch \[16, 60, 60\].*multiple of \[1, 8, 8\]"):
        start(nnUNetTrainerGTVLocal_UNet25D, [16, 60, 60])


def write_untrained_model(trainer_class: type, gtv_dataset, results: Path, monkeypatch,
                          edit=lambda network: None) -> Path:
    """A model folder as nnUNetv2_train leaves it (plans.json, dataset.json, fold_0/checkpoint_final.pth), from a
    freshly initialised trainer whose network ``edit`` may change first; returns the folder."""
    for name, path in {**gtv_dataset["dirs"], "nnUNet_results": str(results)}.items():
        monkeypatch.setenv(name, path)
    plans, dataset_json = _plans(gtv_dataset)
    trainer = trainer_class(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    with torch.no_grad():
        edit(trainer.network)
    folder = Path(trainer.output_folder_base)
    Path(trainer.output_folder).mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    for name, doc in (("plans.json", plans), ("dataset.json", dataset_json)):
        (folder / name).write_text(json.dumps(doc))
    return folder


def test_vnet_checkpoint_loads_through_nnunets_predictor_and_gtv_predict(gtv_dataset, tmp_path, monkeypatch):
    """A checkpoint written by the trainer is rebuilt from its trainer name alone, with the same weights."""
    from nnunetv2_gtv.inference.models import ModelSpec, load_model
    from nnunetv2_gtv.network.vnet import VNet3D
    from nnunetv2_gtv.training.paper_variants import nnUNetTrainerGTVLocal_VNet3D_smoke

    folder = write_untrained_model(nnUNetTrainerGTVLocal_VNet3D_smoke, gtv_dataset, tmp_path, monkeypatch)
    saved = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    model = load_model(ModelSpec("VNet", saved["trainer_name"], 0, folder), torch.device("cpu"), 0.5, False)
    network = model.predictor.network
    assert isinstance(network, VNet3D) and model.required_divisor == (4, 16, 16) and model.sampling_region == "local"
    network.load_state_dict(model.predictor.list_of_parameters[0])
    assert network.state_dict().keys() == saved["network_weights"].keys()
    assert all(torch.equal(value, saved["network_weights"][key]) for key, value in network.state_dict().items())
    shutil.rmtree(folder)


# the rows run end to end through the CLI: a plain 3D network and the paper's full 2.5D one. The other four share
# every line of trainer and predictor code with these and differ only in the network, whose construction (and,
# for the V-Net, checkpoint loading) the tests above check in-process; all six through the CLI cost ~10 minutes.
CLI_VARIANTS = ("UNet3D", "UNet25D_PE_AM")


@pytest.mark.slow
@pytest.mark.parametrize("variant", CLI_VARIANTS)
def test_variant_trains_and_predicts_through_the_stock_commands(gtv_dataset, tmp_path, variant):
    """A row of Tables 1-2 end to end on the CPU (its ``_smoke`` twin): nnUNetv2_train, then nnUNetv2_predict and
    gtv-predict on the held-out case, with no flag beyond the trainer's name. Both commands rebuild the
    checkpoint's own network: with the same tile, step and mirroring they give the same segmentation and
    probabilities within float32 round-off (different tile batching and memory layout). 30-80 s per row on 2 cores."""
    import numpy as np
    import SimpleITK as sitk

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_gtv.training import paper_variants

    env = {**gtv_dataset["env"], "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1"}
    images = Path(gtv_dataset["raw"]) / "imagesTs"
    plans, _ = _plans(gtv_dataset)
    manager = PlansManager(plans)
    same_settings = ["-step_size", "1", "--disable_tta"]
    trainer = f"nnUNetTrainerGTVLocal_{variant}_smoke"
    run_cli(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    model = Path(gtv_dataset["dirs"]["nnUNet_results"]) / DATASET_NAME / f"{trainer}__nnUNetPlans__3d_fullres"
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer
    network = getattr(paper_variants, trainer).build_network_architecture(
        manager, manager.get_configuration("3d_fullres"), 1, 2, False)
    assert checkpoint["network_weights"].keys() == network.state_dict().keys()  # its row's network was trained
    run_cli(["nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "stock"), "-d", str(DATASET_ID), "-c",
             "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu", "--save_probabilities", *same_settings,
             "-npp", "1", "-nps", "1"], env)
    run_cli(["gtv-predict", "-i", str(images), "-o", str(tmp_path / "gtv"), "-d", str(DATASET_ID), "-m",
             f"{trainer}:0", "-device", "cpu", "-precision", "float32", "--tile", "patch", "--no-region-restriction",
             *same_settings, "--save-model-predictions", "-np", "0", "--disable_progress_bar"], env)
    ours_folder = tmp_path / "gtv" / "model_predictions" / f"{trainer}__fold_0"
    for case in sorted(p.name.replace("_0000", "") for p in images.iterdir()):
        stock, ours = sitk.ReadImage(str(tmp_path / "stock" / case)), sitk.ReadImage(str(ours_folder / case))
        assert stock.GetSize() == ours.GetSize() == sitk.ReadImage(str(tmp_path / "gtv" / case)).GetSize()
        assert stock.GetSpacing() == pytest.approx(ours.GetSpacing())
        stock_mask, our_mask = sitk.GetArrayFromImage(stock) > 0, sitk.GetArrayFromImage(ours) > 0
        overlap = np.count_nonzero(stock_mask & our_mask)
        total = np.count_nonzero(stock_mask) + np.count_nonzero(our_mask)
        assert total == 0 or 2 * overlap / total >= 0.999
        npz = case.removesuffix(".nii.gz") + ".npz"
        # nnU-Net sums the tiles' logits in float16 (0.016 a unit at their size), ours in another order: where up
        # to 8 tiles overlap, a rare voxel's logits differ by up to 0.065 (test_predict), its probability by up to
        # a quarter of twice that (0.011 seen once); the mean stays strict
        ours_probabilities = np.load(ours_folder / npz)["probabilities"]
        stock_probabilities = np.load(tmp_path / "stock" / npz)["probabilities"]
        np.testing.assert_allclose(ours_probabilities, stock_probabilities, atol=0.035)
        assert np.mean(np.abs(ours_probabilities - stock_probabilities)) < 1e-4
