"""Which trained models an ensemble uses, and loading them once for many cases.

A model is named ``SCALE:FOLD`` (``Local:0``; the trainer is ``nnUNetTrainerGTV25D<Scale><suffix>``) or
``TRAINER:FOLD`` (``nnUNetTrainerGTV25DLocal_smoke:0``, any trainer). Its checkpoint lives where
``nnUNetv2_train`` put it: ``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_<f>/<checkpoint>``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

SCALES = ("Local", "Middle", "Global")
PAPER_FOLDS = (0, 1)
TRAINER_PREFIX = "nnUNetTrainerGTV25D"
DEFAULT_CHECKPOINT = "checkpoint_final.pth"

# plans.json entries that preprocessing and export read: models may share one preprocessing only if they agree
PLANS_KEYS = ("transpose_forward", "transpose_backward", "image_reader_writer",
              "foreground_intensity_properties_per_channel")
CONFIGURATION_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "preprocessor_name",
                      "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_probabilities",
                      "resampling_fn_probabilities_kwargs")
DATASET_KEYS = ("labels", "channel_names", "regions_class_order")


class ModelError(ValueError):
    """A requested model is missing, unreadable, or cannot be ensembled with the others."""


@dataclass(frozen=True)
class ModelSpec:
    """One model of the ensemble: ``label`` as the user wrote it (or the default set names it)."""

    label: str
    trainer: str
    fold: int | str
    folder: Path  # <trainer>__<plans>__<configuration>
    checkpoint_name: str = DEFAULT_CHECKPOINT

    @property
    def checkpoint(self) -> Path:
        return self.folder / f"fold_{self.fold}" / self.checkpoint_name


def dataset_folder_name(results: Path, dataset: str) -> str:
    """``989`` -> the ``Dataset989_*`` folder's name in nnUNet_results; a name is taken as it is."""
    if not dataset.isdigit():
        return dataset
    found = sorted(p.name for p in results.glob(f"Dataset{int(dataset):03d}_*") if p.is_dir())
    if len(found) != 1:
        raise ModelError(f"dataset {dataset}: {'no' if not found else 'more than one'} Dataset{int(dataset):03d}_* "
                         f"folder in nnUNet_results ({results}){': ' + ', '.join(found) if found else ''}")
    return found[0]


def parse_model_spec(text: str, tr_suffix: str = "") -> tuple[str, int | str]:
    """``Local:0`` -> (``nnUNetTrainerGTV25DLocal<tr_suffix>``, 0); ``<trainer>:<fold>`` -> (trainer, fold)."""
    name, sep, fold = text.rpartition(":")
    if not sep or not name or not fold:
        raise ModelError(f"model '{text}': write SCALE:FOLD (e.g. Local:0) or TRAINER:FOLD")
    if fold != "all":
        try:
            fold = int(fold)
        except ValueError:
            raise ModelError(f"model '{text}': fold must be an integer or 'all', got '{fold}'") from None
    scale = {s.lower(): s for s in SCALES}.get(name.lower())
    if scale is not None:
        return f"{TRAINER_PREFIX}{scale}{tr_suffix}", fold
    if not name.startswith("nnUNetTrainer"):
        raise ModelError(f"model '{text}': '{name}' is neither a scale ({', '.join(SCALES)}) nor a trainer name "
                         "(nnUNetTrainer...)")
    return name, fold


def default_model_labels() -> list[str]:
    """The paper's six: three sampling trainers x folds 0 and 1."""
    return [f"{scale}:{fold}" for scale in SCALES for fold in PAPER_FOLDS]


def resolve_models(results_folder: str | os.PathLike, dataset_name: str, labels: Sequence[str] | None,
                   plans: str = "nnUNetPlans", configuration: str = "3d_fullres", tr_suffix: str = "",
                   checkpoint_name: str = DEFAULT_CHECKPOINT) -> list[ModelSpec]:
    """The models named by ``labels`` (None: the paper's six); ModelError lists every missing checkpoint."""
    default = labels is None
    specs = []
    for label in default_model_labels() if default else labels:
        trainer, fold = parse_model_spec(label, tr_suffix)
        folder = Path(results_folder) / dataset_name / f"{trainer}__{plans}__{configuration}"
        specs.append(ModelSpec(label, trainer, fold, folder, checkpoint_name))
    if len({(s.trainer, s.fold) for s in specs}) != len(specs):
        raise ModelError(f"a model is listed twice: {' '.join(s.label for s in specs)}")
    missing = [s for s in specs if not s.checkpoint.is_file()]
    if not missing:
        return specs
    raise ModelError(_missing_message(specs, missing, default))


def _trained_folds(spec: ModelSpec) -> list[str]:
    """The folds of ``spec``'s model folder that hold its checkpoint file, in fold order."""
    folds = [p.name[len("fold_"):] for p in spec.folder.glob("fold_*") if (p / spec.checkpoint_name).is_file()]
    return sorted(folds, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))


