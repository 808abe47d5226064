"""Options and run bookkeeping shared by gtv-uncertainty and gtv-predict: same option names, same meaning,
same summary files and exit codes."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from nnunetv2_gtv.ensemble.fusion import AUTO_COMPONENTS, OUTSIDE_REGION_RULES, FusionSettings
from nnunetv2_gtv.ensemble.postprocessing import read_postprocessing
from nnunetv2_gtv.ensemble.summary import package_versions, write_summaries
from nnunetv2_gtv.io.atomic import check_writable, remove_stale_temporaries


def add_fusion_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, rule_file_default: str = ""
                         ) -> None:
    """The options that shape the fused outputs; ``rule_file_default`` says which rule file a command reads when
    none is given."""
    parser.add_argument("--weights", nargs="+", type=float, metavar="W",
                        help="one positive weight per model for the mean probability (default: equal); vote "
                             "entropy and VVC count every model once")
    parser.add_argument("--connectivity", type=int, choices=(6, 18, 26),
                        help="neighbourhood of the connected-component rules (default: 6, as the authors; a "
                             "--postprocessing file sets its own)")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--postprocessing", metavar="JSON",
                      help="each label's connected-component rule, as gtv-postprocessing chose it on "
                           "cross-validation. Without this or another rule option: the largest component with one "
                           "foreground label (the paper), every component with several (nothing is deleted)"
                           + rule_file_default)
    rule.add_argument("--largest-component", dest="components", action="store_const", const="largest",
                      help="keep each label's largest connected component only")
    rule.add_argument("--keep-all-components", dest="components", action="store_const", const="all",
                      help="keep every component of every label")
    rule.add_argument("--min-component-ml", type=float, metavar="ML",
                      help="keep each label's components larger than ML millilitres")
    parser.add_argument("--outside-region", choices=OUTSIDE_REGION_RULES, default=FusionSettings.outside_region,
                        help="where a voxel lies outside a model's region (gtv-predict runs Local and Middle models "
                             "in their sampling region only): abstain = that model is left out of the mean and the "
                             "votes there (default); background = it votes background with probability 1")
    parser.add_argument("--entropy", choices=("votes", "mean-probability"), default="votes",
                        help="votes: entropy of the models' label-vote frequencies (paper eq. 6, default); "
                             "mean-probability: entropy of the mean probability map")
    parser.add_argument("--save-probability", action="store_true",
                        help="also write <case>_probability: the mean foreground probability (float32)")
    parser.add_argument("--vvc-threshold", type=float, default=FusionSettings.vvc_threshold, metavar="VVC",
                        help="review=true when VVC exceeds this (default %(default)s; the paper's Fig. 12 spans "
                             "0.06-0.16; with several labels: any label's own VVC), or when every model found nothing")


def fusion_settings_from_args(args: argparse.Namespace, postprocessing: str | os.PathLike | None = None
                              ) -> FusionSettings:
    """The fusion settings of the command line; ``postprocessing`` is a rule file to use when the command line
    chose no rule (gtv-predict's file beside the models). Raises ValueError on unusable values or files."""
    components, min_ml, rules, connectivity = args.components or AUTO_COMPONENTS, 0.0, (), args.connectivity
    if args.min_component_ml is not None:
        components, min_ml = "min_volume", args.min_component_ml
    rule_file = args.postprocessing or (postprocessing if args.components is None
                                        and args.min_component_ml is None else None)
    if rule_file:
        choice = read_postprocessing(rule_file)
        if connectivity is not None and connectivity != choice.connectivity:
            raise ValueError(f"--connectivity {connectivity} differs from the {choice.connectivity} that "
                             f"{rule_file} was chosen with; leave --connectivity out")
        connectivity, rules = choice.connectivity, tuple(sorted(choice.rules.items()))
    return FusionSettings(
        weights=tuple(args.weights) if args.weights else None,
        connectivity=connectivity or FusionSettings.connectivity,
        components=components,
        min_component_ml=min_ml,
        label_rules=rules,
        outside_region=args.outside_region,
        entropy=args.entropy.replace("-", "_"),
        save_probability=args.save_probability,
        vvc_threshold=args.vvc_threshold,
    )


def fusion_settings_record(settings: FusionSettings) -> dict:
    """JSON-ready, for summary headers and --continue fingerprints."""
    return {
        "connectivity": settings.connectivity,
        "components": settings.components,
        "min_component_ml": settings.min_component_ml,
        "label_rules": {str(label): rule.describe() for label, rule in settings.label_rules},
        "outside_region": settings.outside_region,
        "entropy": settings.entropy,
        "entropy_log": "natural",
        "save_probability": settings.save_probability,
        "vvc_threshold": settings.vvc_threshold,
        "vvc_std": "population (ddof=0) over the models whose region holds at least half of the fused label's voxels "
                   "(all models when fewer than two do, or the label is empty); VVC empty/null when fewer than 2 "
                   "models or all volumes are 0",
        "sum_tolerance": settings.sum_tolerance,
    }


def add_resume_and_part_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    """``--continue``, ``-num_parts``, ``-part_id`` as nnUNetv2_predict has them; ``what``: what a run matches."""
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help=f"skip cases already finished in OUT with the same {what}")
    parser.add_argument("-num_parts", type=int, default=1,
                        help="split the cases into this many parts (like nnUNetv2_predict)")
    parser.add_argument("-part_id", type=int, default=0, help="which part this run does, 0..num_parts-1")


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, min_processes: int) -> None:
    """Exit through ``parser.error`` on a part outside 0..num_parts-1 or too few processes (``-np``)."""
    if not 0 <= args.part_id < args.num_parts:
        parser.error(f"-part_id must be in 0..{args.num_parts - 1} (got {args.part_id}); we count from 0")
    if args.np < min_processes:
        parser.error(f"-np must be at least {min_processes}")


