"""Scale-out on Ray: a real local Ray instance (2 CPUs), real actors, real backbone, real HDF5 virtual datasets.

Tests that need Ray skip with a reason when it is not installed (CI installs it: pip install -e '.[ray]').
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import needs_fashion, run_cli

import tlfx

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed: pip install -e '.[ray]' (CI installs it)")

LIMIT, PART, SIZE = 192, 16, 64  # 12 blocks of 16 digits at 64 px: 2 workers each get several blocks
COMMON = {"split": "train", "image_size": SIZE, "limit": LIMIT, "precision": "fp32"}  # fp32: bit-comparable
VOLATILE_ATTRS = {"created", "stats", "part_size"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with 2 CPUs, as on CI; shut down after the module."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    """The local engine's store for the same items, the reference every Ray result must equal."""
    out = tmp_path_factory.mktemp("ray_ref") / "local.h5"
    return tlfx.extract("efficientnet_lite0", "digits", str(out), part_size=64, **COMMON).path


def read_plain(path):
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        return {"features": f["features"][...], "labels": f["labels"][...], "ids": list(f["ids"].asstr()[...]),
                "skipped": list(zip(f["skipped/ids"].asstr()[...], f["skipped/reasons"].asstr()[...])),
                "attrs": attrs, "virtual": f["features"].is_virtual}


def assert_same_store(ray_path, local_path):
    r, loc = read_plain(ray_path), read_plain(local_path)
    assert r["ids"] == loc["ids"] and len(set(r["ids"])) == len(r["ids"])
    np.testing.assert_array_equal(r["labels"], loc["labels"])
    assert r["features"].shape == loc["features"].shape
    np.testing.assert_allclose(r["features"], loc["features"], rtol=1e-4, atol=1e-4)  # fp32; batches differ
    assert r["skipped"] == loc["skipped"]
    for key in set(r["attrs"]) | set(loc["attrs"]):
        if key not in VOLATILE_ATTRS:
            assert r["attrs"].get(key) == loc["attrs"].get(key), key
    return r


