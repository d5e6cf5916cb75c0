"""Reliability: SIGKILL at random moments, resume, configuration guard, locks, full disk, read-only output, bad files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from badcorpus import EXPECTED, write_corpus
from conftest import cli_here, run_cli

import tlfx
from tlfx.store import StoreLock, parts_dir

IS_ROOT = os.geteuid() == 0
# digits "test" (450 images) through efficientnet_lite0 at 48 px, fp32, no worker processes: deterministic
ARGS = ["--data", "digits", "--split", "test", "--image-size", "48", "--precision", "fp32", "--workers", "0",
        "--batch-size", "32", "--part-size", "64", "--quiet"]
N_ITEMS = 450


def _cli(*args):
    return [sys.executable, "-m", "tlfx.cli", *map(str, args)]


def _read(path):
    with h5py.File(path, "r") as f:
        return (f["ids"].asstr()[...].tolist(), f["labels"][...], f["features"][...],
                f["skipped"]["ids"].asstr()[...].tolist(), bool(f.attrs["complete"]))


REFERENCE_SECONDS: list[float] = []  # wall time of the uninterrupted run (interpreter start to exit)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    t0 = time.perf_counter()
    p = subprocess.run(_cli("extract", *ARGS, "--out", out), capture_output=True, text=True)
    REFERENCE_SECONDS.append(time.perf_counter() - t0)
    assert p.returncode == 0, p.stderr
    return out


def _kill_loop(out, seed, kills, window=(0.05, 0.6)):
    """Start the same extract command again and again, SIGKILLing it at random moments, until it completes.

    The moments are drawn from ``window`` times the uninterrupted run's wall time, so they fall inside a run on a
    fast idle machine as on a loaded one. A run that finishes before the first kill (warm caches make later runs
    quicker than the reference) is thrown away and the window halved, so at least one kill always lands.
    """
    rng = random.Random(seed)
    scale = REFERENCE_SECONDS[-1]
    killed = 0
    for _ in range(kills + 10):
        proc = subprocess.Popen(_cli("extract", *ARGS, "--out", out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        if killed < kills:
            time.sleep(rng.uniform(*window) * scale)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed += 1
                continue
        out_text, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        if killed == 0:
            os.remove(out)
            scale /= 2
            continue
        return killed
    raise AssertionError("no run was both killed and then completed")


def _assert_same_store(out, reference):
    ids, labels, feats, skipped, complete = _read(out)
    rids, rlabels, rfeats, rskipped, _ = _read(reference)
    assert complete
    assert ids == rids and len(set(ids)) == len(ids)  # same rows, same order, none lost or duplicated
    assert np.array_equal(labels, rlabels) and skipped == rskipped
    np.testing.assert_array_equal(feats, rfeats)
    assert not os.path.exists(parts_dir(str(out))) and not os.path.exists(f"{out}.lock")
    assert not [f for f in os.listdir(os.path.dirname(out)) if ".tmp" in f]


def test_sigkill_after_a_part_then_resume_equals_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "killed.h5"
    _start_and_kill_after_first_part(out)
    assert 0 < len(tlfx.FeatureStore(str(out))) < N_ITEMS
    p = subprocess.run(_cli("extract", *ARGS, "--out", out), capture_output=True, text=True)
    assert p.returncode == 0 and "resumed at item" in p.stdout, p.stderr
    _assert_same_store(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted_run(reference, tmp_path, seed):
    out = tmp_path / "killed.h5"
    assert _kill_loop(out, seed=seed, kills=6) >= 1
    _assert_same_store(out, reference)


def _start_and_kill_after_first_part(out):
    proc = subprocess.Popen(_cli("extract", *ARGS, "--out", out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        d = parts_dir(str(out))
        if os.path.isdir(d) and any(f.startswith("part-") and f.endswith(".h5") for f in os.listdir(d)):
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()


def test_incomplete_store_says_so_and_is_refused_unless_asked(tmp_path):
    out = tmp_path / "partial.h5"
    _start_and_kill_after_first_part(out)
    info = cli_here("info", out)
    assert info.returncode == 0 and "INCOMPLETE" in info.stdout and f"of {N_ITEMS} items" in info.stdout
    with pytest.raises(tlfx.TlfxError, match="incomplete"):
        tlfx.FeatureStore(str(out), allow_incomplete=False)
    partial = tlfx.FeatureStore(str(out))
    assert 0 < len(partial) < N_ITEMS and partial.features.shape[0] == len(partial.ids)


def test_other_configuration_is_refused_with_what_differs_and_overwrite_replaces(tmp_path):
    out = tmp_path / "s.h5"
    base = ["extract", "--data", "digits", "--split", "test", "--limit", "40", "--image-size", "64", "--quiet", "--out", out]
    assert cli_here(*base).returncode == 0
    again = cli_here(*base)
    assert again.returncode == 0 and "already complete" in again.stdout
    p = cli_here(*base, "--pooling", "max", "--layers", "multi")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "pooling: store avg vs now max" in p.stderr and "layers:" in p.stderr and "--overwrite" in p.stderr
    assert tlfx.FeatureStore(str(out)).attrs["pooling"] == "avg"  # nothing already written is lost
    p = cli_here(*base, "--pooling", "max", "--overwrite")
    assert p.returncode == 0 and tlfx.FeatureStore(str(out)).attrs["pooling"] == "max"


def test_changed_dataset_contents_are_refused(fashion_png_dir, tmp_path):
    import shutil

    data = tmp_path / "imgs"
    shutil.copytree(fashion_png_dir, data)
    out = tmp_path / "f.h5"
    args = ["extract", "--data", f"imagefolder:{data}", "--image-size", "64", "--quiet", "--out", out]
    assert cli_here(*args).returncode == 0
    first = sorted(data.rglob("*.png"))[0]
    first.write_bytes(sorted(data.rglob("*.jpg"))[0].read_bytes())  # same name, new content
    p = cli_here(*args)
    assert p.returncode == 2 and "dataset_fingerprint" in p.stderr


def test_second_writer_is_refused_and_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "l.h5"
    args = ["extract", "--data", "digits", "--split", "test", "--limit", "20", "--image-size", "64", "--quiet", "--out", out]
    with StoreLock(str(out)):  # a live writer (this process)
        p = run_cli(*args)
    assert p.returncode == 2 and f"being written by process {os.getpid()}" in p.stderr
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(f"{out}.lock", "w") as f:
        import json
        import socket

        json.dump({"pid": dead.pid, "host": socket.gethostname()}, f)
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    assert not os.path.exists(f"{out}.lock")


@pytest.fixture
def small_tmpfs(tmp_path):
    if not IS_ROOT:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("mount -t tmpfs is not permitted here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_full_disk_ends_clearly_and_the_store_stays_resumable(small_tmpfs):
    out = small_tmpfs / "full.h5"
    args = ["extract", "--data", "digits", "--split", "test", "--image-size", "48", "--part-size", "32", "--quiet",
            "--out", out]
    p = run_cli(*args)
    assert p.returncode == 2 and "disk full" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    done = len(tlfx.FeatureStore(str(out)))
    assert 0 < done < N_ITEMS
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    st = tlfx.FeatureStore(str(out))
    assert st.complete and len(st) == N_ITEMS and len(set(st.ids)) == N_ITEMS


def test_read_only_output_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if IS_ROOT:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        ro.chmod(0o555)
    try:
        p = cli_here("extract", "--data", "digits", "--limit", "10", "--out", ro / "x.h5")
        assert p.returncode == 2 and "cannot write" in p.stderr and "Traceback" not in p.stderr
    finally:
        if IS_ROOT:
            subprocess.run(["umount", "-l", str(ro)])


def _without_root_file_access(cmd):
    """As root, drop the capabilities that bypass file permissions, so a mode-000 file is really unreadable."""
    import shutil

    if IS_ROOT:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv (util-linux) cannot make a file unreadable to itself")
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    return cmd


def test_bad_files_are_decoded_or_skipped_with_reasons(tmp_path):
    """Every awkward file is decoded correctly or recorded in /skipped ('unreadable' really is, even for root)."""
    data = tmp_path / "corpus"
    write_corpus(data / "things")
    Image_dir = data / "other"
    Image_dir.mkdir()
    (Image_dir / "good.png").write_bytes((data / "things" / "rgba.png").read_bytes())
    out = tmp_path / "bad.h5"
    cmd = _without_root_file_access(_cli("extract", "--data", f"imagefolder:{data}", "--image-size", "64", "--quiet",
                                         "--out", out))
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    st = tlfx.FeatureStore(str(out))
    skipped = dict(st.skipped)
    expected_skips = {f"things/{n}" for n, e in EXPECTED.items() if e == "skip"}
    assert set(skipped) == expected_skips
    assert all(reason for reason in skipped.values())
    assert "bomb" in skipped["things/bomb.png"] and "permission" in skipped["things/unreadable.png"]
    assert "not found" in skipped["things/broken_symlink.png"]
    ok = {f"things/{n}" for n, e in EXPECTED.items() if e == "ok"} | {"other/good.png"}
    assert set(st.ids) == ok and np.isfinite(st.features).all()
    assert f"{len(expected_skips)} skipped" in p.stdout
    strict = subprocess.run(cmd + ["--strict", "--overwrite"], capture_output=True, text=True)
    assert strict.returncode == 2 and "--strict" in strict.stderr and "cannot read" in strict.stderr


def test_awkward_images_decode_correctly(tmp_path):
    from tlfx.images import open_image

    write_corpus(tmp_path)
    rot = open_image(tmp_path / "exif_rotated.jpg")
    assert rot.size == (48, 64)  # EXIF orientation applied: stored landscape, shown portrait
    g16 = np.asarray(open_image(tmp_path / "gray16.png"))
    assert 110 < g16[24, 32, 0] < 150 and g16[-1, -1, 0] > 250  # 16-bit rescaled, not clipped to white
    cmyk = np.asarray(open_image(tmp_path / "cmyk.jpg"))
    assert cmyk.shape == (48, 64, 3) and cmyk[0, 0, 2] > 200 and cmyk[0, -1, 0] > 200
    gif = open_image(tmp_path / "animated.gif")
    assert gif.getpixel((5, 5)) == (255, 0, 0)  # the first frame
    rgba = np.asarray(open_image(tmp_path / "rgba.png")).astype(int)
    assert (rgba[0, 0] - [127, 127, 255]).__abs__().max() <= 2  # half-transparent blue over white


@pytest.mark.parametrize("args, needle", [
    (["extract", "--backbone", "nope", "--data", "digits", "--out", "x.h5"], "unknown backbone 'nope'; valid choices:"),
    (["extract", "--data", "nope", "--out", "x.h5"], "unknown dataset 'nope'; valid choices:"),
    (["extract", "--data", "digits", "--split", "bogus", "--out", "x.h5"], "unknown split 'bogus'"),
    (["extract", "--data", "imagefolder:/no/such/dir", "--out", "x.h5"], "does not exist"),
    (["extract", "--data", "csv:/no/such.csv", "--out", "x.h5"], "does not exist"),
    (["extract", "--data", "digits", "--weights", "/no/such.pth", "--out", "x.h5"], "does not exist"),
    (["extract", "--data", "digits", "--layers", "nolayer", "--out", "x.h5"], "layer 'nolayer' is not a module"),
    (["extract", "--data", "digits", "--limit", "0", "--out", "x.h5"], "--limit must be at least 1"),
    (["extract", "--data", "fashion-mnist", "--root", "/no/where", "--out", "x.h5"], "Fashion-MNIST IDX files not found"),
    (["extract", "--data", "digits", "--out", "/no/such/dir/x.h5"], "output directory"),
    (["info", "/no/such.h5"], "does not exist"),
])
def test_bad_cli_input_is_one_line_exit_2(tmp_path, args, needle):
    p = cli_here(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.h5").exists()


def test_empty_dataset_and_non_store_file(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    p = cli_here("extract", "--data", f"imagefolder:{tmp_path / 'empty'}", "--out", tmp_path / "e.h5")
    assert p.returncode == 2 and "holds no images" in p.stderr
    (tmp_path / "junk.h5").write_text("not hdf5")
    p = cli_here("info", tmp_path / "junk.h5")
    assert p.returncode == 2 and "not a readable HDF5" in p.stderr
    p = cli_here("extract", "--data", "digits", "--limit", "5", "--out", tmp_path / "junk.h5")
    assert p.returncode == 2 and "--overwrite" in p.stderr and (tmp_path / "junk.h5").read_text() == "not hdf5"
