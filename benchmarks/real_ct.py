"""Does it learn on real CT? PTV70 on 76 real head-and-neck CTs at a CPU budget, side by side with stock nnU-Net.

Stages (each reuses what an earlier run with the same ``--work`` finished; ``--stages`` picks some):

1. ``dataset``: ``gtv-dataset`` turns ``--source`` (one folder per patient: ct.nii.gz + PTV70.nii.gz) into
   Dataset920 with 60 training and 16 held-out test CTs (split.json); nothing below looks at the 16;
2. ``plan``: ``nnUNetv2_plan_and_preprocess`` with ``nnUNetPlannerGTV25D`` at 3 x 4 x 4 mm (plans
   ``nnUNetPlansGTV25D_3x4x4``), and stock nnU-Net's own plans (``nnUNetPlans``: 2d and 3d_fullres);
3. ``study``: the recipe study on fold 0 of the 60 training CTs (48 train / 12 validation, nnU-Net's split):
   Middle models trained in this process for ``--study-iterations`` iterations, one per ``STUDY`` variant (loss,
   foreground share, lr schedule, mirroring, a 32-slice patch, no forced foreground, a bfloat16 training step,
   a whole-neck patch on a 6 x 8 x 8 mm grid, ``STUDY_GRIDS``, planned here when needed),
   each scored on the 12 validation CTs (``--study-folds``: on more folds, each model scored on its own fold's
   validation CTs and the folds pooled); then the inference study (``INFERENCE_STUDY``: sliding-window step, slab
   tiles) on the base variant's model;
4. ``train``: through ``nnUNetv2_train``: ours (``_cpuRealCT``, Local, Middle, Global on ``--our-folds``, by default 0
   and 1: the paper's six) and stock nnU-Net (``nnUNetTrainer_20min``, the budget of our training loop; 2d and
   3d_fullres, fold 0); wall time of each command recorded;
5. ``curves``: weight snapshots (every 2 epochs) of the fold-0 models of ``--curve-scales`` scored on the 12
   validation CTs of fold 0: Dice against iterations; then the fusion rule (``FUSION_RULES``) chosen with the three
   fold-0 models on the same 12 CTs; the three models of each other fold of ``--our-folds`` fused with that rule on
   their own fold's 12 validation CTs (a second estimate, nothing chosen on it), and every fold's fused models
   pooled over their own validation CTs (the out-of-fold estimate; with the predicted volumes against the
   reference's and VVC against 1 - Dice), beside a population prior that reads no tumour from the CT (the training
   targets' mean placed by anatomical landmarks);
6. ``test``: the 16 test CTs with ``gtv-predict`` (the models of ``--our-folds`` fused with the chosen rule, each
   model's own output kept; with more than fold 0, the three fold-0 models also fused from those outputs) and with
   ``nnUNetv2_predict`` for the stock models (nnU-Net's step 0.5, no test-time mirroring, as ours), timed per case;
   and the population prior of the 60 training targets on each test CT, in the CT's geometry (a row of the report);
7. ``report``: ``gtv-evaluate`` on that ensemble's output (error rate per vote-entropy level, VVC against 1 - Dice,
   review flags), ``gtv-compare`` of every row against it, the learning-curve plot and overlays of the best,
   median and worst test case, a summary in ``DIR/real_ct.json`` and markdown on stdout.

    python benchmarks/real_ct.py --work DIR [--source ../shared/data/OpenKBP_anatomy] [--stages ...]

Machine facts (cores, load average at the start and end of every stage) go into the log and the JSON.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

from common import configure_environment, load_average, logger, nnunet_command, run_logged
from recipe_study import apply_study_variant

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "OpenKBP_anatomy"
DATASET_ID, DATASET = 920, "Dataset920_HeadNeckPTV70"
OUR_PLANS, OUR_SPACING = "nnUNetPlansGTV25D_3x4x4", ("3", "4", "4")
SCALES = ("Local", "Middle", "Global")
OUR_TRAINER = "nnUNetTrainerGTV25D{scale}_cpuRealCT"
STOCK_TRAINER, STOCK_CONFIGURATIONS = "nnUNetTrainer_20min", ("2d", "3d_fullres")
FOLD = 0  # the split of the comparison: stock nnU-Net's fold, the learning curve, the choice of fusion rule
OUR_FOLDS = (0, 1)  # the paper's six models: every scale on folds 0 and 1 (--our-folds 0: the three of fold 0)
PRIOR_FOLDER, PRIOR_ROW = "population_prior", "population prior (no tumour read)"  # a test row beside the models
STAGES = ("dataset", "plan", "study", "train", "curves", "test", "report")
# recipe study: variant -> attributes of the _cpuRealCT trainer set on the instance (Adam from 1e-3, batch 8; what a
# variant does not name stays as the recipe has it). The scores of a variant with mirror_axes use test-time mirroring.
BASE = {"loss_kind": "dice_ce", "oversample_foreground_percent": 0.33, "lr_schedule": "poly"}
STUDY = {
    "Dice, 50 % foreground, constant lr (the _cpu recipe)":
        {"loss_kind": "dice", "oversample_foreground_percent": 0.5, "lr_schedule": "step"},
    "Dice + CE, 50 % foreground, constant lr": {**BASE, "oversample_foreground_percent": 0.5, "lr_schedule": "step"},
    "Dice + CE, 33 % foreground, constant lr": {**BASE, "lr_schedule": "step"},
    "Dice + CE, 33 % foreground, poly lr": dict(BASE),
    "Dice + CE, 33 % foreground, poly lr, left-right mirroring": {**BASE, "mirror_axes": (2,)},
    "Dice + CE, 33 % foreground, poly lr, patch 32 x 64 x 64": {**BASE, "patch_size_zyx": (32, 64, 64)},
    "Dice + CE, no forced foreground, poly lr": {**BASE, "oversample_foreground_percent": 0.0},
    "Dice + CE, 33 % foreground, poly lr, bfloat16 training step": {**BASE, "training_precision": "bfloat16"},
    "Dice + CE, 33 % foreground, poly lr, 6 x 8 x 8 mm grid, patch 32 x 48 x 48":
        {**BASE, "patch_size_zyx": (32, 48, 48)},
}
# study variants planned on a grid of their own (plans name, spacing z y x in mm); the others use OUR_PLANS. The
# 6 x 8 x 8 mm patch of 32 x 48 x 48 voxels (192 x 384 x 384 mm) holds the whole neck, for about the recipe's
# voxels per patch (74 k against 66 k): whole-neck context at the recipe's cost, the first stage of a cascade.
STUDY_GRIDS = {"Dice + CE, 33 % foreground, poly lr, 6 x 8 x 8 mm grid, patch 32 x 48 x 48":
               ("nnUNetPlansGTV25D_6x8x8", ("6", "8", "8"))}
STUDY_BASE = "Dice + CE, 33 % foreground, poly lr"  # the variant whose model the inference study scores
# inference study: gtv-predict options scored on the STUDY_BASE model; INFERENCE, chosen there, scores everything else
# (--enable_tta mirrors only where the model's trainer allows it: its mirror_axes)
INFERENCE_STUDY = {
    "patch, step 1 (gtv-predict's CPU default)": ["-step_size", "1"],
    "patch, step 0.5 (nnU-Net's default)": ["-step_size", "0.5"],
    "patch, step 0.25": ["-step_size", "0.25"],
    "slab (16 slices, whole in-plane extent), step 1": ["--tile", "slab", "-step_size", "1"],
}
INFERENCE = INFERENCE_STUDY["patch, step 0.5 (nnU-Net's default)"] + ["--enable_tta"]
STUDY_SCALE = "Middle"  # the region that holds the PTV70 of 46 of the 48 training CTs of fold 0
# fusion rules tried on fold 0's validation CTs with the three fold-0 models (gtv-uncertainty over their saved
# outputs); the best one fuses the test CTs. Local sees only the head region and gives background below it, where
# most of a PTV70 lies: a rule may weigh the Local models' probabilities less (every model still votes once in the
# entropy and VVC).
FUSION_RULES = {
    "equal weights, largest component (gtv-predict's default)": {},
    "equal weights, every component": {"keep_all_components": True},
    "Local weight 0.5, largest component": {"local_weight": 0.5},
    "Local weight 0.25, largest component": {"local_weight": 0.25},
}


log = logger("real_ct")
load = load_average


def run(command: list[str], log_file: Path, env: dict | None = None) -> float:
    return run_logged(command, log_file, env, log)


class Record:
    """``DIR/real_ct.json``: what every stage measured, kept across reruns."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")


