"""The three sampling trainers: recipe, region-restricted sampling, and real nnU-Net CLI runs on the CPU."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_gtv.training.lr_schedule import IterationStepLR

from conftest import DATASET_NAME


def test_lr_decays_by_0_9_every_10000_iterations():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = IterationStepLR(optimizer, 1e-4, iterations_per_epoch=250)
    lrs = {}
    for epoch in (0, 39, 40, 79, 80, 67):
        scheduler.step(epoch)
        lrs[epoch] = optimizer.param_groups[0]["lr"]
    assert lrs[0] == lrs[39] == pytest.approx(1e-4)  # 39 * 250 = 9750 iterations
    assert lrs[40] == lrs[79] == pytest.approx(0.9e-4)  # 10000 iterations
    assert lrs[80] == pytest.approx(0.81e-4)


def test_stock_plans_are_refused_by_the_trainer():
    from nnunetv2_gtv.planning.plans_check import GTVPlansError
    from nnunetv2_gtv.training.nnUNetTrainerGTV25D import nnUNetTrainerGTV25DLocal

    plans = {"plans_name": "nnUNetPlans", "experiment_planner_used": "ExperimentPlanner", "configurations": {}}
    with pytest.raises(GTVPlansError, match="nnUNetv2_plan_and_preprocess -d DATASET_ID -pl nnUNetPlannerGTV25D"):
        nnUNetTrainerGTV25DLocal(plans, "3d_fullres", 0, {}, torch.device("cpu"))


def test_trainer_recipe_follows_the_paper(gtv_dataset, monkeypatch):
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from nnunetv2_gtv.training.nnUNetTrainerGTV25D import nnUNetTrainerGTV25DMiddle

    for name, path in gtv_dataset["dirs"].items():
        monkeypatch.setenv(name, path)
    folder = Path(gtv_dataset["dirs"]["nnUNet_preprocessed"]) / DATASET_NAME
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans["continue_training"] = False  # set by nnU-Net's run_training before it builds a trainer
    trainer = nnUNetTrainerGTV25DMiddle(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["weight_decay"] == 1e-5
    assert isinstance(scheduler, IterationStepLR) and scheduler.step_iterations == 10_000 and scheduler.gamma == 0.9
    assert trainer.batch_size == 16 and not trainer.enable_deep_supervision
    assert trainer.num_epochs * trainer.num_iterations_per_epoch == 17_000
    assert isinstance(trainer.loss, MemoryEfficientSoftDiceLoss) and not trainer.loss.do_bg
    assert type(trainer.network).__name__ == "GTV25DUNet"
    output = trainer.network(torch.zeros(1, 1, 16, 64, 64))
    assert isinstance(output, torch.Tensor) and output.shape == (1, 2, 16, 64, 64)


def test_end_of_training_validation_batches_tiles_at_the_recipes_step():
    import importlib

    from nnunetv2_gtv.inference.sliding_window import BatchedTilePredictor, batched_tiles_in_nnunet_validation
    from nnunetv2_gtv.training.cpu_recipes import nnUNetTrainerGTV25DLocal_cpu
    from nnunetv2_gtv.training.nnUNetTrainerGTV25D import nnUNetTrainerGTV25DLocal
    from nnunetv2_gtv.training.short_runs import nnUNetTrainerGTV25DLocal_smoke

    module = importlib.import_module("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")
    original = module.nnUNetPredictor
    with batched_tiles_in_nnunet_validation(1.0, 3):  # what perform_actual_validation builds, as it builds it
        predictor = module.nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                           perform_everything_on_device=True, device=torch.device("cpu"),
                                           verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    assert isinstance(predictor, BatchedTilePredictor)
    assert predictor.tile_step_size == 1.0 and predictor.tiles_per_batch == 3 and predictor.use_mirroring
    assert module.nnUNetPredictor is original
    assert nnUNetTrainerGTV25DLocal.validation_step_size == 0.5  # nnU-Net's
    assert nnUNetTrainerGTV25DLocal_cpu.validation_step_size == nnUNetTrainerGTV25DLocal_smoke.validation_step_size \
        == 1.0


class _RecordingLoader:
    """nnU-Net's loader, recording every patch box it draws (the class is built lazily: nnunetv2 import)."""

    @staticmethod
    def make(*args, **kwargs):
        from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

        class Recording(nnUNetDataLoader):
            def get_bbox(self, data_shape, force_fg, class_locations, *rest, **kw):
                lower, upper = super().get_bbox(data_shape, force_fg, class_locations, *rest, **kw)
                self.draws.append((np.array(lower), np.array(upper), force_fg, np.array(data_shape)))
                return lower, upper

        loader = Recording(*args, **kwargs)
        loader.draws = []
        return loader


