"""gtv-attention: the attention map of one block of a trained AM or AG model on CTs (Mei et al., Fig. 8).

The map comes from the forward pass that predicts each CT (nnU-Net's sliding window, tiles stitched with the
same Gaussian weights as the probabilities) and is written on the CT's own grid. Per case: <case>_attention
(float map in [0, 1], 0 outside the region the model predicts), <case> (the model's segmentation) and
<case>_attention.png (an axial slice through the segmentation: CT, contour, heat map).

Exit codes: 0 done; 2 unusable model, block, inputs or output folder.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as gtv-predict: idle OpenMP threads sleep

import torch  # noqa: E402

from nnunetv2_gtv.cli.common import add_inference_arguments, add_model_arguments, fail, \
    inference_settings_from_args  # noqa: E402
from nnunetv2_gtv.io.atomic import check_writable  # noqa: E402
from nnunetv2_gtv.inference.attention import DEFAULT_BLOCK, AttentionBlockError, attention_blocks, \
    write_attention_maps  # noqa: E402
from nnunetv2_gtv.inference.inputs import InputError, check_channels, check_inputs, find_cases  # noqa: E402
from nnunetv2_gtv.planning.ct_channels import channel_names  # noqa: E402
from nnunetv2_gtv.inference.models import ModelError, dataset_folder_name, load_model, resolve_models  # noqa: E402
from nnunetv2_gtv.inference.settings import set_threads  # noqa: E402

PROG = "gtv-attention"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", required=True, metavar="CT", help="a CT file or a folder of them")
    parser.add_argument("-o", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--block", default=DEFAULT_BLOCK,
                        help="attention block (module path, e.g. decoder.stages.3.attention); 'last' = the "
                             "highest-resolution decoder block (default); --list-blocks shows them")
    parser.add_argument("--list-blocks", action="store_true", help="print the model's attention blocks and stop")
    add_model_arguments(parser)
    add_inference_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.m or len(args.m) != 1:
        parser.error("give exactly one model with -m (SCALE:FOLD or TRAINER:FOLD)")
    results = os.environ.get("nnUNet_results")
    if not results:
        return fail(PROG, "nnUNet_results is not set: it must point to the folder with the trained models")
    settings = inference_settings_from_args(parser, args)
    try:
        (spec,) = resolve_models(results, dataset_folder_name(Path(results), args.d), args.m, args.p, args.c,
                                 args.tr_suffix, args.chk)
        device = torch.device(args.device)
        set_threads(args.device)
        model = load_model(spec, device, settings.step_size, settings.mirroring, args.tiles_per_batch)
        if args.list_blocks:
            print("\n".join(attention_blocks(model.predictor.network)) or f"{PROG}: the model has no attention block")
            return 0
        cases = find_cases(args.i)
        check_inputs(cases)
        check_channels(cases, channel_names(model.predictor.dataset_json, str(spec.folder / "dataset.json")))
        if Path(args.o).resolve() in {c.path.resolve().parent for c in cases}:
            raise InputError(f"{args.o}: the output folder must not be the input folder")
        output_folder = check_writable(args.o)
        written = write_attention_maps(model, cases, output_folder, settings, args.block,
                                       warn=lambda m: print(m, file=sys.stderr))
    except (InputError, ModelError, AttentionBlockError, ValueError, OSError) as err:
        return fail(PROG, str(err))
    print(f"{PROG}: wrote {len(written)} files for {len(cases)} cases to {output_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
