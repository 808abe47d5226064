"""gtv-review: the review page's data (orientation, crop, start slices, level counts), the command, bad input, and
the page itself in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from nnunetv2_gtv.cli.review import main
from nnunetv2_gtv.demo.ensemble_outputs import write_ensemble_outputs
from nnunetv2_gtv.demo.synthetic import write_dataset
from nnunetv2_gtv.ensemble.review_ranking import ReviewSelection, rank_rows
from nnunetv2_gtv.figures.review import PAGE_NAME, REVIEW_MARGIN_MM, SOFT_TISSUE_WINDOW, case_view, level_counts, \
    mosaic
from nnunetv2_gtv.figures.slices import window_to_uint8

IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
SPACING_ZYX = (3.0, 0.9, 0.8)
# (stored array from the upright one, direction, spacing (z, y, x) of the stored array); upright = indices
# increasing to superior, posterior, left
ORIENTED = {
    "identity": (lambda a: a, IDENTITY, SPACING_ZYX),
    "flipped superior": (lambda a: a[::-1], (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0), SPACING_ZYX),
    "flipped in-plane": (lambda a: a[:, ::-1, ::-1], (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0), SPACING_ZYX),
    "slices along x": (lambda a: a.transpose(2, 1, 0), (0, 0, 1.0, 0, 1.0, 0, 1.0, 0, 0), SPACING_ZYX[::-1]),
}


def decode(uri: str, shape: list[int], columns: int) -> np.ndarray:
    """A mosaic data URI back to a (slices, rows, columns) volume, as the page reads it."""
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("L"))
    slices, rows, cols = shape
    return np.stack([image[(s // columns) * rows:(s // columns + 1) * rows, (s % columns) * cols:(s % columns + 1) * cols]
                     for s in range(slices)])


def upright_case():
    """(ct, gtv, entropy) with indices increasing to superior, posterior, left; the GTV's uncertain voxels are two
    lines crossing at (7, 50, 40), so slice 7, row 50 and column 40 hold the most; uncertain voxels outside the
    GTV do not count."""
    shape = (20, 100, 90)
    ct = np.full(shape, -1000.0, np.float32)
    ct[:, 10:90, 10:80] = 40.0
    gtv = np.zeros(shape, bool)
    gtv[6:10, 45:56, 35:46] = True
    entropy = np.zeros(shape, np.float32)
    entropy[7, 45:56, 40] = entropy[7, 50, 35:46] = 0.6931
    entropy[:, 44, 30:60] = 0.45  # outside the GTV
    ct[7, 20, 40] = 300.0  # an anterior marker in the start axial slice
    return ct, gtv, entropy


@pytest.mark.parametrize("orientation", list(ORIENTED))
def test_case_view_is_radiological_and_starts_at_the_most_uncertain_gtv_slices(orientation):
    store, direction, spacing = ORIENTED[orientation]
    ct, gtv, entropy = upright_case()
    view = case_view(store(ct), store(gtv), store(entropy), spacing, direction)
    # crop: the GTV box grown by 30 mm: 10 slices of 3 mm, 34 rows of 0.9 mm, 38 columns of 0.8 mm, clipped
    crop = (slice(0, 20), slice(11, 90), slice(0, 84))
    assert view["shape"] == [20, 79, 84] and view["spacing"] == pytest.approx([3.0, 0.9, 0.8])
    np.testing.assert_array_equal(decode(view["gtv"], view["shape"], view["columns"]) > 0, gtv[crop])
    np.testing.assert_array_equal(decode(view["ct"], view["shape"], view["columns"]),
                                  window_to_uint8(ct[crop], SOFT_TISSUE_WINDOW))
    codes = decode(view["entropy"], view["shape"], view["columns"])
    assert codes.max() == 255 and (codes[entropy[crop] == 0.45] == 166).all() and not codes[entropy[crop] == 0].any()
    assert view["start"] == [7, 50 - 11, 40]
    ct_start = decode(view["ct"], view["shape"], view["columns"])[7]
    assert ct_start[20 - 11, 40] == 255  # the anterior marker is in the upper part of the axial view
    # the page's file index of each start slice names the voxel of the stored array
    marker = np.zeros(ct.shape, bool)
    marker[7, 50, 40] = True
    stored = np.argwhere(store(marker))[0]
    for axis in view["file_axes"]:
        d = view["file_axes"].index(axis)
        display = axis["offset"] + view["start"][d] * axis["step"]
        assert stored["kji".index(axis["letter"])] == (display if axis["sign"] > 0 else axis["n"] - 1 - display)
    assert view["cropped_to"] == "fused GTV" and REVIEW_MARGIN_MM == 30.0


def test_a_box_wider_than_the_limit_is_subsampled_in_plane_but_counted_in_full():
    gtv = np.zeros((4, 300, 290), bool)
    gtv[1:3, 5:295, 5:285] = True
    entropy = np.where(gtv, 0.45, 0).astype(np.float32)
    view = case_view(None, gtv, entropy, (3.0, 1.0, 1.0), IDENTITY)
    assert view["step"] == 2 and view["shape"] == [4, 150, 145] and view["spacing"] == [3.0, 2.0, 2.0]
    assert view["ct"] is None and sum(level["inside"] + level["border"] for level in view["levels"]) == \
        np.count_nonzero(ndimage.binary_dilation(gtv))
    assert [axis["step"] for axis in view["file_axes"]] == [1, 2, 2]


def test_mosaic_tiles_slices_row_by_row():
    volume = np.arange(5 * 2 * 3).reshape(5, 2, 3)
    tiled = mosaic(volume, columns=2)
    assert tiled.shape == (6, 6)
    np.testing.assert_array_equal(tiled[0:2, 3:6], volume[1])
    np.testing.assert_array_equal(tiled[4:6, 0:3], volume[4])
    assert not tiled[4:6, 3:6].any()


def test_level_counts_split_the_gtv_interior_from_its_border():
    gtv = np.zeros((7, 7, 7), bool)
    gtv[2:5, 2:5, 2:5] = True  # 27 voxels: 1 interior, 26 on the surface
    entropy = np.where(gtv, 0.6931, 0.0).astype(np.float32)
    entropy[0, 0, 0] = 0.45
    levels = level_counts(entropy, gtv)
    # border = 26 surface voxels + the 6 * 9 face neighbours outside (6-connectivity dilation)
    assert levels == [{"entropy": 0.0, "inside": 0, "border": 54, "box": 343 - 27 - 1},
                      {"entropy": 0.45, "inside": 0, "border": 0, "box": 1},
                      {"entropy": 0.6931, "inside": 1, "border": 26, "box": 27}]


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def fused_example(tmp_path_factory) -> dict:
    """Four small synthetic CTs (mixed orientations) and the fused outputs of a simulated 6-model ensemble."""
    root = tmp_path_factory.mktemp("review")
    raw = write_dataset(root / "raw", 990, num_train=1, num_test=4, in_plane_size=80, num_slices=24,
                        orientations="mixed", seed=3)
    fused = write_ensemble_outputs(raw / "labelsTs", root / "fused", num_models=6, seed=1)
    return {"images": raw / "imagesTs", "fused": fused}


def page_data(page: Path) -> dict:
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing is fetched from the network
    found = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', text, re.S)
    return json.loads(found.group(1))


def priority(case: dict) -> tuple:
    return (not case["row"]["review"], -(case["row"]["vvc"] or 0.0))


def test_page_lists_every_case_in_review_priority(fused_example, tmp_path, capsys):
    out = tmp_path / "page"
    assert main([str(fused_example["fused"]), "-i", str(fused_example["images"]), "-o", str(out)]) == 0
    assert f"wrote {out / PAGE_NAME}" in capsys.readouterr().out
    data = page_data(out / PAGE_NAME)
    summary = json.loads((fused_example["fused"] / "summary.json").read_text())
    assert sorted(c["case"] for c in data["cases"]) == sorted(r["case"] for r in summary["cases"])
    assert [priority(c) for c in data["cases"]] == sorted(priority(c) for c in data["cases"])
    assert all(c["view"]["ct"] and not c["error"] for c in data["cases"])
    assert [p.name for p in out.iterdir()] == [PAGE_NAME]


def add_a_node(fused: Path, case: str) -> np.ndarray:
    """Label 2 (a node) below the GTV of ``case``, label names and per-label VVC in summary.json: a two-label run."""
    path = fused / f"{case}.nii.gz"
    image = sitk.ReadImage(str(path))
    labels = sitk.GetArrayFromImage(image)
    z, y, x = np.argwhere(labels == 1).min(axis=0)
    labels[max(0, z - 3):max(1, z - 1), y:y + 4, x:x + 4] = 2
    node = sitk.GetImageFromArray(labels)
    node.CopyInformation(image)
    sitk.WriteImage(node, str(path))
    summary = json.loads((fused / "summary.json").read_text())
    summary["label_names"] = ["background", "GTVp", "GTVnd"]
    for row in summary["cases"]:
        row.update(vvc_GTVp=row["vvc"], vvc_GTVnd=0.9 if row["case"] == case else 0.0,
                   review_GTVnd=row["case"] == case, volume_ml_fused_GTVp=1.0, volume_ml_fused_GTVnd=0.5)
    summary["cases"] = rank_rows(summary["cases"], ReviewSelection())  # as the fusion ranks a two-label run
    (fused / "summary.json").write_text(json.dumps(summary))
    return labels


def test_several_labels_are_drawn_each_in_its_colour_and_ranked_by_their_vvc(fused_example, tmp_path):
    fused = tmp_path / "fused"
    shutil.copytree(fused_example["fused"], fused)
    labels = add_a_node(fused, "case_003")
    assert main([str(fused), "-o", str(tmp_path / "page")]) == 0
    data = page_data(tmp_path / "page" / PAGE_NAME)
    assert data["labels"] == [{"value": 1, "name": "GTVp", "colour": "#ff0000"},
                              {"value": 2, "name": "GTVnd", "colour": "#0080ff"}]
    node_case = next(c for c in data["cases"] if c["case"] == "case_003")
    assert node_case["view"]["labels_present"] == [1, 2]
    shown = decode(node_case["view"]["gtv"], node_case["view"]["shape"], node_case["view"]["columns"])
    assert set(np.unique(shown)) == {0, 1, 2} and np.count_nonzero(shown == 2) == np.count_nonzero(labels == 2)
    highest = [(not c["row"]["review"], -max(c["row"]["vvc"] or 0.0, c["row"]["vvc_GTVnd"])) for c in data["cases"]]
    assert highest == sorted(highest)  # ranked by the highest VVC of the case or a label: the node's 0.9 counts


def test_default_page_folder_is_inside_fused_and_needs_no_ct(fused_example, tmp_path):
    fused = tmp_path / "fused"
    shutil.copytree(fused_example["fused"], fused)
    assert main([str(fused)]) == 0
    data = page_data(fused / "review" / PAGE_NAME)
    assert all(c["view"]["ct"] is None and c["view"]["gtv"] for c in data["cases"])


def test_folder_without_summary_is_refused_naming_the_file(tmp_path, capsys):
    (tmp_path / "fused").mkdir()
    assert main([str(tmp_path / "fused"), "-o", str(tmp_path / "page")]) == 2
    assert f"{tmp_path / 'fused' / 'summary.json'}: not found" in capsys.readouterr().err
    assert not (tmp_path / "page" / PAGE_NAME).exists()


def test_broken_cases_are_marked_and_the_others_still_shown(fused_example, tmp_path, capsys):
    fused, images = tmp_path / "fused", tmp_path / "images"
    shutil.copytree(fused_example["fused"], fused)
    shutil.copytree(fused_example["images"], images)
    names = sorted(p.name[:-len(".nii.gz")] for p in fused.glob("case_*.nii.gz") if "_entropy" not in p.name)
    (fused / f"{names[0]}_entropy.nii.gz").unlink()
    other_grid = sitk.ReadImage(str(fused / f"{names[1]}_entropy.nii.gz"))
    other_grid.SetSpacing([2 * s for s in other_grid.GetSpacing()])
    sitk.WriteImage(other_grid, str(fused / f"{names[1]}_entropy.nii.gz"))
    ct = sitk.ReadImage(str(images / f"{names[2]}_0000.nii.gz"))
    sitk.WriteImage(ct[:, :, 1:], str(images / f"{names[2]}_0000.nii.gz"))
    out = tmp_path / "page"
    assert main([str(fused), "-i", str(images), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    errors = {c["case"]: c["error"] for c in page_data(out / PAGE_NAME)["cases"]}
    assert errors[names[0]] == f"{fused / names[0]}_entropy.nii.gz: entropy map not found"
    assert errors[names[1]].startswith(f"{fused / names[1]}_entropy.nii.gz: geometry differs from")
    assert errors[names[2]].startswith(f"{images / names[2]}_0000.nii.gz: geometry differs from")
    assert errors[names[3]] is None and len(errors) == 4
    assert all(f"  {case}: {message}" in err for case, message in errors.items() if message)


# ---------------------------------------------------------------- in a browser


def _chromium() -> str:
    """Debian's chromium, installed with apt-get when this runs as root; skips with the reason otherwise."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium, and apt-get cannot install it here (needs root and apt-get)")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if result.returncode != 0:
            pytest.skip(f"{' '.join(command)} failed: {result.stderr.strip()[-300:]}")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium, but it is not on PATH")


