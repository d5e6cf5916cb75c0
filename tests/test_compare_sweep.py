"""tlfx compare in sweep mode (--data/--backbones) on real data: scikit-learn digits through the pixels_grey and
efficientnet_lite0 backbones at 32 px, real stores in a real cache, the real command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_cli

from tlfx.metrics import mcnemar_exact, paired_comparison
from tlfx.safetext import html as html_escape
from tlfx.safetext import markdown as md_escape
from tlfx.sweep import SweepOptions, resolved_config, store_key, store_path, sweep

SWEEP = ["--data", "digits", "--backbones", "pixels_grey,efficientnet_lite0", "--heads", "svm,knn",
         "--image-size", "32", "--limit", "200", "--test-limit", "100", "--learning-curve", "1,all",
         "--bootstrap", "200", "--gallery", "0", "--quiet"]


# ------------------------------------------------------------------------------------------------ paired test
def test_mcnemar_exact_matches_a_hand_computation():
    # b=1, c=9: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 2 * 11 / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024, abs=1e-15) == pytest.approx(0.02148, abs=1e-5)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * C(5,0) / 2^5
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(4, 4) == 1.0  # capped at 1
    assert mcnemar_exact(3, 4) == 1.0
    # a large count stays exact (integers), no overflow: scipy's binomial test agrees
    from scipy.stats import binomtest

    assert mcnemar_exact(300, 400) == pytest.approx(binomtest(300, 700).pvalue, rel=1e-9)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_paired_comparison_counts_discordant_pairs():
    a = np.array([1, 1, 1, 0, 1, 0, 1, 1, 1, 1], bool)  # 8 right
    b = np.array([1, 0, 0, 0, 1, 1, 0, 1, 0, 1], bool)  # 5 right
    res = paired_comparison(a, b, n_boot=500, seed=0)
    assert (res["n"], res["a_only"], res["b_only"]) == (10, 4, 1)
    assert res["difference"] == pytest.approx(0.3)
    assert res["p_value"] == mcnemar_exact(4, 1) == pytest.approx(2 * 6 / 32)
    lo, hi = res["difference_ci95"]
    assert lo <= 0.3 <= hi
    assert paired_comparison(a, b, n_boot=500, seed=0) == res  # fixed seed, same interval


# -------------------------------------------------------------------------------------------------- cache key
def test_cache_key_changes_with_every_configuration_field():
    import dataclasses

    import tlfx
    from tlfx.backbone import create_backbone

    ds = tlfx.load_dataset("digits", split="train", limit=50)
    bb = create_backbone("pixels_grey")
    base_cfg = resolved_config(bb, "penultimate", SweepOptions(image_size=32, precision="fp32"))
    base, record = store_key(base_cfg, ds, 50, "float32")
    assert record["dataset"]["fingerprint"] == ds.fingerprint()
    variants = {
        "backbone": {**base_cfg, "backbone": "pixels"},
        "weights": {**base_cfg, "weights": {"name": "other", "sha256": "ab" * 32}},
        "layers": {**base_cfg, "layers": ["penultimate", "features"]},
        "pooling": {**base_cfg, "pooling": "max"},
        "image_size": resolved_config(bb, "penultimate", SweepOptions(image_size=16, precision="fp32")),
        "preprocess": {**base_cfg, "preprocess": {**base_cfg["preprocess"], "mean": [0.1, 0.2, 0.3]}},
        "precision": {**base_cfg, "precision": "bf16"},
        "runtime": {**base_cfg, "runtime": "openvino"},
        "tta": {**base_cfg, "tta": "flip"},
        "components": {**base_cfg, "components": [{"config": {**base_cfg, "backbone": "pixels"}, "columns": [0, 1024]}]},
    }
    from tlfx.config import FIELDS

    assert set(variants) == set(FIELDS)  # a new FeatureConfig field needs a line here
    keys = {name: store_key(cfg, ds, 50, "float32")[0] for name, cfg in variants.items()}
    keys["dtype"] = store_key(base_cfg, ds, 50, "float16")[0]
    keys["limit"] = store_key(base_cfg, tlfx.load_dataset("digits", split="train", limit=51), 51, "float32")[0]
    keys["split"] = store_key(base_cfg, tlfx.load_dataset("digits", split="test", limit=50), 50, "float32")[0]
    # the same images under another recorded root or spec would still be another store
    other_root = dataclasses.replace(ds, root="/elsewhere") if dataclasses.is_dataclass(ds) else None
    if other_root is not None:
        keys["root"] = store_key(base_cfg, other_root, 50, "float32")[0]
    assert base not in keys.values(), [k for k, v in keys.items() if v == base]
    assert len(set(keys.values())) == len(keys)
    # where the weights file lies does not matter; its name and content do
    moved = {**base_cfg, "weights": {**(base_cfg["weights"] or {}), "path": "/somewhere/else.pt"}}
    assert store_key(moved, ds, 50, "float32")[0] == base
    assert store_key(dict(base_cfg), tlfx.load_dataset("digits", split="train", limit=50), 50, "float32")[0] == base
    p = store_path("/c", "timm:x/y", "penultimate", "train", base)
    assert os.path.dirname(p) == "/c" and base[:16] in p and "/" not in os.path.basename(p)


# ------------------------------------------------------------------------------------------------ a real sweep
def _stores(cache):
    return sorted(p for p in os.listdir(cache) if p.endswith(".h5"))


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "rep"
    t0 = time.perf_counter()
    proc = run_cli("compare", *SWEEP, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc, time.perf_counter() - t0


def test_sweep_writes_one_report_with_the_grid_and_the_paired_tests(sweep_run):
    out, proc, _ = sweep_run
    rep = json.loads((out / "report.json").read_text())
    assert [(c["backbone"], c["layers"]) for c in rep["configs"]] == [("pixels_grey", "penultimate"),
                                                                       ("efficientnet_lite0", "penultimate")]
    assert sorted((r["backbone"], r["head"]) for r in rep["rows"]) == [
        ("efficientnet_lite0", "knn"), ("efficientnet_lite0", "svm"), ("pixels_grey", "knn"), ("pixels_grey", "svm")]
    best = next(r for r in rep["rows"] if r["id"] == rep["best"])
    assert best["accuracy"] == max(r["accuracy"] for r in rep["rows"])
    for r in rep["rows"]:
        lo, hi = r["accuracy_ci95"]
        assert lo <= r["accuracy"] <= hi and r["n_test"] == 100
        assert r["timing"]["total_cost_seconds"] >= r["timing"]["fit_seconds"] > 0
        # the merged row is the configuration's own compare row
        own = json.loads((out / "configs" / r["config"] / "report.json").read_text())
        assert next(o for o in own["rows"] if o["head"] == r["head"])["accuracy"] == r["accuracy"]
    for c in rep["configs"]:
        assert c["dim"] == (1024 if c["backbone"] == "pixels_grey" else 1280)
        assert c["store_bytes"] == sum(os.path.getsize(s["path"]) for s in c["stores"].values())
        assert c["images_per_s"] > 0 and c["extract_seconds"] > 0
        assert {s["state"] for s in c["stores"].values()} == {"extracting"}
    # one paired test per runner-up, recomputed here from the configurations' own predictions
    assert len(rep["paired"]) == 3
    y = np.array(json.loads((out / "configs" / best["config"] / "report.json").read_text())["rows"][0]["confusion"])
    assert y.sum() == 100
    for p in rep["paired"]:
        other = next(r for r in rep["rows"] if r["id"] == p["b"])
        assert p["difference"] == pytest.approx(best["accuracy"] - other["accuracy"])
        assert p["p_value"] == mcnemar_exact(p["a_only"], p["b_only"])
        assert p["sentence"].startswith(f"{best['label']} ")
        assert other["label"] in p["sentence"] and "p = " in p["sentence"]
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for p in rep["paired"]:
        assert html_escape(p["sentence"]) in html
        assert md_escape(p["sentence"]) in md
    assert 'id="grid-table"' in html and "| backbone · layers | svm | knn |" in md
    assert set(rep["figures"]) == {"grid_heatmap", "accuracy_vs_cost", "learning_curves", "embedding_map"}
    assert [c["row"] for c in rep["learning_curves"]] == [
        max((r for r in rep["rows"] if r["config"] == c["id"]), key=lambda r: (r["accuracy"], r["macro_f1"]))["id"]
        for c in rep["configs"]]
    for f in rep["figures"].values():
        assert (out / f["file"]).stat().st_size > 5000
    emb = rep["embedding"]
    assert emb["method"].startswith(("PCA", "UMAP")) and len(emb["x"]) == 100
    assert emb["n_wrong"] == round((1 - best["accuracy"]) * 100)
    assert "best: " in proc.stdout and "p = " in proc.stdout


def test_the_same_plan_twice_extracts_nothing_and_a_new_field_makes_new_stores(sweep_run):
    out = sweep_run[0]
    cache = out / "stores"
    before = {p: os.stat(cache / p).st_mtime_ns for p in _stores(cache)}
    assert len(before) == 4
    log: list = []
    kw = dict(learning_curve="none", n_boot=50, gallery=0, log=log.append)
    opts = SweepOptions(image_size=32, limit=200, test_limit=100)
    rep = sweep("digits", "pixels_grey,efficientnet_lite0", "penultimate", "svm,knn", str(out), opts=opts, **kw)
    text = "\n".join(log)
    assert text.count(": reusing ") == 4 and "extracted" not in text, text
    assert {p: os.stat(cache / p).st_mtime_ns for p in _stores(cache)} == before
    assert all(s["state"] == "reusing" for c in rep["configs"] for s in c["stores"].values())
    # another image size is another configuration: two new stores beside the old ones, which stay untouched
    log.clear()
    opts = SweepOptions(image_size=16, limit=200, test_limit=100)
    sweep("digits", "pixels_grey", "penultimate", "knn", str(out), opts=opts, **kw)
    text = "\n".join(log)
    assert text.count(": extracting ") == 2 and ": reusing " not in text, text
    after = _stores(cache)
    assert len(after) == 6 and {p: os.stat(cache / p).st_mtime_ns for p in before} == before


def test_store_mode_and_sweep_mode_are_exclusive(tmp_path):
    for args, needle in (
            (["--data", "digits", "--out", tmp_path / "a"], "--backbones"),
            (["--data", "digits", "--backbones", "pixels_grey", "--train", "x.h5", "--out", tmp_path / "b"], "not both"),
            (["--out", tmp_path / "c"], "--train"),
            (["--data", "digits", "--backbones", "pixels_grey,nope", "--out", tmp_path / "d"], "nope"),
            (["--data", "digits", "--backbones", "pixels_grey,pixels_grey", "--out", tmp_path / "e"], "twice"),
            (["--data", "digits", "--backbones", "pixels_grey", "--baseline", "pixels", "--out", tmp_path / "f"],
             "--baseline")):
        proc = run_cli("compare", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_sweep_report_renders_in_headless_chromium(sweep_run, tmp_path):
    from test_report_browser import CHROMIUM, PROBE, _Collect, chromium

    if not os.path.exists(CHROMIUM):
        pytest.skip("headless Chromium missing")
    out = sweep_run[0]
    rep = json.loads((out / "report.json").read_text())
    html = (out / "report.html").read_text()
    static = _Collect()
    static.feed(html)
    assert static.scripts == 0
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = chromium(tmp_path, "--virtual-time-budget=10000", "--window-size=1400,4000", "--dump-dom",
                   probe_page.as_uri())
    import re

    probe = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    assert probe["rows"] == len(rep["rows"])
    assert sorted(im["figure"] for im in probe["images"]) == sorted(rep["figures"])
    for im in probe["images"]:
        assert im["complete"] and im["w"] > 300 and im["h"] > 100 and im["shown_w"] > 300, im


# ---------------------------------------------------------------------------------------------------- resuming
KILLABLE = """
import sys
from tlfx.sweep import SweepOptions, sweep
sweep("digits", ["pixels_grey", "efficientnet_lite0"], ["penultimate"], ["knn"], sys.argv[1],
      opts=SweepOptions(image_size=32, limit=400, test_limit=60, part_size=32, batch_size=16, workers=0),
      learning_curve="none", n_boot=50, gallery=0)
