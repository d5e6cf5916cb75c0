"""``tlfx extract --update``: real PNG folders (scikit-learn digits), the real efficientnet_lite0, real HDF5 stores.

The command runs in this process through ``tlfx.cli.main`` (the console entry point) where only its output is
checked, and in a subprocess where it is killed mid-update.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import cli_here
from PIL import Image

import tlfx
from tlfx.update import SUFFIX

BASE = ["extract", "--backbone", "efficientnet_lite0", "--image-size", "32", "--precision", "fp32", "--runtime", "torch",
        "--workers", "0", "--quiet"]


def tlfx_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the console entry point in this process: (exit code, stdout, stderr)."""
    p = cli_here(*args)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def digit_images():
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target


def add_images(root, digit_images, items, cls=None):
    """Digits ``items`` as 32 px PNGs in ``root/c<digit % 3>/NNNN.png`` (or ``root/<cls>/``)."""
    images, target = digit_images
    for i in items:
        folder = root / (cls or f"c{int(target[i]) % 3}")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], "L").resize((32, 32)).save(folder / f"{i:04d}.png")


def read(path):
    st = tlfx.FeatureStore(str(path), allow_incomplete=False)
    return st, st.features, st.labels, st.ids


def assert_same_rows(a_path, b_path):
    a, fa, la, ia = read(a_path)
    b, fb, lb, ib = read(b_path)
    assert ia == ib and a.class_names == b.class_names
    assert np.array_equal(la, lb)
    assert fa.dtype == fb.dtype == np.float32 and np.array_equal(fa, fb)  # bit for bit
    assert a.skipped == b.skipped
    assert a.attrs["dataset_fingerprint"] == b.attrs["dataset_fingerprint"]


