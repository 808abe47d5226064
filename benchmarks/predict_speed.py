"""Time and peak memory of gtv-predict against the two-step path (nnUNetv2_predict per model + gtv-uncertainty).

One synthetic CT (``--size`` x ``--size`` in-plane at 0.977 mm, ``--slices`` slices at 3 mm; clinical: 512 and
about 130; a patient ``--body-mm`` wide at the shoulders in air), one machine, one run, each contender in its
own processes:

1. gtv-predict with its defaults, the paper's six models (``-precision auto``: bfloat16 on a CPU with native
   bfloat16, else float32);
2. the same with ``-precision float32`` (its fused segmentation is compared with 1.'s);
3. the two-step path at nnU-Net's default inference (training patch as tile, step 0.5, 8-fold mirroring, whole
   image): six ``nnUNetv2_predict --save_probabilities`` runs, then ``gtv-uncertainty`` on the six folders;
4. gtv-predict with the two-step path's tile, step and mirroring (``-precision float32 --tile patch
   --no-region-restriction``) on the same K models: its fused segmentation must agree with the two-step
   path's (Dice >= 0.999), and its speed-up comes from the pipeline alone (one preprocessing, tiles batched,
   no probability files, one process).

At clinical size nnU-Net's default inference takes hours per model on a CPU. By default (``--two-step fast``)
3. and 4. therefore run K models with step 1 and no mirroring, and 3.'s six-model time at nnU-Net's defaults
is extrapolated from what this run measures: per model, the measured fast run plus the extra tile passes
(nnU-Net's own tile count at step 0.5 x 8 mirrorings, minus those at step 1) times the measured time of one
float32 tile pass of nnU-Net's predictor; plus gtv-uncertainty on six folders (the K real ones, repeated).
``--two-step default`` runs 3. and 4. at nnU-Net's real defaults instead (no extrapolation; a small CT only);
``--two-step none`` skips them (gtv-predict's own times only).

``--isa avx2`` emulates, on a CPU with AVX-512, one without it: oneDNN and ATen are limited to AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``) in every command, and gtv-predict's defaults run in
float32, as ``-precision auto`` does on such a CPU (contender 2 is then the same run and is skipped; it needs
``--two-step none``). Clock, cores and caches stay this machine's, so it isolates the instruction set only.

Models: the three sampling trainers are trained here for a few iterations (weights do not change the speed)
and fold 1 is a copy of fold 0. Wall time is measured around each command; peak memory is the largest sum of
RSS over the command's process tree, sampled every 0.1 s from /proc. The load average is printed: the CPU may
be shared.

Run: ``python benchmarks/predict_speed.py [--size 512 --slices 130] [--body-mm MM] [--two-step fast|default|none]
[--isa native|avx2] [-k K]
[--device cpu|cuda] [--work DIR]``
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SCALES, Schedule, configure_environment, dice_of_files, nnunet_command, \
    nnunet_tile_passes, plan_and_preprocess, train  # noqa: E402
from inference_settings import synthetic_dataset  # noqa: E402

from nnunetv2_gtv.inference.models import default_model_labels  # noqa: E402
from nnunetv2_gtv.inference.settings import cpu_description  # noqa: E402

NUM_MODELS = len(default_model_labels())
SPEED_SCHEDULE = Schedule(epochs=1, iterations=20, batch=2)
PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root: int) -> int:
    """Bytes of RSS summed over ``root`` and all its descendants."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return sum(rss.get(pid, 0) for pid in tree)


@dataclass
class Measured:
    seconds: float
    peak_bytes: int
    stdout: str


