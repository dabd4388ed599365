"""``benchmarks/layout_memory.py`` runs on small trees, and its streamed sample equals the listed one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_layout_memory_benchmark_small_trees(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "layout_memory.py"), "--files", "800,1600", "--work", str(tmp_path),
         "--json", str(tmp_path / "rows.json")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("the streamed sample equals the listed one") == 2, result.stdout
    assert result.stdout.count("the walked inspection equals the listed one") == 2, result.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["files"], r["mode"]) for r in rows] == [(n, m) for n in (800, 1600)
                                                       for m in ("listed", "streamed", "sampled", "sampled-list",
                                                                 "generic", "generic-many", "manifest",
                                                                 "inspect", "inspect-list")]
    by = {(r["files"], r["mode"]): r for r in rows}
    assert all(by[(n, "listed")]["count"] == by[(n, "streamed")]["count"] == by[(n, "generic")]["count"]
               == by[(n, "generic-many")]["count"] == by[(n, "manifest")]["count"] == by[(n, "inspect")]["count"] == n for n in (800, 1600))
    assert by[(1600, "sampled")]["count"] == 1600  # 100 per class per generator, all under 1,000
