"""Hostile and odd feature stores: inconsistent or damaged HDF5 files, bit rot, a full disk at the join, readers
racing a writer, escape sequences in class names, planted temporaries. Real stores written by the CLI, damaged
with h5py or by flipping bytes on disk, read back through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import cli_here, run_cli

import tlfx
from tlfx.store import FeatureStore

# the pixels backbone at 16 px: real stores (768 features a row) written in a few seconds
EXTRACT = ["extract", "--backbone", "pixels", "--data", "digits", "--image-size", "16", "--workers", "0", "--quiet"]


def _extract(out, *extra):
    p = run_cli(*EXTRACT, "--out", out, *extra)
    assert p.returncode == 0, p.stderr
    return str(out)


@pytest.fixture(scope="module")
def pixel_stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("pixel_stores")
    return (_extract(d / "train.h5", "--split", "train", "--limit", "300", "--part-size", "64"),
            _extract(d / "test.h5", "--split", "test", "--limit", "100"))


def _one_line_exit_2(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------- 1. inconsistent stores
def _replace(f, name, data, **kw):
    del f[name]
    f.create_dataset(name, data=data, **kw)


def _big_json_attr(f):
    f.attrs["class_names"] = json.dumps([str(i) * 10 for i in range(200_000)])  # ~ 10 MB of JSON


def _features_from_another_file(f):
    shape = f["features"].shape
    layout = h5py.VirtualLayout(shape=shape, dtype="f4")
    layout[...] = h5py.VirtualSource("/tmp/someone-elses.h5", "features", shape=shape)
    del f["features"]
    f.create_virtual_dataset("features", layout, fillvalue=0)


DAMAGE = {
    "labels_shorter": (lambda f: _replace(f, "labels", f["labels"][:-5]), "/labels has 295"),
    "label_outside_classes": (lambda f: f["labels"].__setitem__(3, 12), "label 12 is outside the 10 classes"),
    "label_below_minus_one": (lambda f: f["labels"].__setitem__(3, -7), "label -7 is outside"),
    "wrong_n": (lambda f: f.attrs.__setitem__("n", 1000), "attribute n = 1000 but /features has 300 rows"),
    "absurd_n": (lambda f: f.attrs.__setitem__("n", 10 ** 15), "attribute 'n' = 1000000000000000 is out of range"),
    "no_features": (lambda f: f.__delitem__("features"), "no /features dataset"),
    "no_labels": (lambda f: f.__delitem__("labels"), "no /labels dataset"),
    "class_names_not_json": (lambda f: f.attrs.__setitem__("class_names", "[0, 1"), "'class_names' is not valid JSON"),
    "class_names_not_strings": (lambda f: f.attrs.__setitem__("class_names", "[0, 1]"), "list of strings"),
    "weights_not_json": (lambda f: f.attrs.__setitem__("weights", "{sha"), "'weights' is not valid JSON"),
    "layers_object": (lambda f: f.attrs.__setitem__("layers", '{"a": 1}'), "'layers' should be a JSON list"),
    "preprocess_list": (lambda f: f.attrs.__setitem__("preprocess", "[1]"), "'preprocess' should be a JSON object"),
    "stats_text": (lambda f: f.attrs.__setitem__("stats", '{"seconds": "soon"}'), "'stats' should give seconds"),
    "backbone_number": (lambda f: f.attrs.__setitem__("backbone", 5), "'backbone' should be a string"),
    "features_3d": (lambda f: _replace(f, "features", f["features"][...].reshape(300, 2, 384)), "/features has 3 dimensions"),
    "features_int": (lambda f: _replace(f, "features", f["features"][...].astype(np.int32)), "expected floats"),
    "ids_numbers": (lambda f: _replace(f, "ids", np.arange(300)), "/ids holds int64 values, expected strings"),
    "huge_json_attribute": (_big_json_attr, "larger than"),
    "features_mapping_another_file": (_features_from_another_file, "maps '/tmp/someone-elses.h5', which is not one of"),
}


_FORK_RUNNER = r"""
import json, os, sys
import tlfx.api, tlfx.cli, tlfx.compare, torch  # noqa: F401 - imported once; each job below is a forked process
from tlfx.heads import create_head
create_head("knn")  # loads the head plugins once too
results = []
for i, args in enumerate(json.loads(sys.argv[1])):
    out, err = f"{sys.argv[2]}/{i}.out", f"{sys.argv[2]}/{i}.err"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fo, fe = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600), os.open(err, os.O_WRONLY | os.O_CREAT, 0o600)
            os.dup2(fo, 1)
            os.dup2(fe, 2)
            tlfx.cli.main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    status = os.waitpid(pid, 0)[1]
    code = os.waitstatus_to_exitcode(status)
    results.append({"returncode": 128 - code if code < 0 else code,
                    "stdout": open(out).read(), "stderr": open(err).read()})