def stage_dataset(source: Path, dirs: dict) -> None:
    if (dirs["nnUNet_raw"] / DATASET / "dataset.json").is_file():
        return
    run([nnunet_command("gtv-dataset"), "-i", str(source), "-o", str(dirs["nnUNet_raw"]), "-d", str(DATASET_ID)],
        dirs["logs"] / "gtv-dataset.log")


def plan_ours(dirs: dict, plans: str = OUR_PLANS, spacing: Sequence[str] = OUR_SPACING) -> None:
    """nnUNetPlannerGTV25D's plans and preprocessed data on the grid ``spacing`` (z y x, mm), unless done."""
    if not (dirs["nnUNet_preprocessed"] / DATASET / f"{plans}_3d_fullres").is_dir():
        log_name = "plan_ours.log" if plans == OUR_PLANS else f"plan_{plans}.log"
        run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-pl", "nnUNetPlannerGTV25D",
             "-c", "3d_fullres", "-np", "2", "-overwrite_target_spacing", *spacing,
             "-overwrite_plans_name", plans, "--verify_dataset_integrity"], dirs["logs"] / log_name)


def stage_plan(dirs: dict) -> None:
    folder = dirs["nnUNet_preprocessed"] / DATASET
    plan_ours(dirs)
    if not all((folder / f"nnUNetPlans_{c}").is_dir() for c in STOCK_CONFIGURATIONS):
        # nnU-Net's planner sizes its networks with torch threads = nnUNet_n_proc_DA, which must not be 0 there
        run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", *STOCK_CONFIGURATIONS,
             "-np", "2"], dirs["logs"] / "plan_stock.log", dict(os.environ, nnUNet_n_proc_DA="2"))


def fusion_options(rule: str, specs: Sequence[str]) -> list[str]:
    """gtv-predict / gtv-uncertainty options of a FUSION_RULES rule for the models ``specs`` (SCALE:FOLD)."""
    settings = FUSION_RULES[rule]
    options = ["--keep-all-components"] if settings.get("keep_all_components") else []
    if "local_weight" in settings:
        options += ["--weights", *[str(settings["local_weight"]) if spec.startswith("Local:") else "1"
                                   for spec in specs]]
    return options


def our_specs(folds: Sequence[int]) -> list[str]:
    """Our models as gtv-predict names them (SCALE:FOLD), in its default order."""
    return [f"{scale}:{fold}" for scale in SCALES for fold in folds]


def validation_cases(dirs: dict, fold: int = FOLD, dataset: str = DATASET) -> list[str]:
    splits = json.loads((dirs["nnUNet_preprocessed"] / dataset / "splits_final.json").read_text())
    return sorted(splits[fold]["val"])


def validation_images(dirs: dict, fold: int = FOLD, dataset: str = DATASET) -> Path:
    """A folder of links to a fold's validation CTs (inputs for gtv-predict); labels stay in labelsTr."""
    folder = dirs["work"] / (f"fold{fold}_validation_images" if dataset == DATASET
                             else f"{dataset}_fold{fold}_validation_images")
    if not folder.is_dir():
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for case in validation_cases(dirs, fold, dataset):
            (staging / f"{case}_0000.nii.gz").symlink_to(dirs["nnUNet_raw"] / dataset / "imagesTr" /
                                                          f"{case}_0000.nii.gz")
        staging.rename(folder)
    return folder


def dice_against_labels(prediction_folder: Path, label_folder: Path, cases: list[str]) -> dict[str, dict]:
    """Dice, RVE (%) and both volumes (ml) per case from the files (no surface distances: the study needs only
    these)."""
    import numpy as np
    import SimpleITK as sitk

    scores = {}
    for case in cases:
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_folder / f"{case}.nii.gz"))) == 1
        label = sitk.ReadImage(str(label_folder / f"{case}.nii.gz"))
        reference = sitk.GetArrayFromImage(label) == 1
        voxel_ml = float(np.prod(label.GetSpacing())) / 1000.0
        overlap, total = int(np.count_nonzero(predicted & reference)), int(predicted.sum() + reference.sum())
        scores[case] = {"dice": 2.0 * overlap / total if total else 1.0,
                        "rve_percent": 100.0 * abs(int(predicted.sum()) - int(reference.sum())) / int(reference.sum()),
                        "predicted_ml": int(predicted.sum()) * voxel_ml, "reference_ml": int(reference.sum()) * voxel_ml}
    return scores


def volume_agreement(scores: dict[str, dict]) -> dict:
    """Whether the predicted volumes follow the patients' targets across cases (a model that has learnt only where
    a target usually lies gives every patient about the same volume): quartiles of both volumes and Spearman's rho
    between them."""
    import numpy as np
    from scipy import stats

    predicted = [score["predicted_ml"] for score in scores.values()]
    reference = [score["reference_ml"] for score in scores.values()]
    rho, p = stats.spearmanr(predicted, reference)
    return {"predicted_ml_quartiles": np.percentile(predicted, [25, 50, 75]).tolist(),
            "reference_ml_quartiles": np.percentile(reference, [25, 50, 75]).tolist(),
            "spearman_rho": float(rho), "p": float(p)}


