"""The paper's pipeline as a chain of Slurm jobs: preprocessing, the six models' training as one job array,
prediction of a folder sharded over an array, and a final check.

``write_jobs`` puts into a jobs folder:

- ``jobs.json``: every task's command line, fixed when the folder is written (the plan of the run);
- ``preprocess.sbatch``, ``train.sbatch`` (array: one task per model), ``predict.sbatch`` (array: one task per
  part of the cases, ``gtv-predict -num_parts N -part_id i``, all into one output folder) and ``check.sbatch``;
  each task runs ``gtv-slurm task JOBS STEP INDEX``, which runs the task's command and leaves
  ``status/<step>_<index>.done`` or ``.failed`` (the command, its exit code and its log);
- ``logs/``: one log per task (``<step>_<job id>_<index>.log``).

``submit_jobs`` submits the scripts in order with ``sbatch --parsable``, each after the one before it succeeded
(``--dependency=afterok:<id>``) and cancelled if that can no longer happen (``--kill-on-invalid-dep=yes``): a
failed array task stops the chain, and ``job_status`` names it. Submitting again after a fix continues:
a step whose work is there is skipped (preprocessing done with the same command, a model with its final
checkpoint and validation), an interrupted training continues from its checkpoint (``nnUNetv2_train --c``), prediction skips the
cases finished before (``gtv-predict --continue``).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from nnunetv2_gtv import __version__
from nnunetv2_gtv.dataset_conversion.staging import existing_datasets
from nnunetv2_gtv.io.atomic import write_text
from nnunetv2_gtv.inference.models import PAPER_FOLDS, SCALES, TRAINER_PREFIX

JOBS_FILE = "jobs.json"
STEPS = ("preprocess", "train", "predict", "check")
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
# variables a task passes on to nnU-Net and torch when they are set where the jobs folder is written
PASSED_VARIABLES = NNUNET_FOLDERS + ("nnUNet_n_proc_DA", "nnUNet_def_n_proc", "nnUNet_compile", "OMP_NUM_THREADS")


class SlurmJobsError(ValueError):
    """A jobs folder, a task or a submission that cannot be used."""


@dataclass(frozen=True)
class Resources:
    """``#SBATCH`` options. ``gres`` goes to training and prediction only (preprocessing and the check use
    the CPU); the others to every step."""

    partition: str | None = None
    gres: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    account: str | None = None
    extra: tuple[str, ...] = ()  # further options as sbatch takes them, e.g. "--qos=short"

    def sbatch_options(self, step: str) -> list[str]:
        options = [f"--{name.replace('_', '-')}={value}" for name, value in
                   (("partition", self.partition), ("time", self.time), ("mem", self.mem),
                    ("cpus_per_task", self.cpus_per_task), ("account", self.account)) if value is not None]
        if self.gres and step in ("train", "predict"):
            options.append(f"--gres={self.gres}")
        return options + list(self.extra)


@dataclass(frozen=True)
class Pipeline:
    """What the jobs do. ``models`` as gtv-predict's ``-m``: SCALE:FOLD (trained as
    nnUNetTrainerGTV25D<SCALE><trainer_suffix>) or TRAINER:FOLD."""

    dataset: str
    images: Path
    output: Path
    models: tuple[str, ...] = tuple(f"{scale}:{fold}" for scale in SCALES for fold in PAPER_FOLDS)
    trainer_suffix: str = ""
    plans: str = "nnUNetPlans"
    configuration: str = "3d_fullres"
    device: str = "cuda"
    num_parts: int = 2
    preprocess: bool = True
    plan_arguments: tuple[str, ...] = ()  # more options of nnUNetv2_plan_and_preprocess
    train_arguments: tuple[str, ...] = ()  # more options of nnUNetv2_train
    predict_arguments: tuple[str, ...] = ()  # more options of gtv-predict (inference and fusion)


@dataclass
class Task:
    step: str
    index: int
    name: str  # what the task is, for logs and status
    command: list[str]
    model_folder: str | None = None  # training: nnU-Net's fold folder of the model

    @property
    def marker(self) -> str:
        return f"{self.step}_{self.index}"


@dataclass
class Jobs:
    folder: Path
    pipeline: dict
    resources: dict
    environment: dict[str, str]
    setup: list[str]
    tasks: dict[str, list[Task]] = field(default_factory=dict)

    def save(self) -> Path:
        document = {"written_by": f"nnunetv2_gtv {__version__}", "pipeline": self.pipeline,
                    "resources": self.resources, "environment": self.environment, "setup": self.setup,
                    "tasks": {step: [asdict(task) for task in tasks] for step, tasks in self.tasks.items()}}
        return write_text(json.dumps(document, indent=1, default=str) + "\n", self.folder / JOBS_FILE)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Jobs":
        path = Path(folder) / JOBS_FILE
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SlurmJobsError(f"{path}: not a jobs file written by gtv-slurm ({err})") from err
        tasks = {step: [Task(**task) for task in entries] for step, entries in document["tasks"].items()}
        return cls(Path(folder), document["pipeline"], document["resources"], document["environment"],
                   document["setup"], tasks)

    def task(self, step: str, index: int) -> Task:
        if step not in self.tasks:
            raise SlurmJobsError(f"{self.folder / JOBS_FILE}: no step '{step}' (steps: {', '.join(self.tasks)})")
        if not 0 <= index < len(self.tasks[step]):
            raise SlurmJobsError(f"{self.folder / JOBS_FILE}: step '{step}' has tasks 0..{len(self.tasks[step]) - 1}, "
                                 f"not {index}")
        return self.tasks[step][index]


def _trainer_and_fold(model: str, trainer_suffix: str) -> tuple[str, str]:
    name, _, fold = model.rpartition(":")
    if not name or not fold or not (fold.isdigit() or fold == "all"):
        raise SlurmJobsError(f"model '{model}': write SCALE:FOLD (e.g. Local:0) or TRAINER:FOLD")
    trainer = f"{TRAINER_PREFIX}{name}{trainer_suffix}" if name in SCALES else name
    return trainer, fold


def dataset_name(dataset: str) -> str:
    """``920`` -> the ``Dataset920_*`` folder of $nnUNet_raw (or, when preprocessing is done, $nnUNet_preprocessed)."""
    if not dataset.isdigit():
        return dataset
    searched = []
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        folder = os.environ.get(variable)
        if not folder:
            continue
        found = existing_datasets(Path(folder), int(dataset))
        if len(found) > 1:
            raise SlurmJobsError(f"dataset {dataset}: more than one folder in ${variable} ({folder}): "
                                 f"{', '.join(p.name for p in found)}")
        if found:
            return found[0].name
        searched.append(f"${variable} ({folder})")
    raise SlurmJobsError(f"dataset {dataset}: no Dataset{int(dataset):03d}_* folder in "
                         f"{' or '.join(searched) or '$nnUNet_raw (not set)'}")


def plan_tasks(pipeline: Pipeline) -> dict[str, list[Task]]:
    """Every task's command line."""
    name = dataset_name(pipeline.dataset)
    dataset_id = name[len("Dataset"):].split("_", 1)[0]
    results = os.environ.get("nnUNet_results")
    if not results:
        raise SlurmJobsError("nnUNet_results is not set: the jobs need the folder where the models go")
    tasks: dict[str, list[Task]] = {}
    if pipeline.preprocess:
        plans_name = ["-overwrite_plans_name", pipeline.plans] if pipeline.plans != "nnUNetPlans" else []
        tasks["preprocess"] = [Task("preprocess", 0, f"preprocess {name}", [
            "nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-pl", "nnUNetPlannerGTV25D", "-c",
            pipeline.configuration, *plans_name, *pipeline.plan_arguments])]
    tasks["train"] = []
    for index, model in enumerate(pipeline.models):
        trainer, fold = _trainer_and_fold(model, pipeline.trainer_suffix)
        folder = Path(results) / name / f"{trainer}__{pipeline.plans}__{pipeline.configuration}" / f"fold_{fold}"
        tasks["train"].append(Task("train", index, f"train {model} ({trainer}, fold {fold})", [
            "nnUNetv2_train", dataset_id, pipeline.configuration, fold, "-tr", trainer, "-p", pipeline.plans,
            "-device", pipeline.device, *pipeline.train_arguments], str(folder)))
    predict = ["gtv-predict", "-i", str(pipeline.images), "-o", str(pipeline.output), "-d", name, "-m",
               *pipeline.models, "-tr_suffix", pipeline.trainer_suffix, "-p", pipeline.plans, "-c",
               pipeline.configuration, "-device", pipeline.device, *pipeline.predict_arguments]
    tasks["predict"] = [Task("predict", part, f"predict part {part + 1} of {pipeline.num_parts}",
                             predict + ["-num_parts", str(pipeline.num_parts), "-part_id", str(part), "--continue",
                                        "--disable_progress_bar"])
                        for part in range(pipeline.num_parts)]
    tasks["check"] = [Task("check", 0, f"check that every case of {pipeline.images} is fused",
                           predict + ["--check", "--disable_progress_bar"])]
    return tasks