"""


@pytest.mark.slow
def test_a_killed_sweep_resumes(tmp_path):
    out = tmp_path / "rep"
    cache = out / "stores"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(out)], stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 300
    parts = []
    while time.time() < deadline and proc.poll() is None:
        dirs = [d for d in cache.glob("efficientnet_lite0-*-train-*.h5.parts")] if cache.exists() else []
        parts = [p for d in dirs for p in d.glob("part-*.h5")]
        if len(parts) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed: " + proc.stderr.read()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # only the process group this test started
    proc.wait(30)
    from tlfx.store import read_attrs

    complete = {p: bool(read_attrs(str(cache / p)).get("complete")) for p in _stores(cache)}
    assert sum(complete.values()) == 2, complete  # the pixels stores; efficientnet's train store is unfinished
    assert not any(v for p, v in complete.items() if p.startswith("efficientnet_lite0"))
    again = subprocess.run([sys.executable, "-c", KILLABLE, str(out)], capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    err = again.stderr
    assert err.count(": reusing ") == 2
    assert "efficientnet_lite0 / penultimate: train split: resuming" in err
    assert "resumed at item" in err
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["rows"]) == 2 and all(r["n_test"] == 60 for r in rep["rows"])
    from tlfx.store import FeatureStore

    st = FeatureStore(next(c for c in rep["configs"] if c["backbone"] == "efficientnet_lite0")["stores"]["train"]["path"])
    assert st.complete and len(st) == 400


def test_sweep_report_escapes_every_foreign_value(sweep_run, tmp_path):
    """Names reach the page from the command line and the stores: markup and control characters stay text."""
    from tlfx.report.sweep import render_sweep_html, render_sweep_markdown

    out = sweep_run[0]
    rep = json.loads((out / "report.json").read_text())
    evil = "<script>alert(1)</script>|**x**\x1b[31m"
    for r in rep["rows"]:
        r["label"] = r["backbone"] = r["head"] = evil
    for c in rep["configs"]:
        c["backbone"] = evil
    for p in rep["paired"]:
        p["sentence"] = evil
    rep["config"]["data"] = evil
    rep["heads"] = [evil, *rep["heads"][1:]]
    figures = {name: {"path": str(out / f["file"]), "title": evil, "caption": evil}
               for name, f in rep["figures"].items()}
    html = render_sweep_html(rep, figures)
    assert "<script>" not in html and "\x1b" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    md = render_sweep_markdown(rep)
    assert "<script>" not in md and "\x1b" not in md and "|**x**" not in md
    assert md_escape(evil) in md


def test_layers_that_resolve_to_the_same_features_run_once(tmp_path):
    log: list = []
    rep = sweep("digits", "pixels_grey", "penultimate,multi", "knn", str(tmp_path / "rep"),
                opts=SweepOptions(limit=60, test_limit=30), learning_curve="none", n_boot=20, gallery=0, log=log.append)
    assert [c["layers"] for c in rep["configs"]] == ["penultimate"]
    assert "pixels_grey / multi: skipped, the same features as pixels_grey / penultimate" in log
    assert log[-1].startswith("[3/3] ")
    assert len(_stores(tmp_path / "rep" / "stores")) == 2


def test_a_store_planted_under_a_cache_name_is_never_reused(tmp_path):
    """The file name is only a hint: a complete store whose recorded configuration is not the wanted one is
    refused by the extraction engine, never reused."""
    import shutil

    from tlfx.errors import TlfxError

    kw = dict(learning_curve="none", n_boot=20, gallery=0, log=None)
    small = sweep("digits", "pixels_grey", "penultimate", "knn", str(tmp_path / "a"),
                  opts=SweepOptions(image_size=16, limit=40, test_limit=20), **kw)
    big = sweep("digits", "pixels_grey", "penultimate", "knn", str(tmp_path / "b"),
                opts=SweepOptions(image_size=32, limit=40, test_limit=20), **kw)
    target = big["configs"][0]["stores"]["train"]["path"]
    shutil.copyfile(small["configs"][0]["stores"]["train"]["path"], target)  # 16 px features under the 32 px name
    with pytest.raises(TlfxError, match="image_size"):
        sweep("digits", "pixels_grey", "penultimate", "knn", str(tmp_path / "b"),
              opts=SweepOptions(image_size=32, limit=40, test_limit=20), **kw)


GRID_PROBE = """<script>
window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('#grid-table tr').forEach(function (tr) {
    var row = [];
    tr.querySelectorAll('th,td').forEach(function (c) { row.push(getComputedStyle(c).textAlign); });
    out.push(row);
  });
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def test_grid_headers_line_up_with_their_cells_in_a_browser(sweep_run, tmp_path):
    import re

    from test_report_browser import CHROMIUM, chromium

    if not os.path.exists(CHROMIUM):
        pytest.skip("headless Chromium missing: apt-get install chromium (.ci/run installs it)")
    out, _, _ = sweep_run
    page = tmp_path / "probe.html"  # a copy with a probe: the report itself has no JavaScript
    page.write_text((out / "report.html").read_text().replace("</body>", GRID_PROBE + "</body>"))
    dom = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    rows = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    head, body = rows[0], rows[1:]
    # (another test of this module rewrites the report with fewer rows and heads: no counts here)
    assert body and len(head) >= 2 and head[0] == "left" and set(head[1:]) == {"center"}, rows
    assert all(r == head for r in body), rows