def describe_volumes(agreement: dict) -> str:
    low, middle, high = agreement["predicted_ml_quartiles"]
    return (f"predicted volume median {middle:.0f} ml (quartiles {low:.0f}-{high:.0f}), reference median "
            f"{agreement['reference_ml_quartiles'][1]:.0f} ml, Spearman rho {agreement['spearman_rho']:.2f} "
            f"(p {agreement['p']:.2g})")


def predict_one_model(dirs: dict, results: Path, trainer: str, checkpoint: str, images: Path, output: Path,
                      plans: str = OUR_PLANS, inference: Sequence[str] = tuple(INFERENCE), fold: int = FOLD) -> None:
    """gtv-predict with one model (its region restriction as in the ensemble), no fusion rule."""
    if (output / "summary.json").is_file():
        return
    shutil.rmtree(output, ignore_errors=True)
    env = dict(os.environ, nnUNet_results=str(results))
    run([nnunet_command("gtv-predict"), "-i", str(images), "-o", str(output), "-d", DATASET, "-m", f"{trainer}:{fold}",
         "-p", plans, "-chk", checkpoint, "-device", "cpu", "--keep-all-components", "-np", "0",
         "--disable_progress_bar", *inference], output.parent / f"{output.name}.log", env)


def study_key(variant: str, iterations: int, fold: int) -> str:
    """Record key of a study model; fold 0's keys name no fold (the study was fold 0's alone at first)."""
    return f"{variant}, {iterations} iterations" + (f", fold {fold}" if fold != FOLD else "")


def stage_study(dirs: dict, record: Record, iterations: int, variants: list[int] | None,
                folds: Sequence[int] = (FOLD,)) -> None:
    """Middle models of each STUDY variant (or of the ``variants`` numbers), trained here on each of ``folds`` for
    ``iterations`` and scored on that fold's 12 validation CTs; results are kept per variant, length and fold. With
    more than one fold, a variant's pooled mean over their validation CTs is logged too (the out-of-fold estimate a
    candidate is judged by)."""
    for fold in folds:
        study_fold(dirs, record, iterations, variants, fold)
    if len(folds) > 1:
        study = record.data["study"]
        for number, variant in enumerate(STUDY):
            keys = [study_key(variant, iterations, fold) for fold in folds]
            if (variants is None or number in variants) and all("dice" in study.get(key, {}) for key in keys):
                dice = [d for key in keys for d in study[key]["dice"].values()]
                log(f"study: {variant}, {iterations} iterations, folds {list(folds)} pooled: mean Dice "
                    f"{mean(dice):.3f} over {len(dice)} validation CTs")
    inference_study(dirs, record, iterations)


def study_fold(dirs: dict, record: Record, iterations: int, variants: list[int] | None, fold: int) -> None:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    study = record.data.setdefault("study", {})
    trainer_name = OUR_TRAINER.format(scale=STUDY_SCALE)
    labels = dirs["nnUNet_raw"] / DATASET / "labelsTr"
    for number, (variant, overrides) in enumerate(STUDY.items()):
        key = study_key(variant, iterations, fold)
        if (variants is not None and number not in variants) or "volumes" in study.get(key, {}):
            continue
        name = f"variant_{number}_{iterations}" + (f"_fold{fold}" if fold != FOLD else "")
        results = dirs["work"] / "study" / name
        plans, spacing = STUDY_GRIDS.get(variant, (OUR_PLANS, OUR_SPACING))
        model_folder = results / DATASET / f"{trainer_name}__{plans}__3d_fullres" / f"fold_{fold}"
        if not (model_folder / "checkpoint_final.pth").is_file():
            plan_ours(dirs, plans, spacing)
            log(f"study: {key}: training {iterations} iterations (log in {model_folder})")
            trainer = get_trainer_from_args(DATASET, "3d_fullres", fold, trainer_name, plans,
                                            device=torch.device("cpu"))
            trainer.output_folder_base = str(model_folder.parent)
            trainer.output_folder = str(model_folder)
            model_folder.mkdir(parents=True, exist_ok=True)
            default_log = Path(trainer.log_file)  # nnU-Net opened it in the default model folder
            trainer.log_file = str(model_folder / default_log.name)
            default_log.unlink(missing_ok=True)
            apply_study_variant(trainer, overrides)
            trainer.num_epochs = max(1, iterations // trainer.num_iterations_per_epoch)
            trainer.snapshot_every_epochs = 0
            load_before, start = load(), time.perf_counter()
            trainer.run_training()
            study[key] = {"train_seconds": time.perf_counter() - start, "load": [load_before, load()],
                              "iterations": trainer.num_epochs * trainer.num_iterations_per_epoch,
                              "batch": trainer.batch_size}
            record.save()
            del trainer
        output = dirs["work"] / "study_predictions" / name
        predict_one_model(dirs, results, trainer_name, "checkpoint_final.pth", validation_images(dirs, fold), output,
                          plans=plans, fold=fold)
        scores = dice_against_labels(output, labels, validation_cases(dirs, fold))
        study.setdefault(key, {})["dice"] = {c: s["dice"] for c, s in scores.items()}
        study[key]["rve_percent"] = {c: s["rve_percent"] for c, s in scores.items()}
        study[key]["volumes"] = volume_agreement(scores)
        record.save()
        log(f"study: {key}: mean Dice on the 12 validation CTs {mean(study[key]['dice'].values()):.3f}; "
            f"{describe_volumes(study[key]['volumes'])}")


def inference_study(dirs: dict, record: Record, iterations: int) -> None:
    """The STUDY_BASE model (when trained for ``iterations``) scored with each INFERENCE_STUDY option."""
    number = list(STUDY).index(STUDY_BASE)
    results = dirs["work"] / "study" / f"variant_{number}_{iterations}"
    trainer_name = OUR_TRAINER.format(scale=STUDY_SCALE)
    if not (results / DATASET / f"{trainer_name}__{OUR_PLANS}__3d_fullres" / f"fold_{FOLD}" /
            "checkpoint_final.pth").is_file():
        return
    scores = record.data.setdefault("inference_study", {})
    for option_number, (name, options) in enumerate(INFERENCE_STUDY.items()):
        key = f"{name}, {iterations} iterations"
        if key not in scores:
            output = dirs["work"] / "inference_study" / f"option_{option_number}_{iterations}"
            load_before, start = load(), time.perf_counter()
            predict_one_model(dirs, results, trainer_name, "checkpoint_final.pth", validation_images(dirs), output,
                              inference=options)
            seconds = time.perf_counter() - start
            scores[key] = {"dice": {c: s["dice"] for c, s in dice_against_labels(
                output, dirs["nnUNet_raw"] / DATASET / "labelsTr", validation_cases(dirs)).items()},
                "seconds_per_case": seconds / len(validation_cases(dirs)), "load": [load_before, load()]}
            record.save()
        log(f"inference study: {key}: mean Dice on the 12 validation CTs {mean(scores[key]['dice'].values()):.3f}, "
            f"{scores[key]['seconds_per_case']:.1f} s per case")


def model_folder(dirs: dict, trainer: str, plans: str, configuration: str, fold: int) -> Path:
    return dirs["nnUNet_results"] / DATASET / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}"