# ------------------------------------------------------------------------------------------- without Ray
def test_importing_tlfx_and_the_local_engine_does_not_import_ray():
    code = ("import sys, tlfx, tlfx.engines, tlfx.commands.extract; from tlfx.cli import build_cli; build_cli([]); "
            "print('ray' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_engine_ray_without_ray_installed_is_one_line(tmp_path):
    # sys.modules["ray"] = None makes "import ray" fail exactly as it does where Ray is not installed
    code = ("import sys; sys.modules['ray'] = None; from tlfx.cli import main; "
            f"main(['extract', '--data', 'digits', '--limit', '8', '--out', {str(tmp_path / 'x.h5')!r}, "
            "'--engine', 'ray'])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: --engine ray needs Ray, which is not installed: pip install tlfx[ray]"]
    assert not (tmp_path / "x.h5").exists()


def test_ray_only_options_are_refused_by_the_local_engine(tmp_path):
    p = run_cli("extract", "--data", "digits", "--limit", "8", "--out", tmp_path / "x.h5", "--num-workers", "2")
    assert p.returncode == 2
    assert "--num-workers only applies to --engine ray" in p.stderr and "Traceback" not in p.stderr


@needs_ray
def test_unreachable_cluster_address_is_one_line_not_a_hang(tmp_path):
    p = run_cli("extract", "--data", "digits", "--limit", "8", "--out", tmp_path / "x.h5", "--engine", "ray",
                "--address", "127.0.0.1:1")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: cannot reach a Ray cluster at --address 127.0.0.1:1")


@needs_ray
def test_missing_blocks_cover_every_gap_whatever_wrote_the_parts():
    from tlfx.engines.ray_engine import missing_blocks

    parts = [(0, 32, "a"), (64, 96, "b"), (96, 2048, "c")]  # a Ray crash, then parts of another layout
    assert missing_blocks(parts, 2100, 32) == [(32, 64), (2048, 2080), (2080, 2100)]
    assert missing_blocks([], 70, 32) == [(0, 32), (32, 64), (64, 70)]
    assert missing_blocks([(0, 70, "x")], 70, 32) == []


@needs_ray
def test_default_part_size_keeps_a_store_under_max_parts():
    from tlfx.engines.ray_engine import MAX_PARTS, default_part_size

    assert default_part_size(10_000, 64) == 2048  # the local engine's size where it is small enough
    for n in (1_000_000, 100_000_000):
        size = default_part_size(n, 64)
        assert size % 64 == 0 and -(-n // size) <= MAX_PARTS
    assert default_part_size(100_000_000, 64) == 200_000  # 500 parts of ~1 GB at 1280 x float32


def test_virtual_store_with_unreachable_parts_reads_nan_not_zeros(tmp_path):
    """HDF5 silently gives the fill value for virtual sources it cannot open (here: too few file descriptors)."""
    from tlfx.store import _atomic_h5, _set_attrs, finalize, store_attrs_base, write_part

    path, n_parts = str(tmp_path / "v.h5"), 120
    attrs = {**store_attrs_base(), "n_items": n_parts * 2, "dtype": "float32", "class_names": []}
    _atomic_h5(path, lambda f: _set_attrs(f, {**attrs, "complete": False}))
    for i in range(n_parts):
        write_part(path, 2 * i, 2 * i + 2, np.ones((2, 4)), [0, 1], [f"{2 * i}", f"{2 * i + 1}"], [])
    finalize(path, attrs, virtual=True)
    code = ("import resource, h5py, numpy as np; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
            f"a = h5py.File({path!r})['features'][...]; print(int(np.isnan(a[:, 0]).sum()), int((a == 0).sum()))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    nan_rows, zeros = map(int, p.stdout.split())
    assert nan_rows > 0 and zeros == 0  # visible as NaN, never as plausible zeros
    with h5py.File(path) as f:  # with enough descriptors every row is there
        assert np.array_equal(f["features"][...], np.ones((n_parts * 2, 4), np.float32))


# ------------------------------------------------------------------------------------------- with Ray
@needs_ray
@pytest.mark.slow
def test_cli_engine_ray_equals_local_row_for_row(ray_cluster, local_store, tmp_path):
    out = tmp_path / "ray.h5"
    p = run_cli("extract", "--data", "digits", "--split", "train", "--limit", LIMIT, "--image-size", SIZE,
                "--precision", "fp32", "--out", out, "--quiet", "--engine", "ray", "--address", ray_cluster,
                "--num-workers", "2", "--part-size", PART)
    assert p.returncode == 0, p.stderr
    assert f"extracted {LIMIT} images x 1280" in p.stdout
    r = assert_same_store(out, local_store)
    assert r["virtual"]  # one file of virtual datasets over the parts ...
    stats = json.loads(r["attrs"]["stats"])
    assert stats["engine"] == "ray" and stats["workers"] == 2 and r["attrs"]["part_size"] == PART
    parts = sorted(os.listdir(str(out) + ".parts"))
    assert len(parts) == LIMIT // PART and all(x.endswith(".h5") for x in parts)  # no temporaries left
    # ... readable with plain h5py from anywhere: sources are found relative to the store
    code = f"import h5py; f = h5py.File({str(out)!r}); print(f['features'][-1].sum(), f['labels'].shape[0])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert other.stdout.split()[1] == str(LIMIT) and np.isfinite(float(other.stdout.split()[0]))
    info = run_cli("info", out)
    assert f"complete: {LIMIT} rows x 1280" in info.stdout
    again = run_cli("extract", "--data", "digits", "--split", "train", "--limit", LIMIT, "--image-size", SIZE,
                    "--precision", "fp32", "--out", out, "--quiet", "--engine", "ray", "--address", ray_cluster,
                    "--num-workers", "2", "--part-size", PART)
    assert again.returncode == 0 and "already complete" in again.stdout


@needs_ray
@pytest.mark.slow
def test_tta_flip_on_ray_equals_the_local_engine(ray_cluster, tmp_path):
    common = {**COMMON, "limit": 64}
    local = tlfx.extract("efficientnet_lite0", "digits", str(tmp_path / "local.h5"), part_size=PART, tta="flip",
                         **common).path
    out = tmp_path / "ray.h5"
    p = run_cli("extract", "--data", "digits", "--split", "train", "--limit", 64, "--image-size", SIZE,
                "--precision", "fp32", "--tta", "flip", "--out", out, "--quiet", "--engine", "ray", "--address",
                ray_cluster, "--num-workers", "2", "--part-size", PART)
    assert p.returncode == 0, p.stderr
    assert assert_same_store(out, local)["attrs"]["tta"] == "flip"


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize("max_restarts", [3, 0], ids=["ray-restarts-the-actor", "driver-requeues-to-survivor"])
def test_killed_worker_block_is_redone_never_duplicated(ray_cluster, local_store, tmp_path, max_restarts):
    """SIGKILL one worker process right after its first block: the block it was running is redone, once."""
    from tlfx.engines.ray_engine import extract_ray

    done, killed = [], []

    def on_block(res):
        done.append(res)
        if not killed and res["worker"] == 0:
            os.kill(res["pid"], signal.SIGKILL)  # it already holds its next block (2 in flight per worker)
            killed.append(res["pid"])

    out = tmp_path / "ray.h5"
    res = extract_ray("efficientnet_lite0", "digits", str(out), num_workers=2, part_size=PART,
                      max_restarts=max_restarts, on_block=on_block, **COMMON)
    assert killed and res.n == LIMIT
    assert_same_store(out, local_store)
    blocks = [(d["start"], d["end"]) for d in done]
    assert sorted(set(blocks)) == [(s, s + PART) for s in range(0, LIMIT, PART)]
    stats = json.loads(read_plain(out)["attrs"]["stats"])
    if max_restarts:  # Ray restarted worker 0 and retried its in-flight block on the new process
        assert stats["worker_restarts"] >= 1
        assert len({d["pid"] for d in done if d["worker"] == 0}) >= 2
    else:  # worker 0 is gone for good: its blocks were re-queued and done by worker 1
        assert stats["blocks_requeued"] >= 1
        assert {d["pid"] for d in done if d["worker"] == 0} == {killed[0]}  # never restarted


@needs_ray
@pytest.mark.slow
def test_rerun_after_a_crash_only_does_the_missing_blocks(ray_cluster, local_store, tmp_path):
    from tlfx.engines.ray_engine import extract_ray
    from tlfx.store import list_parts

    out = str(tmp_path / "ray.h5")

    def crash(res):
        raise KeyboardInterrupt  # the driver dies after the first durable block

    with pytest.raises(KeyboardInterrupt):
        extract_ray("efficientnet_lite0", "digits", out, num_workers=2, part_size=PART, on_block=crash, **COMMON)
    st = tlfx.FeatureStore(out)
    assert not st.complete and not os.path.exists(out + ".lock")
    before = {(s, e) for s, e, _ in list_parts(out)}
    assert 0 < len(before) < LIMIT // PART
    redone = []
    res = extract_ray("efficientnet_lite0", "digits", out, num_workers=2, part_size=PART,
                      on_block=lambda r: redone.append((r["start"], r["end"])), **COMMON)
    assert set(redone).isdisjoint(before) and len(redone) == len(set(redone))
    assert before | set(redone) == {(s, s + PART) for s in range(0, LIMIT, PART)}
    assert res.resumed_from == PART * len(before)
    assert_same_store(out, local_store)


@needs_ray
@needs_fashion
@pytest.mark.slow
def test_bad_images_are_skipped_the_same_way(ray_cluster, fashion_png_dir, tmp_path):
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(fashion_png_dir, root)
    cls = sorted(p for p in root.iterdir() if p.is_dir())
    (cls[0] / "empty.png").write_bytes(b"")
    (cls[3] / "text.jpg").write_text("not an image")
    kw = {"image_size": SIZE, "precision": "fp32", "part_size": 16}
    loc = tlfx.extract("efficientnet_lite0", f"imagefolder:{root}", str(tmp_path / "loc.h5"), **kw)
    from tlfx.engines.ray_engine import extract_ray

    ray_res = extract_ray("efficientnet_lite0", f"imagefolder:{root}", str(tmp_path / "ray.h5"), num_workers=2, **kw)
    assert ray_res.skipped == loc.skipped == 2
    r = assert_same_store(ray_res.path, loc.path)
    assert sorted(i for i, _ in r["skipped"]) == sorted([f"{cls[0].name}/empty.png", f"{cls[3].name}/text.jpg"])


@needs_ray
@pytest.mark.slow
def test_search_with_the_ray_backend_finds_the_same_best_params(ray_cluster, digits_stores):
    import joblib
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from tlfx.engines import search_backend

    st = tlfx.FeatureStore(digits_stores[0])
    X, y = st.features, st.labels
    grid = {"alpha": [1.0, 100.0, 1e4, 1e6]}

    def search():
        return GridSearchCV(RidgeClassifier(), grid, cv=StratifiedKFold(3, shuffle=True, random_state=0)).fit(X, y)

    local = search()
    with search_backend("ray"):
        backend, n_jobs = joblib.parallel.get_active_backend()
        remote = search()
    assert type(backend).__name__ == "RayBackend" and n_jobs == -1  # every fit a Ray task, on all the cluster's CPUs
    assert remote.best_params_ == local.best_params_
    assert len(set(np.round(local.cv_results_["mean_test_score"], 4))) > 1  # the grid really discriminates
    np.testing.assert_allclose(remote.cv_results_["mean_test_score"], local.cv_results_["mean_test_score"])


@needs_ray
@pytest.mark.slow
def test_more_workers_than_the_cluster_fits_goes_on_with_those_that_fit(ray_cluster, tmp_path, monkeypatch, capfd):
    from tlfx.engines import ray_engine

    monkeypatch.setattr(ray_engine, "START_GRACE_S", 3.0)
    workers = set()
    res = ray_engine.extract_ray("efficientnet_lite0", "digits", str(tmp_path / "r.h5"), num_workers=3, part_size=8,
                                 on_block=lambda r: workers.add(r["pid"]), **{**COMMON, "limit": 48})
    assert res.n == 48 and len(workers) <= 2  # 2 CPUs: the third worker never started, and nothing hung
    assert re.search(r"fits only [12] of 3 workers; going on", capfd.readouterr().err)


@needs_ray
@pytest.mark.slow
def test_local_engine_finishes_a_store_a_crashed_ray_run_left_with_gaps(ray_cluster, local_store, tmp_path):
    """Ray leaves parts with holes; the local engine resumes after its contiguous prefix, and finalize joins only
    the contiguous chain of parts, so the parts beyond a hole never add rows twice."""
    from tlfx.engines.ray_engine import extract_ray
    from tlfx.store import covered_until, list_parts

    out = str(tmp_path / "mixed.h5")
    seen = []

    def crash(res):
        seen.append(res)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_ray("efficientnet_lite0", "digits", out, num_workers=2, part_size=PART, on_block=crash, **COMMON)
    parts = list_parts(out)
    os.unlink(parts[0][2])  # make sure there is a hole before later parts
    assert covered_until(list_parts(out), LIMIT) == 0 and list_parts(out)
    res = tlfx.extract("efficientnet_lite0", "digits", out, **COMMON)
    assert res.n == LIMIT
    assert_same_store(out, local_store)