def _missing_message(specs: Sequence[ModelSpec], missing: Sequence[ModelSpec], default: bool) -> str:
    """Each missing checkpoint with the folds of its model that exist, and a ``-m`` that runs: the listed
    models that exist plus the missing ones' other trained folds."""
    lines, working = [], [s.label for s in specs if s not in missing]
    listed = {(s.trainer, str(s.fold)) for s in specs}
    for spec in missing:
        folds = _trained_folds(spec)
        found = f"folds with {spec.checkpoint_name}: {', '.join(folds)}" if folds else \
            f"no fold has {spec.checkpoint_name}"
        lines.append(f"  {spec.label}: no {spec.checkpoint} ({found})")
        name = spec.label.rpartition(":")[0]
        working += [f"{name}:{fold}" for fold in folds if (spec.trainer, fold) not in listed]
        listed.update((spec.trainer, fold) for fold in folds)
    message = f"{len(missing)} of {len(specs)} models have no checkpoint:\n" + "\n".join(lines)
    if default:
        message = "the default ensemble is the paper's six models (Local, Middle, Global x folds 0 and 1); " + message
    if working:
        return message + "\ntrain the missing ones, or run with the available ones: -m " + " ".join(working)
    return message + "\ntrain them with nnUNetv2_train (or check -d, -tr_suffix, -p, -c, -chk)"


@dataclass
class LoadedModel:
    """A model ready to predict: nnU-Net's predictor (network, plans, weights) plus what the ensemble needs."""

    spec: ModelSpec
    predictor: object  # nnUNetPredictor
    sampling_region: str  # "local", "middle" or "global" (the trainer's; "global" for other trainers)
    required_divisor: tuple[int, ...]  # tile sizes must be multiples of this per axis

    @property
    def label(self) -> str:
        return self.spec.label


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: cannot read ({err})") from err


def load_model(spec: ModelSpec, device: torch.device, step_size: float, mirroring: bool,
               tiles_per_batch: int | None = None) -> LoadedModel:
    """Build the network of ``spec`` through nnU-Net's predictor (trainer class found by the checkpoint's name).

    ``tiles_per_batch``: sliding-window tiles per network call (None: the device's default, see sliding_window).
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_gtv.inference.sliding_window import BatchedTilePredictor, default_tiles_per_batch

    for name in ("plans.json", "dataset.json"):
        _read_json(spec.folder / name)  # a clear message instead of nnU-Net's bare traceback
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a CPU notice per model
        predictor = BatchedTilePredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=mirroring,
                                         perform_everything_on_device=device.type == "cuda", device=device,
                                         verbose=False, allow_tqdm=False,
                                         tiles_per_batch=tiles_per_batch or default_tiles_per_batch(device))
    try:
        predictor.initialize_from_trained_model_folder(str(spec.folder), (spec.fold,), spec.checkpoint_name)
    except Exception as err:  # torch.load and the trainer lookup raise many kinds; all mean "cannot use this model"
        raise ModelError(f"model {spec.label}: cannot load {spec.checkpoint} ({type(err).__name__}: {err})") from err
    trainer_class = recursive_find_trainer_class_by_name(predictor.trainer_name)
    network = predictor.network
    divisor = tuple(getattr(network, "required_divisor", (1,) * len(predictor.configuration_manager.patch_size)))
    return LoadedModel(spec, predictor, getattr(trainer_class, "sampling_region", "global"), divisor)


def _differences(first: dict, other: dict, keys: Sequence[str], where: str) -> list[str]:
    return [f"{where} '{key}': {first.get(key)!r} vs {other.get(key)!r}" for key in keys
            if first.get(key) != other.get(key)]


def check_shared_preprocessing(models: Sequence[LoadedModel]) -> None:
    """Raise ModelError unless every model preprocesses and exports a CT exactly as the first one does."""
    first = models[0]
    for other in models[1:]:
        a, b = first.predictor, other.predictor
        problems = (_differences(a.plans_manager.plans, b.plans_manager.plans, PLANS_KEYS, "plans")
                    + _differences(a.configuration_manager.configuration, b.configuration_manager.configuration,
                                   CONFIGURATION_KEYS, "configuration")
                    + _differences(a.dataset_json, b.dataset_json, DATASET_KEYS, "dataset.json"))
        if problems:
            raise ModelError(
                f"models {first.label} ({first.spec.folder}) and {other.label} ({other.spec.folder}) were trained "
                f"with different plans; one preprocessing of each CT must serve every model:\n  "
                + "\n  ".join(problems))


def model_record(model: LoadedModel) -> dict:
    """What identifies a loaded model in a run's fingerprint: its trainer, fold, checkpoint file (path, size, time)."""
    stat = model.spec.checkpoint.stat()
    return {"label": model.label, "trainer": model.spec.trainer, "fold": model.spec.fold,
            "checkpoint": str(model.spec.checkpoint.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sampling_region": model.sampling_region}