def models(folds: Sequence[int] = (FOLD,)) -> dict[str, tuple[str, str, str, int]]:
    """Row name -> (trainer, plans, configuration, fold): ours (SCALE:FOLD for ``folds``) and stock nnU-Net (fold
    FOLD)."""
    ours = {f"{scale}:{fold}": (OUR_TRAINER.format(scale=scale), OUR_PLANS, "3d_fullres", fold)
            for scale in SCALES for fold in folds}  # the order of our_specs
    stock = {f"nnU-Net {c}": (STOCK_TRAINER, "nnUNetPlans", c, FOLD) for c in STOCK_CONFIGURATIONS}
    # the order of training: the models of the side-by-side comparison (fold FOLD) first
    return {name: row for name, row in (*ours.items(), *stock.items()) if row[3] == FOLD} | \
        {name: row for name, row in ours.items() if row[3] != FOLD}


def training_log(folder: Path) -> dict:
    """Epochs, training-loop minutes and learning curve (pseudo Dice) from nnU-Net's final checkpoint."""
    import torch

    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = checkpoint["logging"]
    starts, ends = logging["epoch_start_timestamps"], logging["epoch_end_timestamps"]
    return {"epochs": len(ends), "loop_minutes": (ends[-1] - starts[0]) / 60.0,
            "pseudo_dice": [float(d) for d in logging["mean_fg_dice"]]}


def stage_train(dirs: dict, record: Record, folds: Sequence[int]) -> None:
    """Each row's model through nnUNetv2_train (end-of-training validation included), one after the other."""
    training = record.data.setdefault("training", {})
    for name, (trainer, plans, configuration, fold) in models(folds).items():
        folder = model_folder(dirs, trainer, plans, configuration, fold)
        if not (folder / "validation" / "summary.json").is_file():
            load_before = load()
            log_name = f"train_{name.replace(' ', '_').replace(':', '_')}.log"
            seconds = run([nnunet_command("nnUNetv2_train"), str(DATASET_ID), configuration, str(fold), "-tr", trainer,
                           "-p", plans, "-device", "cpu"], dirs["logs"] / log_name)
            training[name] = {"command_seconds": seconds, "load": [load_before, load()]}
        summary = json.loads((folder / "validation" / "summary.json").read_text())
        training.setdefault(name, {}).update(training_log(folder),
                                             validation_dice=summary["foreground_mean"]["Dice"])
        record.save()
        log(f"{name}: {training[name]['epochs']} epochs, training loop {training[name]['loop_minutes']:.1f} min, "
            f"nnU-Net's validation Dice on fold {fold}: {training[name]['validation_dice']:.3f}")


def snapshot_iterations(folder: Path) -> dict[int, str]:
    """Iterations -> weight snapshot file of one of our models (epochs of 50 iterations)."""
    snapshots = {}
    for path in folder.glob("checkpoint_epoch_*.pth"):
        snapshots[50 * int(path.stem.rsplit("_", 1)[1])] = path.name
    return dict(sorted(snapshots.items()))


def stage_curves(dirs: dict, record: Record, scales: list[str], only: list[int] | None,
                 folds: Sequence[int]) -> None:
    """Dice on fold 0's 12 validation CTs of every weight snapshot of our fold-0 models of ``scales`` (each alone,
    in its region); then the fusion rule, chosen with the three final fold-0 models; then, for every other fold of
    ``folds``, its three models fused with that rule on its own validation CTs (a second estimate, chosen on
    nothing), and all folds' fused validation CTs pooled. Every score comes with how far the predicted volumes
    follow the reference's."""
    curves, volumes = record.data.setdefault("curves", {}), record.data.setdefault("curve_volumes", {})
    images, labels, cases = validation_images(dirs), dirs["nnUNet_raw"] / DATASET / "labelsTr", validation_cases(dirs)
    for scale in scales:
        trainer, plans, configuration, fold = models()[f"{scale}:{FOLD}"]
        for iterations, checkpoint in snapshot_iterations(model_folder(dirs, trainer, plans, configuration,
                                                                       fold)).items():
            key = str(iterations)
            if (key in curves.get(scale, {}) and key in volumes.get(scale, {})) or (only and iterations not in only):
                continue
            output = dirs["work"] / "curves" / f"{scale}_{iterations}"
            predict_one_model(dirs, dirs["nnUNet_results"], trainer, checkpoint, images, output)
            scores = dice_against_labels(output, labels, cases)
            curves.setdefault(scale, {})[key] = {c: s["dice"] for c, s in scores.items()}
            volumes.setdefault(scale, {})[key] = volume_agreement(scores)
            record.save()
            log(f"curve {scale} at {iterations} iterations: mean Dice {mean(curves[scale][key].values()):.3f}; "
                f"{describe_volumes(volumes[scale][key])}")
    ensemble = dirs["work"] / "curves" / "ensemble_final"
    predict_ensemble(dirs, images, ensemble, our_specs([FOLD]))
    rule = choose_fusion(dirs, record, ensemble, labels, cases)
    for fold in (fold for fold in folds if fold != FOLD):
        check_other_fold(dirs, record, rule, fold)
    if len(folds) > 1:
        pool_validation(dirs, record, rule, folds)
        population_prior(dirs, record, folds)


def check_other_fold(dirs: dict, record: Record, rule: str, fold: int) -> None:
    """The three models of ``fold`` fused with ``rule`` on that fold's 12 validation CTs, and each alone (one folder
    per rule, so a changed choice never reuses an older output)."""
    checks = record.data.setdefault("other_fold_validation", {})
    labels, cases, specs = dirs["nnUNet_raw"] / DATASET / "labelsTr", validation_cases(dirs, fold), our_specs([fold])
    output = fused_validation_folder(dirs, rule, fold)
    predict_ensemble(dirs, validation_images(dirs, fold), output, specs, fusion_options(rule, specs))
    scores = {"fused": dice_against_labels(output, labels, cases)} | {
        spec: dice_against_labels(folder, labels, cases)
        for spec, folder in zip(specs, model_prediction_folders(output, specs))}
    checks[str(fold)] = {"rule": rule, "scores": scores}
    record.save()
    for name, per_case in scores.items():
        log(f"fold {fold} validation, {name}: mean Dice {mean(s['dice'] for s in per_case.values()):.3f}, "
            f"median RVE {statistics.median(s['rve_percent'] for s in per_case.values()):.1f} %; "
            f"{describe_volumes(volume_agreement(per_case))}")