print(json.dumps(results))
"""


def run_cli_many(jobs, tmp_path):
    """Run many ``tlfx`` command lines, each in its own process, paying the interpreter and torch start-up once.

    One subprocess imports the CLI, then forks a child per job that runs ``tlfx.cli.main(args)`` exactly as
    ``python -m tlfx.cli`` does; a child killed by a signal reports 128 + the signal, like a shell.
    """
    logs = tmp_path / "fork_logs"
    logs.mkdir(exist_ok=True)
    p = subprocess.run([sys.executable, "-c", _FORK_RUNNER, json.dumps([[str(a) for a in j] for j in jobs]), str(logs)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    return [subprocess.CompletedProcess(j, r["returncode"], r["stdout"], r["stderr"])
            for j, r in zip(jobs, json.loads(p.stdout.strip().splitlines()[-1]))]


def test_inconsistent_stores_are_refused_in_one_line_by_info_fit_and_compare(pixel_stores, tmp_path):
    jobs, expect = [], []
    for case, (damage, needle) in sorted(DAMAGE.items()):
        bad = tmp_path / f"{case}.h5"
        shutil.copy(pixel_stores[0], bad)
        with h5py.File(bad, "r+", libver="latest") as f:
            damage(f)
        for args in (["info", bad], ["fit", "--features", bad, "--head", "knn", "--out", tmp_path / f"{case}.tlfx"],
                     ["compare", "--train", bad, "--test", pixel_stores[1], "--heads", "knn", "--learning-curve",
                      "none", "--bootstrap", "10", "--out", tmp_path / f"rep-{case}"]):
            jobs.append(args)
            expect.append((case, needle, str(bad)))
    for p, (case, needle, bad) in zip(run_cli_many(jobs, tmp_path), expect):
        line = _one_line_exit_2(p, needle, bad)
        assert "extract it again" in line, (case, line)
        assert not (tmp_path / f"{case}.tlfx").exists()


def test_undamaged_copy_still_reads(pixel_stores, tmp_path):
    """The control for the damage cases: the same copy, untouched, is accepted by all three commands."""
    ok = tmp_path / "ok.h5"
    shutil.copy(pixel_stores[0], ok)
    assert cli_here("info", ok).returncode == 0
    assert cli_here("fit", "--features", ok, "--head", "knn", "--out", tmp_path / "m.tlfx").returncode == 0
    p = cli_here("compare", "--train", ok, "--test", pixel_stores[1], "--heads", "knn", "--learning-curve", "none",
                "--bootstrap", "10", "--out", tmp_path / "rep")
    assert p.returncode == 0, p.stderr


def test_damaged_part_of_an_incomplete_store_is_refused(pixel_stores, tmp_path):
    """An incomplete store reads its parts: a part whose labels are shorter than its features is refused too."""
    out = tmp_path / "inc.h5"
    _extract(out, "--split", "train", "--limit", "200", "--part-size", "64")
    st = FeatureStore(str(out))
    # turn the complete store back into header + parts, the way a killed writer leaves it
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = False
        n_items = int(f.attrs["n_items"])
    os.makedirs(f"{out}.parts")
    with h5py.File(f"{out}.parts/part-{0:010d}-{n_items:010d}.h5", "w") as p:
        p["features"] = st.features
        p["labels"] = st.labels[:-1]
        p.create_dataset("ids", data=st.ids, dtype=h5py.string_dtype())
        p.create_dataset("skipped_ids", data=[], dtype=h5py.string_dtype())
        p.create_dataset("skipped_reasons", data=[], dtype=h5py.string_dtype())
    _one_line_exit_2(cli_here("fit", "--features", out, "--head", "knn", "--allow-incomplete", "--out", tmp_path / "m"),
                     "/labels has 199")


# -------------------------------------------------------------------------------------------------- 2. bit rot
def _flip_bytes_in_chunk(path, dataset, chunk_index):
    """Flip bits in 16 bytes in the middle of one stored chunk of ``dataset`` on disk; returns the chunk's row range."""
    with h5py.File(path, "r") as f:
        d = f[dataset]
        assert d.fletcher32, "new stores carry checksums"
        info = d.id.get_chunk_info(chunk_index)
        rows = (info.chunk_offset[0], min(info.chunk_offset[0] + d.chunks[0], d.shape[0]))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        raw = fh.read(16)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0x55 for b in raw))  # not 0xFF: Fletcher sums cannot tell 16-bit 0x0000 from 0xFFFF
    return rows


