"""Size and build time of the gtv-review page for clinical-size cases.

Writes ``--cases`` synthetic CTs of ``--size`` x ``--size`` x ``--slices`` voxels (0.977 mm in-plane, 3 mm slices;
clinical: 512 x 512 x 130, the phantom filling the field of view, so its GTV is larger than a real patient's),
the fused outputs of a simulated ``--models``-model ensemble (``nnunetv2_gtv.demo.ensemble_outputs``), then
times ``gtv-review`` (its console script, with the CTs) and prints the page size, each case's box and GTV volume,
and the load average (the CPU may be shared). The page is left in ``--work`` for a look in a browser;
``--screenshot PNG`` saves a picture of it from headless Chromium (playwright and Debian's ``chromium`` needed),
palette-compressed (``docs/review_page.png``, shown in docs/review.md).

Run: ``python benchmarks/review_page.py [--size 512 --slices 130] [--cases 3] [--models 6] [--work DIR]
[--screenshot PNG]``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_gtv.demo.ensemble_outputs import write_ensemble_outputs
from nnunetv2_gtv.demo.synthetic import CaseGeometry, render_case, to_sitk_image

IN_PLANE_MM, SLICE_MM = 0.977, 3.0


def write_cases(folder: Path, size: int, slices: int, cases: int) -> tuple[Path, Path]:
    images, labels = folder / "imagesTs", folder / "labelsTs"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(exist_ok=True)
    geometry = CaseGeometry((slices, size, size), (IN_PLANE_MM, IN_PLANE_MM, SLICE_MM))
    rng = np.random.default_rng(0)
    for i in range(cases):
        image, label = render_case(geometry, rng)
        sitk.WriteImage(to_sitk_image(image, geometry), str(images / f"case_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(to_sitk_image(label, geometry), str(labels / f"case_{i:03d}.nii.gz"))
    return images, labels


def screenshot(page: Path, target: Path) -> None:
    """The page as opened from disk in headless Chromium, 1200 px wide, in 256 colours."""
    import io

    from PIL import Image
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1200, "height": 900})
        tab.goto(page.resolve().as_uri())
        tab.wait_for_selector("body[data-shown]")
        picture = tab.screenshot(full_page=True)
        browser.close()
    Image.open(io.BytesIO(picture)).convert("RGB").quantize(colors=256).save(target, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=130)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary folder)")
    parser.add_argument("--screenshot", type=Path, metavar="PNG", help="save a screenshot of the page here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="review_page_"))
    images, labels = write_cases(work / "raw", args.size, args.slices, args.cases)
    fused = write_ensemble_outputs(labels, work / "fused", args.models)
    command = [str(Path(sys.executable).parent / "gtv-review"), str(fused), "-i", str(images), "-o", str(work / "page")]
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stdout, result.stderr, file=sys.stderr)
        return result.returncode
    page = work / "page" / "review.html"
    text = page.read_text()
    data = json.loads(re.search(r'id="review-data">(.*?)</script>', text, re.S).group(1))
    print(f"{args.cases} cases of {args.size} x {args.size} x {args.slices} voxels, {args.models} simulated models; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average before "
          f"{load_before[0]:.2f} after {os.getloadavg()[0]:.2f}")
    print("| case | fused GTV (ml) | box S x P x L (voxels) | box (mm) | case data in the page (MB) |")
    print("|---|---:|---|---|---:|")
    for case in data["cases"]:
        view = case["view"]
        megabytes = sum(len(view[k] or "") for k in ("ct", "entropy", "gtv", "thumbnail")) / 1e6
        print(f"| {case['case']} | {case['row']['volume_ml_fused']:.1f} | {' x '.join(map(str, view['shape']))} | "
              f"{' x '.join(f'{n * s:.0f}' for n, s in zip(view['shape'], view['spacing']))} | {megabytes:.2f} |")
    print(f"page {page}: {page.stat().st_size / 1e6:.2f} MB, {page.stat().st_size / 1e6 / args.cases:.2f} MB per "
          f"case; gtv-review took {seconds:.1f} s ({seconds / args.cases:.1f} s per case)")
    if args.screenshot:
        screenshot(page, args.screenshot)
        print(f"screenshot {args.screenshot}: {args.screenshot.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
