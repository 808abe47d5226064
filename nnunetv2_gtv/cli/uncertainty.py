"""gtv-uncertainty: fuse several nnU-Net models' probabilities and measure their disagreement.

Reads folders written by ``nnUNetv2_predict ... --save_probabilities`` (or ``nnUNetv2_train --val --npz``)
and writes per case, on the original image grid: the fused segmentation (mean probability, argmax,
connected-component rule), the vote entropy map (Mei et al. eq. 6), optionally the mean foreground
probability, plus summary.json / summary.csv with each model's volume and the VVC (eq. 7).

Exit codes: 0 all cases fused; 1 some cases failed (listed); 2 unusable inputs or output folder.
"""
from __future__ import annotations

import argparse
import multiprocessing
import shlex
import sys
import warnings
from typing import Sequence

from tqdm import tqdm

from nnunetv2_gtv.ensemble.errors import FusionInputError, SingleModelWarning
from nnunetv2_gtv.ensemble.folders import DatasetInfo, check_compatible, match_cases, open_prediction_folder
from nnunetv2_gtv.ensemble.fusion import FusionSettings, fuse_case, output_files
from nnunetv2_gtv.ensemble.summary import case_row, load_row, package_versions, record_path, write_record, \
    write_summaries
from nnunetv2_gtv.ensemble.writing import check_writable

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
    parser.add_argument("--weights", nargs="+", type=float, metavar="W",
                        help="one positive weight per model for the mean probability (default: equal); vote "
                             "entropy and VVC count every model once")
    parser.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=6,
                        help="neighbourhood of the connected-component rule (default 6, as the authors)")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--keep-all-components", action="store_true",
                      help="turn the largest-connected-component rule off")
    rule.add_argument("--min-component-ml", type=float, metavar="ML",
                      help="keep every foreground component larger than ML millilitres instead of the largest one")
    parser.add_argument("--entropy", choices=("votes", "mean-probability"), default="votes",
                        help="votes: entropy of the models' label-vote frequencies (paper eq. 6, default); "
                             "mean-probability: entropy of the mean probability map")
    parser.add_argument("--save-probability", action="store_true",
                        help="also write <case>_probability: the mean foreground probability (float32)")
    parser.add_argument("--vvc-threshold", type=float, default=FusionSettings.vvc_threshold, metavar="VVC",
                        help="review=true when VVC exceeds this (default %(default)s; the paper's Fig. 12 spans "
                             "0.06-0.16) or when every model found nothing")
    parser.add_argument("--allow-missing", action="store_true",
                        help="fuse cases that some folders lack from the models that have them (recorded in "
                             "missing_models)")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="skip cases already finished in OUT with the same inputs and settings")
    parser.add_argument("-num_parts", type=int, default=1, help="split the cases into this many parts (like "
                                                                "nnUNetv2_predict)")
    parser.add_argument("-part_id", type=int, default=0, help="which part this run does, 0..num_parts-1")
    return parser


def settings_from_args(args: argparse.Namespace) -> FusionSettings:
    if args.keep_all_components:
        components = "all"
    elif args.min_component_ml is not None:
        components = "min_volume"
    else:
        components = "largest"
    return FusionSettings(
        weights=tuple(args.weights) if args.weights else None,
        connectivity=args.connectivity,
        components=components,
        min_component_ml=args.min_component_ml or 0.0,
        entropy=args.entropy.replace("-", "_"),
        save_probability=args.save_probability,
        vvc_threshold=args.vvc_threshold,
    )


def _settings_record(settings: FusionSettings) -> dict:
    return {
        "connectivity": settings.connectivity,
        "components": settings.components,
        "min_component_ml": settings.min_component_ml,
        "entropy": settings.entropy,
        "entropy_log": "natural",
        "save_probability": settings.save_probability,
        "vvc_threshold": settings.vvc_threshold,
        "vvc_std": "population (ddof=0); VVC empty/null when fewer than 2 models or all model volumes are 0",
        "sum_tolerance": settings.sum_tolerance,
    }


def _fuse_one(job: tuple) -> tuple[str, dict | None, str | None]:
    """Pool worker: fuse one case and write its record; returns (case, row, error message)."""
    case, files, output_folder, dataset, settings, fingerprint, quiet_single_model = job
    record_path(output_folder, case).unlink(missing_ok=True)  # the case is redone: its old row is void
    with warnings.catch_warnings():
        if quiet_single_model:
            warnings.simplefilter("ignore", SingleModelWarning)
        try:
            row = case_row(fuse_case(case, files, output_folder, dataset, settings))
            write_record(output_folder, row, fingerprint)
        except (FusionInputError, OSError) as err:
            # OUT keeps images only of the cases its summary lists
            for path in output_files(case, output_folder, dataset.file_ending, settings):
                path.unlink(missing_ok=True)
            return case, None, str(err)
    return case, row, None


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


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.part_id < args.num_parts:
        parser.error(f"-part_id must be in 0..{args.num_parts - 1} (got {args.part_id}); we count from 0")
    if args.np < 1:
        parser.error("-np must be at least 1")
    try:
        settings = settings_from_args(args)
        settings.model_weights(len(args.i))
    except ValueError as err:
        parser.error(str(err))

    try:
        folders = [open_prediction_folder(p) for p in args.i]
        for message in check_compatible(folders):
            print(f"{PROG}: warning: {message}", file=sys.stderr)
        cases = match_cases(folders, args.allow_missing)
    except FusionInputError as err:
        return _fail(str(err))
    try:
        output_folder = check_writable(args.o)
    except OSError as err:
        return _fail(f"output folder {args.o} is not writable ({err})")
    if len(folders) == 1:
        print(f"{PROG}: warning: only one model given; uncertainty needs N >= 2: the entropy maps are all zeros "
              "and VVC is left empty", file=sys.stderr)

    dataset: DatasetInfo = folders[0].dataset_info
    inputs = [str(f.path.resolve()) for f in folders]
    fingerprint = {"inputs": inputs, "weights": list(settings.model_weights(len(folders))),
                   "settings": _settings_record(settings)}
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
    header = {"command": shlex.join([PROG, *(sys.argv[1:] if argv is None else argv)]),
              "versions": package_versions(), **fingerprint}
    json_file, csv_file = write_summaries(output_folder, list(rows.values()), len(folders), header)
    print(f"{PROG}: wrote {len(my_cases) - len(failures)} cases' segmentations and uncertainty maps to "
          f"{output_folder}; summary: {json_file.name}, {csv_file.name} ({len(rows)} cases)")
    if failures:
        print(f"{PROG}: error: {len(failures)} case(s) failed:", file=sys.stderr)
        for message in failures:
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
