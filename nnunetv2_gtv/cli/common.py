"""Options shared by the commands (gtv-predict, gtv-uncertainty, gtv-attention): same option names, same meaning;
the run bookkeeping behind them is :mod:`nnunetv2_gtv.runs`."""
from __future__ import annotations

import argparse
import os
import sys

from nnunetv2_gtv.ensemble.fusion import AUTO_COMPONENTS, OUTSIDE_REGION_RULES, FusionSettings
from nnunetv2_gtv.ensemble.postprocessing import read_postprocessing
from nnunetv2_gtv.ensemble.review_ranking import RISK_DIRECTION, ReviewSelection
from nnunetv2_gtv.inference.models import DEFAULT_CHECKPOINT
from nnunetv2_gtv.inference.settings import PRECISIONS, InferenceSettings, default_step_size, parse_tile, \
    use_cpu_bfloat16

INFERENCE_DEFAULTS = InferenceSettings()


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
    parser.add_argument("--review-score", choices=list(RISK_DIRECTION),
                        help="the per-case score that ranks the cases for review (review_rank in the summary, the "
                             "review page's order); default: the score and threshold calibrated by "
                             f"gtv-postprocessing when its file is used, else {ReviewSelection.score}; "
                             "docs/uncertainty.md")
    parser.add_argument("--review-budget", type=float, metavar="FRACTION",
                        help="flag the riskiest share of the run instead of VVC > threshold: review=true for the "
                             "ceil(FRACTION x cases) cases ranked first by --review-score (e.g. 0.25)")


def rule_file_in_use(args: argparse.Namespace, postprocessing: str | os.PathLike | None) -> str | os.PathLike | None:
    """--postprocessing FILE, else ``postprocessing`` (the file beside the models) when the command line chose no
    component rule."""
    return args.postprocessing or (postprocessing if args.components is None
                                   and args.min_component_ml is None else None)


def fusion_settings_from_args(args: argparse.Namespace, postprocessing: str | os.PathLike | None = None
                              ) -> FusionSettings:
    """The fusion settings of the command line; ``postprocessing`` is a rule file to use when the command line
    chose no rule (gtv-predict's file beside the models). Raises ValueError on unusable values or files."""
    components, min_ml, rules, connectivity = args.components or AUTO_COMPONENTS, 0.0, (), args.connectivity
    if args.min_component_ml is not None:
        components, min_ml = "min_volume", args.min_component_ml
    rule_file = rule_file_in_use(args, postprocessing)
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


def review_selection_from_args(args: argparse.Namespace, postprocessing: str | os.PathLike | None = None
                               ) -> ReviewSelection:
    """The review ranking of the command line; with neither --review-score nor --review-budget, the review flag
    calibrated in the post-processing file that the fusion uses (as :func:`fusion_settings_from_args` picks it),
    if it has one. ValueError on an unusable budget or file."""
    rule_file = rule_file_in_use(args, postprocessing)
    if args.review_score is None and args.review_budget is None and rule_file:
        calibrated = read_postprocessing(rule_file).review_selection(rule_file)
        if calibrated is not None:
            return calibrated
    return ReviewSelection(args.review_score or ReviewSelection.score, args.review_budget)


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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """-d, -m, -tr_suffix, -p, -c, -chk, -device: which trained models, as nnUNetv2_predict names them."""
    import torch

    group = parser.add_argument_group("models")
    group.add_argument("-d", required=True, metavar="DATASET", help="dataset name or id the models were trained on")
    group.add_argument("-m", nargs="+", metavar="MODEL",
                       help="models as SCALE:FOLD (Local:0 Middle:1 ...) or TRAINER:FOLD; default: the paper's six, "
                            "Local:0 Local:1 Middle:0 Middle:1 Global:0 Global:1")
    group.add_argument("-tr_suffix", default="", metavar="SUFFIX",
                       help="appended to the trainer of SCALE:FOLD models (e.g. _smoke: "
                            "nnUNetTrainerGTV25DLocal_smoke)")
    group.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="plans identifier (default: nnUNetPlans)")
    group.add_argument("-c", default="3d_fullres", metavar="CONFIGURATION", help="configuration (default: 3d_fullres)")
    group.add_argument("-chk", default=DEFAULT_CHECKPOINT, metavar="CHECKPOINT",
                       help=f"checkpoint file name (default: {DEFAULT_CHECKPOINT})")
    group.add_argument("-device", choices=("cpu", "cuda", "mps"),
                       default="cuda" if torch.cuda.is_available() else "cpu",
                       help="device (default: cuda when available, else cpu)")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """How the networks run over a CT: tile, step, mirroring, precision, tiles per call, region restriction."""
    defaults = INFERENCE_DEFAULTS
    group = parser.add_argument_group(
        "inference (defaults chosen by benchmarks/inference_settings.py, see docs/inference.md)")
    group.add_argument("--tile", type=parse_tile, default=defaults.tile, metavar="TILE",
                       help="patch (the training patch, nnU-Net's sliding window), slab (the patch's slices, whole "
                            "in-plane extent), whole (one pass over the image) or ZxYxX; the network's PE blocks "
                            f"pool over the whole tile, so it can change the result (default: {defaults.tile})")
    group.add_argument("-step_size", type=float, metavar="STEP",
                       help="sliding-window step as a fraction of the tile, 1 = no overlap (default: 1 on the CPU, "
                            "0.5 on CUDA; nnU-Net's is 0.5)")
    tta = group.add_mutually_exclusive_group()
    tta.add_argument("--disable_tta", dest="mirroring", action="store_false", default=defaults.mirroring,
                     help="no test-time mirroring" + (" (the default)" if not defaults.mirroring else ""))
    tta.add_argument("--enable_tta", dest="mirroring", action="store_true",
                     help="test-time mirroring as nnU-Net does it (up to 8 passes)" +
                          (" (the default)" if defaults.mirroring else ""))
    group.add_argument("-precision", choices=PRECISIONS, default="auto",
                       help="CPU arithmetic of the networks: auto = bfloat16 on CPUs that compute it natively "
                            "(AVX512-BF16, AMX; see docs/inference.md for its speed and agreement with float32), "
                            "float32 elsewhere (default: auto). On CUDA nnU-Net autocasts to float16 whatever this "
                            "says")
    group.add_argument("-tiles_per_batch", type=int, metavar="N",
                       help="sliding-window tiles per network call (default: 2 on the CPU, 8 on CUDA); changes speed "
                            "and memory, not the result")
    group.add_argument("--no-region-restriction", dest="restrict", action="store_false",
                       default=defaults.restrict_to_region,
                       help="run every model on the whole image instead of Local and Middle only inside their "
                            "sampling region (head; head and neck) and Global inside the body's bounding box; outside "
                            "it a model abstains in the fusion (see --outside-region)")


def inference_settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> InferenceSettings:
    """The inference settings of the command line; exits through ``parser.error`` on unusable values."""
    if args.tiles_per_batch is not None and args.tiles_per_batch < 1:
        parser.error("-tiles_per_batch must be at least 1")
    try:
        step_size = args.step_size if args.step_size is not None else default_step_size(args.device)
        return InferenceSettings(args.tile, step_size, args.mirroring, args.restrict,
                                 use_cpu_bfloat16(args.precision, args.device))
    except ValueError as err:
        parser.error(str(err))