@pytest.mark.parametrize("region", ["local", "middle"])
def test_patches_stay_inside_the_region_and_foreground_is_oversampled(gtv_dataset, region):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunetv2_gtv.training.region_dataset import RegionCroppedDataset
    from nnunetv2_gtv.training.sampling_regions import training_region_boxes

    folder = gtv_dataset["data"]
    plans = json.loads((folder.parent / "nnUNetPlans.json").read_text())
    dataset = infer_dataset_class(str(folder))(str(folder))
    boxes = training_region_boxes(str(folder), dataset, plans, [3.0, 1.0, 1.0], region, log=lambda _: None)
    cropped = RegionCroppedDataset(dataset, boxes)
    patch = (16, 64, 64)
    loader = _RecordingLoader.make(cropped, 16, patch, patch, LabelManager({"background": 0, "GTV": 1}, None),
                                   oversample_foreground_percent=0.33, sampling_probabilities=None, pad_sides=None,
                                   probabilistic_oversampling=False)
    batches = 20
    foreground_patches = forced = 0
    for _ in range(batches):
        batch = loader.generate_train_batch()
        foreground_patches += int(sum((seg > 0).any() for seg in batch["target"]))
    for identifier, box in boxes.items():  # what the loader sees of a case is exactly its region
        assert cropped.load_case(identifier)[0].shape[1:] == tuple(stop - start for start, stop in box)
    for lower, upper, force_fg, cropped_shape in loader.draws:
        centre = (lower + upper) / 2
        assert np.all(centre >= 0) and np.all(centre <= cropped_shape), (lower, upper, cropped_shape)
        forced += force_fg
    draws = len(loader.draws)
    assert draws == 16 * batches
    # nnU-Net forces the last round(16 * 0.67) = 11th..16th sample of each batch onto foreground: 5 of 16 = 31.25 %
    assert forced / draws == pytest.approx(5 / 16)
    assert foreground_patches / draws >= 5 / 16 - 0.02  # forced patches hold foreground, random ones sometimes do


@pytest.mark.slow
def test_each_trainer_trains_validates_and_saves_through_the_stock_cli(trained_models):
    for scale, model in trained_models.items():
        fold = model / "fold_0"
        assert (fold / "checkpoint_final.pth").is_file()
        assert (fold / "validation" / "summary.json").is_file()
        assert list((fold / "validation").glob("*.npz")), "--npz validation probabilities missing"
        checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert checkpoint["trainer_name"] == f"nnUNetTrainerGTV25D{scale}_smoke"
        log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
        assert "memory: freed tensors stay in the process for reuse" in log
        if scale != "Global":
            assert f"training on the '{scale.lower()}' region" in log and "regions case_" in log
        else:
            assert "training on the" not in log


def _middle_cpu_real_ct_trainer(gtv_dataset):
    """A fresh nnUNetTrainerGTV25DMiddle_cpuRealCT on the session's synthetic dataset (not initialised)."""
    from nnunetv2_gtv.training.cpu_recipes import nnUNetTrainerGTV25DMiddle_cpuRealCT

    folder = Path(gtv_dataset["dirs"]["nnUNet_preprocessed"]) / DATASET_NAME
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    return nnUNetTrainerGTV25DMiddle_cpuRealCT(plans, "3d_fullres", 0,
                                               json.loads((folder / "dataset.json").read_text()), torch.device("cpu"))