def measure(command: list[str], env: dict) -> Measured:
    """Run ``command``; wall time and the peak RSS of its process tree. Raises with its output on failure."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_rss(process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = process.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{stdout[-3000:]}")
    return Measured(seconds, peak[0], stdout)


def write_ct(folder: Path, size: int, slices: int, body_mm: float, seed: int = 0) -> Path:
    """A synthetic CT of ``size`` x ``size`` x ``slices`` voxels at 0.977 x 0.977 x 3 mm. The generator's phantom
    fills its field of view; ``body_mm`` > 0 renders it that wide (shoulders) and surrounds it with air, as a
    patient lies in a clinical 500 mm field of view."""
    import SimpleITK as sitk
    from nnunetv2_gtv.demo.synthetic import AIR_HU, CaseGeometry, render_case, to_sitk_image

    spacing = (0.977, 0.977, 3.0)
    body = min(size, int(round(body_mm / spacing[0]))) if body_mm > 0 else size
    image, _ = render_case(CaseGeometry((slices, body, body), spacing), np.random.default_rng(seed))
    full = np.full((slices, size, size), AIR_HU, dtype=image.dtype)
    start = (size - body) // 2
    full[:, start:start + body, start:start + body] = image
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ct_0000.nii.gz"
    sitk.WriteImage(to_sitk_image(full, CaseGeometry((slices, size, size), spacing)), str(path))
    return path


def prepare_models(dirs: dict[str, Path]) -> str:
    """A tiny synthetic training set and the three trainers trained for a few iterations; fold 1 = fold 0."""
    dataset = synthetic_dataset(dirs["nnUNet_raw"], num_train=6, num_test=0, size=96, slices=40)
    plan_and_preprocess(dataset, dirs["nnUNet_preprocessed"])
    for scale in SCALES:
        checkpoint = train(dataset, scale, SPEED_SCHEDULE, dirs["nnUNet_results"], fold=0)
        copy = checkpoint.parent.parent / "fold_1" / checkpoint.name
        if not copy.is_file():
            copy.parent.mkdir(exist_ok=True)
            shutil.copy(checkpoint, copy)
    return dataset


def _timing(stdout: str) -> tuple[float, list[float], float]:
    """(preprocessing, per-model seconds, export) from gtv-predict's per-case timing line."""
    match = re.search(r"reading and preprocessing ([\d.]+) s, models ([\d. +]+) s, export ([\d.]+) s", stdout)
    if match is None:
        raise RuntimeError(f"no timing line in gtv-predict's output:\n{stdout[-2000:]}")
    return float(match.group(1)), [float(s) for s in match.group(2).split("+")], float(match.group(3))


def run_gtv_predict(inputs: Path, output: Path, dataset: str, labels: list[str], extra: list[str],
                    env: dict, device: str) -> Measured:
    return measure([sys.executable, "-m", "nnunetv2_gtv.cli.predict", "-i", str(inputs), "-o", str(output),
                    "-d", dataset, "-m", *labels, "-device", device, "--disable_progress_bar", *extra], env)


# nnUNetv2_predict options of the two-step path: nnU-Net's defaults, or the fast settings (see the docstring)
TWO_STEP_OPTIONS = {"default": [], "fast": ["-step_size", "1", "--disable_tta"]}
SAME_SETTINGS = {"default": ["-step_size", "0.5", "--enable_tta"], "fast": ["-step_size", "1", "--disable_tta"]}


def run_two_step(inputs: Path, work: Path, dataset: str, labels: list[str], settings: str, env: dict,
                 device: str) -> tuple[list[Measured], Measured, Measured]:
    """nnUNetv2_predict per model; gtv-uncertainty on those folders and on six (the real ones, repeated)."""
    runs, folders = [], []
    for label in labels:
        scale, fold = label.split(":")
        folder = work / "two_step" / label.replace(":", "_")
        runs.append(measure([nnunet_command("nnUNetv2_predict"), "-i", str(inputs), "-o", str(folder), "-d", dataset,
                             "-c", "3d_fullres", "-tr", f"nnUNetTrainerGTV25D{scale}", "-f", fold, "-device", device,
                             "--save_probabilities", "--disable_progress_bar", *TWO_STEP_OPTIONS[settings]], env))
        folders.append(str(folder))
    fused = measure([nnunet_command("gtv-uncertainty"), "-i", *folders, "-o", str(work / "two_step" / "fused"),
                     "-np", "1"], env)
    six = [folders[i % len(folders)] for i in range(NUM_MODELS)]
    fused_six = measure([nnunet_command("gtv-uncertainty"), "-i", *six, "-o", str(work / "two_step" / "fused_six"),
                         "-np", "1"], env)
    return runs, fused, fused_six


