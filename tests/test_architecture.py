"""docs/architecture.md names every module of the two packages, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_CELL = re.compile(r"^\| `([\w/]+\.py)` \|", re.MULTILINE)


def _tree() -> set[str]:
    package = REPO_ROOT / "anomalib_anomalyclip"
    modules = {path.relative_to(package).as_posix() for path in package.rglob("*.py")}
    bench = REPO_ROOT / "anomalyclip_bench"
    return modules | {path.relative_to(REPO_ROOT).as_posix() for path in bench.rglob("*.py")}


def test_the_architecture_page_matches_the_tree() -> None:
    named = MODULE_CELL.findall((REPO_ROOT / "docs" / "architecture.md").read_text())
    assert len(named) == len(set(named)), "a module is named twice"
    tree = _tree()
    assert not set(named) - tree, f"named but missing: {sorted(set(named) - tree)}"
    assert not tree - set(named), f"in the tree but not described: {sorted(tree - set(named))}"