def fused_validation_folder(dirs: dict, rule: str, fold: int) -> Path:
    """Where a fold's three models, fused with ``rule``, segmented that fold's validation CTs: for fold FOLD the
    output of the fusion-rule choice, for another fold that of its check."""
    number = list(FUSION_RULES).index(rule)
    if fold == FOLD:
        return dirs["work"] / "fusion_rules" / f"rule_{number}"
    return dirs["work"] / "curves" / f"ensemble_final_fold{fold}_rule_{number}"


def pool_validation(dirs: dict, record: Record, rule: str, folds: Sequence[int]) -> None:
    """Every fold's fused models on that fold's own validation CTs, pooled (the out-of-fold estimate of the test
    result): mean Dice, median RVE, whether the masks' volumes follow the patients' targets, and whether VVC ranks
    the failures (Spearman's rho of VVC against 1 - Dice; a review threshold for real CT would be chosen here)."""
    from scipy import stats

    labels, scores, vvc = dirs["nnUNet_raw"] / DATASET / "labelsTr", {}, {}
    for fold in folds:
        folder = fused_validation_folder(dirs, rule, fold)
        scores |= dice_against_labels(folder, labels, validation_cases(dirs, fold))
        with open(folder / "summary.csv", newline="") as handle:
            vvc |= {row["case"]: float(row["vvc"]) for row in csv.DictReader(handle)}
    cases = sorted(scores)
    rho, p = stats.spearmanr([vvc[case] for case in cases], [1.0 - scores[case]["dice"] for case in cases])
    pooled = {"folds": list(folds), "rule": rule, "cases": len(cases),
              "mean_dice": mean(scores[case]["dice"] for case in cases),
              "median_rve_percent": statistics.median(scores[case]["rve_percent"] for case in cases),
              "volumes": volume_agreement(scores), "vvc_vs_1_minus_dice": {"spearman_rho": float(rho), "p": float(p)},
              "scores": scores, "vvc": vvc}
    record.data["pooled_validation"] = pooled
    record.save()
    log(f"folds {list(folds)}, each on its own validation CTs ({len(cases)}), fused: mean Dice "
        f"{pooled['mean_dice']:.3f}, median RVE {pooled['median_rve_percent']:.1f} %; "
        f"{describe_volumes(pooled['volumes'])}; VVC against 1 - Dice: Spearman rho {rho:.2f} (p {p:.2g})")


def landmark_frame(regions, mandible_to_lungs: float):
    """Origin and extent (voxels, z y x) of a case's landmark frame: lung apex to mandible in z (a scan that ends
    above the lungs: the mandible level less ``mandible_to_lungs`` slices), the body's box in-plane."""
    import numpy as np

    levels, body = regions.levels, regions.body_box.ranges
    top = levels["mandible"]
    bottom = levels["lungs"] if levels["lungs"] is not None else top - mandible_to_lungs
    return (np.array([bottom, body[1][0], body[2][0]], float),
            np.array([top - bottom, body[1][1] - body[1][0], body[2][1] - body[2][0]], float))


def place_prior(masks: dict, frames: dict, frame: tuple, shape: tuple):
    """The training masks (name -> float array) averaged on a CT of ``shape`` whose landmark frame is ``frame``,
    cut to their median volume: the population prior's mask on that CT."""
    import numpy as np
    from scipy.ndimage import affine_transform

    origin, extent = frame
    prior = np.zeros(shape, np.float32)
    for case, mask in masks.items():
        training_origin, training_extent = frames[case]
        scale = training_extent / extent  # a voxel v of this CT lies at origin' + (v - origin) * scale there
        prior += affine_transform(mask, scale, offset=training_origin - origin * scale, output_shape=shape, order=1)
    median_voxels = int(np.median([mask.sum() for mask in masks.values()]))
    return prior >= np.sort(prior, axis=None)[-median_voxels]


def training_frames(dirs: dict) -> tuple[dict, float] | None:
    """Every training CT's landmark frame (the sampling regions of the recipe's preprocessed data, as the trainers
    found and cached them; computed here where a run has not) and the median mandible-to-lungs distance in slices;
    None (logged) when a CT has no mandible level."""
    import numpy as np
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_gtv.training.regions import (
        air_threshold_from_plans, body_threshold_from_plans, bone_threshold_from_plans, regions_for_dataset,
    )

    preprocessed = dirs["nnUNet_preprocessed"] / DATASET
    plans_manager = PlansManager(str(preprocessed / f"{OUR_PLANS}.json"))
    plans = plans_manager.plans
    split = json.loads((preprocessed / "splits_final.json").read_text())[FOLD]
    regions = regions_for_dataset(preprocessed / f"{OUR_PLANS}_3d_fullres", sorted(split["train"] + split["val"]),
                                  body_threshold_from_plans(plans),
                                  plans_manager.get_configuration("3d_fullres").spacing,
                                  plans_manager.transpose_forward, bone_threshold=bone_threshold_from_plans(plans),
                                  air_threshold=air_threshold_from_plans(plans))
    unplaced = sorted(case for case, r in regions.items() if r.levels.get("mandible") is None)
    if unplaced:
        log(f"population prior left out: no mandible level found in {', '.join(unplaced)}")
        return None
    mandible_to_lungs = float(np.median([r.levels["mandible"] - r.levels["lungs"] for r in regions.values()
                                         if r.levels.get("lungs") is not None]))
    return {case: landmark_frame(r, mandible_to_lungs) for case, r in regions.items()}, mandible_to_lungs