def tile_passes_and_seconds(ct: Path, results: Path, dataset: str, device: str) -> tuple[int, int, float]:
    """nnU-Net's tile passes per model on this CT (step 0.5 with its mirrorings; step 1 without) and the seconds
    of one tile pass of nnU-Net's own predictor (one tile per call, on as many CPU threads as nnU-Net's network
    gets; float32 on the CPU, float16 autocast on CUDA, as nnU-Net runs), measured here."""
    import torch
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(min(default_num_processes, os.cpu_count() or 1))
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=torch.device(device),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        str(results / dataset / "nnUNetTrainerGTV25DGlobal__nnUNetPlans__3d_fullres"), (0,), "checkpoint_final.pth")
    network = predictor.network.to(device).eval()  # as nnU-Net's predict_sliding_window_return_logits does
    tile = torch.randn(1, 1, *predictor.configuration_manager.patch_size, device=device)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode(), torch.autocast(device, enabled=device == "cuda"):
        network(tile)
        synchronize()
        start = time.perf_counter()
        for _ in range(10):
            network(tile)
        synchronize()
    seconds = (time.perf_counter() - start) / 10
    return nnunet_tile_passes(predictor, ct, 0.5, True), nnunet_tile_passes(predictor, ct, 1.0, False), seconds


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--size", type=int, default=512, help="in-plane voxels (default 512)")
    parser.add_argument("--slices", type=int, default=130, help="slices (default 130)")
    parser.add_argument("--body-mm", type=float, default=420.0,
                        help="width of the synthetic patient at the shoulders in mm (default 420; 0: the phantom "
                             "fills the field of view, a worst case for the Local and Middle regions)")
    parser.add_argument("--two-step", choices=("fast", "default", "none"), default="fast",
                        help="settings of the measured two-step runs (default: fast, extrapolated to nnU-Net's "
                             "defaults; 'default' only for small CTs; 'none': skip them)")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="instruction set of every command: this CPU's (default), or limited to AVX2 to emulate "
                             "a CPU without AVX-512 (see above)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where gtv-predict and nnUNetv2_predict run (default cpu; the float32 contender is "
                             "CPU-only)")
    parser.add_argument("-k", type=int, default=2, help="models run by contenders 3 and 4 (1-6, default 2)")
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary folder, kept; reuse "
                                                  "it to skip training)")
    args = parser.parse_args(argv)
    if not 1 <= args.k <= NUM_MODELS:
        parser.error(f"-k must be 1..{NUM_MODELS}")
    if args.isa == "avx2" and args.two_step != "none":  # its tile-pass timing runs in this process, at full ISA
        parser.error("--isa avx2 times gtv-predict only: add --two-step none")
    work = (args.work or Path(tempfile.mkdtemp(prefix="gtv-predict-speed-"))).resolve()
    dirs = configure_environment(work)
    dataset = prepare_models(dirs)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    if args.isa == "avx2":
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    cpu = cpu_description() + (", emulating a CPU without AVX-512 (oneDNN and ATen limited to AVX2)"
                               if args.isa == "avx2" else "")
    inputs = work / f"ct_{args.size}x{args.slices}_body{args.body_mm:g}"
    if not inputs.is_dir():
        write_ct(inputs, args.size, args.slices, args.body_mm)
    for old in ("defaults", "defaults_float32", "same_settings", "two_step"):
        shutil.rmtree(work / old, ignore_errors=True)
    print(f"work folder {work}; CT {args.size} x {args.size} x {args.slices}, body {args.body_mm:g} mm; "
          f"{os.cpu_count()} CPUs ({cpu}); load average before: {os.getloadavg()}", flush=True)
    labels = default_model_labels()
    k_labels = [labels[0], labels[-1]] if args.k == 2 else labels[:args.k]  # K = 2: Local:0 and Global:1

    rows = []
    emulated_float32 = ["-precision", "float32"] if args.isa == "avx2" else []  # auto's choice on such a CPU
    defaults = run_gtv_predict(inputs, work / "defaults", dataset, labels, emulated_float32, env, args.device)
    rows.append(("gtv-predict, defaults" + (" (auto precision = float32 without AVX-512)" if emulated_float32 else ""),
                 NUM_MODELS, defaults.seconds, "measured", defaults.peak_bytes))
    print(f"gtv-predict defaults: {defaults.seconds:.1f} s {_timing(defaults.stdout)}; load {os.getloadavg()}",
          flush=True)
    float32, precision_dice = None, None
    if args.device == "cpu" and not emulated_float32:
        float32 = run_gtv_predict(inputs, work / "defaults_float32", dataset, labels, ["-precision", "float32"], env,
                                  args.device)
        rows.append(("gtv-predict, defaults, -precision float32", NUM_MODELS, float32.seconds, "measured",
                     float32.peak_bytes))
        precision_dice = dice_of_files(work / "defaults" / "ct.nii.gz", work / "defaults_float32" / "ct.nii.gz")
        print(f"gtv-predict defaults float32: {float32.seconds:.1f} s {_timing(float32.stdout)}; fused Dice vs "
              f"defaults {precision_dice:.4f}; load {os.getloadavg()}", flush=True)

    two_step_six = two_step_k = same = agreement = None
    if args.two_step != "none":
        runs, fused, fused_six = run_two_step(inputs, work, dataset, k_labels, args.two_step, env, args.device)
        run_seconds = float(np.mean([r.seconds for r in runs]))
        two_step_peak = max([r.peak_bytes for r in runs] + [fused_six.peak_bytes])
        if args.two_step == "default":
            two_step_six, how = NUM_MODELS * run_seconds + fused_six.seconds, \
                f"6 x mean of {args.k} measured nnUNetv2_predict runs + gtv-uncertainty on 6 folders"
        else:
            passes_default, passes_fast, pass_seconds = tile_passes_and_seconds(
                inputs / "ct_0000.nii.gz", dirs["nnUNet_results"], dataset, args.device)
            per_model = run_seconds + (passes_default - passes_fast) * pass_seconds
            two_step_six = NUM_MODELS * per_model + fused_six.seconds
            how = (f"6 x ({run_seconds:.0f} s measured at step 1 without mirroring + ({passes_default} - "
                   f"{passes_fast}) tile passes x {pass_seconds:.3f} s) + gtv-uncertainty on 6 folders "
                   f"({fused_six.seconds:.0f} s)")
            print(f"tile passes per model: nnU-Net default {passes_default}, step 1 {passes_fast}; "
                  f"{pass_seconds:.3f} s per float32 tile pass", flush=True)
        rows.append(("two-step: 6 x nnUNetv2_predict (nnU-Net defaults) + gtv-uncertainty", NUM_MODELS, two_step_six,
                     how, two_step_peak))
        two_step_k = sum(r.seconds for r in runs) + fused.seconds
        rows.append((f"two-step, {args.two_step} settings, measured", args.k, two_step_k,
                     f"{args.k} x nnUNetv2_predict {' '.join(TWO_STEP_OPTIONS[args.two_step])} + gtv-uncertainty",
                     max([r.peak_bytes for r in runs] + [fused.peak_bytes])))
        print(f"two-step: {[round(r.seconds, 1) for r in runs]} s + fusion {fused.seconds:.1f} s (six folders "
              f"{fused_six.seconds:.1f} s); load {os.getloadavg()}", flush=True)

        same = run_gtv_predict(inputs, work / "same_settings", dataset, k_labels,
                               ["-precision", "float32", "--tile", "patch", "--no-region-restriction", "-np", "0",
                                *SAME_SETTINGS[args.two_step]], env, args.device)
        rows.append((f"gtv-predict, the two-step path's settings ({args.two_step})", args.k, same.seconds, "measured",
                     same.peak_bytes))
        agreement = dice_of_files(work / "two_step" / "fused" / "ct.nii.gz", work / "same_settings" / "ct.nii.gz")
        print(f"gtv-predict, two-step settings: {same.seconds:.1f} s {_timing(same.stdout)}; fused Dice vs two-step: "
              f"{agreement:.5f}; load {os.getloadavg()}", flush=True)

    print(f"\nCT {args.size} x {args.size} x {args.slices}, body {args.body_mm:g} mm, {os.cpu_count()} CPUs "
          f"({cpu}), load average after: {os.getloadavg()}\n")
    print("| contender | models | s per case | how | peak memory GiB |\n|---|---|---|---|---|")
    for name, models, seconds, how, peak in rows:
        print(f"| {name} | {models} | {seconds:.1f} | {how} | {gib(peak)} |")
    _, model_seconds, _ = _timing(defaults.stdout)
    print(f"\ngtv-predict defaults ({args.device}): the six models' time per case {sum(model_seconds):.2f} s "
          f"(the paper: < 0.3 s on a GTX 1080 Ti), end to end {defaults.seconds:.1f} s"
          + (f"; fused Dice defaults vs float32: {precision_dice:.4f}" if float32 else ""))
    if two_step_six is not None:
        print(f"{two_step_six / defaults.seconds:.1f}x faster than the two-step path at nnU-Net's defaults"
              + (f"; -precision float32: {two_step_six / float32.seconds:.1f}x" if float32 else "")
              + f"\nsame settings ({args.two_step}, {args.k} models): the pipeline alone is "
                f"{two_step_k / same.seconds:.1f}x faster; fused Dice vs the two-step path: {agreement:.5f}")
    (work / "predict_speed.json").write_text(json.dumps(
        {"size": args.size, "slices": args.slices, "body_mm": args.body_mm, "device": args.device,
         "two_step": args.two_step, "k": args.k, "cpu": cpu,
         "rows": [dict(zip(("contender", "models", "seconds", "how", "peak_bytes"), r)) for r in rows],
         "precision_dice": precision_dice, "same_settings_dice": agreement}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