def _script(jobs: Jobs, step: str, resources: Resources) -> str:
    tasks = jobs.tasks[step]
    lines = ["#!/bin/bash", f"#SBATCH --job-name=gtv-{step}"]
    if len(tasks) > 1:
        lines += [f"#SBATCH --array=0-{len(tasks) - 1}",
                  f"#SBATCH --output={jobs.folder.resolve() / 'logs' / step}_%A_%a.log"]
    else:
        lines.append(f"#SBATCH --output={jobs.folder.resolve() / 'logs' / step}_%j_0.log")
    lines += [f"#SBATCH {option}" for option in resources.sbatch_options(step)]
    lines += [f"# written by gtv-slurm (nnunetv2_gtv {__version__}); what each task runs:"]
    lines += [f"#   {task.index}: {shlex.join(task.command)}" for task in tasks]
    lines += ["set -euo pipefail", *jobs.setup]
    lines += [_export_line(key, value) for key, value in sorted(jobs.environment.items())]
    lines.append(f"exec gtv-slurm task {shlex.quote(str(jobs.folder.resolve()))} {step} "
                 "\"${SLURM_ARRAY_TASK_ID:-0}\"")
    return "\n".join(lines) + "\n"


def write_jobs(folder: str | os.PathLike, pipeline: Pipeline, resources: Resources = Resources(),
               setup: Sequence[str] = ()) -> Jobs:
    """Write the jobs folder (see the module's docstring). ``setup``: shell lines every job runs first (e.g.
    ``module load cuda``); the jobs also put this Python environment's commands first on PATH."""
    if pipeline.num_parts < 1:
        raise SlurmJobsError(f"the prediction needs at least 1 part, got {pipeline.num_parts}")
    if not pipeline.images.exists():
        raise SlurmJobsError(f"{pipeline.images}: the CTs to predict do not exist")
    folder = Path(folder)
    environment = {key: os.environ[key] for key in PASSED_VARIABLES if os.environ.get(key)}
    environment["PATH"] = str(Path(sys.executable).parent)  # put first on the job's PATH
    jobs = Jobs(folder, {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(pipeline).items()},
                asdict(resources), environment, list(setup), plan_tasks(pipeline))
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    (folder / "status").mkdir(exist_ok=True)
    jobs.save()
    for step in jobs.tasks:
        script = write_text(_script(jobs, step, resources), folder / f"{step}.sbatch")
        script.chmod(0o755)
    return jobs


