"""Every link of the README (and of the pages under docs/) leads somewhere: the file exists, the anchor too.

The Sphinx build (.ci/run) checks the pages as well; this test needs no build and runs in the quick tier.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside code fences."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and MyST's ``myst_heading_anchors``) gives a heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in _prose(path) if re.match(r"#{1,6} ", line)}


def _broken_links(path: Path) -> list[str]:
    broken = []
    for line in _prose(path):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{target}: no file {linked}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{target}: no heading '#{anchor}' in {linked.name}")
    return broken


def test_the_anchors_are_github_s() -> None:
    assert (
        github_anchor("Few-shot: a few normal images of your product") == "few-shot-a-few-normal-images-of-your-product"
    )
    assert github_anchor("Several devices: `anomalib predict` with DDP") == "several-devices-anomalib-predict-with-ddp"


@pytest.mark.parametrize("page", ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md"))])
def test_every_link_resolves(page: str) -> None:
    assert _broken_links(REPO / page) == []


def test_the_readme_links_every_capability_page_and_stays_short() -> None:
    readme = (REPO / "README.md").read_text()
    pages = "zero_shot few_shot mutual_scoring tiling prompt_training adaptation own_images deployment benchmark"
    for page in [*pages.split(), "offline", "faithfulness", "architecture", "configuration", "speed"]:
        assert f"(docs/{page}.md" in readme, page
    assert len(readme.splitlines()) < 300


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "page.md").write_text("# Title\n\n[a](other.md) [b](#title) [c](#missing)\n```\n[d](nowhere.md)\n```\n")
    assert _broken_links(tmp_path / "page.md") == [
        f"other.md: no file {tmp_path / 'other.md'}",
        "#missing: no heading '#missing' in page.md",
    ]


def test_the_notebook_command_keeps_its_outputs_in_ignored_files() -> None:
    (command,) = [line for line in (REPO / "README.md").read_text().splitlines() if "jupyter execute" in line]
    output = re.search(r"--output=(\S+)", command)
    # nbclient replaces the suffix of the name it is given: a dot in it would overwrite the notebook itself
    assert output is not None and "." not in output[1], command
    written = [f"notebooks/{output[1]}.ipynb", "notebooks/anomalyclip_quickstart/results/model.ckpt"]
    ignored = subprocess.run(["git", "check-ignore", *written], cwd=REPO, capture_output=True, text=True, check=False)
    assert ignored.stdout.split() == written
