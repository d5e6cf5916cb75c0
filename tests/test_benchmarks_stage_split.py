"""benchmarks/stage_split.py runs (``--quick``: real JPEG files, real resnet18, a real HDF5 store) and its numbers
add up: the bound is the network's share of the stages' CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import needs_fashion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "stage_split.py")


@needs_fashion
def test_stage_split_quick_run(tmp_path):
    out = tmp_path / "stages.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--n", "40", "--workdir", str(tmp_path / "w"),
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 28 px | torch bf16 |" in proc.stdout or "| 28 px | torch fp32 |" in proc.stdout
    assert "loader as extract runs it" in proc.stdout and "ratio <=" in proc.stdout
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    st = row["stages"]
    assert set(st) == {"list", "read", "decode", "resize", "normalise", "network", "write"}
    assert all(st[s]["n"] == 40 for s in ("list", "read", "decode", "resize", "write"))
    assert st["network"]["n"] == 40 and st["network"]["cpu_ms"] > 0 and st["decode"]["cpu_ms"] > 0
    b = row["bound"]
    total = sum(v["cpu_ms"] for v in st.values())
    assert b["total_cpu_ms"] == pytest.approx(total)
    assert b["predicted_ratio"] == pytest.approx(st["network"]["cpu_ms"] / total)
    assert b["e2e_max_img_s"] == pytest.approx(res["machine"]["cores"] * 1000 / total)
    assert row["measured"]["ratio"] == pytest.approx(0.97, abs=0.01)  # the saved 2026-12-02 run, resnet18 torch 28 px
    assert "serial (other stages between batches" in proc.stdout
    # the saved JSON prints the same table again
    again = subprocess.run([sys.executable, SCRIPT, "--report", str(out)], capture_output=True, text=True, cwd=REPO,
                           timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "network share" in again.stdout
