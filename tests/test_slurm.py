"""gtv-slurm: the jobs folder, what a task runs after earlier runs (skip, continue, failure markers), the submission
chain; the whole chain on a real single-node Slurm (opt-in, see ``slurm_cluster``); and nnU-Net's model export /
install round trip with our trainers, followed by gtv-predict from the installed models."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import BIN, DATASET_ID, DATASET_NAME, clean_env, run_cli
from nnunetv2_gtv.cli.slurm import main
from nnunetv2_gtv.scaleout.slurm import Jobs, SlurmJobsError, job_status, run_task, submit_jobs, task_command

SLURM_TEST_VARIABLE = "GTV_SLURM_TEST"


def run(args: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def raw_dataset(nnunet_dirs, tmp_path) -> dict:
    """An (empty) raw dataset folder and a folder of CTs to predict: what writing a jobs folder looks at."""
    (Path(nnunet_dirs["nnUNet_raw"]) / "Dataset977_Slurm").mkdir()
    images = tmp_path / "cts"
    images.mkdir()
    (images / "a_0000.nii.gz").write_bytes(b"")
    return {"images": images, "jobs": tmp_path / "jobs", "out": tmp_path / "fused", **nnunet_dirs}


def write_args(data: dict, *extra) -> list:
    return ["write", "-j", data["jobs"], "-d", "977", "-i", data["images"], "-o", data["out"], *extra]


def test_write_gives_one_script_per_step_with_the_tasks_commands(raw_dataset):
    code, stdout, _ = run(write_args(raw_dataset, "-tr_suffix", "_cpu", "--num-parts", "3", "--gres", "gpu:1",
                                     "--time", "2:00:00", "--partition", "gpu", "--setup", "module load cuda",
                                     "--predict-args", "--save-model-predictions --review"))
    assert code == 0 and "submit with: gtv-slurm submit" in stdout
    jobs_folder = raw_dataset["jobs"]
    assert sorted(p.name for p in jobs_folder.glob("*.sbatch")) == ["check.sbatch", "predict.sbatch",
                                                                    "preprocess.sbatch", "train.sbatch"]
    train = (jobs_folder / "train.sbatch").read_text()
    assert "#SBATCH --array=0-5" in train and "#SBATCH --gres=gpu:1" in train and "#SBATCH --partition=gpu" in train
    assert "module load cuda" in train and f"export nnUNet_results={raw_dataset['nnUNet_results']}" in train
    assert train.rstrip().endswith(f'gtv-slurm task {jobs_folder.resolve()} train "${{SLURM_ARRAY_TASK_ID:-0}}"')
    preprocess = (jobs_folder / "preprocess.sbatch").read_text()
    assert "--array" not in preprocess and "--gres" not in preprocess and "#SBATCH --time=2:00:00" in preprocess
    assert "#SBATCH --array=0-2" in (jobs_folder / "predict.sbatch").read_text()

    jobs = Jobs.load(jobs_folder)
    trained = [(t.command[3], t.command[5]) for t in jobs.tasks["train"]]
    assert trained == [(fold, f"nnUNetTrainerGTV25D{scale}_cpu") for scale in ("Local", "Middle", "Global")
                       for fold in ("0", "1")]
    assert jobs.tasks["train"][3].model_folder == str(Path(raw_dataset["nnUNet_results"]) / "Dataset977_Slurm" /
                                                      "nnUNetTrainerGTV25DMiddle_cpu__nnUNetPlans__3d_fullres" / "fold_1")
    for part, task in enumerate(jobs.tasks["predict"]):
        command = task.command
        assert command[0] == "gtv-predict" and "--continue" in command and "--review" in command
        assert command[command.index("-num_parts") + 1] == "3" and command[command.index("-part_id") + 1] == str(part)
    (check,) = jobs.tasks["check"]
    assert "--check" in check.command and "-num_parts" not in check.command
    assert job_status(jobs_folder)[1] == 3  # nothing has run


def test_write_refuses_an_unknown_dataset_and_missing_images(raw_dataset):
    code, _, stderr = run(["write", "-j", raw_dataset["jobs"], "-d", "978", "-i", raw_dataset["images"],
                           "-o", raw_dataset["out"]])
    assert code == 2 and "dataset 978: no Dataset978_* folder in $nnUNet_raw" in stderr
    code, _, stderr = run(["write", "-j", raw_dataset["jobs"], "-d", "977", "-i", raw_dataset["images"] / "missing",
                           "-o", raw_dataset["out"]])
    assert code == 2 and "missing: the CTs to predict do not exist" in stderr
    assert not raw_dataset["jobs"].exists()


def test_tasks_skip_what_is_done_and_continue_an_interrupted_training(raw_dataset):
    assert run(write_args(raw_dataset, "--no-preprocess"))[0] == 0
    jobs = Jobs.load(raw_dataset["jobs"])
    assert "preprocess" not in jobs.tasks
    task = jobs.tasks["train"][0]
    folder = Path(task.model_folder)
    assert task_command(jobs, task) == task.command
    folder.mkdir(parents=True)
    (folder / "checkpoint_latest.pth").write_bytes(b"")
    assert task_command(jobs, task) == task.command + ["--c"]
    (folder / "checkpoint_final.pth").write_bytes(b"")
    assert task_command(jobs, task) == task.command + ["--c"]  # validation did not finish
    (folder / "validation").mkdir()
    (folder / "validation" / "summary.json").write_text("{}")
    assert task_command(jobs, task) is None
    assert "--continue" in task_command(jobs, jobs.tasks["predict"][1])


def test_preprocessing_is_skipped_only_after_it_ran_with_the_same_command(raw_dataset, monkeypatch):
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    assert run(write_args(raw_dataset, "--plan-args", "-np 1"))[0] == 0
    jobs = Jobs.load(raw_dataset["jobs"])
    (task,) = jobs.tasks["preprocess"]
    assert task.command[-2:] == ["-np", "1"] and task_command(jobs, task) == task.command
    (raw_dataset["jobs"] / "status" / "preprocess_0.done").write_text(f"preprocess\ncommand: {shlex.join(task.command)}\n")
    assert task_command(jobs, task) is None
    assert run(write_args(raw_dataset, "--plan-args", "-np 4"))[0] == 0  # rewritten with other planning options
    jobs = Jobs.load(raw_dataset["jobs"])
    assert task_command(jobs, jobs.tasks["preprocess"][0])[-2:] == ["-np", "4"]


def test_a_failed_task_is_named_with_its_exit_code_and_a_rerun_clears_it(raw_dataset, monkeypatch):
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    assert run(write_args(raw_dataset, "--no-preprocess"))[0] == 0
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    code = run_task(raw_dataset["jobs"], "train", 2, log=lambda line: None)  # no preprocessed data: nnU-Net fails
    assert code != 0
    lines, status = job_status(raw_dataset["jobs"])
    assert status == 1
    (failed,) = [line for line in lines if "FAILED" in line]
    assert failed.startswith("train_2") and "train Middle:0 (nnUNetTrainerGTV25DMiddle, fold 0)" in failed
    assert f"exit code {code}" in failed and "nnUNetv2_train 977 3d_fullres 0" in failed
    assert f"log: {(raw_dataset['jobs'] / 'logs' / 'train_41_2.log').resolve()}" in failed

    folder = Path(Jobs.load(raw_dataset["jobs"]).tasks["train"][2].model_folder)  # "fixed": the model is there
    (folder / "validation").mkdir(parents=True)
    (folder / "validation" / "summary.json").write_text("{}")
    (folder / "checkpoint_final.pth").write_bytes(b"")
    assert run_task(raw_dataset["jobs"], "train", 2, log=lambda line: None) == 0
    lines, status = job_status(raw_dataset["jobs"])
    assert status == 3 and any(line.startswith("train_2") and " done " in line for line in lines)


def test_submission_chains_the_steps_after_each_other(raw_dataset, tmp_path):
    calls = tmp_path / "calls.txt"
    sbatch = tmp_path / "sbatch"
    sbatch.write_text(f'#!/bin/bash\necho "$@" >> {calls}\necho "$(( $(wc -l < {calls}) + 100 ));cluster"\n')
    sbatch.chmod(0o755)
    assert run(write_args(raw_dataset))[0] == 0
    ids = submit_jobs(raw_dataset["jobs"], sbatch=str(sbatch), log=lambda line: None)
    assert ids == {"preprocess": "101", "train": "102", "predict": "103", "check": "104"}
    submitted = calls.read_text().splitlines()
    assert submitted[0] == f"--parsable {(raw_dataset['jobs'] / 'preprocess.sbatch').resolve()}"
    for line, previous in zip(submitted[1:], ("101", "102", "103")):
        assert line.startswith(f"--parsable --dependency=afterok:{previous} --kill-on-invalid-dep=yes")
    history = json.loads((raw_dataset["jobs"] / "submitted.json").read_text())
    assert history[-1]["jobs"] == ids

    sbatch.write_text("#!/bin/bash\necho 'sbatch: error: invalid partition specified: gpu' >&2\nexit 1\n")
    with pytest.raises(SlurmJobsError, match="invalid partition specified: gpu"):
        submit_jobs(raw_dataset["jobs"], sbatch=str(sbatch), log=lambda line: None)


# ---------------------------------------------------------------- nnU-Net's export / install of our models


def test_models_exported_and_installed_elsewhere_predict_the_same(gtv_dataset, trained_models, tmp_path):
    env = gtv_dataset["env"]
    installed = tmp_path / "other_machine_results"
    installed.mkdir()
    for scale, folder in trained_models.items():
        archive = tmp_path / f"{scale}.zip"
        run_cli(["nnUNetv2_export_model_to_zip", "-d", str(DATASET_ID), "-o", str(archive), "-c", "3d_fullres",
                 "-tr", folder.name.split("__")[0], "-f", "0"], env)
        run_cli(["nnUNetv2_install_pretrained_model_from_zip", str(archive)], {**env, "nnUNet_results": str(installed)})
    assert sorted(p.name for p in (installed / DATASET_NAME).iterdir()) == sorted(f.name for f in
                                                                                 trained_models.values())
    test_ct = next((gtv_dataset["raw"] / "imagesTs").glob("*_0000.nii.gz"))
    outputs = {}
    for name, results in (("here", gtv_dataset["dirs"]["nnUNet_results"]), ("installed", str(installed))):
        outputs[name] = tmp_path / name
        run_cli(["gtv-predict", "-i", str(test_ct), "-o", str(outputs[name]), "-d", str(DATASET_ID), "-m", "Local:0",
                 "Middle:0", "Global:0", "-tr_suffix", "_smoke", "-device", "cpu", "-np", "0", "--disable_progress_bar"],
                {**env, "nnUNet_results": results})
    for output in outputs["here"].glob("*.nii.gz"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(output))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(outputs["installed"] / output.name))))


# ---------------------------------------------------------------- a real Slurm


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _install_slurm() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ,
                                                                             "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            pytest.skip(f"cannot install Debian's slurm-wlm ({' '.join(command)}: {done.stderr.strip()[-300:]})")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A single-node Slurm on this machine (Debian's slurm-wlm: munged, slurmctld and slurmd on localhost, in a
    temporary folder, on free ports); yields the environment for its client commands. Opt-in, since the chain
    it runs takes several minutes."""
    if os.environ.get(SLURM_TEST_VARIABLE) != "1":
        pytest.skip(f"starts a Slurm cluster on this machine and runs the six-model chain (about 10 minutes on 2 "
                    f"cores): set {SLURM_TEST_VARIABLE}=1 to run it")
    if os.geteuid() != 0:
        pytest.skip("needs root to install and start Debian's slurm-wlm")
    _install_slurm()
    started_munge = subprocess.run(["munge", "-n"], capture_output=True).returncode != 0
    if started_munge:
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    root = tmp_path_factory.mktemp("slurm")
    node = socket.gethostname().split(".")[0]
    config = root / "slurm.conf"
    config.write_text("\n".join([
        "ClusterName=gtvtest", f"SlurmctldHost={node}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool", f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid", f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd.log", f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        f"NodeName={node} CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP", ""]))
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    env = {**os.environ, "SLURM_CONF": str(config)}
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([daemon, "-f", str(config)], check=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                           env=env).stdout:
            if time.monotonic() > deadline:
                pytest.fail(f"the Slurm node did not come up: {(root / 'slurmd.log').read_text()[-2000:]}")
            time.sleep(1)
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env)
        for daemon in ("slurmd", "slurmctld"):
            pid_file = root / f"{daemon}.pid"
            if pid_file.is_file():
                subprocess.run(["kill", pid_file.read_text().strip()])
        if started_munge:  # leave the machine as the test found it
            subprocess.run(["pkill", "-x", "munged"])