def test_flipped_bits_in_features_are_found_by_verify_and_refused_by_fit(tmp_path):
    out = _extract(tmp_path / "rot.h5", "--split", "train", "--limit", "1000", "--part-size", "128")
    good = FeatureStore(out).features
    p = cli_here("info", "--verify", out)
    assert p.returncode == 0 and "verified: 1000 rows OK" in p.stdout, p.stderr
    a, b = _flip_bytes_in_chunk(out, "features", 1)
    assert 0 < a < b <= 1000
    line = _one_line_exit_2(cli_here("info", "--verify", out), f"damaged rows {a}-{b - 1}", out)
    assert f"{b - a} of 1000 rows" in line
    _one_line_exit_2(cli_here("fit", "--features", out, "--head", "knn", "--out", tmp_path / "m.tlfx"),
                     "damaged rows", f"{a}-{b - 1}", out)
    assert not (tmp_path / "m.tlfx").exists()
    # the rows outside the damaged chunk are intact and the checksum is what caught it
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["features"][:a], good[:a])


def test_flipped_bits_in_a_part_are_found_by_verify(tmp_path):
    """An incomplete store: bit rot in one part's features is found too, and named by the store's row numbers."""
    out = tmp_path / "inc.h5"
    _extract(out, "--split", "train", "--limit", "256", "--part-size", "64")
    st = FeatureStore(str(out))
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = False
    parts = os.path.join(f"{out}.parts")
    os.makedirs(parts)
    for i in range(4):
        tlfx.store.write_part(str(out), 64 * i, 64 * (i + 1), st.features[64 * i:64 * (i + 1)], st.labels[64 * i:64 * (i + 1)],
                              st.ids[64 * i:64 * (i + 1)], [])
    _flip_bytes_in_chunk(f"{out}.parts/part-{128:010d}-{192:010d}.h5", "features", 0)
    _one_line_exit_2(cli_here("info", "--verify", out), "damaged rows 128-191")


def test_store_without_checksums_still_reads_and_verify_says_it_cannot_check(pixel_stores, tmp_path):
    old = tmp_path / "old.h5"
    shutil.copy(pixel_stores[0], old)
    with h5py.File(old, "r+") as f:  # the layout of stores written before checksums: contiguous, no filter
        for name in ("features", "labels"):
            _replace(f, name, f[name][...])
        assert not f["features"].fletcher32
    p = cli_here("info", "--verify", old)
    assert p.returncode == 0 and "cannot verify" in p.stdout and "without checksums" in p.stdout, p.stderr
    assert cli_here("fit", "--features", old, "--head", "knn", "--out", tmp_path / "m.tlfx").returncode == 0


