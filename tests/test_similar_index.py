"""tlfx similar --index exact|faiss|auto on a real store (digits, pixels backbone at 16 px), through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import tlfx
from tests.conftest import cli_here
from tlfx import similar as S
from tlfx.store import FeatureStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """400 digits at 16 px (768 features): enough rows for an IVF index of 10 cells."""
    d = tmp_path_factory.mktemp("ix")
    return tlfx.extract("pixels", "digits", str(d / "px.h5"), split="train", limit=400, image_size=16).path


def _json(*args):
    return json.loads(cli_here("similar", *args, "--format", "json", check=True).stdout)


def test_faiss_answers_equal_exact_and_say_which_index(digits_store):
    pytest.importorskip("faiss")
    st = FeatureStore(digits_store)
    for id_ in (st.ids[0], st.ids[123]):
        ex = _json(digits_store, "--id", id_, "--top-k", 8, "--index", "exact")
        fa = _json(digits_store, "--id", id_, "--top-k", 8, "--index", "faiss")
        assert [r["id"] for r in fa] == [r["id"] for r in ex]
        assert [r["similarity"] for r in fa] == pytest.approx([r["similarity"] for r in ex], abs=1e-5)
        assert {(r["index"], r["exact"]) for r in ex} == {("exact", True)}
        assert {(r["index"], r["exact"]) for r in fa} == {("faiss", True)}  # IndexFlatIP: exact

    # duplicates: the IVF cells may miss a pair (approximate), never invent one; each similarity is exact
    ex = _json(digits_store, "--duplicates", "--threshold", 0.97, "--index", "exact")
    fa = _json(digits_store, "--duplicates", "--threshold", 0.97, "--index", "faiss")
    assert len(ex) > 20
    sims = {(r["id_a"], r["id_b"]): r["similarity"] for r in ex}
    got = {(r["id_a"], r["id_b"]): r["similarity"] for r in fa}
    assert set(got) <= set(sims) and len(got) >= 0.9 * len(sims)
    assert [got[k] for k in got] == pytest.approx([sims[k] for k in got], abs=1e-5)
    assert {(r["index"], r["exact"]) for r in fa} == {("faiss", False)}


def test_auto_is_exact_below_the_threshold_and_says_so(digits_store):
    st = FeatureStore(digits_store)
    assert len(st) <= S.AUTO_FAISS_ROWS["duplicates"]
    rows = _json(digits_store, "--duplicates", "--threshold", 0.99, "--index", "auto")
    assert rows and {(r["index"], r["exact"]) for r in rows} == {("exact", True)}
    proc = cli_here("similar", digits_store, "--id", st.ids[5], "--index", "auto", check=True)
    assert "index: exact (exact; one query: an index would not pay)" in proc.stderr


def test_faiss_refused_over_the_memory_bound_auto_falls_back(digits_store, monkeypatch):
    pytest.importorskip("faiss")
    st = FeatureStore(digits_store)
    monkeypatch.setattr(S, "FAISS_MEMORY_FRACTION", 1e-9)  # a machine whose memory cannot hold this store
    proc = cli_here("similar", digits_store, "--duplicates", "--index", "faiss")
    assert proc.returncode == 2 and "use --index exact" in proc.stderr and "Traceback" not in proc.stderr
    monkeypatch.setattr(S, "AUTO_FAISS_ROWS", {"nearest": None, "duplicates": 10})
    used = S.choose_index(st, "auto", "duplicates")
    assert used["index"] == "exact" and "GiB" in used["why"]
    monkeypatch.setattr(S, "FAISS_MEMORY_FRACTION", 0.5)  # fits again: above the threshold auto takes faiss
    assert S.choose_index(st, "auto", "duplicates") == {**S.choose_index(st, "faiss", "duplicates")}
    assert S.choose_index(st, "auto", "duplicates")["index"] == "faiss"


def test_index_faiss_without_faiss_is_one_clear_line(digits_store):
    # faiss made unimportable in a fresh interpreter (sys.modules entry None: import raises ImportError)
    code = ("import sys; sys.modules['faiss'] = None\n"
            "from tlfx.cli import main\n"
            f"main(['similar', {digits_store!r}, '--id', '0', '--index', 'faiss'])")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "faiss-cpu" in lines[0] and "--index exact" in lines[0]
    # auto without faiss: the exact search answers
    code = code.replace("'faiss'])", "'auto', '--duplicates', '--format', 'json'])").replace("'--id', '0', ", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(r["index"] == "exact" for r in json.loads(proc.stdout))


def test_benchmark_script_runs_tiny(tmp_path):
    pytest.importorskip("faiss")
    out = tmp_path / "b.json"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "similar_index.py"), "--sizes", "2000",
                           "--sample", "200", "--queries", "20", "--hnsw-max", "2000", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {r["mode"] for r in rows} == {"query", "duplicates"} and len(rows) == 6
    assert all(r["recall"] >= 0.9 for r in rows) and "| 2,000 | query | exact" in proc.stdout