def _wait_for_queue(env: dict, timeout: float = 1500) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=env).stdout.strip():
        assert time.monotonic() < deadline, "the chain did not end in time"
        time.sleep(5)


@pytest.mark.slow
def test_the_chain_on_a_real_slurm_stops_at_a_failed_task_and_continues_after_the_fix(slurm_cluster, tmp_path):
    from nnunetv2_gtv.demo.synthetic import write_dataset

    dirs = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in dirs.values():
        folder.mkdir()
    raw = write_dataset(str(dirs["nnUNet_raw"]), 976, num_train=6, num_test=3, in_plane_size=80, num_slices=36,
                        orientations="mixed", seed=5)
    images = tmp_path / "cts"
    shutil.copytree(raw / "imagesTs", images)
    broken = images / "broken_0000.nii.gz"
    broken.write_bytes(next(images.glob("*.nii.gz")).read_bytes()[:400])  # a header whose pixels are cut off
    env = {**clean_env(**{k: str(v) for k, v in dirs.items()}, nnUNet_n_proc_DA="0", OMP_NUM_THREADS="1"),
           "SLURM_CONF": slurm_cluster["SLURM_CONF"]}
    jobs = tmp_path / "jobs"
    out = tmp_path / "fused"
    written = run_cli(["gtv-slurm", "write", "-j", str(jobs), "-d", "976", "-i", str(images), "-o", str(out),
                       "-tr_suffix", "_smoke", "-device", "cpu", "--num-parts", "2", "--plan-args", "-np 1",
                       "--cpus-per-task", "1", "--submit"], env)
    assert "check: job" in written.stdout
    _wait_for_queue(env)
    status = run_cli(["gtv-slurm", "status", str(jobs)], env, check=False)
    assert status.returncode == 1, status.stdout
    failed = [line for line in status.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and failed[0].startswith("predict_") and "log: " in failed[0], status.stdout
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()}
    assert states["check_0"] == "not" and all(states[f"train_{i}"] == "done" for i in range(6)), status.stdout
    checkpoints = {p: p.stat().st_mtime_ns for p in dirs["nnUNet_results"].rglob("checkpoint_final.pth")}
    assert len(checkpoints) == 6

    shutil.copyfile(next(raw.glob("imagesTs/*_0000.nii.gz")), broken)  # the fix
    run_cli(["gtv-slurm", "submit", str(jobs)], env)
    _wait_for_queue(env)
    status = run_cli(["gtv-slurm", "status", str(jobs)], env, check=False)
    assert status.returncode == 0, status.stdout
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints  # nothing retrained
    second_train_job = json.loads((jobs / "submitted.json").read_text())[-1]["jobs"]["train"]
    for task in range(6):
        assert "already done, nothing to run" in (jobs / "logs" / f"train_{second_train_job}_{task}.log").read_text()

    single = tmp_path / "single"
    run_cli(["gtv-predict", "-i", str(images), "-o", str(single), "-d", "976", "-tr_suffix", "_smoke", "-device", "cpu",
             "--disable_progress_bar"], env)
    fused_files = sorted(p.name for p in single.glob("*.nii.gz"))
    assert fused_files == sorted(p.name for p in out.glob("*.nii.gz")) and len(fused_files) == 8
    for name in fused_files:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(single / name))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(out / name))))
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(row["case"] for row in summary["cases"]) == sorted(n[:-7] for n in fused_files if "_entropy" not in n)
