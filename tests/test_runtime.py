"""Runtime choices: precision rules, threads, allocator; features float32 whatever the compute precision."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import needs_fashion

from tlfx import runtime
from tlfx.errors import TlfxError
from tlfx.extraction import FeatureComputer, extract
from tlfx.store import FeatureStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def test_precision_auto_follows_the_cpu_bf16_flags():
    assert runtime.resolve_precision("auto", CPU, bf16_cpu=True) == "bf16"
    assert runtime.resolve_precision("auto", CPU, bf16_cpu=False) == "fp32"
    flags = runtime.cpu_flags()
    expected = "bf16" if {"amx_bf16", "avx512_bf16"} & flags else "fp32"
    assert runtime.resolve_precision("auto", CPU) == expected


@pytest.mark.parametrize("choice", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept(choice):
    assert runtime.resolve_precision(choice, CPU, bf16_cpu=False) == choice
    assert runtime.resolve_precision(choice, CPU, bf16_cpu=True) == choice


def test_unknown_precision_names_the_choices():
    with pytest.raises(TlfxError, match=r"unknown precision 'half'.*auto, fp32, bf16, fp16"):
        runtime.resolve_precision("half", CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_precision_auto_on_cuda_is_half():
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert runtime.resolve_precision("auto", torch.device("cuda")) == expected


def test_default_workers_leave_small_machines_to_threads(monkeypatch):
    for cores, workers in ((1, 0), (2, 0), (4, 1), (16, 4), (96, 8)):
        monkeypatch.setattr(runtime, "cpu_count", lambda c=cores: c)
        assert runtime.default_workers() == workers
        assert runtime.decode_threads() in range(1, 9)


class _Threads(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.get_num_threads()


def test_worker_init_gives_each_decoding_worker_one_torch_thread():
    loader = torch.utils.data.DataLoader(_Threads(), batch_size=1, num_workers=1, worker_init_fn=runtime.worker_init)
    assert [int(t) for t in loader] == [1, 1]


def test_allocator_tuning_is_applied_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    tune = runtime.tune_allocator.__wrapped__  # the cached one has run already in this process
    assert tune() is (platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("TLFX_MALLOC_TUNE", "0")
    assert tune() is False


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_features_are_stored_float32_whatever_the_precision(tmp_path, lite0, precision):
    res = extract(lite0, "digits", str(tmp_path / "d.h5"), split="test", limit=12, image_size=32,
                       precision=precision, batch_size=8)
    st = FeatureStore(res.path)
    assert st.attrs["precision"] == precision
    feats = np.asarray(st.features)
    assert feats.dtype == np.float32 and feats.shape == (12, 1280)
    assert np.isfinite(feats).all()


@needs_fashion
def test_bf16_features_are_close_to_fp32_on_real_images(lite0, fashion_png_dir):
    from tlfx.datasets import load_dataset

    ds = load_dataset(f"imagefolder:{fashion_png_dir}", limit=16)
    out = {}
    for precision in ("bf16", "fp32"):
        computer = FeatureComputer(lite0, image_size=128, precision=precision, device="cpu")
        batches = list(computer.loader(ds, range(len(ds)), batch_size=16, workers=0))
        assert len(batches) == 1 and not batches[0][3]
        out[precision] = computer(batches[0][2])
        assert out[precision].dtype == np.float32
    a, b = out["bf16"], out["fp32"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.99, cos
    assert not np.array_equal(a, b)  # bf16 really ran: the features differ in the low bits


@pytest.mark.slow
def test_benchmark_script_runs_in_quick_mode(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "extract_speed.py"), "--quick", "--n", "40",
                           "--backbones", "efficientnet_lite0", "--rss", "40", "--workdir", str(tmp_path / "w"),
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| efficientnet_lite0 | 28 px JPEG |" in proc.stdout
    assert "3/1" in proc.stdout and "peak RSS" in proc.stdout and "points apart" in proc.stdout
    import json

    res = json.loads(out.read_text())
    row = res["rows"][0]
    assert row["naive_img_s"] > 0 and row["model_img_s"] > 0 and row["tlfx_img_s"] > 0
    assert row["ratio_3_1"] == pytest.approx(row["tlfx_img_s"] / row["naive_img_s"])
    assert res["rss"][0]["peak_rss_mb"] > 50
    assert 0 <= res["accuracy"]["acc"] <= 100
