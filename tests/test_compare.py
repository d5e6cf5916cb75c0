"""tlfx compare on real stores (digits through efficientnet_lite0, the pixels baseline): files, numbers, errors."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from conftest import cli_here, run_cli
from PIL import Image

import tlfx
from tlfx.compare import compare, pareto_front, parse_curve, subsample_per_class
from tlfx.errors import TlfxError
from tlfx.metrics import bootstrap_ci, confusion_matrix, macro_f1
from tlfx.store import FeatureStore, StoreWriter

HEADS = "svm,knn"  # fast on 600 rows; every registered head goes through the same code


def strip_timing(obj):
    """The report without wall-clock measurements, the command line (it names the output directory) and model file
    sizes (each file's meta.json records its fit time, so sizes move by a few bytes; compared separately)."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in ("timing", "command", "size_bytes")}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def report_run(digits_stores, tmp_path_factory):
    """One real compare run through the CLI: two heads, the pixels baseline, short learning curves."""
    tr, te = digits_stores
    out = tmp_path_factory.mktemp("compare") / "rep"
    proc = cli_here("compare", "--train", tr, "--test", te, "--heads", HEADS, "--baseline", "pixels",
                   "--learning-curve", "1,5,all", "--bootstrap", "300", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_compare_writes_html_json_md_with_every_row(report_run, digits_stores):
    out, proc = report_run
    for name in ("report.html", "report.json", "report.md"):
        assert (out / name).stat().st_size > 0
    rep = json.loads((out / "report.json").read_text())
    ids = [r["id"] for r in rep["rows"]]
    assert ids == ["svm", "knn", "pixels_grey/svm", "pixels_grey/knn"]
    y = FeatureStore(digits_stores[1]).labels
    for r in rep["rows"]:
        pred = np.array(r["predictions"])
        assert len(pred) == len(y) == r["n_test"]
        assert r["accuracy"] == pytest.approx(float(np.mean(pred == y)))
        lo, hi = r["accuracy_ci95"]
        assert lo <= r["accuracy"] <= hi and hi - lo < 0.2
        lo, hi = r["macro_f1_ci95"]
        assert lo <= r["macro_f1"] <= hi
        assert r["size_bytes"] == os.path.getsize(out / r["model_file"]) > 0
        t = r["timing"]
        assert t["fit_seconds"] >= 0 and t["predict_seconds_per_1000"] > 0
        assert np.array(r["confusion"]).sum() == len(y)
        assert r["params"] == {} and r["effective_params"]  # defaults, recorded in full
    # efficientnet features of 8x8 digits upscaled are far above chance (10 classes), and so are raw pixels
    assert min(r["accuracy"] for r in rep["rows"]) > 0.6
    assert rep["best"] in ids and set(rep["timing"]["pareto_front"]) <= set(ids)
    # digits are greyscale: --baseline pixels uses one channel, not three identical copies, and says so
    b = rep["baseline"]
    assert b["backbone"] == "pixels_grey" and b["requested"] == "pixels" and "greyscale" in b["note"]
    assert os.path.isfile(out / b["test"]) and FeatureStore(str(out / b["test"])).features.shape[1] == 32 * 32
    assert sorted(p.name for p in out.glob("baseline-*.h5")) == ["baseline-pixels_grey-test.h5",
                                                                 "baseline-pixels_grey-train.h5"]
    # learning curves: one per (features, head), points 1, 5, all; accuracy grows from 1 to all examples per class
    curves = rep["learning_curves"]["curves"]
    assert [(c["features"], c["head"]) for c in curves] == [("main", "svm"), ("main", "knn"),
                                                            ("baseline", "svm"), ("baseline", "knn")]
    for c in curves:
        assert c["per_class"] == [1, 5, "all"]
        assert c["n_train"][0] == 10 and c["n_train"][1] == 50 and c["n_train"][2] == 600
        assert c["accuracy"][-1] == next(r["accuracy"] for r in rep["rows"] if r["id"] == c["row"])
        assert c["accuracy"][0] < c["accuracy"][-1]
    assert set(rep["figures"]) == {"accuracy_vs_fit_time", "learning_curves", "confusion_best", "per_class_f1",
                                   "misclassified"}
    for f in rep["figures"].values():
        with Image.open(out / f["file"]) as im:
            assert im.format == "PNG" and im.width > 300
    md = (out / "report.md").read_text()
    # names are Markdown-escaped ('_' -> '\_'), so they render as written
    assert "| pixels_grey/knn" not in md and "knn (baseline: pixels\\_grey)" in md and "## Learning curves" in md
    assert "Baseline: the images are greyscale" in md
    assert "the images are greyscale" in (out / "report.html").read_text()
    # the summary table on stdout and a progress display on stderr
    assert "best:" in proc.stdout and "report.html" in proc.stdout
    assert "20/20 step" in proc.stderr and "done" in proc.stderr and "\r" not in proc.stderr  # whole lines in a log


def test_same_command_gives_same_numbers(report_run, digits_stores, tmp_path):
    out, _ = report_run
    tr, te = digits_stores
    compare(tr, te, HEADS.split(","), str(tmp_path / "again"), baseline="pixels", learning_curve="1,5,all", n_boot=300)
    first = json.loads((out / "report.json").read_text())
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert first["timing"]["total_seconds"] > 0 and "fit_seconds" in again["rows"][0]["timing"]
    a, b = strip_timing(first), strip_timing(again)
    assert a["rows"] == b["rows"] and a["learning_curves"] == b["learning_curves"]
    assert a == b
    for r1, r2 in zip(first["rows"], again["rows"]):
        assert abs(r1["size_bytes"] - r2["size_bytes"]) < 0.01 * r1["size_bytes"]


def test_model_file_row_matches_the_head_it_was_saved_from(report_run, digits_stores, tmp_path):
    """--finetune M adds a row from any model file through Model.predict_proba_store (here a saved head)."""
    out, _ = report_run
    tr, te = digits_stores
    model = out / "models" / "svm.tlfx"
    proc = cli_here("compare", "--train", tr, "--test", te, "--heads", "knn", "--finetune", model,
                   "--learning-curve", "none", "--bootstrap", "100", "--quiet", "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    first = json.loads((out / "report.json").read_text())
    row = rep["rows"][-1]
    assert row["id"] == "model/svm" and row["kind"] == "head" and row["features"] == "model"
    orig = next(r for r in first["rows"] if r["id"] == "svm")
    assert row["predictions"] == orig["predictions"] and row["accuracy"] == orig["accuracy"]
    assert row["size_bytes"] == model.stat().st_size
    assert row["timing"]["fit_seconds"] == pytest.approx(orig["timing"]["fit_seconds"])  # meta train_seconds
    assert "model/svm" in (tmp_path / "r" / "report.html").read_text()
    assert rep["learning_curves"]["curves"] == []


def test_unknown_head_is_one_line_with_choices(digits_stores, tmp_path):
    tr, te = digits_stores
    proc = cli_here("compare", "--train", tr, "--test", te, "--heads", "logistic,xgboostt", "--out", tmp_path / "r")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "xgboostt" in lines[0] and "logistic" in lines[0] and "svm" in lines[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, words", [
    (["--learning-curve", "1,x"], ["--learning-curve", "'x'"]),
    (["--baseline", "pixelz"], ["pixelz", "pixels"]),
    (["--finetune", "missing.tlfx"], ["missing.tlfx", "does not exist"]),
    (["--cv", "1", "--search"], ["--cv", "1"]),
])
def test_bad_options_are_one_line(digits_stores, tmp_path, args, words, capsys, monkeypatch):
    from tlfx.cli import main

    tr, te = digits_stores
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:  # the real entry point, in-process (no interpreter start per case)
        main(["compare", "--train", tr, "--test", te, "--heads", "knn", *args, "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert not (tmp_path / "r").exists()


def test_stores_from_other_backbone_configs_or_classes_are_refused(digits_stores, tmp_path, fashion_png_dir):
    tr, te = digits_stores
    px_te = tlfx.extract("pixels", "digits", str(tmp_path / "px_te.h5"), split="test", limit=40).path
    proc = cli_here("compare", "--train", tr, "--test", px_te, "--heads", "knn", "--out", tmp_path / "r")
    assert proc.returncode == 2
    assert "different backbone configurations" in proc.stderr and "efficientnet_lite0 vs pixels" in proc.stderr
    px_tr = tlfx.extract("pixels", "digits", str(tmp_path / "px_tr.h5"), split="train", limit=40).path
    px_other = tlfx.extract("pixels", f"imagefolder:{fashion_png_dir}", str(tmp_path / "px_f.h5")).path
    proc = cli_here("compare", "--train", px_tr, "--test", px_other, "--heads", "knn", "--out", tmp_path / "r")
    assert proc.returncode == 2 and "different class names" in proc.stderr


def test_incomplete_store_refused_unless_allowed(digits_stores, tmp_path):
    tr, te = digits_stores
    full = FeatureStore(tr)
    partial = str(tmp_path / "partial.h5")
    attrs = {k: v for k, v in full.attrs.items() if k not in ("complete", "n", "dim", "stats")}
    with StoreWriter(partial, attrs) as w:  # the real writer, stopped after its first part
        w.write_part(0, 300, full.features[:300], full.labels[:300], full.ids[:300], [])
    proc = cli_here("compare", "--train", partial, "--test", te, "--heads", "knn", "--out", tmp_path / "r")
    assert proc.returncode == 2 and "incomplete" in proc.stderr and "--allow-incomplete" in proc.stderr
    rep = compare(partial, te, ["knn"], str(tmp_path / "r"), allow_incomplete=True, learning_curve="none", n_boot=50)
    assert rep["data"]["train"]["n_labelled"] == 300 and rep["data"]["train"]["complete"] is False


def test_out_must_be_a_directory(digits_stores, tmp_path):
    tr, te = digits_stores
    (tmp_path / "file").write_text("x")
    with pytest.raises(TlfxError, match="is a file"):
        compare(tr, te, ["knn"], str(tmp_path / "file"))


def test_gallery_images_come_from_the_dataset_by_id(report_run, digits_stores):
    """Built-in datasets are re-loaded and indexed by the store's ids (digits ids are original indices)."""
    from tlfx.report.figures import load_gallery_images
    from tlfx_plugins.datasets import digits

    st = FeatureStore(digits_stores[1])
    ids = st.ids[:5]
    imgs = load_gallery_images(st.attrs, ids, size=8)
    full = digits(None, split="all")
    for i, im in zip(ids, imgs):
        assert np.array_equal(np.asarray(im.convert("L")), full.images[int(i)])


def test_gallery_images_of_a_file_dataset(fashion_png_dir, tmp_path):
    from tlfx.report.figures import load_gallery_images

    st = FeatureStore(tlfx.extract("pixels", f"imagefolder:{fashion_png_dir}", str(tmp_path / "f.h5")).path)
    ids = st.ids[:3]
    imgs = load_gallery_images(st.attrs, ids)
    for i, im in zip(ids, imgs):
        with Image.open(fashion_png_dir / i) as ref:
            assert im.size[0] <= 96 and abs(im.size[0] / im.size[1] - ref.size[0] / ref.size[1]) < 0.05
    # files moved after extraction: the ids are still resolved against data_root when the folder is gone
    moved = tmp_path / "moved"
    shutil.copytree(fashion_png_dir, moved)
    attrs = {**st.attrs, "dataset": "imagefolder:/nonexistent", "data_root": str(moved)}
    assert all(im is not None for im in load_gallery_images(attrs, ids))


# ------------------------------------------------------------------------------------------------ units
def test_macro_f1_and_bootstrap_agree_with_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 400)
    p = np.where(rng.random(400) < 0.7, y, rng.integers(0, 5, 400))
    p[p == 4] = 3  # a class never predicted
    assert macro_f1(confusion_matrix(y, p, 5)) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    ci = bootstrap_ci(y, p, 5, n_boot=500, seed=0)
    assert ci == bootstrap_ci(y, p, 5, n_boot=500, seed=0)
    acc = accuracy_score(y, p)
    assert ci["accuracy"][0] < acc < ci["accuracy"][1] and 0.05 < ci["accuracy"][1] - ci["accuracy"][0] < 0.15


def test_subsample_per_class_is_nested_and_balanced():
    y = np.repeat(np.arange(3), [50, 7, 20])
    a, b = subsample_per_class(y, 5, 0), subsample_per_class(y, 10, 0)
    assert np.bincount(y[a]).tolist() == [5, 5, 5] and np.bincount(y[b]).tolist() == [10, 7, 10]
    assert set(a) <= set(b)
    assert not np.array_equal(subsample_per_class(y, 5, 1), a)


def test_parse_curve_and_pareto():
    assert parse_curve("all,10,1,5,10") == [1, 5, 10, "all"]
    assert parse_curve("none") == []
    with pytest.raises(TlfxError):
        parse_curve("0")
    rows = [{"id": "a", "accuracy": 0.9, "timing": {"fit_seconds": 10}},
            {"id": "b", "accuracy": 0.8, "timing": {"fit_seconds": 1}},
            {"id": "c", "accuracy": 0.7, "timing": {"fit_seconds": 5}},
            {"id": "d", "accuracy": 0.95, "timing": {"fit_seconds": None}}]
    assert pareto_front(rows) == ["a", "b"]


def test_colour_images_keep_the_rgb_pixels_baseline(tmp_path):
    """Only images whose three channels are copies switch to pixels_grey; colour photos keep all three."""
    from conftest import rng_images

    root = tmp_path / "colour"
    for i, a in enumerate(rng_images(40, size=24)):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / f"c{i % 2}" / f"{i}.png")
    spec = f"imagefolder:{root}"
    tr = tlfx.extract("pixels_grey", spec, str(tmp_path / "tr.h5"), limit=30, precision="fp32").path
    te = tlfx.extract("pixels_grey", spec, str(tmp_path / "te.h5"), precision="fp32").path
    rep = compare(tr, te, ["knn"], str(tmp_path / "r"), baseline="pixels", learning_curve="none", n_boot=50)
    assert rep["baseline"]["backbone"] == "pixels" and "note" not in rep["baseline"]
    assert FeatureStore(str(tmp_path / "r" / rep["baseline"]["train"])).features.shape == (30, 3 * 32 * 32)
    assert [r["id"] for r in rep["rows"]] == ["knn", "pixels/knn"]


def test_pixels_backbone_is_the_resized_image(tmp_path):
    """The baseline's features are the 32x32 image itself, scaled to [0, 1]."""
    from tlfx_plugins.datasets import digits

    res = tlfx.extract("pixels", "digits", str(tmp_path / "p.h5"), split="test", limit=3, precision="fp32")
    st = FeatureStore(res.path)
    assert st.features.shape == (3, 3 * 32 * 32) and res.dim == 3072
    ds = digits(None, split="test")
    ref = np.asarray(ds.load(0).resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    assert np.allclose(st.features[0].reshape(3, 32, 32).transpose(1, 2, 0), ref, atol=1 / 255 + 1e-6)
    with h5py.File(res.path) as f:
        assert json.loads(f.attrs["weights"])["name"] == "none"
    grey = tlfx.extract("pixels_grey", "digits", str(tmp_path / "g.h5"), split="test", limit=3, precision="fp32")
    assert grey.dim == 1024
    with pytest.raises(TlfxError, match="no weights"):
        tlfx.create_backbone("pixels", weights=str(tmp_path / "p.h5"))


def test_search_chooses_parameters_by_cv_on_the_training_store_only(digits_stores, tmp_path):
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from tlfx.heads import create_head, param_grid

    tr, te = digits_stores
    rep = compare(tr, te, ["knn"], str(tmp_path / "r"), search=True, learning_curve="none", n_boot=50)
    row = rep["rows"][0]
    st = FeatureStore(tr)
    ref = GridSearchCV(create_head("knn"), param_grid("knn"), scoring="accuracy", refit=False,
                       cv=StratifiedKFold(3, shuffle=True, random_state=0)).fit(st.features, st.labels)
    assert row["params"] == ref.best_params_ and row["cv"] == {"accuracy": pytest.approx(ref.best_score_), "folds": 3}
    assert rep["config"]["search"] is True and row["timing"]["search_seconds"] > 0
    assert "CV acc." in (tmp_path / "r" / "report.html").read_text()


@pytest.mark.slow
def test_finetune_model_row(digits_stores, tmp_path):
    """A real (tiny) fine-tune from the fine-tune plugin becomes a row: images re-read, train_seconds as fit time."""
    tr, te = digits_stores
    ft = tmp_path / "ft.tlfx"
    proc = run_cli("finetune", "--data", "digits", "--limit", "200", "--image-size", "32", "--epochs", "1",
                   "--unfreeze", "head", "--val-fraction", "0", "--quiet", "--out", ft)
    assert proc.returncode == 0, proc.stderr
    rep = compare(tr, te, ["knn"], str(tmp_path / "r"), finetune=[str(ft)], learning_curve="none", n_boot=50)
    row = rep["rows"][-1]
    from tlfx.models import read_meta

    meta = read_meta(str(ft))
    assert row["kind"] == "finetune" and row["timing"]["fit_seconds"] == pytest.approx(meta["train_seconds"])
    assert row["n_test"] == len(FeatureStore(te)) and row["accuracy"] > 0.1
    assert row["size_bytes"] == ft.stat().st_size and "fine-tuned" in row["feature_label"]