# ------------------------------------------------------------------------------------------ 3. disk full at the join
@pytest.fixture
def tmpfs_2m(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.slow  # test_reliability.py keeps a full-disk test in the fast lane; CI runs this one
def test_disk_full_while_joining_parts_is_one_line_and_rerun_finishes_identically(tmpfs_2m, tmp_path):
    # 400 rows x 768 float32 = 1.2 MB of parts: they fit in 2 MB, the joined copy beside them does not
    args = ["--split", "train", "--limit", "400", "--part-size", "64"]
    out = tmpfs_2m / "full.h5"
    for _ in range(2):  # the old join crashed HDF5 (exit 139) every time; a second run meets the same full disk
        p = run_cli(*EXTRACT, "--out", out, *args)
        _one_line_exit_2(p, "disk full", str(out), "parts are kept")
    assert len(os.listdir(f"{out}.parts")) == 7
    assert not [n for n in os.listdir(tmpfs_2m) if ".tmp" in n], "no temporary is left behind"
    subprocess.run(["mount", "-o", "remount,size=16m", str(tmpfs_2m)], check=True)
    p = run_cli(*EXTRACT, "--out", out, *args)
    assert p.returncode == 0, p.stderr
    ref = FeatureStore(_extract(tmp_path / "ref.h5", *args))
    st = FeatureStore(str(out))
    assert st.complete and len(st) == 400 and not os.path.exists(f"{out}.parts")
    assert np.array_equal(st.features, ref.features) and st.ids == ref.ids and np.array_equal(st.labels, ref.labels)


# ------------------------------------------------------------------------------- 4. readers racing a writer
def test_allow_incomplete_reader_racing_a_writer_sees_one_consistent_snapshot(tmp_path):
    out = tmp_path / "race.h5"
    writer = subprocess.Popen([sys.executable, "-m", "tlfx.cli", *EXTRACT, "--out", str(out), "--split", "train",
                               "--batch-size", "8", "--part-size", "8"], stderr=subprocess.PIPE, text=True)
    seen, deadline = set(), time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if not os.path.exists(out):
                time.sleep(0.05)
                continue
            try:
                st = FeatureStore(str(out))
                x, y, ids, sk = st.features, st.labels, st.ids, st.skipped
            except tlfx.TlfxError as exc:
                assert "changed twice while being read" in str(exc) or "being written" in str(exc), exc
                continue
            assert len(x) == len(y) == len(ids) == len(st), (len(x), len(y), len(ids), len(st))
            assert sk == [] and len(set(ids)) == len(ids)
            seen.add((st.complete, len(ids)))
            if st.complete:
                break
        assert writer.wait(timeout=240) == 0, writer.stderr.read()
    finally:
        if writer.poll() is None:
            writer.kill()
    assert any(not c and n > 0 for c, n in seen), f"the reader never caught the store half-written: {sorted(seen)}"
    assert any(c for c, _ in seen)


# ------------------------------------------------------------------------------- 5. escapes in what info prints
def test_info_escapes_control_characters_from_the_store(pixel_stores, tmp_path):
    evil = tmp_path / "evil.h5"
    shutil.copy(pixel_stores[0], evil)
    names = ["\x1b[2J\x1b[31mred"] + [str(i) for i in range(1, 10)]
    with h5py.File(evil, "r+") as f:
        f.attrs["class_names"] = json.dumps(names)
        f.attrs["dataset"] = "digits\x1b]0;pwned\x07"
        f["ids"][0] = "a\u202eb\nc"
    p = cli_here("info", evil)
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "\x07" not in p.stdout and "\u202e" not in p.stdout
    assert "\\x1b[2J\\x1b[31mred" in p.stdout and "digits\\x1b]0;pwned\\x07" in p.stdout


# --------------------------------------------------------------------------------- 6. planted temporaries
def test_planted_symlinks_at_temporary_names_are_not_followed_and_stale_ones_are_removed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "s.h5"
    os.makedirs(f"{out}.parts")
    planted = [f"{out}.tmp{pid}" for pid in range(os.getpid(), os.getpid() + 400)]  # the old, guessable names
    planted += [f"{out}.parts/part-{0:010d}-{64:010d}.h5.tmp{pid}" for pid in range(os.getpid(), os.getpid() + 400)]
    for name in planted:
        os.symlink(victim, name)
    _extract(out, "--split", "train", "--limit", "128", "--part-size", "64", "--overwrite")
    assert victim.read_text() == "precious"
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n], "stale temporaries of this store are removed"
    assert FeatureStore(str(out)).complete and oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~_umask())
    # in this process the old name is known for sure: a link planted there is not written through either
    part = f"{out}.parts/part-{0:010d}-{4:010d}.h5"
    os.makedirs(f"{out}.parts")
    os.symlink(victim, f"{part}.tmp{os.getpid()}")
    tlfx.store.write_part(str(out), 0, 4, np.ones((4, 3), np.float32), [0, 1, 0, 1], list("abcd"), [])
    assert victim.read_text() == "precious"
    with h5py.File(part, "r") as f:
        assert np.array_equal(f["features"][...], np.ones((4, 3))) and f["features"].fletcher32


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m