def fail(prog: str, message: str) -> int:
    """Print ``message`` as the command's error; returns exit code 2 (unusable inputs or output folder)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def open_output_folder(prog: str, folder: str, num_models: int) -> Path | None:
    """``folder`` created if needed and checked writable, or None after saying why; removes the temporary files
    that killed runs left there; warns when a single model cannot give any uncertainty."""
    try:
        output_folder = check_writable(folder)
        removed = remove_stale_temporaries(output_folder)
    except OSError as err:
        fail(prog, f"output folder {folder} is not writable ({err})")
        return None
    if removed:
        print(f"{prog}: removed {len(removed)} temporary file(s) that interrupted runs left in {output_folder}")
    if num_models == 1:
        print(f"{prog}: warning: only one model given; uncertainty needs N >= 2: the entropy maps are all zeros "
              "and VVC is left empty", file=sys.stderr)
    return output_folder


def components_removed_text(rows: Sequence[dict], settings: FusionSettings, names: Sequence[str]) -> str:
    """What the connected-component rules removed over ``rows``, per foreground label with its rule."""
    rules = settings.component_rules(max(len(names), 2))
    several = len(rules) > 1
    parts = []
    for label, rule in rules.items():
        name = names[label] if label < len(names) else f"label_{label}"
        column = f"components_removed_{name}" if several else "components_removed"
        removed = sum(int(row.get(column) or 0) for row in rows)
        cases = sum(1 for row in rows if row.get(column))
        parts.append(f"{name} ({rule.describe()}): {removed} in {cases} case(s)")
    return "components removed per label: " + "; ".join(parts)


def finish_run(prog: str, argv: Sequence[str] | None, output_folder: Path, rows: Sequence[dict], num_models: int,
               fingerprint: dict, num_done: int, failures: Sequence[str], settings: FusionSettings,
               label_names: Sequence[str]) -> int:
    """Write summary.json / summary.csv, say where everything went and what the component rules removed per label,
    list failures; returns the exit code."""
    header = {"command": shlex.join([prog, *(sys.argv[1:] if argv is None else argv)]),
              "versions": package_versions(), "label_names": list(label_names), **fingerprint}
    rows = list(rows)
    json_file, csv_file = write_summaries(output_folder, rows, num_models, header)
    print(f"{prog}: wrote {num_done} cases' segmentations and uncertainty maps to {output_folder}; "
          f"summary: {json_file.name}, {csv_file.name} ({len(rows)} cases)")
    print(f"{prog}: {components_removed_text(rows, settings, label_names)}")
    return list_failures(prog, "failed", failures)


def list_failures(prog: str, what: str, messages: Sequence[str]) -> int:
    """Print the case-level failures under one error line; returns exit code 1 if there are any, else 0."""
    if not messages:
        return 0
    print(f"{prog}: error: {len(messages)} case(s) {what}:", file=sys.stderr)
    for message in messages:
        print(f"  {message}", file=sys.stderr)
    return 1
