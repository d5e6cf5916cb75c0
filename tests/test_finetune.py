"""Fine-tune plugin: the real pretrained efficientnet_lite0 trained for a few steps on real images (scikit-learn
digits at 32 px), checkpoint resume, the model file (safetensors, no code on load) read by load_model, predict
and the feature-store path, and bad options ending in one line with exit code 2."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

import tlfx
from tlfx.backbone import Backbone
from tlfx.datasets import FileDataset, load_dataset
from tlfx.errors import TlfxError
from tlfx.extraction import FeatureComputer
from tlfx.pipeline import collate
from tlfx.preprocess import Preprocess
from tlfx.weights import WeightsInfo
from tlfx_plugins.finetune import FinetuneModel
from tlfx_plugins.finetune_config import FinetuneConfig
from tlfx_plugins.finetune_train import (
    AugmentedImages,
    Schedule,
    build_network,
    eval_batches,
    finetune,
    load_checkpoint,
    param_groups,
)

# a few real optimisation steps: 96 training / 24 validation digits, 6 steps of 16 per epoch, last stage unfrozen
KW = dict(data="digits", limit=120, image_size=32, epochs=2, unfreeze="last:1", augment="none", batch_size=16,
          val_fraction=0.2, lr=3e-3, workers=0, patience=0, precision="fp32")


@pytest.fixture(scope="module")
def fresh_lite0():
    """A private efficientnet_lite0 (the session-wide ``lite0`` fixture must not be modified)."""
    return tlfx.create_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def ft(tmp_path_factory):
    """Fine-tune stopped after epoch 1 (as a kill would), then the same call again, which must resume."""
    d = tmp_path_factory.mktemp("finetune")
    out = str(d / "ft.tlfx")
    first = finetune(out, stop_after=1, **KW)
    existed_after_first = os.path.exists(out)
    ck1 = load_checkpoint(out + ".ckpt")
    model = finetune(out, **KW)
    return SimpleNamespace(out=out, first=first, existed_after_first=existed_after_first, ck1=ck1, model=model, dir=d)


def test_loss_falls_and_killed_run_resumes_after_last_finished_epoch(ft, fresh_lite0):
    assert ft.first is None and not ft.existed_after_first  # stopped mid-run: checkpoint only, no model yet
    assert ft.ck1["epoch"] == 1 and ft.ck1["schedule"]["step"] == 6
    h = ft.model.meta["history"]
    assert [r["epoch"] for r in h] == [1, 2]
    assert h[0] == ft.ck1["history"][0]  # epoch 1 was taken from the checkpoint, not trained again
    assert h[1]["train_loss"] < h[0]["train_loss"] * 0.9, h
    ck2 = torch.load(ft.out + ".ckpt", map_location="cpu", weights_only=True)  # no code, tensors + plain data
    assert ck2["epoch"] == 2 and ck2["schedule"] == {"kind": "onecycle", "step": 12, "total_steps": 12}
    # last:1 trains the last stage and the new layer only: the stem is exactly the pretrained one
    sd, ref = ft.model.state_dict, fresh_lite0.module.state_dict()
    assert torch.equal(sd["body.conv_stem.weight"], ref["conv_stem.weight"])
    assert torch.equal(sd["body.blocks.4.0.conv_pw.weight"], ref["blocks.4.0.conv_pw.weight"])
    assert not torch.equal(sd["body.blocks.6.0.conv_pw.weight"], ref["blocks.6.0.conv_pw.weight"])
    assert sd["body.classifier.weight"].shape == (10, 1280)


def test_resume_with_other_options_is_refused(ft):
    with pytest.raises(TlfxError, match=r"another configuration .*--lr: checkpoint 0.003 vs now 0.01.*--restart"):
        finetune(ft.out, **{**KW, "lr": 0.01})


def test_model_file_is_meta_plus_safetensors_and_records_the_run(ft):
    with zipfile.ZipFile(ft.out) as z:
        assert sorted(z.namelist()) == ["meta.json", "weights.safetensors"]
        meta = json.loads(z.read("meta.json"))
    assert meta["kind"] == "finetune" and meta["backbone"] == "efficientnet_lite0"
    assert meta["base_weights"]["sha256"] and len(meta["base_weights"]["sha256"]) == 64
    assert meta["image_size"] == 32 and meta["preprocess"]["crop"] == 32
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["unfreeze"] == "last:1" and meta["epochs"] == 2 and meta["n_train"] == 96 and meta["n_val"] == 24
    assert 0.0 <= meta["best_val_accuracy"] <= 1.0 and meta["train_seconds"] > 0 and meta["images_per_s"] > 0
    assert meta["config"]["layers"] == ["finetune"] and meta["config"]["backbone"] == "efficientnet_lite0"
    m = tlfx.load_model(ft.out)
    assert isinstance(m, FinetuneModel) and m.kind == "finetune"
    for k, v in ft.model.state_dict.items():
        assert torch.equal(m.state_dict[k], v), k


def _digit_pngs(directory, n=6):
    ds = load_dataset("digits", "test", limit=n)
    paths = []
    for i in range(n):
        p = os.path.join(directory, f"d{i}.png")
        ds.load(i).save(p)  # lossless: the same pixels as the in-memory dataset
        paths.append(p)
    return ds, paths


def test_predict_proba_images_matches_the_network_and_reports_bad_files(ft, tmp_path):
    ds, paths = _digit_pngs(tmp_path)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    m = tlfx.load_model(ft.out)
    proba, ok, skipped = m.predict_proba_images([paths[0], str(bad), *paths[1:]])
    assert ok == paths and [p for p, _ in skipped] == [str(bad)] and skipped[0][1]
    assert proba.shape == (6, 10) and np.allclose(proba.sum(1), 1.0, atol=1e-4)
    direct, idx, _ = m._run(ds, range(6), workers=0)
    assert idx == list(range(6)) and np.allclose(proba, direct, atol=1e-4)
    rows = tlfx.predict(ft.out, paths[:2], top_k=2)
    assert [r["path"] for r in rows] == paths[:2] and len(rows[0]["top"]) == 2
    assert rows[0]["top"][0]["class"] == str(int(proba[0].argmax()))


def test_predict_proba_store_reads_the_stores_images_in_row_order(ft, fashion_png_dir, tmp_path):
    m = tlfx.load_model(ft.out)
    # built-in dataset (ids are indices): rows follow the store, the same as running the network on the dataset
    st = tlfx.FeatureStore(tlfx.extract("efficientnet_lite0", "digits", str(tmp_path / "d.h5"), split="test",
                                        image_size=32, limit=30).path)
    proba = m.predict_proba_store(st)
    ds = load_dataset("digits", "test", limit=30)
    direct, idx, _ = m._run(ds, range(30), workers=0)
    order = [ds.ids.index(i) for i in st.ids]
    assert proba.shape == (30, 10) and np.allclose(proba, direct[order], atol=1e-4)
    # image folder (ids are relative paths under the recorded root): same as predicting the files themselves
    st2 = tlfx.FeatureStore(tlfx.extract("efficientnet_lite0", f"imagefolder:{fashion_png_dir}", str(tmp_path / "f.h5"),
                                         image_size=32).path)
    p2 = m.predict_proba_store(st2)
    files = [os.path.join(st2.attrs["data_root"], i) for i in st2.ids]
    p_files, ok, bad = m.predict_proba_images(files)
    assert not bad and ok == files and p2.shape == (len(st2), 10) and np.allclose(p2, p_files, atol=1e-4)


def test_evaluate_accepts_a_finetune_model(ft, tmp_path):
    st = tlfx.extract("efficientnet_lite0", "digits", str(tmp_path / "e.h5"), split="test", image_size=32, limit=30)
    rep = tlfx.evaluate(ft.out, st.path)
    assert rep["kind"] == "finetune" and 0.0 <= rep["accuracy"] <= 1.0
    m = tlfx.load_model(ft.out)  # used like a fitted estimator: a store, not a feature array (it reads images)
    assert m.score(st.path) == pytest.approx(rep["accuracy"]) and list(m.classes_) == list(range(10))
    with pytest.raises(TlfxError, match="predicts from images, not from a feature array"):
        m.predict(np.zeros((3, 1280), np.float32))


def test_cli_predict_runs_a_finetune_model(ft, tmp_path):
    _, paths = _digit_pngs(tmp_path, 3)
    proc = run_cli("predict", "--model", ft.out, *paths, "--format", "json", "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["path"] for r in rows] == paths and all(len(r["top"]) == 1 for r in rows)


def test_unfreeze_groups_and_discriminative_learning_rates(fresh_lite0):
    net = build_network(copy.deepcopy(fresh_lite0), 5, 32)
    trainable = lambda: {k for k, p in net.named_parameters() if p.requires_grad}  # noqa: E731
    groups = param_groups(net, fresh_lite0.stages, "head", 1e-3, 0.5, 0.01)
    assert trainable() == {"body.classifier.weight", "body.classifier.bias"} and {g["lr"] for g in groups} == {1e-3}
    param_groups(net, fresh_lite0.stages, "last:1", 1e-3, 0.5, 0.01)
    t = trainable()
    assert any(k.startswith("body.blocks.5.") for k in t) and "body.conv_head.weight" in t
    assert not any(k.startswith("body.blocks.4.") for k in t) and "body.conv_stem.weight" not in t
    groups = param_groups(net, fresh_lite0.stages, "all", 1e-3, 0.5, 0.01)
    assert len(trainable()) == len(list(net.parameters()))
    lrs = [g["lr"] for g in groups if g["weight_decay"] > 0]
    assert lrs == sorted(lrs) and lrs[-1] == 1e-3 and lrs[0] == pytest.approx(0.05e-3)  # earliest: the floor
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.ndim <= 1 for p in g["params"]))


def test_schedules_shape_and_resume_from_a_step_count():
    one = Schedule("onecycle", 100)
    f = [one.factor(s) for s in range(101)]
    assert f[0] == pytest.approx(1 / 25) and max(f) == pytest.approx(1.0) and f.index(max(f)) == 25 and f[100] < 1e-3
    cos = Schedule("cosine", 100)
    g = [cos.factor(s) for s in range(101)]
    assert g[0] == pytest.approx(0.1) and g[5] == pytest.approx(1.0) and g[100] == pytest.approx(0.0, abs=1e-9)
    assert Schedule("onecycle", 100, step=40).factor(40) == f[40]


def test_training_items_augment_and_skip_unreadable_files(tmp_path):
    ds_mem = load_dataset("digits", "train", limit=2)
    pre = Preprocess(37, 32, (0.5,) * 3, (0.5,) * 3, "bicubic")
    items = AugmentedImages(ds_mem, [0, 1], pre, ["flip", "crop", "scale", "rotate", "color", "erase"])
    i, x, reason = items[1]
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8 and i == 1 and not reason
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    fds = FileDataset("x", None, str(tmp_path), ["ok.png", "bad.jpg"], [0, 1], ["a", "b"])
    idx, good, arr, bad = collate([AugmentedImages(fds, [0, 1], pre, ["crop"])[k] for k in range(2)], pre)
    assert idx == [0, 1] and good == [0] and arr.shape == (1, 32, 32, 3) and arr.dtype == torch.uint8
    assert bad[0][0] == 1 and bad[0][1]


@pytest.mark.parametrize("interpolation,workers", [("bilinear", 0), ("bicubic", 0), ("bicubic", 1)])
def test_evaluation_batches_are_extractions_pixels(tmp_path, interpolation, workers):
    """The fine-tune's evaluation (validation, predict, evaluate) reads images as tlfx extract does: same uint8
    pixels batch for batch, whether an image takes the batched torch upscale or Pillow's box resize."""
    rng = np.random.default_rng(0)
    names = []
    for k, (w, h) in enumerate([(20, 30), (28, 28), (300, 200), (100, 120), (28, 28), (45, 40), (64, 64)]):
        names.append(f"i{k}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / names[-1])
    names.insert(3, "broken.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = FileDataset("x", None, str(tmp_path), names, [0] * len(names), ["a"])
    pre = Preprocess(46, 40, interpolation=interpolation)
    bb = Backbone("tiny", torch.nn.Conv2d(3, 4, 1), pre, WeightsInfo("none"))
    ext = list(FeatureComputer(bb, device="cpu", precision="fp32").loader(ds, range(len(ds)), 3, workers))
    ft = list(eval_batches(ds, np.arange(len(ds)), pre, 3, workers))
    assert len(ext) == len(ft) == 3
    for (i1, g1, a1, b1), (i2, g2, a2, b2) in zip(ext, ft):
        assert i1 == i2 and g1 == g2 and b1 == b2 and a1.dtype == a2.dtype == torch.uint8 and torch.equal(a1, a2)
    assert [i for _, _, _, b in ft for i, _ in b] == [3]


@pytest.mark.parametrize("change,message", [
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"unfreeze": "last:0"}, "unknown --unfreeze 'last:0'"),
    ({"unfreeze": "middle"}, "valid choices: all, head, last:N"),
    ({"augment": "flip,zoom"}, "unknown augmentation 'zoom'"),
    ({"val_fraction": 1.5}, "--val-fraction must be in"),
    ({"label_smoothing": 1.0}, "--label-smoothing must be in"),
    ({"lr": -1.0}, "--lr must be a positive number"),
    ({"optimizer": "adam"}, "unknown optimizer 'adam'"),
    ({"image_size": 8}, "--image-size must be between"),
])
def test_bad_options_are_refused_with_the_value_named(change, message):
    with pytest.raises(TlfxError, match=message.replace("(", r"\(")):
        FinetuneConfig(**{**KW, **change}).validate()


