"""gtv-uncertainty: fuse several nnU-Net models' probabilities and measure their disagreement.

Reads folders written by ``nnUNetv2_predict ... --save_probabilities`` (or ``nnUNetv2_train --val --npz``)
and writes per case, on the original image grid: the fused segmentation (mean probability, argmax,
connected-component rule per label), the vote entropy map (Mei et al. eq. 6), optionally the mean foreground
probability, plus summary.json / summary.csv with each model's volume and the VVC (eq. 7), for the case and,
with several labels, per label. Probabilities that gtv-predict saved for a model run in a region carry that box:
the model is left out of the fusion outside it, as gtv-predict fuses.

Exit codes: 0 all cases fused; 1 some cases failed (listed); 2 unusable inputs or output folder.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import warnings
from typing import Sequence

from tqdm import tqdm

from nnunetv2_gtv.cli.common import add_fusion_arguments, add_resume_and_part_arguments, check_run_arguments, \
    fail, finish_run, fusion_settings_from_args, fusion_settings_record, open_output_folder
from nnunetv2_gtv.ensemble.errors import FusionInputError, SingleModelWarning
from nnunetv2_gtv.ensemble.folders import DatasetInfo, check_compatible, match_cases, open_prediction_folder
from nnunetv2_gtv.ensemble.fusion import fuse_case, output_files
from nnunetv2_gtv.ensemble.summary import fuse_and_record, load_row
from nnunetv2_gtv.io.folders import OutputFolderError, check_outside_inputs

PROG = "gtv-uncertainty"


def build_parser() -> argparse.ArgumentParser:
    from nnunetv2.configuration import default_num_processes

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", nargs="+", required=True, metavar="PRED",
                        help="one probability folder per model (nnUNetv2_predict --save_probabilities output, a "
                             "fold_X[/validation] folder or a trained model folder with fold_*/validation)")
    parser.add_argument("-o", required=True, metavar="OUT", help="output folder")
    parser.add_argument("-np", type=int, default=default_num_processes,
                        help=f"cases processed in parallel (default {default_num_processes}, capped at the number "
                             "of cases); each process holds about 2 probability maps")
    add_fusion_arguments(parser)
    parser.add_argument("--allow-missing", action="store_true",
                        help="fuse cases that some folders lack from the models that have them (recorded in "
                             "missing_models)")
    add_resume_and_part_arguments(parser, "inputs and settings")
    return parser


def _fuse_one(job: tuple) -> tuple[str, dict | None, str | None]:
    """Pool worker: fuse one case and write its record; returns (case, row, error message)."""
    case, files, output_folder, dataset, settings, fingerprint, quiet_single_model = job
    with warnings.catch_warnings():
        if quiet_single_model:
            warnings.simplefilter("ignore", SingleModelWarning)
        row, error = fuse_and_record(case, lambda: fuse_case(case, files, output_folder, dataset, settings),
                                     output_folder, dataset.file_ending, settings, fingerprint)
    return case, row, error


def _run(jobs: list[tuple], num_processes: int) -> list[tuple[str, dict | None, str | None]]:
    progress = tqdm(total=len(jobs), desc="Fusing", unit="case", disable=not jobs)
    results = []
    if num_processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append(_fuse_one(job))
            progress.update()
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            for result in pool.imap_unordered(_fuse_one, jobs):
                results.append(result)
                progress.update()
    progress.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_run_arguments(parser, args, min_processes=1)
    try:
        settings = fusion_settings_from_args(args)
        settings.model_weights(len(args.i))
    except ValueError as err:
        parser.error(str(err))

    try:
        folders = [open_prediction_folder(p) for p in args.i]
        for message in check_compatible(folders):
            print(f"{PROG}: warning: {message}", file=sys.stderr)
        cases = match_cases(folders, args.allow_missing)
        check_outside_inputs(args.o, args.i)
        settings.component_rules(folders[0].dataset_info.num_labels)
    except (FusionInputError, OutputFolderError, ValueError) as err:
        return fail(PROG, str(err))
    output_folder = open_output_folder(PROG, args.o, len(folders))
    if output_folder is None:
        return 2

    dataset: DatasetInfo = folders[0].dataset_info
    inputs = [str(f.path.resolve()) for f in folders]
    fingerprint = {"inputs": inputs, "weights": list(settings.model_weights(len(folders))),
                   "settings": fusion_settings_record(settings)}
    my_cases = sorted(cases)[args.part_id::args.num_parts]
    rows, jobs = {}, []
    for case in my_cases:
        done = load_row(output_folder, case, fingerprint) if args.resume else None
        if done is not None and all(p.is_file() for p in output_files(case, output_folder, dataset.file_ending,
                                                                       settings)):
            rows[case] = done
        else:
            jobs.append((case, cases[case], output_folder, dataset, settings, fingerprint, len(folders) == 1))
    print(f"{PROG}: {len(cases)} cases in {len(folders)} folders; this part: {len(my_cases)}, "
          f"{len(my_cases) - len(jobs)} already finished, {len(jobs)} to fuse")

    failures = []
    for case, row, error in _run(jobs, args.np):
        if error is None:
            rows[case] = row
        else:
            failures.append(error)
    # rows of other parts (or earlier runs) finished with the same inputs and settings join the summary
    for case in sorted(cases):
        if case not in rows:
            row = load_row(output_folder, case, fingerprint)
            if row is not None:
                rows[case] = row
    return finish_run(PROG, argv, output_folder, rows.values(), len(folders), fingerprint,
                      len(my_cases) - len(failures), failures, settings, dataset.label_names)


if __name__ == "__main__":
    sys.exit(main())
