"""tlfx export / import-features / similar on real stores (pixels backbone at 16 px), real files, the real CLI."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tlfx
from tests.conftest import cli_here
from tlfx.store import FeatureStore


@pytest.fixture(scope="module")
def px_store(tmp_path_factory):
    """A pixels store of 60 digits at 16 px (768 features)."""
    d = tmp_path_factory.mktemp("px")
    return tlfx.extract("pixels", "digits", str(d / "px.h5"), split="train", limit=60, image_size=16).path


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory):
    """An imagefolder of 8 distinct PNGs in two classes plus an exact copy of one (a duplicated file pair); one class
    name is markup, which the contact sheet must show as text."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for cls in ("cat", "<b>dog"):
        (root / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    shutil.copyfile(root / "<b>dog" / "2.png", root / "<b>dog" / "2-copy.png")
    out = tmp_path_factory.mktemp("fs") / "f.h5"
    return tlfx.extract("pixels", f"imagefolder:{root}", str(out), image_size=16).path, root


def test_export_parquet_npy_csv_equal_the_store(px_store, tmp_path):
    st = FeatureStore(px_store)
    pq_out, npy_out, csv_out = tmp_path / "x.parquet", tmp_path / "x_npy", tmp_path / "x.csv"
    for fmt, out in (("parquet", pq_out), ("npy", npy_out), ("csv", csv_out)):
        cli_here("export", px_store, "--format", fmt, "--out", out, "--row-group-size", 16, check=True)

    pf = pq.ParquetFile(pq_out)
    assert pf.num_row_groups == 4  # 60 rows in groups of 16: written chunk by chunk
    t = pf.read()
    feats = np.stack(t.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert feats.dtype == np.float32 and np.array_equal(feats.view(np.uint32), st.features.view(np.uint32))
    assert t.column("id").to_pylist() == st.ids and t.column("label").to_pylist() == st.labels.tolist()
    assert t.column("class").to_pylist() == [st.class_names[x] for x in st.labels]
    meta = json.loads(pf.schema_arrow.metadata[b"tlfx"])
    assert meta["class_names"] == st.class_names and meta["config"] == json.loads(json.dumps(st.config))

    got = np.load(npy_out / "features.npy")
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), st.features.view(np.uint32))
    assert np.array_equal(np.load(npy_out / "labels.npy"), st.labels)
    assert json.loads((npy_out / "ids.json").read_text()) == st.ids
    assert (npy_out / "ids.txt").read_text().splitlines() == st.ids
    assert json.loads((npy_out / "meta.json").read_text())["config"]["backbone"] == "pixels"

    with open(csv_out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["id", "label", "class", "f0"] and len(rows[0]) == 3 + st.features.shape[1]
    assert [r[0] for r in rows[1:]] == st.ids
    assert np.array_equal(np.array([[float(v) for v in r[3:]] for r in rows[1:]], np.float32), st.features)


def test_import_features_round_trip_and_fit(px_store, tmp_path):
    pq_out = tmp_path / "x.parquet"
    cli_here("export", px_store, "--format", "parquet", "--out", pq_out, "--row-group-size", 25, check=True)
    imp = tmp_path / "imp.h5"
    cli_here("import-features", pq_out, "--out", imp, check=True)
    a, b = FeatureStore(px_store), FeatureStore(str(imp))
    assert np.array_equal(a.features, b.features) and a.ids == b.ids and np.array_equal(a.labels, b.labels)
    assert b.class_names == a.class_names and b.config["backbone"] == "imported:x.parquet"
    proc = cli_here("fit", "--features", imp, "--head", "knn", "--out", tmp_path / "knn.tlfx", check=True)
    assert (tmp_path / "knn.tlfx").is_file(), proc.stdout


def test_export_and_import_refuse_bad_input(px_store, tmp_path):
    import pyarrow as pa

    out = tmp_path / "x.csv"
    out.write_text("keep me")
    proc = cli_here("export", px_store, "--format", "csv", "--out", out)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == "keep me"  # nothing already written is lost
    cases = {
        "novec.parquet": pa.table({"id": ["a", "b"], "x": [1.0, 2.0]}),
        "nan.parquet": pa.table({"vector": [[1.0, 2.0], [float("nan"), 1.0]]}),
        "ragged.parquet": pa.table({"vector": [[1.0, 2.0], [1.0, 2.0, 3.0]]}),
    }
    for name, table in cases.items():
        pq.write_table(table, tmp_path / name)
        proc = cli_here("import-features", tmp_path / name, "--out", tmp_path / f"{name}.h5")
        assert proc.returncode == 2, (name, proc.stderr)
        line = proc.stderr.strip()
        assert line.startswith("error:") and "\n" not in line and "Traceback" not in line, line
        assert {"novec.parquet": "no 'vector' column", "nan.parquet": "NaN", "ragged.parquet": "ragged"}[name] in line
        assert not (tmp_path / f"{name}.h5").exists()


def test_similar_by_id_finds_itself_first(px_store):
    st = FeatureStore(px_store)
    proc = cli_here("similar", px_store, "--id", st.ids[7], "--top-k", 5, "--format", "json", check=True)
    rows = json.loads(proc.stdout)
    assert len(rows) == 5 and rows[0]["id"] == st.ids[7] and rows[0]["similarity"] == pytest.approx(1.0, abs=1e-6)
    assert [r["similarity"] for r in rows] == sorted((r["similarity"] for r in rows), reverse=True)


def test_similar_image_copy_first_duplicates_and_contact_sheet(folder_store, tmp_path):
    path, root = folder_store
    query = tmp_path / "query.png"
    shutil.copyfile(root / "cat" / "3.png", query)
    proc = cli_here("similar", path, "--image", query, "--top-k", 3, "--format", "csv", check=True)
    rows = list(csv.DictReader(proc.stdout.splitlines()))
    assert rows[0]["id"] == "cat/3.png" and float(rows[0]["similarity"]) == pytest.approx(1.0, abs=1e-5)

    html = tmp_path / "dups.html"
    proc = cli_here("similar", path, "--duplicates", "--threshold", 0.999, "--format", "json", "--html", html, check=True)
    pairs = json.loads(proc.stdout)
    assert [{p["id_a"], p["id_b"]} for p in pairs] == [{"<b>dog/2.png", "<b>dog/2-copy.png"}]
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 2 and "&lt;b&gt;dog/2-copy.png" in page and "<b>" not in page


def test_similar_table_escapes_control_characters_in_ids(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("\x1b[31mred.png", "plain.png"):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "a" / name)
    path = tlfx.extract("pixels", f"imagefolder:{root}", str(tmp_path / "e.h5"), image_size=16).path
    proc = cli_here("similar", path, "--id", "a/plain.png", check=True)
    assert "\x1b" not in proc.stdout and "\\x1b[31mred.png" in proc.stdout
