"""Shared fixtures: real data (Fashion-MNIST IDX files, scikit-learn digits), real backbones, real HDF5 stores."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

# The command line's default runtime is auto (OpenVINO on a CPU when installed), which converts each new network
# configuration once (tens of seconds here). Tests of everything else run torch; tests/test_openvino.py names the
# runtime it tests.
os.environ.setdefault("TLFX_RUNTIME", "torch")


def fashion_test_split():
    """Fashion-MNIST's test split found by the dataset plugin's own lookup (``tlfx.load_dataset``), or None.

    ``TLFX_FASHION_MNIST_DIRS`` replaces the plugin's search path, so ``TLFX_FASHION_MNIST_DIRS=/nonexistent``
    makes this machine look like a fresh one without the Debian package.
    """
    from tlfx import load_dataset
    from tlfx.errors import TlfxError

    try:
        return load_dataset("fashion-mnist", split="test")
    except TlfxError:
        return None


def fashion_dir():
    """The directory of the search path the dataset plugin reads Fashion-MNIST's test files from, or None."""
    from tlfx import load_dataset
    from tlfx.errors import TlfxError
    from tlfx.plugins import registry

    plugin = sys.modules[registry("dataset").get("fashion-mnist").factory.__module__]
    dirs = os.environ.get("TLFX_FASHION_MNIST_DIRS")
    for d in filter(None, dirs.split(os.pathsep) if dirs is not None else plugin.FASHION_DIRS):
        try:  # the plugin's own finder, pointed at one directory of its search path at a time
            load_dataset("fashion-mnist", split="test", root=os.path.expanduser(d), limit=1)
        except TlfxError:
            continue
        return os.path.expanduser(d)
    return None


HAVE_FASHION = fashion_test_split() is not None
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST not found by the fashion-mnist dataset "
                                   "plugin: apt-get install dataset-fashion-mnist (make test does, as root)")


def assert_imagenet_top5(bb):
    """Pretrained ImageNet weights, checked: photos shipped with scikit-image get their true class in the top 5."""
    import torch
    from skimage import data

    from tlfx.images import preprocess_image

    expected = {"coffee": {967, 968, 504}, "chelsea": {281, 282, 285}}  # espresso/cup/coffee mug; tabby/tiger/Egyptian cat
    mean = torch.tensor(bb.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.preprocess.std).view(1, 3, 1, 1)
    for name, classes in expected.items():
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        x = torch.from_numpy(preprocess_image(img, bb.preprocess).copy()).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            top5 = set(bb.module((x - mean) / std).topk(5).indices[0].tolist())
        assert top5 & classes, f"{bb.name}: {name}: top-5 {top5} has none of {classes}"


def run_cli(*args, env=None, cwd=None, check=False):
    """Run the real ``tlfx`` console entry point in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "tlfx.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"tlfx {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def cli_here(*args, env=None, cwd=None, check=False):
    """Run the console entry point (``tlfx.cli.main``) in this process; returns what :func:`run_cli` returns.

    A subprocess pays the imports of torch, torchvision and timm (seconds of CPU) on every call. Tests that need
    no isolation (no signal, no hang guard, no plugin folder, no environment read at import) use this instead.
    """
    import contextlib
    import io

    from tlfx.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, code = dict(os.environ), os.getcwd(), 0
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    if check and code != 0:
        raise AssertionError(f"tlfx {' '.join(map(str, args))} failed ({code}):\n{err.getvalue()}")
    return subprocess.CompletedProcess(["tlfx", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def lite0():
    import tlfx

    return tlfx.create_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def digits_stores(tmp_path_factory):
    """Small real stores: scikit-learn digits train/test through efficientnet_lite0 at 64 px."""
    import tlfx

    d = tmp_path_factory.mktemp("digits_stores")
    tr = tlfx.extract("efficientnet_lite0", "digits", str(d / "train.h5"), split="train", image_size=64, limit=600)
    te = tlfx.extract("efficientnet_lite0", "digits", str(d / "test.h5"), split="test", image_size=64, limit=200)
    return tr.path, te.path


@pytest.fixture(scope="session")
def fashion_png_dir(tmp_path_factory):
    """A real image folder: 10 classes x 6 images as PNG and JPEG, mixed sizes and modes.

    Fashion-MNIST test images where the package is installed; elsewhere (a fresh machine) scikit-learn's digits,
    which are always there, in class folders ``digit-0`` ... ``digit-9`` (names unlike the digits dataset's own).
    """
    import tlfx

    ds = fashion_test_split()
    prefix = ""
    if ds is None:
        ds, prefix = tlfx.load_dataset("digits", split="test"), "digit-"
    root = tmp_path_factory.mktemp("fashion_imgs")
    counts = {}
    for i in range(len(ds)):
        c = int(ds.labels[i])
        if counts.get(c, 0) >= 6:
            continue
        k = counts[c] = counts.get(c, 0) + 1
        cls_dir = root / (prefix + ds.class_names[c].replace("/", "-"))
        cls_dir.mkdir(exist_ok=True)
        img = Image.fromarray(ds.images[i], "L")
        if k % 3 == 0:
            img.convert("RGB").resize((96, 96)).save(cls_dir / f"{i}.jpg", quality=92)
        elif k % 3 == 1:
            img.save(cls_dir / f"{i}.png")
        else:
            img.convert("RGBA").resize((50, 40)).save(cls_dir / f"{i}.png")
        if len(counts) == 10 and all(v >= 6 for v in counts.values()):
            break
    return root


def rng_images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