def test_cli_bad_value_is_one_line_exit_2(tmp_path):
    proc = run_cli("finetune", "--data", "digits", "--epochs", "1", "--unfreeze", "last:x", "--out", tmp_path / "m.tlfx")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: unknown --unfreeze 'last:x'; valid choices: all, head, last:N (N >= 1 stages)"
    helptext = run_cli("finetune", "--help").stdout
    assert "Examples:" in helptext and "tlfx finetune --data fashion-mnist" in helptext


@pytest.mark.slow
def test_cli_sigkill_after_first_checkpoint_then_same_command_resumes(tmp_path):
    out = tmp_path / "k.tlfx"
    args = ["finetune", "--data", "digits", "--limit", "120", "--image-size", "32", "--epochs", "3", "--unfreeze",
            "last:1", "--batch-size", "16", "--workers", "0", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "tlfx.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = str(out) + ".ckpt"
    deadline = time.time() + 600
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and os.path.exists(ckpt) and not out.exists()
    killed = load_checkpoint(ckpt)
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {ckpt}: {killed['epoch']} epoch(s) done" in again.stderr
    meta = tlfx.load_model(str(out)).meta
    assert meta["epochs"] == 3 and meta["history"][: killed["epoch"]] == killed["history"]


@pytest.mark.slow
def test_compare_adds_the_finetune_row(ft, tmp_path):
    from tlfx.compare import compare

    tr = tlfx.extract("efficientnet_lite0", "digits", str(tmp_path / "tr.h5"), split="train", image_size=32, limit=200)
    te = tlfx.extract("efficientnet_lite0", "digits", str(tmp_path / "te.h5"), split="test", image_size=32, limit=60)
    rep = compare(tr.path, te.path, "knn", str(tmp_path / "report"), finetune=[ft.out], learning_curve="none",
                  n_boot=20, gallery=0)
    row = next(r for r in rep["rows"] if r["kind"] == "finetune")
    assert row["timing"]["fit_seconds"] == pytest.approx(ft.model.meta["train_seconds"])
    assert 0.0 <= row["accuracy"] <= 1.0 and row["size_bytes"] > 1_000_000
