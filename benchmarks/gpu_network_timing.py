"""Network time of the 2.5D GTV network on a GPU: training steps and the six-model ensemble per case.

Needs only torch (CUDA) and dynamic_network_architectures, so it runs on a bare GPU machine. Prints two tables:
- training step (forward, Dice-like loss, backward, Adam) at 16 x 64 x 64, batch 2 and 16, fp32 and autocast
  fp16 (nnU-Net trains with autocast on CUDA), and the implied time of the authors' 17,000 iterations;
- inference for one clinical-size case after resampling to 1 x 1 x 3 mm (default 130 x 512 x 512), for one model
  and for the paper's six: the whole volume in one forward pass (as the authors' code ran it), and nnU-Net's
  sliding window with 16 x 64 x 64 tiles at step 0.5 without and with 8-fold mirroring. The paper reports
  about 0.1 s per model and < 0.3 s for the ensemble on a GTX 1080 Ti.

    python benchmarks/gpu_network_timing.py [--slices 130] [--size 512] [--tile-batch 64]
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

from nnunetv2_gtv.network.gtv_unet import GTV25DUNet, default_arch_kwargs

PATCH = (16, 64, 64)
DEVICE = "cuda"


def _synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    fn()
    _synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _synchronize()
    return (time.perf_counter() - start) / repeats


def training_step_time(batch: int, autocast: bool) -> float:
    net = GTV25DUNet(1, 2, **default_arch_kwargs()).to(DEVICE).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, weight_decay=1e-5)
    scaler = torch.amp.GradScaler(DEVICE, enabled=autocast)
    x = torch.randn(batch, 1, *PATCH, device=DEVICE)
    target = (torch.rand(batch, 1, *PATCH, device=DEVICE) > 0.9).float()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.float16, enabled=autocast):
            probability = torch.softmax(net(x), 1)[:, 1:]
            intersection = (probability * target).sum()
            loss = 1 - 2 * intersection / (probability.sum() + target.sum() + 1e-5)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return _timed(step, 10)


def tile_starts(length: int, tile: int, step: float = 0.5) -> list[int]:
    """nnU-Net's tile positions along one axis (compute_steps_for_sliding_window)."""
    if length <= tile:
        return [0]
    count = int(-(-(length - tile) // (tile * step))) + 1
    spacing = (length - tile) / (count - 1)
    return [int(round(spacing * i)) for i in range(count)]


@torch.inference_mode()
def inference_times(slices: int, size: int, tile_batch: int, autocast: bool) -> dict[str, float]:
    net = GTV25DUNet(1, 2, **default_arch_kwargs()).to(DEVICE).eval()
    volume = torch.randn(1, 1, slices, size, size, device=DEVICE)
    boxes = list(itertools.product(*(tile_starts(n, t) for n, t in zip((slices, size, size), PATCH))))
    tiles = torch.empty(tile_batch, 1, *PATCH, device=DEVICE)

    def whole_volume():
        with torch.autocast(DEVICE, dtype=torch.float16, enabled=autocast):
            torch.softmax(net(volume), 1)

    def sliding_window(mirror: bool):
        flips = [()] + ([(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if mirror else [])
        accumulated = torch.zeros(1, 2, slices, size, size, device=DEVICE)
        with torch.autocast(DEVICE, dtype=torch.float16, enabled=autocast):
            for first in range(0, len(boxes), tile_batch):
                chunk = boxes[first:first + tile_batch]
                for i, (z, y, x) in enumerate(chunk):
                    tiles[i] = volume[0, :, z:z + PATCH[0], y:y + PATCH[1], x:x + PATCH[2]]
                batch = tiles[:len(chunk)]
                logits = sum(torch.flip(net(torch.flip(batch, f)), f) if f else net(batch) for f in flips)
                for i, (z, y, x) in enumerate(chunk):
                    accumulated[0, :, z:z + PATCH[0], y:y + PATCH[1], x:x + PATCH[2]] += logits[i].float()

    return {
        "tiles": len(boxes),
        "whole volume": _timed(whole_volume, 3),
        "sliding window, no mirroring": _timed(lambda: sliding_window(False), 1),
        "sliding window, 8 mirrors (nnU-Net default)": _timed(lambda: sliding_window(True), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=130)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile-batch", type=int, default=64)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run at a small --size")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    print("\n| training step, 16x64x64 | batch | precision | s/iteration | 17,000 iterations (h) |")
    print("|---|---:|---|---:|---:|")
    for batch, autocast in itertools.product((2, 16), (False, True)):
        seconds = training_step_time(batch, autocast)
        print(f"| GTV25DUNet | {batch} | {'fp16 autocast' if autocast else 'fp32'} | {seconds:.4f} | "
              f"{seconds * 17000 / 3600:.2f} |")
    print(f"\n| inference, {args.slices}x{args.size}x{args.size} voxels | precision | one model (s) | six models (s) |")
    print("|---|---|---:|---:|")
    for autocast in (False, True):
        times = inference_times(args.slices, args.size, args.tile_batch, autocast)
        tiles = times.pop("tiles")
        for name, seconds in times.items():
            label = name if name == "whole volume" else f"{name}, {tiles} tiles"
            print(f"| {label} | {'fp16 autocast' if autocast else 'fp32'} | {seconds:.3f} | "
                  f"{6 * seconds:.3f} |")


if __name__ == "__main__":
    main()
