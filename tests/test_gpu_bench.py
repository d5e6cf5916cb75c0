"""benchmarks/gpu.sh runs as is: without a CUDA GPU it makes a tiny CPU run that checks the script itself."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_benchmark_cpu_smoke_prints_its_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "gpu.json")}
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu.sh"), "--cpu-smoke"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CPU smoke run" in proc.stdout and "fine-tune epoch" in proc.stdout
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    paths = {(r["model"], r["path"]) for r in rows}
    assert {("resnet50", "model only"), ("efficientnet_lite0", "JPEG, CPU decode")} <= paths
    assert all(r["images_per_s"] > 0 for r in rows)