def test_update_gives_the_rows_of_a_fresh_extraction_and_extracts_only_new_files(tmp_path, capsys, digit_images):
    data, out = tmp_path / "data", tmp_path / "s.h5"
    add_images(data, digit_images, range(24))
    args = [*BASE, "--data", f"imagefolder:{data}", "--out", out]
    assert tlfx_cli(capsys, *args)[0] == 0
    before = tlfx.FeatureStore(str(out))
    old_fp, old_rows = before.attrs["dataset_fingerprint"], dict(zip(before.ids, before.features))

    for name in ("c0/0000.png", "c1/0001.png", "c2/0002.png"):
        (data / name).unlink()
    add_images(data, digit_images, range(24, 28))
    add_images(data, digit_images, [28, 29], cls="a-new")  # a new class sorting first: every label index moves
    (data / "c1" / "9999.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # a corrupt new file
    kept_file = data / "c0" / "0003.png"  # made undecodable, same size and times: the update must not read it
    times, original = os.stat(kept_file), kept_file.read_bytes()
    kept_file.write_bytes(bytes(len(original)))
    os.utime(kept_file, ns=(times.st_atime_ns, times.st_mtime_ns))
    changed = data / "c2" / "0005.png"  # other pixels under the same name, modified after the store was made
    Image.fromarray(digit_images[0][40], "L").resize((32, 32)).save(changed)
    later = time.time() + 5
    os.utime(changed, (later, later))

    code, stdout, stderr = tlfx_cli(capsys, *args)
    assert code == 2 and "--update" in stderr and len(stderr.strip().splitlines()) == 1
    assert tlfx.FeatureStore(str(out)).attrs["dataset_fingerprint"] == old_fp  # refused: nothing changed

    code, stdout, stderr = tlfx_cli(capsys, *args, "--update")
    assert code == 0, stderr
    assert "kept 20 rows, added 7, dropped 4 (1 of them changed files); extracted 8 images" in stdout, stdout
    assert "9999.png" in stdout  # the corrupt file is skipped and named, as a normal extraction does
    st, feats, labels, ids = read(out)
    assert st.attrs["updated_from"] == old_fp and st.attrs["dataset_fingerprint"] != old_fp
    assert st.attrs["stats"]["update"] == {"kept": 20, "added": 7, "dropped": 4, "changed": 1, "extracted": 8}
    assert st.class_names == ["a-new", "c0", "c1", "c2"]
    assert [st.class_names[k] for k in labels] == [i.split("/")[0] for i in ids]
    assert np.array_equal(feats[ids.index("c0/0003.png")], old_rows["c0/0003.png"])  # kept, never decoded
    assert all(np.array_equal(f, old_rows[i]) for i, f in zip(ids, feats) if i in old_rows and i != "c2/0005.png")
    assert not np.array_equal(feats[ids.index("c2/0005.png")], old_rows["c2/0005.png"])  # extracted again
    assert not os.path.exists(str(out) + SUFFIX) and not os.path.exists(str(out) + SUFFIX + ".parts")

    # a fresh extraction of the folder as it is now (the zeroed file restored) gives exactly these rows
    kept_file.write_bytes(original)
    os.utime(kept_file, ns=(times.st_atime_ns, times.st_mtime_ns))
    fresh = tmp_path / "fresh.h5"
    assert tlfx_cli(capsys, *BASE, "--data", f"imagefolder:{data}", "--out", fresh)[0] == 0
    assert_same_rows(out, fresh)

    code, stdout, _ = tlfx_cli(capsys, *args, "--update")  # nothing changed since
    assert code == 0 and "up to date" in stdout and "kept 27 rows, added 0, dropped 0; nothing extracted" in stdout


def test_update_refuses_another_configuration_and_datasets_without_file_ids(tmp_path, capsys, digit_images):
    data, out = tmp_path / "data", tmp_path / "r.h5"
    add_images(data, digit_images, range(6))
    args = [*BASE, "--data", f"imagefolder:{data}", "--out", out]
    assert tlfx_cli(capsys, *args)[0] == 0
    add_images(data, digit_images, [6])
    code, _, stderr = tlfx_cli(capsys, *args, "--update", "--pooling", "max")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "pooling: store avg vs now max" in stderr and "--update" in stderr
    code, _, stderr = tlfx_cli(capsys, *args, "--update", "--overwrite")
    assert code == 2 and "--overwrite" in stderr
    code, _, stderr = tlfx_cli(capsys, *BASE, "--data", "digits", "--limit", "5", "--out", tmp_path / "d.h5", "--update")
    assert code == 2 and "'digits' has no stable per-file ids" in stderr and len(stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "d.h5")
    assert tlfx.FeatureStore(str(out)).attrs["n"] == 6  # untouched


@pytest.mark.slow  # kills a subprocess mid-write and resumes (tens of seconds); CI runs the slow lane
def test_a_killed_update_leaves_the_old_store_whole_and_the_same_command_finishes_it(tmp_path, capsys, digit_images):
    data, out = tmp_path / "data", tmp_path / "k.h5"
    add_images(data, digit_images, range(8))
    args = [*BASE, "--data", f"imagefolder:{data}", "--out", out, "--batch-size", "4", "--part-size", "4"]
    assert tlfx_cli(capsys, *args)[0] == 0
    _, old_feats, _, old_ids = read(out)
    old_bytes = out.read_bytes()
    add_images(data, digit_images, range(8, 32))

    proc = subprocess.Popen([sys.executable, "-m", "tlfx.cli", *map(str, args), "--update"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    parts = tmp_path / ("k.h5" + SUFFIX + ".parts")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(parts.glob("part-*.h5"))) < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the update ended before it could be killed mid-way"
    assert 2 <= len(list(parts.glob("part-*.h5"))) < 8  # killed while it was writing its parts

    assert out.read_bytes() == old_bytes  # the old store, byte for byte
    _, feats, _, ids = read(out)
    assert ids == old_ids and np.array_equal(feats, old_feats)

    code, stdout, stderr = tlfx_cli(capsys, *args, "--update")  # the same command continues the update
    assert code == 0, stderr
    assert "kept 8 rows, added 24, dropped 0" in stdout and "resumed at item" in stdout
    fresh = tmp_path / "fresh.h5"
    assert tlfx_cli(capsys, *BASE, "--data", f"imagefolder:{data}", "--out", fresh)[0] == 0
    assert_same_rows(out, fresh)


def test_an_images_features_do_not_depend_on_its_batch(lite0):
    """What --update relies on: a new image extracted alone gets the bits it gets among others (CPU, fp32)."""
    import torch

    from tlfx.extraction import FeatureComputer

    computer = FeatureComputer(lite0, image_size=32, precision="fp32", device="cpu")
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8))
    together = computer(batch)
    for k in (1, 2, 5):
        assert np.array_equal(computer(batch[:k]), together[:k]), k