def population_prior(dirs: dict, record: Record, folds: Sequence[int]) -> None:
    """A benchmark-only baseline (not in the package) that reads no tumour from the CT: each validation CT of ``folds`` gets the mean of its fold's
    training PTV70 masks, placed by the mandible and lung-apex levels (z) and the body's box (y, x) that the sampling
    regions find in each CT, and cut to the training masks' median volume (a rule set by the training CTs alone).
    Scored on the recipe's preprocessed grid. What the models add over it is what they read of the patient."""
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from scipy import stats

    if "population_prior" in record.data or (found := training_frames(dirs)) is None:
        return
    frames, _ = found
    folder = dirs["nnUNet_preprocessed"] / DATASET / f"{OUR_PLANS}_3d_fullres"
    ml_per_voxel = float(np.prod([float(v) for v in OUR_SPACING])) / 1000
    dataset_class = infer_dataset_class(str(folder))
    scores = {}
    for fold in folds:
        train = json.loads((dirs["nnUNet_preprocessed"] / DATASET / "splits_final.json").read_text())[fold]["train"]
        cases = validation_cases(dirs, fold)
        dataset = dataset_class(str(folder), train + cases)
        masks = {case: (np.asarray(dataset.load_case(case)[1])[0] > 0).astype(np.float32) for case in train}
        for case in cases:
            reference = np.asarray(dataset.load_case(case)[1])[0] > 0
            prediction = place_prior(masks, frames, frames[case], reference.shape)
            predicted, true = prediction.sum() * ml_per_voxel, reference.sum() * ml_per_voxel
            scores[case] = {"dice": float(2 * (prediction & reference).sum() / (prediction.sum() + reference.sum())),
                            "rve_percent": float(100 * abs(predicted - true) / true),
                            "predicted_ml": float(predicted), "reference_ml": float(true)}
    fused = record.data["pooled_validation"]["scores"]
    cases = sorted(scores)
    fused_dice, prior_dice = [fused[case]["dice"] for case in cases], [scores[case]["dice"] for case in cases]
    prior = {"folds": list(folds), "scores": scores, "mean_dice": mean(prior_dice),
             "median_rve_percent": statistics.median(s["rve_percent"] for s in scores.values()),
             "volumes": volume_agreement(scores),
             "fused_better_cases": sum(f > p for f, p in zip(fused_dice, prior_dice)),
             "wilcoxon_p_fused_vs_prior": float(stats.wilcoxon(fused_dice, prior_dice).pvalue)}
    record.data["population_prior"] = prior
    record.save()
    log(f"population prior (no tumour read from the CT), folds {list(folds)}, {len(cases)} validation CTs: mean Dice "
        f"{prior['mean_dice']:.3f}, median RVE {prior['median_rve_percent']:.1f} %; "
        f"{describe_volumes(prior['volumes'])}; the fused models beat it on {prior['fused_better_cases']} of "
        f"{len(cases)} CTs (paired Wilcoxon p {prior['wilcoxon_p_fused_vs_prior']:.2g})")


