"""Shared fixtures: nnU-Net folders in a temporary directory, and a clean environment for subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Dataset910_OpenKBPHN"
BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict:
    """The environment of a fresh shell: this Python's bin folder on PATH, no nnU-Net variables unless given."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("nnUNet")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console command of this environment; on failure show its output."""
    result = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\n"
                             f"STDERR:\n{result.stderr[-4000:]}")
    return result


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