def _export_line(key: str, value: str) -> str:
    """PATH keeps the job's own PATH after this environment's commands; other values are quoted."""
    if key == "PATH":
        return f"export PATH={shlex.quote(value)}:\"$PATH\""
    return f"export {key}={shlex.quote(value)}"


def _marker(jobs: Jobs, task: Task, suffix: str) -> Path:
    return jobs.folder / "status" / f"{task.marker}.{suffix}"


def task_command(jobs: Jobs, task: Task) -> list[str] | None:
    """The command a task runs now, given what earlier runs left (None: nothing left to do)."""
    command = list(task.command)
    done = _marker(jobs, task, "done")
    if task.step == "preprocess" and done.is_file() and f"command: {shlex.join(command)}" in done.read_text():
        return None
    if task.step == "train":
        folder = Path(task.model_folder)
        if (folder / "checkpoint_final.pth").is_file() and (folder / "validation" / "summary.json").is_file():
            return None
        if any(folder.glob("checkpoint_*.pth")):
            command.append("--c")
    return command


def run_task(folder: str | os.PathLike, step: str, index: int, log: Callable[[str], None] = print) -> int:
    """Run one task of a jobs folder and leave its status marker; returns the command's exit code."""
    jobs = Jobs.load(folder)
    task = jobs.task(step, index)
    done, failed = _marker(jobs, task, "done"), _marker(jobs, task, "failed")
    command = task_command(jobs, task)
    failed.unlink(missing_ok=True)
    if command is None:
        log(f"gtv-slurm: {task.marker} ({task.name}): already done, nothing to run")
        done.touch()
        return 0
    done.unlink(missing_ok=True)
    log(f"gtv-slurm: {task.marker} ({task.name}) on {os.uname().nodename}: {shlex.join(command)}")
    start = time.monotonic()
    try:
        code = subprocess.run(command).returncode
    except OSError as err:
        log(f"gtv-slurm: {task.marker}: cannot start {command[0]} ({err})")
        code = 127
    minutes = (time.monotonic() - start) / 60
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    where = str((jobs.folder / "logs" / f"{step}_{job}_{index}.log").resolve()) if job else "the task's output"
    if code == 0:
        write_text(f"{task.name}\nfinished in {minutes:.1f} min\ncommand: {shlex.join(command)}\n", done)
        log(f"gtv-slurm: {task.marker} ({task.name}) done in {minutes:.1f} min")
    else:
        write_text(f"{task.name}\nexit code {code} after {minutes:.1f} min\ncommand: {shlex.join(command)}\n"
                   f"log: {where}\n", failed)
        log(f"gtv-slurm: {task.marker} ({task.name}) FAILED with exit code {code}; log: {where}")
    return code