def population_prior_test(dirs: dict, output: Path) -> None:
    """The population prior of all 60 training CTs on each test CT, written in the CT's own geometry (nnU-Net's
    preprocessing and export, as a model's output) with the seconds per case, for gtv-compare."""
    import numpy as np
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_gtv.training.regions import (
        air_threshold_from_plans, body_threshold_from_plans, bone_threshold_from_plans,
    )
    from nnunetv2_gtv.training.regions.borders import compute_regions
    from nnunetv2_gtv.training.regions.orientation import anterior_axis_from_direction, superior_axis_from_direction

    if (output / "timings.csv").is_file() or (found := training_frames(dirs)) is None:
        return
    frames, mandible_to_lungs = found
    preprocessed = dirs["nnUNet_preprocessed"] / DATASET
    plans_manager = PlansManager(str(preprocessed / f"{OUR_PLANS}.json"))
    configuration = plans_manager.get_configuration("3d_fullres")
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    plans, transpose = plans_manager.plans, plans_manager.transpose_forward
    folder = preprocessed / f"{OUR_PLANS}_3d_fullres"
    dataset = infer_dataset_class(str(folder))(str(folder), sorted(frames))
    masks = {case: (np.asarray(dataset.load_case(case)[1])[0] > 0).astype(np.float32) for case in frames}
    images = dirs["nnUNet_raw"] / DATASET / "imagesTs"
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    writer, seconds = plans_manager.image_reader_writer_class(), {}
    for image in sorted(images.glob("*_0000.nii.gz")):
        case, start = image.name[:-len("_0000.nii.gz")], time.perf_counter()
        data, _, properties = DefaultPreprocessor(verbose=False).run_case([str(image)], None, plans_manager,
                                                                          configuration, dataset_json)
        direction = properties["sitk_stuff"]["direction"]
        regions = compute_regions(data[0], configuration.spacing, *superior_axis_from_direction(direction, transpose),
                                  body_threshold_from_plans(plans), bone_threshold=bone_threshold_from_plans(plans),
                                  anterior=anterior_axis_from_direction(direction, transpose),
                                  air_threshold=air_threshold_from_plans(plans))
        if regions.levels.get("mandible") is None:
            log(f"population prior: {case}: no mandible level found; the prior is left out of the test comparison")
            shutil.rmtree(output)
            return
        mask = place_prior(masks, frames, landmark_frame(regions, mandible_to_lungs), data.shape[1:])
        two_class = torch.from_numpy(np.stack([~mask, mask]).astype(np.float32))
        segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
            two_class, plans_manager, configuration, plans_manager.get_label_manager(dataset_json), properties)
        writer.write_seg(segmentation, str(output / f"{case}.nii.gz"), properties)
        seconds[case] = time.perf_counter() - start
    with open(output / "timings.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["case", "seconds"], *([c, f"{s:.2f}"] for c, s in seconds.items())])
    log(f"population prior on the {len(seconds)} test CTs written to {output}")


def predict_ensemble(dirs: dict, images: Path, output: Path, specs: Sequence[str], fusion: Sequence[str] = (),
                     dataset: str = DATASET, recipe: str = "cpuRealCT") -> bool:
    """The final models ``specs`` of ``dataset`` and trainer suffix ``recipe`` fused by gtv-predict (with the options
    ``fusion``; inference as INFERENCE), each model's output kept; False when an earlier run's output is there."""
    if (output / "summary.json").is_file():
        return False
    shutil.rmtree(output, ignore_errors=True)
    run([nnunet_command("gtv-predict"), "-i", str(images), "-o", str(output), "-d", dataset, "-m", *specs,
         "-tr_suffix", f"_{recipe}", "-p", OUR_PLANS, "-device", "cpu", "--save-model-predictions",
         "--disable_progress_bar", *INFERENCE, *fusion], output.parent / f"{output.name}.log")
    return True


def ensemble_name(folds: Sequence[int]) -> str:
    return f"ours, {len(our_specs(folds))} models fused" if len(folds) > 1 else f"ours, fold {FOLD} fused"


def fused_test_folders(dirs: dict, record: Record, folds: Sequence[int]) -> dict[str, Path]:
    """The test stage's ensembles, name -> folder: every model of ``folds`` (gtv-predict) and, when that is more than
    fold FOLD, also the three of fold FOLD (gtv-uncertainty over their saved outputs); one folder per fusion rule and
    set of folds, so a rerun never mixes them."""
    rule = list(FUSION_RULES).index(record.data["fusion_rule"])
    folders = {ensemble_name(folds): dirs["work"] / "test" /
               f"ours_fused_folds{''.join(map(str, folds))}_rule_{rule}"}
    if list(folds) != [FOLD]:
        folders[ensemble_name([FOLD])] = dirs["work"] / "test" / f"ours_fused_folds{FOLD}_saved_rule_{rule}"
    return folders


def model_prediction_folders(fused: Path, specs: Sequence[str]) -> list[Path]:
    """Each model's own output of a gtv-predict run, in the order of ``specs``."""
    folders = []
    for spec in specs:
        scale, fold = spec.split(":")
        folders.append(fused / "model_predictions" / f"{OUR_TRAINER.format(scale=scale)}__fold_{fold}")
    return folders


def choose_fusion(dirs: dict, record: Record, ensemble: Path, labels: Path, cases: list[str]) -> str:
    """Each FUSION_RULES rule over the saved model outputs of fold 0's validation CTs; the best mean Dice wins."""
    scores = record.data.setdefault("fusion_rules", {})
    specs = our_specs([FOLD])
    for number, rule in enumerate(FUSION_RULES):
        if rule not in scores:
            output = dirs["work"] / "fusion_rules" / f"rule_{number}"
            fuse_saved_outputs(model_prediction_folders(ensemble, specs), output, fusion_options(rule, specs))
            scores[rule] = {c: s["dice"] for c, s in dice_against_labels(output, labels, cases).items()}
            record.save()
        log(f"fusion rule on fold {FOLD} validation: {rule}: mean Dice {mean(scores[rule].values()):.3f}")
    best = max(FUSION_RULES, key=lambda rule: mean(scores[rule].values()))
    record.data["fusion_rule"] = best
    record.save()
    log(f"chosen fusion rule (used on the test CTs): {best}")
    return best


def fuse_saved_outputs(folders: Sequence[Path], output: Path, options: Sequence[str]) -> None:
    """gtv-uncertainty over models' saved outputs (a fresh ``output``)."""
    shutil.rmtree(output, ignore_errors=True)
    run([nnunet_command("gtv-uncertainty"), "-i", *map(str, folders), "-o", str(output), "-np", "2", *options],
        output.parent / f"{output.name}.log")


def stage_test(dirs: dict, record: Record, folds: Sequence[int]) -> None:
    """The 16 held-out test CTs: our models of ``folds`` fused by gtv-predict (with more than fold FOLD, also the
    three of fold FOLD fused from their saved outputs), each trained stock model with nnUNetv2_predict."""
    test = record.data.setdefault("test", {})
    images = dirs["nnUNet_raw"] / DATASET / "imagesTs"
    (headline, fused), *fold_only = fused_test_folders(dirs, record, folds).items()
    rule, specs = record.data["fusion_rule"], our_specs(folds)
    load_before = load()
    if predict_ensemble(dirs, images, fused, specs, fusion_options(rule, specs)):
        test[headline] = {"load": [load_before, load()], "fused": fused.name}
    for _, folder in fold_only:
        if not (folder / "summary.json").is_file():
            fuse_saved_outputs(model_prediction_folders(fused, our_specs([FOLD])), folder,
                               fusion_options(rule, our_specs([FOLD])))
    population_prior_test(dirs, dirs["work"] / "test" / PRIOR_FOLDER)
    for name, (trainer, plans, configuration, fold) in models(folds).items():
        if trainer.startswith("nnUNetTrainerGTV"):
            continue
        output = dirs["work"] / "test" / name.replace(" ", "_")
        if not (model_folder(dirs, trainer, plans, configuration, fold) / "checkpoint_final.pth").is_file():
            log(f"test: {name} left out, it is not trained yet (--stages train)")
            continue
        if not (output / "timings.csv").is_file():
            shutil.rmtree(output, ignore_errors=True)
            load_before = load()
            seconds = run([nnunet_command("nnUNetv2_predict"), "-i", str(images), "-o", str(output), "-d",
                           str(DATASET_ID), "-c", configuration, "-tr", trainer, "-p", plans, "-f", str(fold),
                           "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1", "--disable_progress_bar"],
                          dirs["logs"] / f"predict_{name.replace(' ', '_')}.log")
            cases = sorted(p.name[:-len(".nii.gz")] for p in output.glob("*.nii.gz"))
            with open(output / "timings.csv", "w", newline="") as handle:  # the run's time shared out per case
                writer = csv.writer(handle)
                writer.writerow(["case", "seconds"])
                writer.writerows([case, f"{seconds / len(cases):.2f}"] for case in cases)
            test[name] = {"command_seconds": seconds, "load": [load_before, load()]}
        record.save()


def stage_report(dirs: dict, record: Record, folds: Sequence[int], docs: Path | None) -> None:
    """gtv-evaluate and gtv-compare on the 16 test CTs, the learning curve, the uncertainty claims; with ``docs``
    the figures are copied there (learning curve, overlays of the best, median and worst case)."""
    import numpy as np
    from scipy import stats

    from nnunetv2_gtv.figures.evaluation_plots import learning_curve_plot

    report = record.data.setdefault("report", {})
    raw = dirs["nnUNet_raw"] / DATASET
    ensembles, out = fused_test_folders(dirs, record, folds), dirs["work"] / "report"
    headline, fused = next(iter(ensembles.items()))
    evaluation = out / f"evaluation_{fused.name}"
    if not (evaluation / "evaluation.json").is_file():
        run([nnunet_command("gtv-evaluate"), "-p", str(fused), "-r", str(raw / "labelsTs"), "-o", str(evaluation),
             "--images", str(raw / "imagesTs")], dirs["logs"] / "gtv-evaluate.log")
    # training minutes: nnUNetv2_train's wall time, end-of-training validation included; an ensemble: its models'
    own = {name: record.data["training"][name]["command_seconds"] / 60
           for name in models(folds) if name in record.data["training"]}
    fold0 = our_specs([FOLD])
    minutes = {name: sum(own[spec] for spec in our_specs(folds if name == headline else [FOLD]))
               for name in ensembles}
    minutes.update({f"ours {spec}": own[spec] for spec in fold0})
    minutes.update({name: value for name, value in own.items() if name.startswith("nnU-Net")})
    inputs = [f"{name}={folder}" for name, folder in ensembles.items()]
    inputs += [f"ours {spec}={folder}" for spec, folder in zip(fold0, model_prediction_folders(fused, fold0))]
    for name in models(folds):
        folder = dirs["work"] / "test" / name.replace(" ", "_")
        if not name.startswith("nnU-Net"):
            continue
        if (folder / "timings.csv").is_file():
            inputs.append(f"{name}={folder}")
        else:
            minutes.pop(name)
            log(f"report: {name} left out, its test stage did not finish ({folder})")
    if (dirs["work"] / "test" / PRIOR_FOLDER / "timings.csv").is_file():
        inputs.append(f"{PRIOR_ROW}={dirs['work'] / 'test' / PRIOR_FOLDER}")
    comparison = out / "comparison"
    shutil.rmtree(comparison, ignore_errors=True)
    run([nnunet_command("gtv-compare"), "-i", *inputs, "-r", str(raw / "labelsTs"), "-o", str(comparison),
         "--training-minutes", *[f"{name}={value:.1f}" for name, value in minutes.items()]],
        dirs["logs"] / "gtv-compare.log")
    doc = json.loads((evaluation / "evaluation.json").read_text())
    fused_rows = {row["case"]: row for row in doc["metrics"] if row["source"] == "fused"}
    dice = {case: row["dice"] for case, row in fused_rows.items()}
    rve = [row["rve_percent"] for row in fused_rows.values()]
    volumes = volume_agreement({case: {"predicted_ml": row["volume_pred_ml"], "reference_ml": row["volume_ref_ml"]}
                                for case, row in fused_rows.items()})
    with open(fused / "summary.csv", newline="") as handle:
        summary = list(csv.DictReader(handle))
    review = {row["case"]: row["review"].lower() == "true" for row in summary}
    vvc = {row["case"]: float(row["vvc"]) for row in summary}
    ranked = sorted(dice, key=dice.get)
    quarter = max(1, len(ranked) // 4)
    worst_quarter = set(ranked[:quarter])
    flagged = {case for case, flag in review.items() if flag}
    highest_vvc = set(sorted(vvc, key=vvc.get)[-quarter:])  # a flag at whatever threshold flags a quarter
    report.update(
        fused_mean_dice=mean(dice.values()), fused_median_rve_percent=float(np.median(rve)), volumes=volumes,
        error_rate=doc["error_rate"], vvc_vs_1_minus_dice=doc["vvc_vs_1_minus_dice"],
        review={"flagged": sorted(flagged), "worst_quarter": sorted(worst_quarter),
                "flagged_in_worst_quarter": len(flagged & worst_quarter),
                "fisher_p": float(stats.fisher_exact([[len(flagged & worst_quarter), len(flagged - worst_quarter)],
                                                      [len(worst_quarter - flagged),
                                                       len(set(dice) - flagged - worst_quarter)]])[1]),
                "highest_vvc_quarter": sorted(highest_vvc),
                "highest_vvc_quarter_in_worst_quarter": len(highest_vvc & worst_quarter)},
        best_median_worst=[ranked[-1], ranked[len(ranked) // 2], ranked[0]], comparison=str(comparison),
        evaluation=str(evaluation))
    curves = {f"{scale} alone": {int(i): list(v.values()) for i, v in record.data["curves"][scale].items()}
              for scale in SCALES if scale in record.data.get("curves", {})}
    curve_png = out / "learning_curve.png"
    learning_curve_plot(curves, curve_png, f"fold {FOLD}: Dice on its 12 validation CTs (mean, 25-75 % band)")
    record.save()
    if docs:
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(curve_png, docs / "learning_curve.png")
        for what, case in zip(("best", "median", "worst"), report["best_median_worst"]):
            shutil.copyfile(evaluation / doc["overlays"][case], docs / f"overlay_{what}.png")
        for name in ("box_dice.png",):
            shutil.copyfile(comparison / name, docs / name)
        shutil.copyfile(evaluation / "error_rate_per_level.png", docs / "error_rate_per_level.png")
        shutil.copyfile(evaluation / "vvc_vs_1_minus_dice.png", docs / "vvc_vs_1_minus_dice.png")
        log(f"figures copied to {docs}")
    print((comparison / "comparison.md").read_text())
    log(f"fused on the 16 test CTs: mean Dice {report['fused_mean_dice']:.3f}, median RVE "
        f"{report['fused_median_rve_percent']:.1f} %; {describe_volumes(volumes)}; review flags {sorted(flagged)}, worst quarter "
        f"{sorted(worst_quarter)}, highest VVC {sorted(highest_vvc)}; full numbers in {record.path}")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--work", type=Path, required=True, help="working folder (kept; reused by a rerun)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="patient folders (default: %(default)s)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--study-iterations", type=int, default=250)
    parser.add_argument("--study-variants", nargs="+", type=int, choices=range(len(STUDY)), metavar="N",
                        help="train only these STUDY variants (numbers from 0; default: all)")
    parser.add_argument("--study-folds", nargs="+", type=int, choices=range(5), default=[FOLD], metavar="F",
                        help="folds the study trains and scores each variant on (default: %(default)s)")
    parser.add_argument("--curve-scales", nargs="+", choices=SCALES, default=list(SCALES),
                        help="models whose snapshots the curves stage scores (about a minute per snapshot)")
    parser.add_argument("--curve-iterations", nargs="+", type=int, metavar="N",
                        help="score only the snapshots after these iterations (default: every snapshot)")
    parser.add_argument("--our-folds", nargs="+", type=int, choices=range(5), default=list(OUR_FOLDS), metavar="F",
                        help="folds of our models to train and fuse on the test CTs (default: %(default)s, the paper's "
                             f"six models; {FOLD} alone: the three of fold {FOLD})")
    parser.add_argument("--docs", type=Path, help="copy the report's figures into this folder (e.g. docs/real_ct)")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        log(f"{args.source} not found: nothing to do")
        return 2
    work = args.work.resolve()
    dirs = configure_environment(work)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    dirs.update(work=work, logs=work / "logs")
    record = Record(work / "real_ct.json")
    record.data.setdefault("machine", {})["cores"] = os.cpu_count()
    for stage in STAGES:
        if stage not in args.stages:
            continue
        log(f"stage {stage}: load average {load()}")
        start = time.perf_counter()
        if stage == "dataset":
            stage_dataset(args.source, dirs)
        elif stage == "plan":
            stage_plan(dirs)
        elif stage == "study":
            stage_study(dirs, record, args.study_iterations, args.study_variants, args.study_folds)
        elif stage == "train":
            stage_train(dirs, record, args.our_folds)
        elif stage == "curves":
            stage_curves(dirs, record, args.curve_scales, args.curve_iterations, args.our_folds)
        elif stage == "test":
            stage_test(dirs, record, args.our_folds)
        elif stage == "report":
            stage_report(dirs, record, args.our_folds, args.docs)
        record.data.setdefault("stages", {})[stage] = {"seconds": time.perf_counter() - start, "load_end": load()}
        record.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
