"""Hostile image folders and data files: link loops, FIFOs, unreadable folders, malformed IDX and CSV files.

Everything here is real: folders, links, FIFOs and files in tmp_path, the real CLI in a subprocess with a timeout
wherever the fault could hang. The ``pixels`` backbone keeps each extraction to seconds.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

import tlfx

HANG_TIMEOUT = 240  # seconds: a run that takes longer is a hang (a normal one here takes ~15 s on 2 busy cores)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _cli(*args):
    return [sys.executable, "-m", "tlfx.cli", *map(str, args)]


def _run(cmd, timeout=HANG_TIMEOUT):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: {' '.join(map(str, cmd))} ran past {timeout} s")


def _extract(data_dir, out, *extra):
    return _run(_cli("extract", "--backbone", "pixels", "--workers", "0", "--quiet", "--data", f"imagefolder:{data_dir}",
                     "--out", out, *extra))


def _images(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / n)


def _two_classes(root):
    _images(root / "a", ["0.png", "1.png", "2.png"], seed=1)
    _images(root / "b", ["0.png", "1.png", "2.png"], seed=2)


def _labelled(store_path):
    st = tlfx.FeatureStore(str(store_path))
    return {i: st.class_names[int(lab)] for i, lab in zip(st.ids, st.labels)}, dict(st.skipped)


# ------------------------------------------------------------------------------------------- link loops
def test_symlink_loops_list_every_folder_once_with_the_right_labels(tmp_path):
    """a/up -> .. (6 images became 246 rows, b's labelled a) and b/x -> ., b/y -> . (hung): now 6 rows, 3 skips."""
    data = tmp_path / "data"
    _two_classes(data)
    os.symlink("..", data / "a" / "up")
    os.symlink(".", data / "b" / "x")
    os.symlink(".", data / "b" / "y")
    p = _extract(data, tmp_path / "o.h5")
    assert p.returncode == 0, p.stderr
    rows, skipped = _labelled(tmp_path / "o.h5")
    assert rows == {f"{c}/{k}.png": c for c in "ab" for k in range(3)}
    assert set(skipped) == {"a/up/", "b/x/", "b/y/"}
    assert all("already listed" in r for r in skipped.values())
    assert "3 skipped" in p.stdout and "a/up/: folder already listed" in p.stdout


def test_links_to_other_folders_are_followed_once_and_files_count_once(tmp_path):
    """A class linked from outside the folder is listed; a second link to it, or to a file, is a skip, not a copy."""
    outside = tmp_path / "elsewhere" / "cats"
    _images(outside, ["c0.png", "c1.png"], seed=3)
    data = tmp_path / "data"
    _two_classes(data)
    os.symlink(outside, data / "cat")  # a class that lives on another disk: followed
    os.symlink(outside, data / "a" / "more_cats")  # the same folder again, inside class a: listed once (as cat)
    os.symlink("../a/0.png", data / "b" / "dup.png")  # a file reached twice: counted once, under a
    os.symlink(data / "a", data / "z_alias")  # a class folder linked under a second class name
    ds = tlfx.load_dataset(f"imagefolder:{data}")
    rows = {i: ds.class_names[lab] for i, lab in zip(ds.ids, ds.labels)}
    assert rows == {**{f"{c}/{k}.png": c for c in "ab" for k in range(3)}, "cat/c0.png": "cat", "cat/c1.png": "cat"}
    skips = dict(ds.listing_skips)
    assert set(skips) == {"a/more_cats/", "b/dup.png", "z_alias/"}
    assert "same file as a/0.png" in skips["b/dup.png"] and "same folder as a/" in skips["z_alias/"]


def test_link_from_train_into_test_is_not_followed(tmp_path):
    """A link inside the train split to the test split (or to the split's parent) would leak test images."""
    data = tmp_path / "data"
    _two_classes(data / "train")
    _two_classes(data / "test")
    os.symlink("../../test/a", data / "train" / "a" / "leak")
    os.symlink("../..", data / "train" / "b" / "root")
    os.symlink("../test/b", data / "train" / "c")
    ds = tlfx.load_dataset(f"imagefolder:{data}", split="train")
    assert sorted(ds.ids) == sorted(f"{c}/{k}.png" for c in "ab" for k in range(3))
    skips = dict(ds.listing_skips)
    assert set(skips) == {"a/leak/", "b/root/", "c/"}
    assert skips["a/leak/"] == skips["c/"] == "link into another split; not followed"


# ------------------------------------------------------------------------------------------- special files
def test_fifo_named_png_is_skipped_not_opened(tmp_path):
    """A FIFO named *.png hung extract forever; now it is one skipped item: 'not a regular file (a FIFO)'."""
    data = tmp_path / "data"
    _two_classes(data)
    os.mkfifo(data / "a" / "pipe.png")
    p = _extract(data, tmp_path / "o.h5")
    assert p.returncode == 0, p.stderr
    rows, skipped = _labelled(tmp_path / "o.h5")
    assert len(rows) == 6 and skipped == {"a/pipe.png": "not a regular file (a FIFO)"}
    strict = _extract(data, tmp_path / "s.h5", "--strict")
    assert strict.returncode == 2 and "a/pipe.png" in strict.stderr and "not a regular file" in strict.stderr
    assert len(strict.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.h5").exists()


def test_open_image_refuses_fifo_device_and_directory_without_blocking(tmp_path):
    """The common path of every image read (extract, predict, report galleries): only regular files are opened."""
    from tlfx.images import BadImage, open_image

    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "dir.png").mkdir()
    for path, kind in [(tmp_path / "pipe.png", "a FIFO"), ("/dev/null", "a character device"),
                       (tmp_path / "dir.png", "a directory")]:
        with pytest.raises(BadImage, match=f"not a regular file \\({kind}\\)"):
            open_image(path)


@pytest.fixture(scope="module")
def knn_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    _two_classes(d / "data")
    assert _extract(d / "data", d / "s.h5").returncode == 0
    run_cli("fit", "--features", d / "s.h5", "--head", "knn", "--param", "n_neighbors=1", "--out", d / "m.tlfx", check=True)
    return d


def test_predict_on_a_fifo_does_not_hang(knn_model, tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    good = knn_model / "data" / "a" / "0.png"
    p = _run(_cli("predict", "--model", knn_model / "m.tlfx", tmp_path / "pipe.png", good, "--format", "csv"))
    assert p.returncode == 0, p.stderr
    assert "not a regular file (a FIFO)" in p.stdout and f"{good},1,a," in p.stdout
    alone = _run(_cli("predict", "--model", knn_model / "m.tlfx", tmp_path / "pipe.png"))
    assert alone.returncode == 2 and "not a regular file" in alone.stderr


def test_csv_data_file_that_is_a_fifo_or_not_utf8_is_one_line(tmp_path):
    os.mkfifo(tmp_path / "labels.csv")
    (tmp_path / "latin1.csv").write_bytes(b"path,label\n\xe9t\xe9.png,caf\xe9\n")
    for name, needle in [("labels.csv", "not a regular file (a FIFO)"), ("latin1.csv", "not valid UTF-8")]:
        p = _run(_cli("extract", "--backbone", "pixels", "--data", f"csv:{tmp_path / name}", "--out", tmp_path / "o.h5"))
        assert p.returncode == 2 and needle in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def _idx(ndim_code, dtype_code, shape, data: bytes, gz=True):
    raw = bytes([0, 0, dtype_code, ndim_code]) + b"".join(struct.pack(">I", s) for s in shape) + data
    return gzip.compress(raw, mtime=0) if gz else raw


GOOD_LABELS = _idx(1, 8, [2], bytes([1, 2]))


MALFORMED_IDX = [
    (_idx(3, 8, [2, 28, 28], bytes(2 * 784 - 1)), GOOD_LABELS, "needs 1568 bytes of data, the file holds 1567"),
    (_idx(3, 8, [2, 28, 28], bytes(2 * 784 + 5)), GOOD_LABELS, "needs 1568 bytes of data"),
    (_idx(2, 8, [2, 784], bytes(2 * 784)), GOOD_LABELS, "2 dimensions, expected 3"),
    (_idx(3, 0x0D, [2, 28, 28], bytes(2 * 784)), GOOD_LABELS, "element type 0x0d"),
    (_idx(3, 8, [60000, 60000, 60000], b""), GOOD_LABELS, "more than the"),
    (b"\x1f\x8b\x08garbage", GOOD_LABELS, "malformed IDX file"),
    (gzip.compress(b"PK\x03\x04", mtime=0), GOOD_LABELS, "no IDX header"),
    (_idx(3, 8, [2, 28, 28], bytes(2 * 784)), _idx(1, 8, [3], bytes(3)), "2 images, 3 labels"),
    (_idx(3, 8, [2, 28, 28], bytes(2 * 784)), _idx(1, 8, [2], bytes([0, 200])), "labels 0-9 expected"),
]


@pytest.mark.parametrize("images, labels, needle", MALFORMED_IDX, ids=[case[2] for case in MALFORMED_IDX])
def test_malformed_idx_files_are_refused_with_the_reason(tmp_path, images, labels, needle):
    from tlfx.errors import TlfxError
    from tlfx_plugins.datasets import fashion_mnist

    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(images)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(labels)
    with pytest.raises(TlfxError, match="IDX file") as err:
        fashion_mnist(None, split="test", root=str(tmp_path))
    assert needle in err.value.message


def test_malformed_idx_file_is_one_line_exit_2(tmp_path):
    """It was a reshape ValueError; the CLI says which file and what is wrong with it."""
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(_idx(3, 8, [2, 28, 28], bytes(100)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(GOOD_LABELS)
    p = run_cli("extract", "--backbone", "pixels", "--data", "fashion-mnist", "--split", "test", "--root", tmp_path,
                "--out", tmp_path / "o.h5")
    assert p.returncode == 2 and "malformed IDX file" in p.stderr and "needs 1568 bytes" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_wellformed_idx_files_still_load(tmp_path):
    from tlfx_plugins.datasets import fashion_mnist

    pixels = np.arange(2 * 784, dtype=np.uint8).tobytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(3, 8, [2, 28, 28], pixels, gz=False))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(GOOD_LABELS)
    ds = fashion_mnist(None, split="test", root=str(tmp_path))
    assert ds.images.shape == (2, 28, 28) and list(ds.labels) == [1, 2] and ds.images.tobytes() == pixels


# ------------------------------------------------------------------------------------------- unreadable folders
def _as_unprivileged(cmd):
    """As root, drop the capabilities that bypass permissions, so a mode-000 folder is really unreadable."""
    if IS_ROOT:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv (util-linux) cannot make a folder unreadable to itself")
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    return cmd


def test_unreadable_class_folder_is_a_recorded_skip_and_fails_strict(tmp_path):
    """A class folder that cannot be listed was '0 skipped', exit 0 even with --strict."""
    data = tmp_path / "data"
    _two_classes(data)
    _images(data / "c", ["0.png"])
    os.symlink(tmp_path / "gone", data / "d")  # a class folder that is a dangling link
    (data / "c").chmod(0)
    try:
        cmd = _cli("extract", "--backbone", "pixels", "--workers", "0", "--quiet", "--data", f"imagefolder:{data}",
                   "--out", tmp_path / "o.h5")
        p = _run(_as_unprivileged(cmd))
        assert p.returncode == 0, p.stderr
        rows, skipped = _labelled(tmp_path / "o.h5")
        assert len(rows) == 6
        assert skipped == {"c/": "cannot list folder: permission denied",
                           "d/": "broken symlink where a class folder may be meant"}
        assert "2 skipped" in p.stdout and "c/: cannot list folder: permission denied" in p.stdout
        strict = _run(_as_unprivileged(cmd + ["--strict", "--overwrite"]))
        assert strict.returncode == 2 and "--strict" in strict.stderr, strict.stderr
        assert len(strict.stderr.strip().splitlines()) == 1
    finally:
        (data / "c").chmod(0o755)


def test_folder_with_only_unlistable_classes_says_why_it_is_empty(tmp_path):
    data = tmp_path / "data"
    os.makedirs(data)
    os.symlink(tmp_path / "gone", data / "cls")
    _images(data / "empty", [])
    p = run_cli("extract", "--backbone", "pixels", "--data", f"imagefolder:{data}", "--out", tmp_path / "o.h5")
    assert p.returncode == 2 and "holds no images (1 skipped while listing, e.g. cls/: broken symlink" in p.stderr


# ------------------------------------------------------------------------------------------- names on the terminal
def test_file_names_in_the_summary_are_escaped(tmp_path):
    """A file name carrying an ANSI escape and a newline reaches the terminal as visible text, not as commands."""
    data = tmp_path / "data"
    _two_classes(data)
    (data / "a" / "evil\x1b[2J\nname.png").write_bytes(b"not an image")
    p = _extract(data, tmp_path / "o.h5")
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "evil\\x1b[2J\\x0aname.png: not an image" in p.stdout
    strict = _extract(data, tmp_path / "s.h5", "--strict")
    assert strict.returncode == 2 and "\x1b" not in strict.stderr and "evil\\x1b[2J\\x0aname.png" in strict.stderr


# ------------------------------------------------------------------------------------------- option values
_X = ["extract", "--backbone", "pixels", "--data", "digits", "--out", "x.h5"]
_FIT = ["fit", "--features", "no.h5", "--out", "m.tlfx", "--head"]


_OPTION_CASES = [
    pytest.param([*_X, "--image-size", "0"], "'--image-size': 0 is not in the range 16<=x<=2048", id="size-0"),
    pytest.param([*_X, "--image-size", "-1"], "'--image-size': -1 is not in the range", id="size-negative"),
    pytest.param([*_X, "--image-size", "100000"], "'--image-size': 100000 is not in the range", id="size-huge"),
    pytest.param([*_X, "--limit", "1e23"], "'1e23' is not a valid integer", id="limit-float"),
    pytest.param([*_X, "--limit", str(10**30)], "--limit must be at least 1 and at most 1000000000000", id="limit-huge"),
    pytest.param([*_X, "--layers", ""], "names an empty layer", id="layers-empty"),
    pytest.param([*_X, "--layers", "penultimate,"], "names an empty layer", id="layers-trailing-comma"),
    pytest.param([*_X, "--layers", "penultimate,penultimate"], "names 'penultimate' twice", id="layers-twice"),
    pytest.param([*_X, "--layers", "nosuch"], "layer 'nosuch' is not a module", id="layers-no-module"),
    pytest.param([*_FIT, "knn", "--seed", "-1"], "'--seed': -1 is not in the range 0<=x<=4294967295", id="fit-seed"),
    pytest.param([*_FIT, "knn", "--seed", str(2**32)], "is not in the range 0<=x<=4294967295", id="fit-seed-2**32"),
    pytest.param(["compare", "--train", "a.h5", "--test", "b.h5", "--seed", "-1"], "'--seed': -1 is not in the range",
                 id="compare-seed"),
    pytest.param(["finetune", "--data", "digits", "--epochs", "1", "--out", "m.tlfx", "--seed", "-1"],
                 "'--seed': -1 is not in the range", id="finetune-seed"),
    pytest.param([*_FIT, "linear", "--param", "epochs=-1"], "--param epochs=-1 is out of range for head 'linear': "
                 "epochs must be >= 1", id="linear-epochs"),
    pytest.param([*_FIT, "linear", "--param", "val_fraction=1"], "val_fraction must be >= 0 and < 1", id="linear-val"),
    pytest.param([*_FIT, "linear", "--param", "lr=nan"], "lr must be a number, not nan", id="linear-lr-nan"),
    pytest.param([*_FIT, "logistic", "--param", "C=-1"], "C must be > 0", id="logistic-C"),
    pytest.param([*_FIT, "svm", "--param", "C=0"], "C must be > 0", id="svm-C"),
    pytest.param([*_FIT, "svm", "--param", "random_state=-1"], "random_state must be >= 0 and <= 4294967295",
                 id="svm-seed"),
    pytest.param([*_FIT, "knn", "--param", "n_neighbors=0"], "n_neighbors must be >= 1", id="knn-k"),
    pytest.param([*_FIT, "random_forest", "--param", "min_samples_leaf=1.5"], "min_samples_leaf must be > 0 and < 1",
                 id="rf-leaf-float"),
    pytest.param([*_FIT, "random_forest", "--param", "n_estimators=0"], "n_estimators must be >= 1", id="rf-trees"),
]
# each case starts the CLI (seconds of imports): a few in the fast lane, every one in the slow lane
_FAST_CASES = {"size-0", "limit-float", "layers-empty", "fit-seed", "linear-epochs", "logistic-C"}


@pytest.mark.parametrize("args, needle", [
    c if c.id in _FAST_CASES else pytest.param(*c.values, id=c.id, marks=pytest.mark.slow) for c in _OPTION_CASES])
def test_out_of_range_option_values_are_one_line_exit_2_before_any_work(tmp_path, args, needle):
    """Each used to be silently replaced (--image-size 0 became 224), an empty store (-1), a 60 GB allocation
    (100000), a crash deep in numpy (--seed -1) or a head that trains nothing (epochs=-1)."""
    p = run_cli(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []  # nothing written: refused before any work


def test_head_bounds_hold_for_the_python_api_too():
    from tlfx.heads import create_head

    X = np.random.default_rng(0).normal(size=(20, 3))
    y = np.arange(20) % 2
    with pytest.raises(ValueError, match="n_neighbors=0 must be >= 1"):
        create_head("knn", n_neighbors=0).fit(X, y)
    assert create_head("knn", n_neighbors=1).fit(X, y).predict(X).tolist() == y.tolist()
