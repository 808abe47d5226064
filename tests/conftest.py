"""Shared fixtures: nnU-Net folders in a temporary directory, and a clean environment for subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DATASET_ID = 989
DATASET_NAME = f"Dataset{DATASET_ID}_SyntheticGTV"
SCALES = ("Local", "Middle", "Global")
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Dataset910_OpenKBPHN"
BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict:
    """The environment of a fresh shell: this Python's bin folder on PATH, no nnU-Net variables unless given."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("nnUNet")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("nnUNet_def_n_proc", "1")  # nnU-Net's export pools default to 8 workers of ~0.9 GiB
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console command of this environment; on failure show its output."""
    result = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\n"
                             f"STDERR:\n{result.stderr[-4000:]}")
    return result


def kill_while_writing(target: Path) -> None:
    """A process killed (SIGKILL) in the middle of writing ``target`` through the project's writer: it leaves the
    writer's temporary file behind, owned by a process that no longer exists."""
    script = ("import os, signal, sys\n"
              "from nnunetv2_gtv.io.atomic import write_file\n"
              "write_file(sys.argv[1], lambda f: (f.write(b'half'), f.flush(), os.kill(os.getpid(), signal.SIGKILL)))")
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr


# fixtures that run nnU-Net's commands (plan and preprocess; train): every test that uses one, directly or through
# another fixture, is marked slow, so that `pytest -m "not slow"` runs no nnU-Net command and trains nothing
NNUNET_COMMAND_FIXTURES = {"gtv_dataset", "trained_models"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if NNUNET_COMMAND_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch) -> dict:
    """nnUNet_raw / nnUNet_preprocessed / nnUNet_results under tmp_path, set for this process and subprocesses."""
    dirs = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, path in dirs.items():
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    return {name: str(path) for name, path in dirs.items()}


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "dataset.json").is_file():
        pytest.skip(f"real CT data not present at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def gtv_dataset(tmp_path_factory) -> dict:
    """A tiny synthetic dataset (6 training cases, 1 test case, mixed orientations), planned and preprocessed with
    the stock CLI and our planner. Keys: dirs (nnU-Net folders), env (for subprocesses), raw, data (3d_fullres)."""
    from nnunetv2_gtv.demo.synthetic import write_dataset

    root = tmp_path_factory.mktemp("nnunet")
    dirs = {name: str(root / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for path in dirs.values():
        Path(path).mkdir()
    raw = write_dataset(dirs["nnUNet_raw"], DATASET_ID, num_train=6, num_test=1, in_plane_size=88, num_slices=40,
                        orientations="mixed", seed=11)
    env = clean_env(**dirs, nnUNet_n_proc_DA="0")
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-pl", "nnUNetPlannerGTV25D", "-c", "3d_fullres",
             "-np", "2"], env)
    return {"dirs": dirs, "env": env, "raw": raw,
            "data": Path(dirs["nnUNet_preprocessed"]) / DATASET_NAME / "nnUNetPlans_3d_fullres"}


@pytest.fixture(scope="session")
def trained_models(gtv_dataset) -> dict:
    """Each sampling trainer's short variant (``..._smoke``), fold 0, trained through the stock nnUNetv2_train on the
    CPU with --npz. Returns {scale: model folder}."""
    models = {}
    for scale in SCALES:
        trainer = f"nnUNetTrainerGTV25D{scale}_smoke"
        run_cli(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu", "--npz"],
                gtv_dataset["env"], timeout=900)
        models[scale] = Path(gtv_dataset["dirs"]["nnUNet_results"]) / DATASET_NAME / f"{trainer}__nnUNetPlans__3d_fullres"
    return models
