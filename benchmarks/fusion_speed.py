"""Time and peak memory of gtv-uncertainty on one clinical-size case from 6 models.

Writes 6 nnU-Net-style probability folders (one case, 2 x 130 x 512 x 512 float32 probabilities saved with
``np.savez_compressed`` as nnU-Net does, plus .pkl, plans.json, dataset.json), then runs each contender in
its own subprocess and reports the work's wall time and the process' peak RSS (ru_maxrss; for
nnUNetv2_ensemble, which works in a spawned child, the child's):

- load: ``np.load(f)['probabilities']`` of the 6 files, nothing else (the floor for any fusion);
- gtv-uncertainty (-np 1): fused segmentation + vote entropy + summary (default outputs);
- gtv-uncertainty --save-probability: also writes the mean probability map;
- nnUNetv2_ensemble (ensemble_folders, 1 process): mean + argmax + segmentation only.

Peak memory is given in units of one probability map, in total and above the RSS the process had after its
imports (the interpreter, numpy, SimpleITK, and torch for nnU-Net's ensembling). Run:
``python benchmarks/fusion_speed.py [--work DIR] [--keep]``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

NUM_MODELS = 6
SHAPE = (130, 512, 512)
SPACING_XYZ = (0.98, 0.98, 3.0)
CASE = "case_000"

_MEASURE = r"""
import json, resource, sys, time
sys.argv = ["bench"]
{imports}
rss = lambda who: resource.getrusage(who).ru_maxrss * 1024
after_imports = rss(resource.RUSAGE_SELF)
start = time.perf_counter()
{work}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "after_imports": after_imports,
                  "peak": max(rss(resource.RUSAGE_SELF), rss(resource.RUSAGE_CHILDREN))}}))
"""

CONTENDERS = {
    "load 6 npz (floor)": (
        "import numpy as np",
        "for f in FILES:\n    np.load(f)['probabilities']",
    ),
    "gtv-uncertainty": (
        "from nnunetv2_gtv.cli.uncertainty import main",
        "assert main(['-i', *FOLDERS, '-o', OUT, '-np', '1']) == 0",
    ),
    "gtv-uncertainty --save-probability": (
        "from nnunetv2_gtv.cli.uncertainty import main",
        "assert main(['-i', *FOLDERS, '-o', OUT, '-np', '1', '--save-probability']) == 0",
    ),
    "nnUNetv2_ensemble": (
        "from nnunetv2.ensembling.ensemble import ensemble_folders",
        "ensemble_folders(FOLDERS, OUT, num_processes=1)",
    ),
}


def _probabilities(model: int) -> np.ndarray:
    """Softmax-like 2-class map: a blurred ellipsoid GTV whose size and position vary a little per model."""
    rng = np.random.default_rng(model)
    z, y, x = (np.arange(n, dtype=np.float32)[s] for n, s in
               zip(SHAPE, (np.s_[:, None, None], np.s_[None, :, None], np.s_[None, None, :])))
    shift = rng.uniform(-2, 2, 3).astype(np.float32)
    distance = np.sqrt(((z - 70 - shift[0]) / 6) ** 2 + ((y - 250 - shift[1]) / 22) ** 2
                       + ((x - 256 - shift[2]) / 18) ** 2)
    # background logits level off around -15 with voxel noise, as network outputs do: the float32 mantissas
    # then vary everywhere and the npz compresses about as poorly as real nnU-Net output (~50 %)
    logit = np.maximum(10 * (1 - distance), -15) + rng.normal(0, 1.5, SHAPE).astype(np.float32)
    foreground = (1 / (1 + np.exp(-logit))).astype(np.float32)
    return np.stack([1 - foreground, foreground])


def write_inputs(work: Path) -> list[Path]:
    """The 6 model folders, reused when present (writing takes ~5 s per model)."""
    properties = {
        "sitk_stuff": {"spacing": SPACING_XYZ, "origin": (-250.0, -230.0, -400.0),
                       "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)},
        "spacing": list(SPACING_XYZ[::-1]),
        "shape_before_cropping": SHAPE,
        "bbox_used_for_cropping": [[0, n] for n in SHAPE],
        "shape_after_cropping_and_before_resampling": SHAPE,
    }
    plans = {"dataset_name": "Dataset990_Benchmark", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "label_manager": "LabelManager",
             "configurations": {}}
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "GTV": 1}, "numTraining": 1,
               "file_ending": ".nii.gz"}
    folders = []
    for model in range(1, NUM_MODELS + 1):
        folder = work / f"model_{model}"
        folders.append(folder)
        if (folder / "dataset.json").is_file():
            continue
        staging = work / f".model_{model}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        np.savez_compressed(staging / f"{CASE}.npz", probabilities=_probabilities(model))
        with open(staging / f"{CASE}.pkl", "wb") as f:
            pickle.dump(properties, f)
        (staging / "plans.json").write_text(json.dumps(plans))
        (staging / "dataset.json").write_text(json.dumps(dataset))
        os.replace(staging, folder)
        print(f"wrote {folder}")
    return folders


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter. This process stays small: a child inherits its parent's ru_maxrss."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{done.stderr[-3000:]}")
    return done.stdout


def measure(name: str, folders: list[Path], out: Path, repeats: int) -> dict:
    """Fastest time and highest peak RSS over ``repeats`` runs."""
    imports, work = CONTENDERS[name]
    prelude = (f"FOLDERS = {[str(f) for f in folders]!r}\nOUT = {str(out)!r}\n"
               f"FILES = {[str(f / (CASE + '.npz')) for f in folders]!r}")
    runs = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        output = _python(_MEASURE.format(imports=imports + "\n" + prelude, work=work))
        runs.append(json.loads(output.strip().splitlines()[-1]))
    return {"seconds": min(r["seconds"] for r in runs), "peak": max(r["peak"] for r in runs),
            "after_imports": min(r["after_imports"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path,
                        help="folder for the inputs (reused) and outputs; default: a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep a temporary work folder")
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender (fastest time is reported)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="fusion_speed."))
    try:
        _python(f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                f"from fusion_speed import write_inputs; from pathlib import Path; write_inputs(Path({str(work)!r}))")
        folders = [work / f"model_{m}" for m in range(1, NUM_MODELS + 1)]
        map_bytes = 2 * int(np.prod(SHAPE)) * 4
        results = {name: measure(name, folders, work / "out", args.repeats) for name in CONTENDERS}
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    floor = results["load 6 npz (floor)"]["seconds"]
    mb = 1024 ** 2
    print(f"\n{NUM_MODELS} models, probabilities 2 x {' x '.join(map(str, SHAPE))} float32 "
          f"(one map = {map_bytes / mb:.0f} MiB), {os.cpu_count()} CPUs, fastest of {args.repeats} runs\n")
    print("| run | time (s) | x load | peak RSS (MiB) | peak / map | peak above imports / map |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.2f} | {r['seconds'] / floor:.2f} | {r['peak'] / mb:.0f} | "
              f"{r['peak'] / map_bytes:.2f} | {(r['peak'] - r['after_imports']) / map_bytes:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
