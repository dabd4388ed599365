"""``benchmarks/attack_server.py`` runs (a quick subset) and finds no fault."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="the web service needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_attack_benchmark_quick_subset(served, tmp_path):
    cases = "long-boundary,not-multipart,bad-content-length,bomb,zero-byte,disclosure"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "attack_server.py"), "--quick", "--head", str(served["head"]),
         "--work", str(tmp_path), "--cases", cases, "--json", str(tmp_path / "rows.json")],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["case"]: row for row in json.loads((tmp_path / "rows.json").read_text())}
    assert list(rows) == cases.split(",") and all(row["ok"] for row in rows.values()), rows
    assert rows["long-boundary"]["statuses"] == {"400": 5} and rows["bomb"]["statuses"] == {"422": 5}
    assert "no server path" in rows["disclosure"]["note"]
    assert "0 tracebacks" in result.stdout
