"""tlfx compare in sweep mode with --finetune: a real (tiny) fine-tuned efficientnet_lite0 from the fine-tune
plugin, scored once on the sweep's test images of scikit-learn digits beside a pixels_grey head, through the real
command line; the merged report's row, paired test, tables and figures."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
from conftest import cli_here

import tlfx
from tlfx.safetext import html as html_escape
from tlfx.safetext import markdown as md_escape

SWEEP = ["--data", "digits", "--backbones", "pixels_grey", "--heads", "knn", "--limit", "60", "--test-limit", "40",
         "--learning-curve", "none", "--bootstrap", "10", "--gallery", "0", "--quiet"]


@pytest.fixture(scope="module")
def ft_sweep(tmp_path_factory):
    from tlfx_plugins.finetune_train import finetune

    d = tmp_path_factory.mktemp("ft_sweep")
    ft = str(d / "ft.tlfx")
    finetune(ft, data="digits", limit=60, image_size=32, epochs=1, unfreeze="head", augment="none", batch_size=16,
             val_fraction=0.0, workers=0, patience=0, precision="fp32")
    out = d / "rep"
    proc = cli_here("compare", *SWEEP, "--finetune", ft, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return ft, out, proc


def test_a_finetuned_model_is_a_row_of_the_sweep(ft_sweep):
    ft, out, proc = ft_sweep
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["finetune"] == [os.path.abspath(ft)]
    assert len(rep["rows"]) == 2
    row = next(r for r in rep["rows"] if r["config"] is None)
    assert row["id"].startswith("finetune/") and row["label"] == "fine-tuned: efficientnet_lite0"
    assert row["kind"] == "finetune" and row["backbone"] == "efficientnet_lite0" and row["n_test"] == 40
    # the same number tlfx evaluate gives for this model on the same test images
    test_store = rep["configs"][0]["stores"]["test"]["path"]
    assert row["scored_on"] == rep["configs"][0]["id"]
    assert row["accuracy"] == pytest.approx(tlfx.evaluate(ft, test_store)["accuracy"])
    meta = tlfx.load_model(ft).meta
    t = row["timing"]
    assert t["fit_seconds"] == pytest.approx(meta["train_seconds"]) and t["predict_seconds"] > 0
    assert t["total_cost_seconds"] == pytest.approx(t["fit_seconds"] + t["predict_seconds"])
    # the paired test between the best row and the other one runs on the 40 shared images
    head = next(r for r in rep["rows"] if r["config"] is not None)
    assert len(rep["paired"]) == 1
    p = rep["paired"][0]
    assert {p["a"], p["b"]} == {row["id"], head["id"]} and p["n"] == 40
    assert p["difference"] == pytest.approx(abs(row["accuracy"] - head["accuracy"]))
    assert row["label"] in p["sentence"]
    # tables, grid line and figures
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert f'class="model-line" data-row="{html_escape(row["id"])}"' in html and 'colspan="1"' in html
    assert html_escape(p["sentence"]) in html and md_escape(p["sentence"]) in md
    assert f"| {md_escape(row['label'])} | " in md
    assert {"grid_heatmap", "accuracy_vs_cost"} <= set(rep["figures"])
    assert "fine-tuned" in rep["figures"]["accuracy_vs_cost"]["caption"]
    for f in rep["figures"].values():
        assert (out / f["file"]).stat().st_size > 5000
    assert "fine-tuned: efficientnet_lite0" in proc.stdout


def test_a_finetuned_model_of_other_classes_is_refused_before_any_extraction(ft_sweep, tmp_path):
    ft = ft_sweep[0]
    other = tmp_path / "other.tlfx"
    with zipfile.ZipFile(ft) as src, zipfile.ZipFile(other, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "meta.json":
                meta = json.loads(data)
                meta["class_names"] = [f"c{i}" for i in range(len(meta["class_names"]))]
                data = json.dumps(meta).encode()
            dst.writestr(info, data)
    proc = cli_here("compare", *SWEEP, "--finetune", other, "--out", tmp_path / "rep")
    assert proc.returncode == 2, proc.stderr
    assert "other classes" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "rep" / "stores").exists() or not os.listdir(tmp_path / "rep" / "stores")


def test_the_finetune_row_renders_in_headless_chromium(ft_sweep, tmp_path):
    from test_report_browser import CHROMIUM, PROBE, chromium

    if not os.path.exists(CHROMIUM):
        pytest.skip("headless Chromium missing")
    out = ft_sweep[1]
    rep = json.loads((out / "report.json").read_text())
    page = tmp_path / "probe.html"
    page.write_text((out / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(tmp_path, "--virtual-time-budget=10000", "--window-size=1400,4000", "--dump-dom", page.as_uri())
    import re

    probe = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    assert probe["rows"] == len(rep["rows"])
    assert sorted(im["figure"] for im in probe["images"]) == sorted(rep["figures"])
    for im in probe["images"]:
        assert im["complete"] and im["w"] > 300 and im["h"] > 100, im


def test_the_finetune_row_is_escaped(ft_sweep):
    """The model's name and backbone come from someone else's file: markup and control characters stay text."""
    from tlfx.report.sweep import render_sweep_html, render_sweep_markdown

    out = ft_sweep[1]
    rep = json.loads((out / "report.json").read_text())
    evil = "<script>alert(1)</script>|**x**\x1b[31m"
    row = next(r for r in rep["rows"] if r["config"] is None)
    row["label"] = row["backbone"] = row["head"] = row["model_file"] = row["id"] = evil
    figures = {name: {"path": str(out / f["file"]), "title": f["title"], "caption": f["caption"]}
               for name, f in rep["figures"].items()}
    html = render_sweep_html(rep, figures)
    assert "<script>" not in html and "\x1b" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    md = render_sweep_markdown(rep)
    assert "<script>" not in md and "\x1b" not in md and md_escape(evil) in md
