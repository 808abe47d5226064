"""What the benchmarks share: nnU-Net's folders and commands, the real CTs as a dataset, short trainings, the
package's Dice on files, and a line naming the machine and its load for every figure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

SCALES = ("Local", "Middle", "Global")
REAL_ID = 982
REAL_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset910_OpenKBPHN"
REAL_TEST_CASES = 2
FOLD = "all"


def logger(name: str) -> Callable[[str], None]:
    """``log(message)`` printing ``[name HH:MM:SS] message`` at once."""
    def log(message: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", flush=True)
    return log


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def machine_line() -> str:
    """The machine behind a figure: CPU model and cores, and the load average now."""
    from nnunetv2_gtv.inference.settings import cpu_description

    return f"{os.cpu_count()} CPU cores ({cpu_description()}), load average " \
           f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"


def run_logged(command: list[str], log_file: Path, env: dict | None = None,
               log: Callable[[str], None] = print) -> float:
    """Run a console command with its output in ``log_file``; returns its wall time; raises naming the log."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log(f"$ {' '.join(command)}  (output: {log_file})")
    start = time.perf_counter()
    with open(log_file, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed with exit code {result.returncode}; see {log_file}")
    return time.perf_counter() - start


def dice_of_files(prediction: Path, reference: Path) -> float:
    """The package's Dice of two label files' foregrounds."""
    import SimpleITK as sitk

    from nnunetv2_gtv.evaluation.metrics import dice_score

    return dice_score(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))) > 0,
                      sitk.GetArrayFromImage(sitk.ReadImage(str(reference))) > 0)


@dataclass(frozen=True)
class Schedule:
    """A short training: ``epochs`` x ``iterations`` at ``batch``; Adam at ``lr`` (the paper's 1e-4 needs far
    longer than a CPU benchmark can afford)."""

    epochs: int = 4
    iterations: int = 50
    batch: int = 4
    lr: float = 1e-3


def configure_environment(work: Path) -> dict[str, Path]:
    """nnU-Net folders under ``work``; must run before nnunetv2 is imported (it reads them at import)."""
    if "nnunetv2.paths" in sys.modules:
        raise RuntimeError("configure_environment must run before nnunetv2 is imported")
    dirs = {name: work / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    return dirs


def work_folders(work: Path) -> dict[str, Path]:
    """:func:`configure_environment` for a benchmark's working folder, plus ``work`` and ``logs``; nnU-Net's pools
    sized to this machine."""
    work = work.resolve()
    dirs = configure_environment(work)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    return dirs | {"work": work, "logs": work / "logs"}


def run_stages(path: Path, stages: dict[str, Callable[[dict], None]], chosen: list[str],
               log: Callable[[str], None]) -> dict:
    """The ``chosen`` of ``stages`` (name -> function of the record) in their order; the record (``path``, a JSON kept
    across reruns, with the machine of the latest run) is saved after each."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    record["machine"] = machine_line()
    for name, stage in stages.items():
        if name in chosen:
            log(f"stage {name}: {machine_line()}")
            stage(record)
            path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def nnunet_command(name: str) -> str:
    """A console script of this environment (nnU-Net's or ours)."""
    return str(Path(sys.executable).parent / name)


def real_dataset(raw: Path, source: Path = REAL_SOURCE, num_test: int = REAL_TEST_CASES) -> str:
    """The real cases as a raw dataset whose last ``num_test`` cases are test cases (images and labels linked)."""
    name = f"Dataset{REAL_ID}_OpenKBPHN"
    target = raw / name
    if (target / "dataset.json").is_file():
        return name
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (source / "imagesTr").glob("*_0000.nii.gz"))
    for split, chosen in (("Tr", cases[:-num_test]), ("Ts", cases[-num_test:])):
        (target / f"images{split}").mkdir(parents=True, exist_ok=True)
        (target / f"labels{split}").mkdir(parents=True, exist_ok=True)
        for case in chosen:
            (target / f"images{split}" / f"{case}_0000.nii.gz").symlink_to(source / "imagesTr" / f"{case}_0000.nii.gz")
            (target / f"labels{split}" / f"{case}.nii.gz").symlink_to(source / "labelsTr" / f"{case}.nii.gz")
    dataset_json = json.loads((source / "dataset.json").read_text())
    dataset_json["numTraining"] = len(cases) - num_test
    (target / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    return name


def plan_and_preprocess(dataset_name: str, preprocessed: Path) -> None:
    if (preprocessed / dataset_name / "nnUNetPlans_3d_fullres").is_dir():
        return
    subprocess.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", dataset_name[7:10],
                    "-pl", "nnUNetPlannerGTV25D", "-c", "3d_fullres", "-np", "2"],
                   check=True, stdout=subprocess.DEVNULL)


def train(dataset_name: str, scale: str, schedule: Schedule, results: Path, fold: int | str = FOLD) -> Path:
    """Train nnUNetTrainerGTV25D<scale> with ``schedule``; returns its checkpoint (reused when it exists)."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer_name = f"nnUNetTrainerGTV25D{scale}"
    checkpoint = results / dataset_name / f"{trainer_name}__nnUNetPlans__3d_fullres" / f"fold_{fold}" / \
        "checkpoint_final.pth"
    if checkpoint.is_file():
        return checkpoint
    trainer = get_trainer_from_args(dataset_name, "3d_fullres", fold, trainer_name, device=torch.device("cpu"))
    trainer.num_epochs = schedule.epochs
    trainer.num_iterations_per_epoch = schedule.iterations
    trainer.num_val_iterations_per_epoch = 2
    trainer.initial_lr = schedule.lr
    trainer.initialize()
    trainer.batch_size = schedule.batch
    trainer.run_training()
    return checkpoint


def nnunet_tile_passes(predictor, image: Path, step: float, mirroring: bool) -> int:
    """Network passes of nnU-Net's sliding window (``predictor``'s tile layout at ``step``, times its mirrorings
    when ``mirroring``) over ``image`` resampled to the plans' spacing and padded to at least the patch, as
    nnU-Net pads it. Reads the image header only."""
    import SimpleITK as sitk
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image))
    reader.ReadImageInformation()
    configuration = predictor.configuration_manager
    shape = compute_new_shape(reader.GetSize()[::-1], reader.GetSpacing()[::-1], configuration.spacing)
    shape = tuple(int(n) for n in np.maximum(shape, configuration.patch_size))
    saved_step = predictor.tile_step_size
    predictor.tile_step_size = step
    try:
        tiles = len(predictor._internal_get_sliding_window_slicers(shape))
    finally:
        predictor.tile_step_size = saved_step
    return tiles * (2 ** len(predictor.allowed_mirroring_axes or ()) if mirroring else 1)
