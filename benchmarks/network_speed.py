"""Speed and memory of GTV25DUNet vs nnU-Net's default 3d_fullres PlainConvUNet, on the CPU, in one run.

nnU-Net's network is the one its default planner (ExperimentPlanner, 3d_fullres) plans for a synthetic
dataset written with ``nnunetv2_gtv.demo.synthetic.write_dataset`` into a temporary folder. Every row is
measured in a fresh subprocess (``--worker``) so its memory figures are its own:

* fwd+bwd: wall time of one training step (forward, cross-entropy on random labels for every output,
  backward; no optimizer step), after one untimed warm-up step. Deep supervision as each network trains.
* fwd/voxel: one forward pass in eval mode without gradients at the row's batch size, divided by the voxels
  in the batch.
* peak RSS +: peak resident set size during the training steps minus the resident set size just before them
  (after the network and the batch were created). Linux only: the peak (``VmHWM`` in /proc/self/status) is
  reset through /proc/self/clear_refs first, so import-time peaks do not hide it. It counts every allocation
  torch makes on the CPU, not only tensors.

Run: ``python benchmarks/network_speed.py`` (about 3-4 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASET_ID = 987
OUR_PATCH = [16, 64, 64]
OUR_BATCHES = (2, 16)


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)


def run_worker(spec: dict) -> dict:
    """Build one network from a plans-style spec and time it; runs inside its own process."""
    import torch
    import torch.nn.functional as F
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(0)
    net = get_network_from_plans(spec["network_class_name"], spec["arch_kwargs"], spec["_kw_requires_import"],
                                 input_channels=1, output_channels=2, deep_supervision=spec["deep_supervision"])
    x = torch.randn(spec["batch_size"], 1, *spec["patch_size"])

    def train_step() -> float:
        start = time.perf_counter()
        net.zero_grad(set_to_none=True)
        outputs = net(x)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        loss = sum(F.cross_entropy(o, torch.randint(0, 2, (o.shape[0], *o.shape[2:]))) for o in outputs)
        loss.backward()
        return time.perf_counter() - start

    net.train()
    _reset_peak_rss()
    rss_before = _proc_status_mib("VmRSS")
    train_step()
    step_times = [train_step() for _ in range(spec["repeats"])]
    rss_peak = _proc_status_mib("VmHWM")

    net.eval()
    with torch.no_grad():
        start = time.perf_counter()
        net(x)
        forward_time = time.perf_counter() - start
    return {
        "parameters": sum(p.numel() for p in net.parameters()),
        "step_times": step_times,
        "forward_ns_per_voxel": forward_time / x[:, 0].numel() * 1e9,
        "peak_rss_increase_mib": rss_peak - rss_before,
        "peak_rss_mib": rss_peak,
        "torch_threads": torch.get_num_threads(),
    }


def _measure_in_subprocess(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True,
                            stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def plan_default_nnunet(workdir: Path, in_plane_size: int, num_slices: int) -> dict:
    """Write a synthetic dataset, run nnU-Net's fingerprint + default planner, return the 3d_fullres config."""
    os.environ["nnUNet_raw"] = str(workdir / "raw")
    os.environ["nnUNet_preprocessed"] = str(workdir / "preprocessed")
    os.environ["nnUNet_results"] = str(workdir / "results")
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_gtv.demo.synthetic import write_dataset

    write_dataset(workdir / "raw", DATASET_ID, num_train=4, num_test=0, in_plane_size=in_plane_size,
                  num_slices=num_slices, seed=0)
    with contextlib.redirect_stdout(sys.stderr):  # keep nnU-Net's log out of the table
        extract_fingerprint_dataset(DATASET_ID, num_processes=2, verbose=False, show_progress_bar=False)
        plans, _ = plan_experiment_dataset(DATASET_ID)
    configuration = PlansManager(plans).get_configuration("3d_fullres")
    return {
        "network_class_name": configuration.network_arch_class_name,
        "arch_kwargs": configuration.network_arch_init_kwargs,
        "_kw_requires_import": list(configuration.network_arch_init_kwargs_req_import),
        "patch_size": list(configuration.patch_size),
        "batch_size": configuration.batch_size,
        "median_shape": list(configuration.median_image_size_in_voxels),
    }


def _row(name: str, spec: dict, result: dict) -> str:
    steps = result["step_times"]
    patch = "x".join(str(s) for s in spec["patch_size"])
    return (f"| {name} | {result['parameters'] / 1e6:.2f} M | {patch} | {spec['batch_size']} | "
            f"{'on' if spec['deep_supervision'] else 'off'} | {sum(steps) / len(steps):.2f} "
            f"({', '.join(f'{t:.2f}' for t in steps)}) | {result['forward_ns_per_voxel']:.0f} | "
            f"{result['peak_rss_increase_mib']:.0f} | {result['peak_rss_mib']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps for our network")
    parser.add_argument("--nnunet-repeats", type=int, default=1, help="timed training steps for nnU-Net's network")
    parser.add_argument("--size", type=int, default=160, help="in-plane size of the synthetic cases")
    parser.add_argument("--slices", type=int, default=42, help="approximate slice count of the synthetic cases")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    from nnunetv2_gtv.network import plans_architecture

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gtv_network_speed_") as tmp:
        print(f"planning nnU-Net's default 3d_fullres for a synthetic dataset in {tmp} ...", file=sys.stderr)
        nnunet = plan_default_nnunet(Path(tmp), args.size, args.slices)
    rows = []
    ours = plans_architecture()
    for batch in OUR_BATCHES:
        spec = {**ours, "patch_size": OUR_PATCH, "batch_size": batch, "deep_supervision": False,
                "repeats": args.repeats}
        print(f"measuring GTV25DUNet at batch {batch} ...", file=sys.stderr)
        rows.append(("GTV25DUNet (AM+PE, paper)", spec, _measure_in_subprocess(spec)))
    spec = {**nnunet, "deep_supervision": True, "repeats": args.nnunet_repeats}
    print("measuring nnU-Net's default PlainConvUNet ...", file=sys.stderr)
    rows.append(("nnU-Net 3d_fullres " + nnunet["network_class_name"].rsplit(".", 1)[-1], spec,
                 _measure_in_subprocess(spec)))

    threads = rows[0][2]["torch_threads"]
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU, "
          f"torch threads {threads}; 1-min load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} "
          f"at the end (other processes share the cores). Synthetic data median shape {nnunet['median_shape']} "
          f"(z, y, x).")
    print("| network | params | patch (z,y,x) | batch | deep sup. | fwd+bwd s/step, mean (each) | "
          "fwd ns/voxel | peak RSS + MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, spec, result in rows:
        print(_row(name, spec, result))
    print(f"\nTotal benchmark time {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
