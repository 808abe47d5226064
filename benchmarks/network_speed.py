"""Speed and memory of GTV25DUNet (fast CPU path and its direct reference formulation) vs nnU-Net's default
3d_fullres PlainConvUNet, on the CPU, in one run, with the step's GFLOP and the machine's matmul floor.

nnU-Net's network is the one its default planner (ExperimentPlanner, 3d_fullres) plans for a synthetic
dataset written with ``nnunetv2_gtv.demo.synthetic.write_dataset`` into a temporary folder. Every row is
measured in a fresh subprocess (``--worker``) so its memory figures are its own:

* fwd+bwd: wall time of one training step (forward, cross-entropy on random labels for every output,
  backward, Adam step), after one untimed warm-up step. Deep supervision as each network trains.
  GTV25DUNet is timed twice in the same process, alternating step by step: as shipped (slice-folded 2D
  convolutions in channels_last memory, ``nnunetv2_gtv.network.blocks.SliceConv3d``) and as its direct
  formulation (``nnunetv2_gtv.network.reference.reference_copy``: plain Conv3d, eq. 1-5 written out), the
  implementation before the speed-up. The ratio of the two is robust to load; absolute times are not.
  A third process times GTV25DUNet as the trainers and gtv-predict run it: with freed memory kept for reuse
  (``nnunetv2_gtv.allocator.keep_freed_memory``); the first two run on glibc's defaults, as nnU-Net does.
* GFLOP: one training step of the reference as counted by ``torch.utils.flop_counter.FlopCounterMode``;
  floor: those GFLOP at the float32 matmul rate measured in the same run (``torch.mm`` of 2048 x 2048) and
  share of floor = floor / measured step time.
* fwd/voxel: one forward pass in eval mode without gradients at the row's batch size, divided by the voxels
  in the batch.
* peak RSS +: peak resident set size during the training steps minus the resident set size just before them
  (after the network and the batch were created). Linux only: the peak (``VmHWM`` in /proc/self/status) is
  reset through /proc/self/clear_refs first, so import-time peaks do not hide it. It counts every allocation
  torch makes on the CPU, not only tensors.

Run: ``python benchmarks/network_speed.py`` (about 5 minutes on 2 quiet cores).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
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


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """float32 matrix-multiply rate of this machine (best of ``repeats``), GFLOP/s."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def run_worker(spec: dict) -> dict:
    """Build one network from a plans-style spec and time it; runs inside its own process. With
    ``compare_reference`` the direct formulation of the same network is timed too, alternating step by step."""
    import torch
    import torch.nn.functional as F
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from torch.utils.flop_counter import FlopCounterMode

    from nnunetv2_gtv.network.reference import reference_copy

    if spec.get("keep_freed_memory"):
        from nnunetv2_gtv.allocator import keep_freed_memory

        keep_freed_memory()
    torch.manual_seed(0)
    net = get_network_from_plans(spec["network_class_name"], spec["arch_kwargs"], spec["_kw_requires_import"],
                                 input_channels=1, output_channels=2, deep_supervision=spec["deep_supervision"])
    x = torch.randn(spec["batch_size"], 1, *spec["patch_size"])
    networks = {"shipped": net}
    if spec.get("compare_reference"):
        networks["reference"] = reference_copy(net)

    def train_step(network, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        outputs = network(x)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        loss = sum(F.cross_entropy(o, torch.randint(0, 2, (o.shape[0], *o.shape[2:]))) for o in outputs)
        loss.backward()
        optimizer.step()

    optimizers = {name: torch.optim.Adam(network.parameters(), lr=1e-4) for name, network in networks.items()}
    results = {name: {"step_times": [], "peak_rss_increase_mib": 0.0} for name in networks}
    for name, network in networks.items():
        network.train()
        train_step(network, optimizers[name])  # warm-up
    for _ in range(spec["repeats"]):
        for name, network in networks.items():
            _reset_peak_rss()
            rss_before = _proc_status_mib("VmRSS")
            results[name]["step_times"].append(_timed(lambda: train_step(network, optimizers[name])))
            increase = _proc_status_mib("VmHWM") - rss_before
            results[name]["peak_rss_increase_mib"] = max(results[name]["peak_rss_increase_mib"], increase)
    for name, network in networks.items():
        network.eval()
        with torch.no_grad():
            results[name]["forward_ns_per_voxel"] = _timed(lambda: network(x)) / x[:, 0].numel() * 1e9
        results[name]["peak_rss_mib"] = _proc_status_mib("VmHWM")
    counted = networks.get("reference", net).train()
    with FlopCounterMode(display=False) as counter:
        train_step(counted, optimizers["reference" if "reference" in networks else "shipped"])
    return {
        "parameters": sum(p.numel() for p in net.parameters()),
        "gflop_per_step": counter.get_total_flops() / 1e9,
        "matmul_gflops": matmul_gflops(),
        "torch_threads": torch.get_num_threads(),
        "implementations": results,
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


def _row(name: str, spec: dict, result: dict, implementation: str = "shipped") -> str:
    measured = result["implementations"][implementation]
    steps = measured["step_times"]
    mean = sum(steps) / len(steps)
    floor = result["gflop_per_step"] / result["matmul_gflops"]
    patch = "x".join(str(s) for s in spec["patch_size"])
    return (f"| {name} | {result['parameters'] / 1e6:.2f} M | {patch} | {spec['batch_size']} | "
            f"{'on' if spec['deep_supervision'] else 'off'} | {mean:.2f} ({', '.join(f'{t:.2f}' for t in steps)}) | "
            f"{result['gflop_per_step']:.0f} | {floor:.2f} ({100 * floor / mean:.0f} %) | "
            f"{measured['forward_ns_per_voxel']:.0f} | {measured['peak_rss_increase_mib']:.0f} | "
            f"{measured['peak_rss_mib']:.0f} |")


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

    from nnunetv2_gtv.inference.settings import cpu_description
    from nnunetv2_gtv.network import plans_architecture

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gtv_network_speed_") as tmp:
        print(f"planning nnU-Net's default 3d_fullres for a synthetic dataset in {tmp} ...", file=sys.stderr)
        nnunet = plan_default_nnunet(Path(tmp), args.size, args.slices)
    rows = []
    ours = plans_architecture()
    for batch in OUR_BATCHES:
        spec = {**ours, "patch_size": OUR_PATCH, "batch_size": batch, "deep_supervision": False,
                "repeats": args.repeats, "compare_reference": True}
        print(f"measuring GTV25DUNet at batch {batch} (shipped and reference, alternating) ...", file=sys.stderr)
        result = _measure_in_subprocess(spec)
        rows.append(("GTV25DUNet, direct formulation (before)", spec, result, "reference"))
        rows.append(("GTV25DUNet, slice-folded, glibc defaults", spec, result, "shipped"))
        print(f"measuring GTV25DUNet at batch {batch} with freed memory kept ...", file=sys.stderr)
        kept = {**spec, "compare_reference": False, "keep_freed_memory": True}
        rows.append(("GTV25DUNet, as shipped (slice-folded, freed memory kept)", kept, _measure_in_subprocess(kept),
                     "shipped"))
    spec = {**nnunet, "deep_supervision": True, "repeats": args.nnunet_repeats}
    print("measuring nnU-Net's default PlainConvUNet ...", file=sys.stderr)
    rows.append(("nnU-Net 3d_fullres " + nnunet["network_class_name"].rsplit(".", 1)[-1], spec,
                 _measure_in_subprocess(spec), "shipped"))

    threads = rows[0][2]["torch_threads"]
    print(f"\nMachine: {cpu_description()}, {os.cpu_count()} CPU cores, no GPU, torch threads {threads}; "
          f"float32 matmul {rows[0][2]['matmul_gflops']:.0f} GFLOP/s; 1-min load average {load_before:.1f} at the "
          f"start, {os.getloadavg()[0]:.1f} at the end (other processes share the cores). Synthetic data median "
          f"shape {nnunet['median_shape']} (z, y, x).")
    print("| network | params | patch (z,y,x) | batch | deep sup. | train step s, mean (each) | GFLOP/step | "
          "floor s (share) | fwd ns/voxel | peak RSS + MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, spec, result, implementation in rows:
        print(_row(name, spec, result, implementation))
    mean_step = {}
    for name, spec, result, implementation in rows:
        steps = result["implementations"][implementation]["step_times"]
        mean_step[(spec["batch_size"], name)] = sum(steps) / len(steps)
        if implementation == "shipped" and "reference" in result["implementations"]:
            before = result["implementations"]["reference"]["step_times"]
            print(f"batch {spec['batch_size']}: slice-folded / direct = {sum(before) / sum(steps):.2f}x faster "
                  f"(same process, alternating steps)")
    for batch in OUR_BATCHES:
        defaults = mean_step[(batch, "GTV25DUNet, slice-folded, glibc defaults")]
        kept = mean_step[(batch, "GTV25DUNet, as shipped (slice-folded, freed memory kept)")]
        direct = mean_step[(batch, "GTV25DUNet, direct formulation (before)")]
        print(f"batch {batch}: freed memory kept / glibc defaults = {defaults / kept:.2f}x faster; as shipped / "
              f"direct = {direct / kept:.2f}x (separate processes, one after the other)")
    print(f"\nTotal benchmark time {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
