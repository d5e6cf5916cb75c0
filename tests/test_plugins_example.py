"""The third-party example package, installed with pip for real and used through the tlfx command line.

The package goes into a temporary ``--target`` folder (never into the project's environment); the CLI runs in
subprocesses with that folder on ``PYTHONPATH``, where ``importlib.metadata`` finds its ``tlfx`` entry point.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

import tlfx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tlfx-plugin-example"
HAS_FIT_COMMAND = importlib.util.find_spec("tlfx.commands.fit") is not None


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install --no-deps --no-build-isolation --target TMP`` of a copy of the package (the build writes
    build/ and *.egg-info into the source folder, so build from a copy and keep the checkout clean)."""
    base = tmp_path_factory.mktemp("example_pkg")
    src, target = base / "src", base / "site"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-input", "--disable-pip-version-check", "--target", str(target), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    dist = list(target.glob("tlfx_plugin_example-*.dist-info"))
    assert len(dist) == 1 and "example = tlfx_plugin_example" in (dist[0] / "entry_points.txt").read_text()
    return target


def env_for(target: Path) -> dict:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH", "")]))}


def test_not_installed_in_the_project_environment():
    assert importlib.util.find_spec("tlfx_plugin_example") is None, (
        "tlfx_plugin_example is importable in the test environment; these tests install it into a temporary "
        "folder and expect a clean environment (pip uninstall tlfx-plugin-example)")
    assert "colour_hog" not in tlfx.list_backbones()


def test_tlfx_plugins_lists_the_installed_package(installed):
    res = run_cli("plugins", "--json", env=env_for(installed), check=True)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    ex = rows["example"]
    assert ex["error"] is None
    assert ex["provides"] == ["backbone", "head", "dataset", "command"]
    assert ex["module"] == "tlfx_plugin_example"
    assert ex["source"] == "entry point (tlfx-plugin-example 0.1.0)"
    assert rows["datasets"]["error"] is None  # first-party plugins unaffected


def test_extract_fit_and_command_through_the_cli(installed, tmp_path):
    env = env_for(installed)
    train_h5, test_h5 = tmp_path / "train.h5", tmp_path / "test.h5"
    res = run_cli("extract", "--backbone", "colour_hog", "--data", "shapes:20", "--split", "train",
                  "--out", train_h5, "--quiet", "--workers", "0", env=env, check=True)
    assert "extracted 80 images x 208 features" in res.stdout
    train = tlfx.FeatureStore(str(train_h5))
    assert train.config["backbone"] == "colour_hog" and train.config["weights"]["name"] == "none"
    assert train.class_names == ["circle", "square", "triangle", "star"]

    # the test split through the Python API (one process less), then the head on it
    extract_test = (f"from tlfx.extract import extract; extract('colour_hog', 'shapes:20', {str(test_h5)!r}, "
                    f"split='test', workers=0); ")
    if HAS_FIT_COMMAND:
        model = tmp_path / "ncm.tlfx"
        run_cli("fit", "--features", train_h5, "--head", "nearest_class_mean", "--out", model, env=env, check=True)
        code = extract_test + f"import tlfx; print(tlfx.evaluate({str(model)!r}, {str(test_h5)!r})['accuracy'])"
    else:  # until `tlfx fit` lands: the same through the Python API, in a process that sees the plugin
        code = extract_test + (f"import tlfx, numpy as np; from tlfx.heads import create_head; "
                               f"tr, te = tlfx.FeatureStore({str(train_h5)!r}), tlfx.FeatureStore({str(test_h5)!r}); "
                               f"h = create_head('nearest_class_mean').fit(tr.features, tr.labels); "
                               f"print(float(np.mean(h.predict(te.features) == te.labels)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    accuracy = float(proc.stdout.strip().splitlines()[-1])
    assert accuracy >= 0.6, f"nearest_class_mean on colour_hog features: {accuracy:.0%} on 4 shapes (chance 25%)"

    out = tmp_path / "exported"
    res = run_cli("export-shapes", "--out", out, "--per-class", "3", env=env, check=True)
    assert "wrote 24 images" in res.stdout
    files = sorted(p.relative_to(out).parts[:2] for p in out.rglob("*.png"))
    assert len(files) == 24 and {f[1] for f in files} == {"circle", "square", "triangle", "star"}
    from PIL import Image

    with Image.open(next(out.rglob("*.png"))) as img:
        assert img.size == (64, 64) and img.mode == "RGB"


@pytest.mark.slow
def test_wrong_input_to_the_plugin_is_one_line(installed, tmp_path):
    res = run_cli("extract", "--backbone", "colour_hog", "--data", "shapes:0", "--out", tmp_path / "x.h5",
                  env=env_for(installed))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "error: shapes:0 is not valid; pass shapes:N with N >= 1 images per class (e.g. shapes:50)"


@pytest.mark.slow  # ~25 s on 2 busy cores: torch import + contract checks + two small extractions
def test_the_example_packages_own_tests(installed, tmp_path):
    """The package's tests (tlfx.testing contract checks + behaviour) against the pip-installed copy."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(EXAMPLE),
                           "-c", str(EXAMPLE / "pyproject.toml"), "--basetemp", str(tmp_path / "t"), str(EXAMPLE / "tests")],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env_for(installed)}, timeout=900)
    tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
    assert proc.returncode == 0, f"example package tests failed:\n{tail}\n{proc.stderr[-2000:]}"
    assert " passed" in tail and "failed" not in tail and "skipped" not in tail, tail

