"""The user's pages hold together: every relative link resolves (file and heading), and each number of the README's
results table is found in the page that row links to."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_to_files_and_headings(page: Path):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no heading)")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def _results_rows() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text().split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("what", "---"):
            rows.append((cells[1], cells[2]))
    return rows


@pytest.mark.parametrize("measured, details", _results_rows(), ids=lambda v: v[:40])
def test_readme_results_numbers_are_in_the_pages_they_link(measured: str, details: str):
    link = LINK.search(details)
    assert link, f"no link in {details}"
    path = (link.group(1) or link.group(2)).partition("#")[0]
    source = (ROOT / path).read_text() if path else (ROOT / "README.md").read_text().split("## Results", 1)[0]
    on_page = {float(n) for n in re.findall(r"\d+\.\d+", source)}
    # a number of the table is on the page as written or rounded from a more precise one there (0.31 from 0.309)
    missing = [n for n in re.findall(r"\d+\.\d+", measured)
               if not any(round(value, len(n.split(".")[1])) == float(n) for value in on_page)]
    assert not missing, f"{missing} of '{measured}' not in {path or 'the README above its table'}"
