"""No new import cycles: each one makes two modules one for a reader, and
the layout (docs/architecture.md) draws every seam in one direction."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import import_cycles  # noqa: E402

KNOWN: list[list[str]] = []


def test_no_import_cycle_beyond_the_known_ones() -> None:
    found = import_cycles.cycles(import_cycles.graph(REPO / "edge_agent"))
    assert [c for c in found if c not in KNOWN] == []
    assert import_cycles.cycles(import_cycles.graph(REPO / "quantize")) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert import_cycles.cycles(import_cycles.graph(pkg)) == [["pkg.a", "pkg.b"]]