def test_cpu_recipe_is_seeded_and_trains_with_dice_ce_and_poly_decay(gtv_dataset, monkeypatch):
    """The demo's recipe: the same seed gives the same initial network and the same augmented batches from nnU-Net's
    worker process, another seed others; nnU-Net's Dice + CE, poly decay from 1e-3, a third of each batch on
    foreground, 300 iterations (Global 600)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    from nnunetv2_gtv.training.cpu_recipes import nnUNetTrainerGTV25DGlobal_cpu, nnUNetTrainerGTV25DLocal_cpu

    for name, path in gtv_dataset["dirs"].items():
        monkeypatch.setenv(name, path)
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    folder = Path(gtv_dataset["dirs"]["nnUNet_preprocessed"]) / DATASET_NAME
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # set by nnU-Net's run_training before it builds a trainer
    dataset_json = json.loads((folder / "dataset.json").read_text())

    def seeded(seed):
        trainer = nnUNetTrainerGTV25DLocal_cpu(dict(plans), "3d_fullres", 0, dataset_json, torch.device("cpu"))
        trainer.training_seed = seed
        trainer.seed_training()
        trainer.initialize()
        return trainer

    first, again, other = seeded(0), seeded(0), seeded(1)
    weights = [t.network.state_dict() for t in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert isinstance(first.loss, DC_and_CE_loss) and isinstance(first.lr_scheduler, PolyLRScheduler)
    assert first.optimizer.defaults["lr"] == 1e-3 and first.oversample_foreground_percent == 0.33
    assert first.batch_size == 4 and first.num_epochs * first.num_iterations_per_epoch == 300
    global_model = nnUNetTrainerGTV25DGlobal_cpu(dict(plans), "3d_fullres", 0, dataset_json, torch.device("cpu"))
    assert global_model.num_epochs * global_model.num_iterations_per_epoch == 600  # the demo-recipe study's choice
    batches = []
    for trainer in (first, again, other):  # one augmentation worker: batches arrive in the order drawn
        train, validation = trainer.get_dataloaders()
        batches.append(next(train)["data"])
        assert train.seeds == [trainer.training_seed + 1000] and validation.seeds == [trainer.training_seed + 2000]
        for loader in (train, validation):
            loader._finish()
    assert torch.equal(batches[0], batches[1]) and not torch.equal(batches[0], batches[2])


def test_cpu_real_ct_recipe_differs_from_the_paper_only_where_documented(gtv_dataset, monkeypatch, tmp_path):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    for name, path in gtv_dataset["dirs"].items():
        monkeypatch.setenv(name, path)
    trainer = _middle_cpu_real_ct_trainer(gtv_dataset)
    trainer.initialize()
    assert isinstance(trainer.loss, DC_and_CE_loss) and isinstance(trainer.lr_scheduler, PolyLRScheduler)
    assert isinstance(trainer.optimizer, torch.optim.Adam) and trainer.optimizer.defaults["lr"] == 1e-3
    assert trainer.batch_size == 8 and trainer.oversample_foreground_percent == 0.33
    assert trainer.num_epochs * trainer.num_iterations_per_epoch == 500
    assert type(trainer.network).__name__ == "GTV25DUNet" and trainer.sampling_region == "middle"

    # weight snapshots every 2 epochs: what gtv-predict -chk loads, without the optimizer state
    trainer.output_folder = str(tmp_path)
    monkeypatch.setattr(nnUNetTrainer, "on_epoch_end", lambda self: setattr(self, "current_epoch",
                                                                             self.current_epoch + 1))
    for _ in range(5):
        trainer.on_epoch_end()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch_2.pth", "checkpoint_epoch_4.pth"]
    snapshot = torch.load(tmp_path / "checkpoint_epoch_4.pth", weights_only=False)
    assert snapshot["trainer_name"] == "nnUNetTrainerGTV25DMiddle_cpuRealCT" and "optimizer_state" not in snapshot
    for key, value in trainer.network.state_dict().items():
        assert torch.equal(snapshot["network_weights"][key], value)


def test_cpu_real_ct_long_recipe_is_the_recipe_over_1400_bfloat16_iterations(gtv_dataset, monkeypatch):
    """``_cpuRealCTLong``: the ``_cpuRealCT`` recipe with 1400 iterations (poly decay over all 28 epochs) and its
    training step under bfloat16; nothing else differs, and each scale keeps its sampling region."""
    from nnunetv2_gtv.training import cpu_recipes

    for name, path in gtv_dataset["dirs"].items():
        monkeypatch.setenv(name, path)
    recipe = _middle_cpu_real_ct_trainer(gtv_dataset)
    shared = ("initial_lr", "num_iterations_per_epoch", "num_val_iterations_per_epoch",
              "oversample_foreground_percent", "cpu_batch_size", "loss_kind", "lr_schedule", "training_seed",
              "snapshot_every_epochs", "validation_step_size")
    for scale in ("Local", "Middle", "Global"):
        trainer = getattr(cpu_recipes, f"nnUNetTrainerGTV25D{scale}_cpuRealCTLong")(
            {**recipe.plans_manager.plans, "continue_training": False}, "3d_fullres", 0, recipe.dataset_json,
            torch.device("cpu"))
        assert trainer.num_epochs * trainer.num_iterations_per_epoch == 1400
        assert trainer.training_precision == "bfloat16" and recipe.training_precision == "float32"
        assert {a: getattr(trainer, a) for a in shared} == {a: getattr(recipe, a) for a in shared}
        assert trainer.sampling_region == scale.lower()
    trainer.initialize()
    assert trainer.lr_scheduler.max_steps == 28 and trainer.batch_size == 8


def test_cpu_real_ct_study_knobs_reach_training_and_the_saved_plans(gtv_dataset, monkeypatch, tmp_path):
    """The recipe study's mirror_axes and patch_size_zyx (benchmarks/recipe_study.py, set on the instance):
    augmentation and test-time mirroring follow the axes, a patch of its own stays in-plane augmented and goes into
    the plans the model folder keeps for inference."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from recipe_study import apply_study_variant

    for name, path in {**gtv_dataset["dirs"], "nnUNet_results": str(tmp_path)}.items():
        monkeypatch.setenv(name, path)
    trainer = _middle_cpu_real_ct_trainer(gtv_dataset)
    rotation, dummy_2d, initial, mirror = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror is None and trainer.inference_allowed_mirroring_axes is None and dummy_2d and initial[0] == 16
    apply_study_variant(trainer, {"mirror_axes": (2,), "patch_size_zyx": (32, 64, 64)})
    trainer.output_folder_base, trainer.output_folder = str(tmp_path), str(tmp_path / "fold_0")
    trainer.on_train_start()
    try:
        assert trainer.configuration_manager.patch_size == [32, 64, 64]
        saved = json.loads((tmp_path / "plans.json").read_text())
        assert saved["configurations"]["3d_fullres"]["patch_size"] == [32, 64, 64]
        rotation, dummy_2d, initial, mirror = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        assert dummy_2d and initial[0] == 32 and rotation == (-math.pi, math.pi)  # nnU-Net alone would go 3D here
        assert mirror == (2,) and trainer.inference_allowed_mirroring_axes == (2,)
        data = next(trainer.dataloader_train)["data"]
        assert tuple(data.shape[2:]) == (32, 64, 64)
    finally:
        trainer.on_train_end()


