"""The OpenVINO runtime: equal features to torch on real weights, the on-disk cache, refusal to mix, the fallback."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import needs_fashion, run_cli

ov = pytest.importorskip("openvino", reason="OpenVINO not installed (pip install 'tlfx[openvino]'); torch is used")

import tlfx  # noqa: E402
from tlfx import openvino_runtime as ovr  # noqa: E402
from tlfx.datasets import load_dataset  # noqa: E402
from tlfx.extraction import FeatureComputer  # noqa: E402
from tlfx.store import FeatureStore  # noqa: E402

SIZE = 64
# OpenVINO's thread pool and torch's never share the suite's main process: the tests that build OpenVINO networks
# in-process run in a child pytest (test_openvino_in_a_process_of_its_own), the others through the CLI.
IN_CHILD = os.environ.get("TLFX_TEST_OPENVINO_CHILD") == "1"
in_child = pytest.mark.skipif(not IN_CHILD, reason="run by test_openvino_in_a_process_of_its_own in a child process")


def test_openvino_in_a_process_of_its_own():
    if IN_CHILD:
        pytest.skip("this is the child process")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "in_child"],
                          env={**os.environ, "TLFX_TEST_OPENVINO_CHILD": "1"}, capture_output=True, text=True,
                          timeout=1500, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-4000:]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One OpenVINO cache for this module (conversions cost tens of seconds on a loaded 2-core machine)."""
    d = tmp_path_factory.mktemp("ovcache")
    old = os.environ.get("TLFX_CACHE_DIR")
    os.environ["TLFX_CACHE_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("TLFX_CACHE_DIR", None)
    else:
        os.environ["TLFX_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def digits_batch():
    ds = load_dataset("digits", split="test", limit=24)
    computer = FeatureComputer(tlfx.create_backbone("efficientnet_lite0"), image_size=SIZE, precision="fp32",
                               device="cpu")
    return next(iter(computer.loader(ds, range(len(ds)), 24, workers=0)))[2]


@in_child
@pytest.mark.parametrize("layers", ["penultimate", "multi"])
def test_in_child_openvino_fp32_features_equal_torch_fp32(cache_dir, lite0, digits_batch, layers):
    torch_fc = FeatureComputer(lite0, layers, image_size=SIZE, precision="fp32", device="cpu", runtime="torch")
    ov_fc = FeatureComputer(lite0, layers, image_size=SIZE, precision="fp32", device="cpu", runtime="openvino")
    a, b = torch_fc(digits_batch), ov_fc(digits_batch)
    assert ov_fc.runtime == "openvino" and a.shape == b.shape and b.dtype == np.float32
    assert a.shape[1] == 1280 if layers == "penultimate" else a.shape[1] > 1280
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
    # batch invariance: an image's features do not depend on the batch it came in
    np.testing.assert_allclose(ov_fc(digits_batch[:5]), b[:5], rtol=1e-5, atol=1e-5)


@in_child
def test_in_child_second_build_reuses_the_cache_and_a_damaged_entry_is_rebuilt(cache_dir, lite0, digits_batch):
    first = FeatureComputer(lite0, image_size=SIZE, precision="fp32", device="cpu", runtime="openvino")
    folder = first._openvino.folder
    bin_path = os.path.join(folder, "model.bin")
    mtime, conversions = os.stat(bin_path).st_mtime_ns, ovr.stats["conversions"]
    again = FeatureComputer(lite0, image_size=SIZE, precision="fp32", device="cpu", runtime="openvino")
    assert again._openvino.cached and ovr.stats["conversions"] == conversions
    assert os.stat(bin_path).st_mtime_ns == mtime
    expected = again(digits_batch)
    with open(bin_path, "r+b") as f:  # a flipped byte in the weights: must not be loaded
        f.seek(os.path.getsize(bin_path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    rebuilt = FeatureComputer(lite0, image_size=SIZE, precision="fp32", device="cpu", runtime="openvino")
    assert not rebuilt._openvino.cached and ovr.stats["conversions"] == conversions + 1
    np.testing.assert_array_equal(rebuilt(digits_batch), expected)


@in_child
def test_in_child_openvino_tta_flip_is_the_mean_of_both_passes(cache_dir, lite0, digits_batch):
    import torch

    plain = FeatureComputer(lite0, image_size=SIZE, precision="fp32", device="cpu", runtime="openvino")
    flip = FeatureComputer(lite0, image_size=SIZE, precision="fp32", device="cpu", runtime="openvino", tta="flip")
    expected = (plain(digits_batch) + plain(torch.flip(digits_batch, dims=(2,)))) / np.float32(2)
    np.testing.assert_allclose(flip(digits_batch), expected, rtol=1e-5, atol=1e-5)
    on_torch = FeatureComputer(lite0, image_size=SIZE, precision="fp32", device="cpu", runtime="torch", tta="flip")
    np.testing.assert_allclose(flip(digits_batch), on_torch(digits_batch), rtol=1e-3, atol=1e-3)


def _ov_store(tmp_path, name="ov.h5", *extra):
    out = tmp_path / name
    proc = run_cli("extract", "--data", "digits", "--split", "test", "--limit", "40", "--image-size", SIZE,
                   "--precision", "fp32", "--runtime", "openvino", "--quiet", "--out", out, *extra)
    assert proc.returncode == 0, proc.stderr
    return out


def test_a_model_fitted_on_torch_features_refuses_an_openvino_store(cache_dir, tmp_path, digits_stores):
    ov_store = _ov_store(tmp_path)
    st = FeatureStore(str(ov_store))
    assert st.attrs["runtime"] == "openvino" and st.attrs["precision"] == "fp32"
    model = tmp_path / "m.tlfx"
    run_cli("fit", "--features", digits_stores[0], "--head", "logistic", "--out", model, check=True)
    proc = run_cli("evaluate", "--model", model, "--features", ov_store)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "runtime" in lines[0] and "openvino" in lines[0]
    assert "Traceback" not in proc.stderr


def test_feature_config_diff_counts_runtime_and_int8():
    from tlfx.config import FeatureConfig

    torch_fp32 = FeatureConfig(backbone="b", precision="fp32")
    assert torch_fp32.diff(FeatureConfig(backbone="b", precision="fp32", runtime="torch")) == []  # None means torch
    assert torch_fp32.diff(FeatureConfig(backbone="b", precision="bf16")) == []  # bf16 vs fp32: same network
    assert torch_fp32.diff(FeatureConfig(backbone="b", precision="fp32", runtime="openvino")) == [
        "runtime: model torch vs store openvino"]
    assert FeatureConfig(precision="int8", runtime="openvino").diff(FeatureConfig(precision="bf16", runtime="openvino")) \
        == ['precision: model int8 vs store bf16']


BLOCK = ("import sys, runpy; sys.modules['openvino'] = None; sys.argv = ['tlfx', *sys.argv[1:]]; "
         "runpy.run_module('tlfx.cli', run_name='__main__')")


def test_without_openvino_auto_falls_back_to_torch_and_openvino_is_one_line(tmp_path):
    common = ["extract", "--data", "digits", "--split", "test", "--limit", "16", "--image-size", "32", "--quiet"]
    env = {**os.environ, "TLFX_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("TLFX_RUNTIME", None)  # the command line's own default, auto
    run = [sys.executable, "-c", BLOCK]
    proc = subprocess.run([*run, *common, "--out", str(tmp_path / "a.h5")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert FeatureStore(str(tmp_path / "a.h5")).attrs["runtime"] == "torch"
    for extra in (["--runtime", "openvino"], ["--precision", "int8"]):
        proc = subprocess.run([*run, *common, *extra, "--out", str(tmp_path / "b.h5")], capture_output=True,
                              text=True, env=env, timeout=600)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "not installed" in lines[0], lines
        assert "tlfx[openvino]" in lines[0]
    assert not (tmp_path / "b.h5").exists()


@pytest.mark.slow
@needs_fashion
def test_int8_features_keep_fp32_accuracy_on_fashion_mnist(cache_dir, tmp_path, capfd):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = {}
    for precision in ("fp32", "int8"):
        res = tlfx.extract("efficientnet_lite0", "fashion-mnist", str(tmp_path / f"{precision}.h5"), split="test",
                           limit=2000, image_size=96, precision=precision, runtime="openvino", device="cpu")
        st = FeatureStore(res.path)
        assert st.attrs["precision"] == precision
        if precision == "int8":
            cal = st.attrs["calibration"]
            assert cal["items"] == ovr.CALIBRATION_ITEMS and cal["seed"] == ovr.CALIBRATION_SEED
        X, y = np.asarray(st.features), np.asarray(st.labels)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.5))
        scores[precision] = 100 * cross_val_score(clf, X, y, cv=5).mean()
    assert abs(scores["int8"] - scores["fp32"]) <= 0.5, scores
    out, err = capfd.readouterr()  # NNCF's progress bars and torch's CUDA notice stay out of tlfx's output
    for noise in ("Statistics collection", "Bias correction", "No CUDA runtime"):
        assert noise not in out + err, (noise, out[-500:], err[-500:])

    # predict rebuilds the INT8 network from the cache; without it there is nothing to calibrate on: one line
    model = tmp_path / "int8.tlfx"
    run_cli("fit", "--features", tmp_path / "int8.h5", "--head", "logistic", "--out", model, check=True)
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(np.full((28, 28), 200, np.uint8), "L").save(img)
    assert run_cli("predict", "--model", model, img).returncode == 0
    proc = run_cli("predict", "--model", model, img, env={"TLFX_CACHE_DIR": str(tmp_path / "empty-cache")})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "INT8" in lines[0] and "--precision int8" in lines[0], lines


def test_predict_rebuilds_the_openvino_runtime_the_model_was_fitted_on(cache_dir, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    train = _ov_store(tmp_path, "ovtrain.h5")  # the cached conversion of the tests above: no new conversion
    model = tmp_path / "ov.tlfx"
    run_cli("fit", "--features", train, "--head", "logistic", "--out", model, check=True)
    digits = load_digits()
    paths = []
    for i in range(3):
        p = tmp_path / f"d{i}.png"
        Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8), "L").save(p)
        paths.append(p)
    proc = run_cli("predict", "--model", model, *paths, "--format", "json", "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    assert all(str(p) in proc.stdout for p in paths)
    proc = run_cli("predict", "--model", model, paths[0], env={"TLFX_CACHE_DIR": str(tmp_path / "fresh")})
    assert proc.returncode == 0, proc.stderr  # a float OpenVINO model converts again where its cache is missing