def test_page_in_headless_chromium(fused_example, tmp_path):
    browser_path = _chromium()
    from playwright.sync_api import sync_playwright

    out = tmp_path / "page"
    fused = tmp_path / "fused"
    shutil.copytree(fused_example["fused"], fused)
    (fused / "case_002_entropy.nii.gz").unlink()  # one broken case: listed, marked, no console error
    add_a_node(fused, "case_003")
    assert main([str(fused), "-i", str(fused_example["images"]), "-o", str(out)]) == 1
    started = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((out / PAGE_NAME).as_uri())
        page.wait_for_selector("body[data-shown]", timeout=15000)
        rows = page.eval_on_selector_all("#case-table tbody tr",
                                         "rows => rows.map(r => [r.dataset.case, r.classList.contains('broken')])")
        assert sorted(rows) == [[f"case_00{i}", i == 2] for i in range(1, 5)]
        images = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
        assert images == [True] * 3
        for row in range(4):  # every case opens (the broken one with its message) without an error
            page.click(f"#case-table tbody tr:nth-child({row + 1})")
            page.wait_for_selector(f'body[data-shown="{rows[row][0]}"]', timeout=5000)
        first = next(i for i, (_, broken) in enumerate(rows) if not broken)
        page.click(f"#case-table tbody tr:nth-child({first + 1})")
        page.wait_for_selector(f'body[data-shown="{rows[first][0]}"]', timeout=5000)
        axial = page.locator('.view[data-view="axial"]')
        before, picture = int(axial.get_attribute("data-slice")), axial.locator("canvas").screenshot()
        page.mouse.move(0, 0)
        key, step = ("ArrowDown", -1) if before >= 2 else ("ArrowUp", 1)
        page.keyboard.press(key)
        page.keyboard.press(key)
        assert int(axial.get_attribute("data-slice")) == before + 2 * step
        assert axial.locator("canvas").screenshot() != picture
        assert f"axial {before + 2 * step + 1}/" in axial.inner_text()
        assert page.eval_on_selector_all("#legend .label-swatch", "s => s.map(e => e.dataset.label)") == \
            ["GTVp", "GTVnd"]
        headers = page.eval_on_selector_all("#case-table thead th", "h => h.map(e => e.textContent)")
        assert "VVC GTVnd" in headers and "GTVp (ml)" in headers
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert (tmp_path / "review.png").stat().st_size > 10000
    assert time.monotonic() - started < 30