def job_status(folder: str | os.PathLike) -> tuple[list[str], int]:
    """One line per task (done, failed with its exit code and log, or not run); exit code 1 if a task
    failed, 3 if some have not run yet, else 0."""
    jobs = Jobs.load(folder)
    lines, failed, pending = [], 0, 0
    for step, tasks in jobs.tasks.items():
        for task in tasks:
            if _marker(jobs, task, "failed").is_file():
                details = _marker(jobs, task, "failed").read_text().splitlines()[1:]
                lines.append(f"{task.marker:<12} FAILED   {task.name}: " + "; ".join(details))
                failed += 1
            elif _marker(jobs, task, "done").is_file():
                lines.append(f"{task.marker:<12} done     {task.name}")
            else:
                lines.append(f"{task.marker:<12} not run  {task.name}")
                pending += 1
    return lines, 1 if failed else (3 if pending else 0)


def submit_jobs(folder: str | os.PathLike, sbatch: str = "sbatch",
                log: Callable[[str], None] = print) -> dict[str, str]:
    """Submit the jobs folder's scripts as a chain; returns step -> job id (also appended to submitted.json)."""
    jobs = Jobs.load(folder)
    ids: dict[str, str] = {}
    previous = None
    for step in (s for s in STEPS if s in jobs.tasks):
        command = [sbatch, "--parsable"]
        if previous:
            command += [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"]
        command.append(str((jobs.folder / f"{step}.sbatch").resolve()))
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as err:
            raise SlurmJobsError(f"cannot run {sbatch} ({err}): is Slurm installed here?") from err
        if result.returncode != 0:
            raise SlurmJobsError(f"{shlex.join(command)} failed ({result.returncode}): {result.stderr.strip()}"
                                 + (f"; submitted before it: {ids}" if ids else ""))
        previous = ids[step] = result.stdout.strip().split(";")[0]
        tasks = len(jobs.tasks[step])
        log(f"gtv-slurm: {step}: job {previous}" + (f" ({tasks} array tasks)" if tasks > 1 else "")
            + (f", after {list(ids)[-2]} succeeded" if len(ids) > 1 else ""))
    history = jobs.folder / "submitted.json"
    earlier = json.loads(history.read_text()) if history.is_file() else []
    write_text(json.dumps(earlier + [{"time": time.strftime("%Y-%m-%d %H:%M:%S"), "jobs": ids}], indent=1) + "\n",
               history)
    return ids
