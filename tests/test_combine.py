"""tlfx combine: real stores of scikit-learn digits (pixels_grey at 16 px, efficientnet_lite0 at 32 px), the real CLI."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image

import tlfx
from tests.conftest import cli_here
from tlfx.config import FeatureConfig
from tlfx.store import FeatureStore
from tlfx.weights import sha256_of


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Train (120 digits) and test (60 digits) stores of two backbones, and an RGB pixels test store."""
    d = tmp_path_factory.mktemp("combine")
    out = {}
    for split, limit in (("train", 120), ("test", 60)):
        out[f"px-{split}"] = tlfx.extract("pixels_grey", "digits", str(d / f"px-{split}.h5"), split=split, limit=limit,
                                          image_size=16).path
        out[f"lite-{split}"] = tlfx.extract("efficientnet_lite0", "digits", str(d / f"lite-{split}.h5"), split=split,
                                            limit=limit, image_size=32).path
    out["rgb-test"] = tlfx.extract("pixels", "digits", str(d / "rgb-test.h5"), split="test", limit=60,
                                   image_size=16).path
    return out


def _copy(src, dst, edit):
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return str(dst)


def test_features_are_the_sources_side_by_side(stores, tmp_path):
    out = tmp_path / "ab.h5"
    st = tlfx.combine_stores([stores["px-train"], stores["lite-train"]], out, block_rows=7)  # blocks across rows
    a, b = FeatureStore(stores["px-train"]), FeatureStore(stores["lite-train"])
    assert np.array_equal(st.features, np.hstack([a.features, b.features]))
    assert st.ids == a.ids and np.array_equal(st.labels, a.labels) and st.class_names == a.class_names
    assert st.attrs["dtype"] == "float32" and st.attrs["backbone"] == "combined"
    assert st.attrs["dataset"] == "digits" and st.attrs["split"] == "train" and st.attrs["limit"] == 120
    comps = st.attrs["components"]
    assert [c["columns"] for c in comps] == [[0, 256], [256, 1536]]
    assert comps[0]["config"] == FeatureConfig.from_dict(a.config).to_dict()
    assert comps[1]["config"]["backbone"] == "efficientnet_lite0" and comps[1]["config"]["image_size"] == 32
    assert comps[1]["source"] == {"name": "lite-train.h5", "sha256": sha256_of(stores["lite-train"])}
    assert st.verify() == (120, True, [])
    info = cli_here("info", out, check=True).stdout
    assert "pixels_grey[0:256] + efficientnet_lite0[256:1536]" in info and "lite-train.h5" in info

    # a combined store combined again records its sources flat, with their columns moved
    abc = tlfx.combine_stores([out, stores["px-train"]], tmp_path / "abc.h5")
    assert [(c["config"]["backbone"], c["columns"]) for c in abc.attrs["components"]] == [
        ("pixels_grey", [0, 256]), ("efficientnet_lite0", [256, 1536]), ("pixels_grey", [1536, 1792])]
    assert np.array_equal(abc.features, np.hstack([st.features, a.features]))


def test_ids_that_differ_are_refused_naming_the_row(stores, tmp_path):
    def rename(f):
        f["ids"][17] = "somewhere/else.png"

    other = _copy(stores["lite-train"], tmp_path / "lite-moved.h5", rename)
    proc = cli_here("combine", stores["px-train"], other, "--out", tmp_path / "x.h5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ids differ at row 17" in proc.stderr and "lite-moved.h5" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.h5").exists() and not list(tmp_path.glob("x.h5*"))

    # another split (other images) is refused before the rows are compared
    proc = cli_here("combine", stores["px-train"], stores["lite-test"], "--out", tmp_path / "x.h5")
    assert proc.returncode == 2 and "split differs" in proc.stderr


def test_class_names_that_differ_are_refused(stores, tmp_path):
    def rename(f):
        names = json.loads(f.attrs["class_names"])
        names[3] = "three"
        f.attrs["class_names"] = json.dumps(names)

    other = _copy(stores["lite-train"], tmp_path / "lite-names.h5", rename)
    proc = cli_here("combine", stores["px-train"], other, "--out", tmp_path / "x.h5")
    assert proc.returncode == 2 and "class names differ" in proc.stderr and "first at class 3" in proc.stderr
    assert not (tmp_path / "x.h5").exists()


def test_out_that_exists_or_is_a_source_is_refused(stores, tmp_path):
    out = tmp_path / "ab.h5"
    out.write_bytes(b"keep me")
    proc = cli_here("combine", stores["px-train"], stores["lite-train"], "--out", out)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert out.read_bytes() == b"keep me"
    cli_here("combine", stores["px-train"], stores["lite-train"], "--out", out, "--overwrite", check=True)
    assert len(FeatureStore(str(out))) == 120

    before = sha256_of(stores["px-train"])
    proc = cli_here("combine", stores["px-train"], stores["lite-train"], "--out", stores["px-train"], "--overwrite")
    assert proc.returncode == 2 and "is one of the stores to combine" in proc.stderr
    assert sha256_of(stores["px-train"]) == before
    proc = cli_here("combine", stores["px-train"], "--out", tmp_path / "one.h5")
    assert proc.returncode == 2 and "at least 2 stores" in proc.stderr


def test_sources_that_are_not_regular_files_are_refused_without_opening_them(stores, tmp_path):
    import os

    fifo, loop = tmp_path / "fifo.h5", tmp_path / "loop.h5"
    os.mkfifo(fifo)  # opening it for reading would block forever
    loop.symlink_to(loop)
    for bad in (fifo, loop):  # a directory is refused by click already
        proc = cli_here("combine", stores["px-train"], bad, "--out", tmp_path / "o.h5")
        assert proc.returncode == 2 and "not a regular file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.h5").exists()