def _runtime_sweep_args(tmp_path):
    return ["--data", "digits", "--backbones", "efficientnet_lite0", "--heads", "knn", "--image-size", "32",
            "--limit", "60", "--test-limit", "30", "--learning-curve", "none", "--bootstrap", "50", "--gallery", "0",
            "--quiet", "--cache", tmp_path / "stores"]


def test_sweep_refuses_int8_on_torch_in_one_line_before_extracting(tmp_path):
    proc = run_cli("compare", *_runtime_sweep_args(tmp_path), "--runtime", "torch", "--precision", "int8",
                   "--out", tmp_path / "out")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--precision int8" in lines[0], lines
    assert not (tmp_path / "stores").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sweep_runtime_is_a_choice_recorded_in_every_store(tmp_path):
    pytest.importorskip("openvino")
    from tlfx.store import FeatureStore

    env = {"TLFX_CACHE_DIR": str(tmp_path / "cache")}
    args = [*_runtime_sweep_args(tmp_path), "--precision", "fp32"]
    for runtime in ("openvino", "torch"):
        proc = run_cli("compare", *args, "--runtime", runtime, "--out", tmp_path / runtime, env=env)
        assert proc.returncode == 0, proc.stderr
        rep = json.loads((tmp_path / runtime / "report.json").read_text())
        assert [c["runtime"] for c in rep["configs"]] == [runtime]
    stores = _stores(tmp_path / "stores")
    assert len(stores) == 4, stores  # the OpenVINO stores are not reused for torch: features differ
    assert sorted(FeatureStore(str(tmp_path / "stores" / s)).attrs["runtime"] for s in stores) == \
        ["openvino", "openvino", "torch", "torch"]
