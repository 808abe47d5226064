"""Make nnU-Net's stock commands find the classes of this package.

nnU-Net v2.8.1 looks planners up by name inside the ``nnunetv2`` package only, and trainers inside
``nnunetv2.training.nnUNetTrainer`` (or in folders named by ``nnUNet_extTrainer``, which would need an
environment variable in every shell, and breaks pickling of the trainer). Registration therefore writes one
small sub-package of import shims into each of those two places in the installed nnunetv2::

    nnunetv2/training/nnUNetTrainer/variants/nnunetv2_gtv_plugin/{__init__.py, nnUNetTrainerGTV25D.py,
        short_runs.py, cpu_recipes.py, paper_variants.py, budget_baselines.py}
    nnunetv2/experiment_planning/experiment_planners/nnunetv2_gtv_plugin/{__init__.py, nnUNetPlannerGTV25D.py}

Each shim only re-exports classes that live in this package, so the class objects (and pickles, checkpoints)
keep their ``nnunetv2_gtv`` module path. The shim folders are built under a hidden temporary name and renamed
into place, so nnU-Net never sees a half-written one. Registering twice changes nothing; ``remove`` deletes
exactly these two folders and leaves nnunetv2 as installed.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from nnunetv2_gtv.io.file_modes import make_shareable

PLUGIN_FOLDER_NAME = "nnunetv2_gtv_plugin"
SUPPORTED_NNUNET = ((2, 8, 1), (2, 9, 0))  # [lower, upper)
SUPPORTED_NNUNET_TEXT = ">=2.8.1,<2.9"


@dataclass(frozen=True)
class ShimModule:
    """One shim module: where it goes inside nnunetv2, and which of our classes it re-exports."""

    nnunet_subfolder: tuple[str, ...]
    module_name: str
    source_module: str
    class_names: tuple[str, ...]

    def render(self) -> str:
        imports = ", ".join(self.class_names)
        return (
            "# Written by `nnunetv2-gtv register`; removed by `nnunetv2-gtv remove`. Do not edit.\n"
            "# Re-exports classes of the installed nnunetv2_gtv package so that nnU-Net finds them by name.\n"
            "try:\n"
            f"    from {self.source_module} import {imports}  # noqa: F401\n"
            "except ModuleNotFoundError as error:  # nnunetv2_gtv was uninstalled: stay invisible, never break nnU-Net\n"
            "    if error.name != 'nnunetv2_gtv':\n"
            "        raise\n"
        )


TRAINER_NAMES = ("nnUNetTrainerGTV25D", "nnUNetTrainerGTV25DLocal", "nnUNetTrainerGTV25DMiddle",
                 "nnUNetTrainerGTV25DGlobal")
SCALES = ("Local", "Middle", "Global")
SHORT_RUN_NAMES = tuple(f"nnUNetTrainerGTV25D{scale}_{suffix}" for suffix in ("5epochs", "smoke") for scale in SCALES)
CPU_RECIPE_NAMES = tuple(f"nnUNetTrainerGTV25D{scale}_{suffix}" for suffix in ("cpu", "cpuRealCT", "cpuRealCTLong")
                         for scale in SCALES)
PAPER_VARIANT_NAMES = tuple(f"nnUNetTrainerGTVLocal_{network}{suffix}" for network in (
    "UNet3D", "VNet3D", "UNet25D", "UNet25D_PE", "UNet25D_PE_AG", "UNet25D_PE_AM") for suffix in ("", "_smoke"))
BUDGET_BASELINE_NAMES = ("nnUNetTrainer_20min", "nnUNetTrainer_40min")
ALL_TRAINER_NAMES = TRAINER_NAMES + SHORT_RUN_NAMES + CPU_RECIPE_NAMES + PAPER_VARIANT_NAMES + BUDGET_BASELINE_NAMES
PLANNER_NAMES = ("nnUNetPlannerGTV25D",)

SHIMS = (
    ShimModule(("training", "nnUNetTrainer", "variants"), "nnUNetTrainerGTV25D",
               "nnunetv2_gtv.training.nnUNetTrainerGTV25D", TRAINER_NAMES),
    ShimModule(("training", "nnUNetTrainer", "variants"), "short_runs",
               "nnunetv2_gtv.training.short_runs", SHORT_RUN_NAMES),
    ShimModule(("training", "nnUNetTrainer", "variants"), "cpu_recipes",
               "nnunetv2_gtv.training.cpu_recipes", CPU_RECIPE_NAMES),
    ShimModule(("training", "nnUNetTrainer", "variants"), "paper_variants",
               "nnunetv2_gtv.training.paper_variants", PAPER_VARIANT_NAMES),
    ShimModule(("training", "nnUNetTrainer", "variants"), "budget_baselines",
               "nnunetv2_gtv.training.budget_baselines", BUDGET_BASELINE_NAMES),
    ShimModule(("experiment_planning", "experiment_planners"), "nnUNetPlannerGTV25D",
               "nnunetv2_gtv.planning.nnUNetPlannerGTV25D", PLANNER_NAMES),
)


class RegistrationError(RuntimeError):
    """nnunetv2 is missing, unsupported, or its folder cannot be written."""


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def find_nnunet() -> tuple[Path, str]:
    """Location and version of the installed nnunetv2; raises RegistrationError if missing or unsupported."""
    try:
        nnunet_version = version("nnunetv2")
    except PackageNotFoundError:
        raise RegistrationError(
            "nnunetv2 is not installed in this Python environment; install it first: "
            f"pip install 'nnunetv2{SUPPORTED_NNUNET_TEXT}'"
        ) from None
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        raise RegistrationError("nnunetv2 has package metadata but cannot be imported; reinstall it")
    lower, upper = SUPPORTED_NNUNET
    if not lower <= _parse_version(nnunet_version) < upper:
        raise RegistrationError(
            f"nnunetv2 {nnunet_version} is not supported by this nnunetv2_gtv (needs nnunetv2{SUPPORTED_NNUNET_TEXT}); "
            f"nothing was written. Install a supported version: pip install 'nnunetv2{SUPPORTED_NNUNET_TEXT}'"
        )
    return Path(spec.submodule_search_locations[0]), nnunet_version


def plugin_folders(nnunet_root: Path) -> dict[Path, list[ShimModule]]:
    """The shim folders inside nnunetv2 and the modules each one holds."""
    folders: dict[Path, list[ShimModule]] = {}
    for shim in SHIMS:
        folders.setdefault(nnunet_root.joinpath(*shim.nnunet_subfolder, PLUGIN_FOLDER_NAME), []).append(shim)
    return folders


def _expected_files(shims: list[ShimModule]) -> dict[str, str]:
    files = {"__init__.py": "# Written by `nnunetv2-gtv register`: nnunetv2_gtv classes for nnU-Net's lookup.\n"}
    files.update({f"{shim.module_name}.py": shim.render() for shim in shims})
    return files


def _is_current(folder: Path, files: dict[str, str]) -> bool:
    if not folder.is_dir():
        return False
    present = {p.name for p in folder.iterdir() if p.suffix == ".py"}
    return present == set(files) and all((folder / name).read_text() == text for name, text in files.items())


def register() -> list[Path]:
    """Write (or refresh) the shim folders; returns the folders that changed (empty when already registered)."""
    nnunet_root, _ = find_nnunet()
    changed = []
    for folder, shims in plugin_folders(nnunet_root).items():
        files = _expected_files(shims)
        if _is_current(folder, files):
            continue
        if not os.access(folder.parent, os.W_OK):
            raise RegistrationError(f"cannot write into {folder.parent}: no write permission")
        # the hidden name ('.' inside) is never seen as a package by nnU-Net's pkgutil-based lookup
        staging = Path(tempfile.mkdtemp(prefix=f".{PLUGIN_FOLDER_NAME}.", dir=folder.parent))
        make_shareable(staging)
        try:
            for name, text in files.items():
                (staging / name).write_text(text)
            if folder.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{PLUGIN_FOLDER_NAME}.old.", dir=folder.parent))
                os.replace(folder, retired / PLUGIN_FOLDER_NAME)
                os.replace(staging, folder)
                shutil.rmtree(retired)
            else:
                os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        changed.append(folder)
    return changed


def remove() -> list[Path]:
    """Delete the shim folders; returns those that were removed."""
    nnunet_root, _ = find_nnunet()
    removed = []
    for folder in plugin_folders(nnunet_root):
        if folder.exists():
            # drop __init__.py first so that the folder stops being a package before anything else goes
            (folder / "__init__.py").unlink(missing_ok=True)
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


@dataclass(frozen=True)
class LookupResult:
    kind: str
    name: str
    found: bool
    detail: str


def check() -> tuple[str, list[LookupResult]]:
    """Ask nnU-Net's own lookup functions for every class of ours; returns (nnunetv2 version, results)."""
    nnunet_root, nnunet_version = find_nnunet()
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    results = []
    for shim in SHIMS:
        try:
            importlib.import_module(shim.source_module)
        except Exception as error:  # report any import failure of our own module, with its cause
            results.append(LookupResult("module", shim.source_module, False, f"cannot be imported: {error!r}"))
    for name in ALL_TRAINER_NAMES:
        try:
            cls = recursive_find_trainer_class_by_name(name)
            ok = cls.__module__.startswith("nnunetv2_gtv.")
            results.append(LookupResult("trainer", name, ok, f"{cls.__module__}.{cls.__qualname__}"))
        except RuntimeError:
            results.append(LookupResult("trainer", name, False, "not found by nnUNetv2_train / nnUNetv2_predict"))
    for name in PLANNER_NAMES:
        cls = recursive_find_python_class(str(nnunet_root / "experiment_planning"), name, "nnunetv2.experiment_planning")
        if cls is None:
            results.append(LookupResult("planner", name, False, "not found by nnUNetv2_plan_and_preprocess -pl"))
        else:
            results.append(LookupResult("planner", name, cls.__module__.startswith("nnunetv2_gtv."),
                                        f"{cls.__module__}.{cls.__qualname__}"))
    return nnunet_version, results