def test_fit_evaluate_and_predict_on_combined_stores(stores, tmp_path):
    tr, te, swapped = tmp_path / "tr.h5", tmp_path / "te.h5", tmp_path / "te-swapped.h5"
    cli_here("combine", stores["px-train"], stores["lite-train"], "--out", tr, check=True)
    cli_here("combine", stores["px-test"], stores["lite-test"], "--out", te, check=True)
    cli_here("combine", stores["lite-test"], stores["px-test"], "--out", swapped, check=True)
    model = tmp_path / "m.tlfx"
    cli_here("fit", "--features", tr, "--head", "logistic", "--out", model, check=True)
    proc = cli_here("evaluate", "--model", model, "--features", te, "--json", check=True)
    assert json.loads(proc.stdout)["accuracy"] > 0.5

    proc = cli_here("evaluate", "--model", model, "--features", stores["lite-test"])  # one backbone only
    assert proc.returncode == 2 and "backbone: model combined vs efficientnet_lite0" in proc.stderr
    assert "combined from stores made the same way" in proc.stderr
    proc = cli_here("evaluate", "--model", model, "--features", swapped)  # same sources, other order
    assert proc.returncode == 2
    assert "components: model pixels_grey[0:256] + efficientnet_lite0[256:1536] vs efficientnet_lite0[0:1280]" \
        in proc.stderr
    other = tmp_path / "te-rgb.h5"  # another backbone in the same columns' place
    cli_here("combine", stores["rgb-test"], stores["lite-test"], "--out", other, check=True)
    proc = cli_here("evaluate", "--model", model, "--features", other)
    assert proc.returncode == 2 and "components" in proc.stderr and "pixels[0:768]" in proc.stderr

    # predict runs every source backbone on the image and puts the features side by side, as the store has them
    ds = tlfx.load_dataset("digits", split="test", limit=3)
    te_store = FeatureStore(str(te))
    rows = {i: k for k, i in enumerate(te_store.ids)}
    paths = []
    for i in range(3):
        p = tmp_path / f"d{i}.png"
        Image.fromarray(np.asarray(ds.load(i).convert("RGB"))).save(p)
        paths.append(str(p))
    m = tlfx.load_model(str(model))
    from tlfx.combine import embed

    feats, ok, bad = embed(m.config, paths)
    assert ok == paths and not bad and feats.shape == (3, 1536)
    want = te_store.features[[rows[ds.ids[i]] for i in range(3)]]
    assert np.allclose(feats, want, atol=1e-4)
    proc = cli_here("predict", "--model", model, *paths, "--format", "json", check=True)
    assert len(json.loads(proc.stdout)) == 3
    proc = cli_here("similar", te, "--image", paths[0], "--top-k", 1, "--format", "json", check=True)
    assert ds.ids[0] in proc.stdout  # the query image's own row is the nearest


def test_feature_config_components_round_trip_and_old_records():
    plain = FeatureConfig.from_dict({"backbone": "resnet18", "layers": ["penultimate"]})
    assert "components" not in plain.to_dict()  # a one-backbone record is what it was before combining
    comps = [{"config": plain.to_dict(), "columns": [0, 512], "source": {"name": "a.h5", "sha256": "ab"}},
             {"config": {**plain.to_dict(), "image_size": 96}, "columns": [512, 1024], "source": {"name": "b.h5"}}]
    c = FeatureConfig.from_dict({"backbone": "combined", "components": comps})
    assert FeatureConfig.from_dict(c.to_dict()) == c
    other_files = [{**x, "source": {"name": "test.h5", "sha256": "cd"}} for x in comps]
    assert c.diff(FeatureConfig.from_dict({"backbone": "combined", "components": other_files})) == []
    changed = [comps[0], {**comps[1], "config": {**comps[1]["config"], "image_size": 128}}]
    assert c.diff(FeatureConfig.from_dict({"backbone": "combined", "components": changed})) == [
        "component 2 image_size: model 96 vs store 128"]
