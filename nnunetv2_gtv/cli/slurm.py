"""gtv-slurm: the six-model training and a sharded prediction as a chain of Slurm job arrays.

  gtv-slurm write -d 920 -i CTS -o OUT -j JOBS [--submit] ...   write the sbatch scripts (and submit them)
  gtv-slurm submit JOBS                                          submit a written folder again (after a fix)
  gtv-slurm status JOBS                                          which tasks are done, failed or not run
  gtv-slurm task JOBS STEP INDEX                                 what one array task runs (the scripts call it)

The chain: preprocess -> train (array, one task per model) -> predict (array, gtv-predict -num_parts N into one
output folder) -> check (every case fused, summary written); each job starts once the one before it succeeded and
is cancelled when a task before it failed. Submitting again continues where the last run stopped. See
docs/slurm.md.

Exit codes: 0 done; 1 a task failed (status: some task failed); 2 unusable arguments or jobs folder;
3 (status only) some tasks have not run yet.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from nnunetv2_gtv.cli.common import fail
from nnunetv2_gtv.scaleout.slurm import STEPS, Pipeline, Resources, SlurmJobsError, job_status, run_task, \
    submit_jobs, write_jobs

PROG = "gtv-slurm"


def _add_write_parser(commands) -> None:
    write = commands.add_parser("write", help="write the jobs folder (sbatch scripts); --submit also submits it",
                                description="Write the sbatch scripts of the chain into a jobs folder.")
    write.add_argument("-j", "--jobs", required=True, metavar="JOBS", help="jobs folder to write")
    write.add_argument("--submit", action="store_true", help="submit the chain right away and print the job ids")
    what = write.add_argument_group("what the jobs do")
    what.add_argument("-d", required=True, metavar="DATASET", help="dataset id or name (its raw folder must exist)")
    what.add_argument("-i", required=True, metavar="CTS", help="CTs to segment (anything gtv-predict -i takes)")
    what.add_argument("-o", required=True, metavar="OUT", help="output folder of the prediction, shared by its parts")
    what.add_argument("-m", nargs="+", metavar="MODEL",
                      default=list(Pipeline.__dataclass_fields__["models"].default),
                      help="models as SCALE:FOLD or TRAINER:FOLD, one training task each (default: the paper's six)")
    what.add_argument("-tr_suffix", default="", metavar="SUFFIX",
                      help="trainer variant of SCALE:FOLD models, e.g. _cpu or _smoke (default: the paper's recipe)")
    what.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="plans identifier (default: %(default)s)")
    what.add_argument("-c", default="3d_fullres", metavar="CONFIGURATION", help="configuration (default: %(default)s)")
    what.add_argument("-device", default="cuda", choices=("cuda", "cpu"), help="device (default: %(default)s)")
    what.add_argument("--num-parts", type=int, default=2, help="prediction array tasks (default: %(default)s)")
    what.add_argument("--no-preprocess", dest="preprocess", action="store_false",
                      help="the dataset is planned and preprocessed already: start with training")
    what.add_argument("--plan-args", default="", metavar="'ARGS'",
                      help="more options of nnUNetv2_plan_and_preprocess, in quotes (e.g. '-np 8')")
    what.add_argument("--train-args", default="", metavar="'ARGS'", help="more options of nnUNetv2_train, in quotes")
    what.add_argument("--predict-args", default="", metavar="'ARGS'",
                      help="more options of gtv-predict (inference, fusion), in quotes (e.g. '--save-model-predictions')")
    slurm = write.add_argument_group("Slurm resources (#SBATCH lines)")
    slurm.add_argument("--partition")
    slurm.add_argument("--gres", help="e.g. gpu:1; training and prediction only")
    slurm.add_argument("--time", help="e.g. 24:00:00")
    slurm.add_argument("--mem", help="e.g. 32G")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--account")
    slurm.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                       help="any other sbatch option, e.g. --sbatch-option=--qos=short (repeatable)")
    slurm.add_argument("--setup", action="append", default=[], metavar="LINE",
                       help="shell line every job runs first, e.g. 'module load cuda' (repeatable); the jobs put this "
                            "Python environment's commands first on PATH")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_write_parser(commands)
    submit = commands.add_parser("submit", help="submit a written jobs folder as a chain of jobs")
    submit.add_argument("jobs", metavar="JOBS")
    status = commands.add_parser("status", help="which tasks are done, failed (with their logs) or not run")
    status.add_argument("jobs", metavar="JOBS")
    task = commands.add_parser("task", help="run one task of a jobs folder (what the sbatch scripts call)")
    task.add_argument("jobs", metavar="JOBS")
    task.add_argument("step", choices=STEPS)
    task.add_argument("index", type=int)
    return parser


def _split(text: str) -> tuple[str, ...]:
    return tuple(shlex.split(text))


def _write(args: argparse.Namespace) -> int:
    pipeline = Pipeline(dataset=args.d, images=Path(args.i).resolve(), output=Path(args.o).resolve(),
                        models=tuple(args.m), trainer_suffix=args.tr_suffix, plans=args.p, configuration=args.c,
                        device=args.device, num_parts=args.num_parts, preprocess=args.preprocess,
                        plan_arguments=_split(args.plan_args), train_arguments=_split(args.train_args),
                        predict_arguments=_split(args.predict_args))
    resources = Resources(partition=args.partition, gres=args.gres, time=args.time, mem=args.mem,
                          cpus_per_task=args.cpus_per_task, account=args.account, extra=tuple(args.sbatch_option))
    jobs = write_jobs(args.jobs, pipeline, resources, args.setup)
    counts = ", ".join(f"{step} ({len(tasks)} task{'s' if len(tasks) > 1 else ''})" for step, tasks in jobs.tasks.items())
    print(f"{PROG}: wrote {counts} to {jobs.folder.resolve()}: *.sbatch, jobs.json; logs go to logs/, task states "
          "to status/")
    if args.submit:
        submit_jobs(jobs.folder)
    else:
        print(f"{PROG}: submit with: gtv-slurm submit {jobs.folder}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "write":
            return _write(args)
        if args.command == "submit":
            submit_jobs(args.jobs)
            return 0
        if args.command == "status":
            lines, code = job_status(args.jobs)
            print("\n".join(lines))
            return code
        return 0 if run_task(args.jobs, args.step, args.index) == 0 else 1
    except SlurmJobsError as err:
        return fail(PROG, str(err))


if __name__ == "__main__":
    sys.exit(main())