def test_cpu_real_ct_bfloat16_knob_autocasts_the_training_step_only(gtv_dataset, monkeypatch):
    """training_precision "bfloat16" (the recipe study's row): the network runs under CPU bfloat16 autocast inside
    the training step, float32 by default, and the autocast ends with the step."""
    for name, path in gtv_dataset["dirs"].items():
        monkeypatch.setenv(name, path)
    trainer = _middle_cpu_real_ct_trainer(gtv_dataset)
    trainer.initialize()
    forward, seen = trainer.network.forward, []

    def recording_forward(x):
        output = forward(x)
        seen.append((torch.is_autocast_enabled("cpu"), output.dtype))
        return output

    monkeypatch.setattr(trainer.network, "forward", recording_forward)
    generator = torch.Generator().manual_seed(0)
    batch = {"data": torch.randn(2, 1, 16, 64, 64, generator=generator),
             "target": torch.randint(0, 2, (2, 1, 16, 64, 64), generator=generator).float()}
    for precision in ("float32", "bfloat16"):
        trainer.training_precision = precision
        assert np.isfinite(trainer.train_step(batch)["loss"])
    assert seen == [(False, torch.float32), (True, torch.bfloat16)]
    assert not torch.is_autocast_enabled("cpu")


def test_wall_clock_budget_stretches_the_schedule_and_stops_in_time(monkeypatch):
    from types import SimpleNamespace

    from nnunetv2_gtv.training import budget_baselines

    class Loop:
        """The parts of nnU-Net's trainer the budget touches, with an epoch of 60 s."""

        def __init__(self, *args):
            self.current_epoch, self.num_epochs, self.ended = 0, 1000, False
            self.lr_scheduler = SimpleNamespace(max_steps=1000)
            self.messages, self.schedule = [], []

        def on_train_start(self):
            pass

        def on_epoch_end(self):
            self.current_epoch += 1

        def print_to_log_file(self, *text):
            self.messages.append(" ".join(map(str, text)))

        def run_training(self):
            self.on_train_start()
            for _ in range(self.num_epochs):
                clock[0] += 60.0
                self.on_epoch_end()
                self.schedule.append(self.lr_scheduler.max_steps)
            self.on_train_end()

        def on_train_end(self):
            self.ended = True

    class Budgeted(budget_baselines._WallClockBudget, Loop):
        budget_minutes = 3.5

    clock = [100.0]
    monkeypatch.setattr(budget_baselines.time, "monotonic", lambda: clock[0])
    trainer = Budgeted({}, "3d_fullres", 0, {}, torch.device("cpu"))
    assert trainer.num_iterations_per_epoch == 5 and trainer.num_val_iterations_per_epoch == 1
    trainer.run_training()
    assert trainer.ended and trainer.current_epoch == 3  # a fourth epoch would end after 4 of the 3.5 minutes
    assert trainer.num_epochs == 3 and trainer.schedule == [3, 3]  # the poly schedule spans the 3 epochs
    assert "wall-clock budget spent after 3 epochs (3.0 min)" in trainer.messages[-1]
