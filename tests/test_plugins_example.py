"""The third-party example package, installed with pip for real and used through the tlfx command line.

The package goes into a temporary ``--target`` folder (never into the project's environment); the CLI runs in
subprocesses with that folder on ``PYTHONPATH``, where ``importlib.metadata`` finds its ``tlfx`` entry point.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

import tlfx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tlfx-plugin-example"
SHAPES = ["circle", "square", "triangle", "star"]


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
    assert ex["source"] == "entry point (tlfx-plugin-example 0.1.0)" and ex["version"] == "0.1.0" and not ex["skipped"]
    assert ex["hooks"] == ["register_backbones", "register_commands", "register_datasets", "register_heads"]
    assert rows["datasets"]["error"] is None  # first-party plugins unaffected
    assert rows["datasets"]["source"].startswith("tlfx ") and rows["datasets"]["module"] == "tlfx_plugins.datasets"
    heads = {r["name"]: r for r in json.loads(run_cli("heads", "--json", env=env_for(installed), check=True).stdout)}
    assert heads["pca_logistic"]["plugin"] == "example" and heads["pca_logistic"]["clash"] == []


def test_extract_fit_command_and_predict_through_the_cli(installed, tmp_path):
    """Its dataset and backbone into a store, its head fitted with --search over its param_grid into a model
    file, its command writing PNGs, and `tlfx predict` rebuilding its backbone and loading its head from the model."""
    env = env_for(installed)
    train_h5 = tmp_path / "train.h5"
    res = run_cli("extract", "--backbone", "colour_hog", "--data", "shapes:20", "--split", "train",
                  "--out", train_h5, "--quiet", "--workers", "0", env=env, check=True)
    assert "extracted 80 images x 208 features" in res.stdout
    train = tlfx.FeatureStore(str(train_h5))
    assert train.config["backbone"] == "colour_hog" and train.config["weights"]["name"] == "none"
    assert train.class_names == SHAPES

    out = tmp_path / "exported"
    res = run_cli("export-shapes", "--out", out, "--per-class", "5", "--split", "test", env=env, check=True)
    assert "wrote 20 images" in res.stdout
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 20 and {p.parent.name for p in pngs} == set(SHAPES)
    with Image.open(pngs[0]) as img:
        assert img.size == (64, 64) and img.mode == "RGB"

    model = tmp_path / "ncm.tlfx"
    run_cli("fit", "--features", train_h5, "--head", "nearest_class_mean", "--search", "--cv", "3", "--out", model,
            env=env, check=True)
    res = run_cli("predict", "--model", model, "--top-k", "1", "--format", "json", *pngs, env=env, check=True)
    rows = json.loads(res.stdout)
    assert len(rows) == 20 and all("error" not in r for r in rows), rows
    accuracy = np.mean([r["top"][0]["class"] == Path(r["path"]).parent.name for r in rows])
    assert accuracy >= 0.6, f"nearest_class_mean on colour_hog features: {accuracy:.0%} on 4 shapes (chance 25%)"


def test_pipeline_head_with_nested_params_through_fit_evaluate_predict_compare(installed, tmp_path):
    """The example's Pipeline head, written from docs/plugins.md alone: nested --param names reach its steps, the
    model file loads back for evaluate and predict, and compare runs it beside a first-party head."""
    env = env_for(installed)
    stores = {}
    for split in ("train", "test"):
        stores[split] = tmp_path / f"{split}.h5"
        run_cli("extract", "--backbone", "colour_hog", "--data", "shapes:12", "--split", split, "--out", stores[split],
                "--quiet", "--workers", "0", env=env, check=True)
    model = tmp_path / "pca.tlfx"
    run_cli("fit", "--features", stores["train"], "--head", "pca_logistic", "--param", "pca__n_components=6",
            "--param", "logisticregression__C=0.5", "--out", model, env=env, check=True)
    rep = json.loads(run_cli("evaluate", "--model", model, "--features", stores["test"], "--json", env=env,
                             check=True).stdout)
    assert rep["accuracy"] > 0.4, rep["accuracy"]  # 4 shapes, chance 25%
    bad = run_cli("fit", "--features", stores["train"], "--head", "pca_logistic", "--param", "pca__n_componentz=6",
                  "--out", tmp_path / "bad.tlfx", env=env)
    assert bad.returncode == 2 and "pca__n_components" in bad.stderr and not (tmp_path / "bad.tlfx").exists()

    out = tmp_path / "png"
    run_cli("export-shapes", "--out", out, "--per-class", "2", "--split", "test", env=env, check=True)
    rows = json.loads(run_cli("predict", "--model", model, "--format", "json", *sorted(out.rglob("*.png")),
                              env=env, check=True).stdout)
    assert len(rows) == 8 and all("error" not in r for r in rows)

    run_cli("compare", "--train", stores["train"], "--test", stores["test"], "--heads", "pca_logistic,logistic",
            "--learning-curve", "none", "--bootstrap", "50", "--gallery", "0", "--quiet", "--out", tmp_path / "r",
            env=env, check=True)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {r["head"] for r in report["rows"] if r.get("head")} >= {"pca_logistic", "logistic"}


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



def documented_api() -> set[str]:
    """The qualified names listed in the guide's "The plugin API" table (bare names take the row's module)."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text.split("## The plugin API", 1)[1].split("\n## ", 1)[0]
    names = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        module = "tlfx"
        for item in re.findall(r"`([\w.]+)`", row.split(" | ")[0]):
            if item.startswith("tlfx."):
                names.add(item)
                module = item.rsplit(".", 1)[0]
            else:
                names.add(f"{module}.{item}")
    return names


def tlfx_names_used(path: Path) -> set[str]:
    """Every tlfx name a source file uses: ``from tlfx.x import y``, ``import tlfx.x``, ``tlfx.y`` attributes."""
    tree = ast.parse(path.read_text())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tlfx":
            used |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            used |= {a.name for a in node.names if a.name.startswith("tlfx.")}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tlfx":
            used.add(f"tlfx.{node.attr}")
    return used


def test_example_uses_only_the_documented_plugin_api():
    api = documented_api()
    assert {"tlfx.hookimpl", "tlfx.backbone.Backbone", "tlfx.datasets.ArrayDataset", "tlfx.testing"} <= api
    files = sorted(EXAMPLE.rglob("*.py"))
    assert len(files) >= 6
    for f in files:
        outside = sorted(n for n in tlfx_names_used(f) if n not in api and not any(n.startswith(f"{m}.") for m in api))
        assert not outside, f"{f.relative_to(ROOT)} uses tlfx names the guide does not document: {outside}"
