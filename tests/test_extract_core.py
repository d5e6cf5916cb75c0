"""Core extraction: real backbones, real data, real HDF5 files read back with plain h5py."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_imagenet_top5, cli_here, fashion_dir, needs_fashion, run_cli

import tlfx
from tlfx.errors import TlfxError
from tlfx.images import preprocess_image

DOCUMENTED_ATTRS = ["format_version", "tlfx_version", "backbone", "weights", "layers", "pooling", "image_size",
                    "preprocess", "class_names", "dataset", "dataset_fingerprint", "complete"]


def test_store_is_plain_hdf5_with_every_documented_field(digits_stores):
    train, _ = digits_stores
    with h5py.File(train, "r") as f:
        feats, labels, ids = f["features"], f["labels"], f["ids"]
        assert feats.dtype == np.float32 and feats.ndim == 2 and feats.shape == (600, 1280)
        assert feats.chunks is not None and feats.chunks[1] == 1280  # chunked by rows
        assert labels.dtype == np.int64 and labels.shape == (600,)
        assert h5py.check_string_dtype(ids.dtype).encoding == "utf-8"
        assert set(f["skipped"]) == {"ids", "reasons"}
        for key in DOCUMENTED_ATTRS:
            assert key in f.attrs, key
        assert bool(f.attrs["complete"]) is True
        assert json.loads(f.attrs["weights"])["sha256"]
        assert json.loads(f.attrs["class_names"]) == [str(i) for i in range(10)]
        assert json.loads(f.attrs["preprocess"])["crop"] == 64
        assert np.isfinite(feats[:50]).all() and feats[:50].std() > 0
        assert set(np.unique(labels[...])) == set(range(10))


def test_python_api_mirrors_cli(digits_stores):
    st = tlfx.FeatureStore(digits_stores[1])
    assert len(st) == 200 and st.features.shape == (200, 1280) and st.complete
    assert "efficientnet_lite0" in tlfx.list_backbones() and "digits" in tlfx.list_datasets()
    assert st.ids[:3] == [str(i) for i in tlfx.load_dataset("digits", "test").take(3).ids]


def test_default_weights_are_really_pretrained(lite0):
    """ImageNet photos shipped with scikit-image get their true class in the top 5."""
    assert_imagenet_top5(lite0)


@needs_fashion
def test_cli_extract_fashion_mnist_and_info(tmp_path):
    out = tmp_path / "t.h5"
    p = run_cli("extract", "--backbone", "efficientnet_lite0", "--data", "fashion-mnist", "--split", "test",
                "--limit", "120", "--image-size", "96", "--out", out, "--quiet")
    assert p.returncode == 0, p.stderr
    assert "extracted 120 images x 1280" in p.stdout and str(out) in p.stdout
    info = run_cli("info", out)
    assert info.returncode == 0
    for text in ("complete: 120 rows x 1280", "efficientnet_lite0", "fashion-mnist split test", "Ankle boot"):
        assert text in info.stdout
    with h5py.File(out) as f:
        assert f["labels"][:5].tolist() == [9, 2, 1, 1, 6]  # the first Fashion-MNIST test labels


@needs_fashion
def test_fashion_mnist_search_path_from_the_environment(tmp_path, monkeypatch):
    from tlfx.datasets import load_dataset

    moved = tmp_path / "idx"
    moved.mkdir()
    found = fashion_dir()
    for name in os.listdir(found):
        if name.startswith("t10k-"):  # the test split's images and labels, .gz or not
            os.symlink(os.path.join(found, name), moved / name)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("TLFX_FASHION_MNIST_DIRS", f"{empty}{os.pathsep}{moved}")
    ds = load_dataset("fashion-mnist", split="test", limit=5)
    assert ds.labels[:5].tolist() == [9, 2, 1, 1, 6]
    monkeypatch.setenv("TLFX_FASHION_MNIST_DIRS", str(empty))
    with pytest.raises(TlfxError, match=f"not found in {empty}; apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", split="test", limit=5)


@pytest.mark.slow
@needs_fashion
def test_cli_extract_fashion_mnist_2000_as_in_the_issue(tmp_path):
    out = tmp_path / "t.h5"
    p = run_cli("extract", "--backbone", "efficientnet_lite0", "--data", "fashion-mnist", "--split", "test",
                "--limit", "2000", "--out", out, "--quiet")
    assert p.returncode == 0, p.stderr
    with h5py.File(out) as f:
        assert f["features"].shape == (2000, 1280) and f.attrs["image_size"] == 224


def test_imagefolder_of_real_png_and_jpeg_mixed_sizes_and_modes(fashion_png_dir, tmp_path):
    res = tlfx.extract("efficientnet_lite0", f"imagefolder:{fashion_png_dir}", str(tmp_path / "f.h5"), image_size=64)
    st = tlfx.FeatureStore(res.path)
    assert len(st) == 60 and res.skipped == 0
    assert st.class_names == sorted(os.listdir(fashion_png_dir))
    assert {os.path.splitext(i)[1] for i in st.ids} == {".png", ".jpg"}
    assert all(not os.path.isabs(i) and os.path.isfile(fashion_png_dir / i) for i in st.ids)
    # the same image as PNG and JPEG lands close in feature space: the pipeline decodes both correctly
    feats = st.features
    assert np.isfinite(feats).all()


def test_layers_multi_named_and_max_pooling(tmp_path):
    multi = tlfx.extract("efficientnet_lite0", "digits", str(tmp_path / "m.h5"), split="test", limit=40,
                         image_size=64, layers="multi")
    assert multi.dim == 40 + 112 + 320 + 1280
    named = tlfx.extract("efficientnet_lite0", "digits", str(tmp_path / "n.h5"), split="test", limit=40,
                         image_size=64, layers="blocks.4,blocks.6", pooling="max")
    st = tlfx.FeatureStore(named.path)
    assert st.features.shape == (40, 112 + 320) and st.attrs["layers"] == ["blocks.4", "blocks.6"]
    assert st.attrs["pooling"] == "max"


def test_csv_dataset_with_splits(fashion_png_dir, tmp_path):
    rows = []
    for i, path in enumerate(sorted(fashion_png_dir.rglob("*.*"))):
        rows.append(f"{path},{path.parent.name},{'test' if i % 4 == 0 else 'train'}")
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    ds = tlfx.load_dataset(f"csv:{csv_file}", split="test")
    assert len(ds) == 15 and len(ds.class_names) == 10
    res = tlfx.extract("efficientnet_lite0", f"csv:{csv_file}", str(tmp_path / "c.h5"), split="test", image_size=64)
    assert res.n == 15


def test_torchvision_offline_message_names_file_and_directory(tmp_path):
    p = cli_here("extract", "--backbone", "vgg16", "--data", "digits", "--out", tmp_path / "v.h5",
                env={"TORCH_HOME": str(tmp_path / "torch"), "TLFX_OFFLINE": "1"})
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert "vgg16-397923af.pth" in lines[0] and str(tmp_path / "torch" / "hub" / "checkpoints") in lines[0]


def _write_hub_checkpoint(arch, torch_home):
    import torchvision

    from tlfx_plugins.torchvision_backbones import default_weights

    ckpt = torch_home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    path = ckpt / os.path.basename(default_weights(arch).url)
    torch.save(model.state_dict(), path)
    return model, path


def test_torchvision_weights_api_loads_from_hub_cache(tmp_path):
    model, path = _write_hub_checkpoint("resnet18", tmp_path / "torch")
    p = cli_here("extract", "--backbone", "resnet18", "--data", "digits", "--split", "test", "--limit", "16",
                "--image-size", "64", "--out", tmp_path / "r.h5", "--quiet", env={"TORCH_HOME": str(tmp_path / "torch")})
    assert p.returncode == 0, p.stderr
    st = tlfx.FeatureStore(str(tmp_path / "r.h5"))
    assert st.attrs["weights"]["name"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert st.attrs["weights"]["path"] == str(path) and st.features.shape == (16, 512)
    assert st.attrs["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    # the features are those of the checkpoint we placed: compare with the model run by hand
    ds = tlfx.load_dataset("digits", "test", limit=16)
    from tlfx.backbone import Preprocess

    pre = Preprocess(**{**st.attrs["preprocess"], "mean": tuple(st.attrs["preprocess"]["mean"]),
                        "std": tuple(st.attrs["preprocess"]["std"])})
    x = torch.from_numpy(np.stack([preprocess_image(ds.load(i), pre) for i in range(4)])).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    model.eval().fc = torch.nn.Identity()
    with torch.inference_mode():
        ref = model(x).numpy()
    got = st.features[:4]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.99  # bf16 autocast vs fp32 reference


def test_local_weights_file_for_torchvision_and_timm(tmp_path):
    import timm
    import torchvision

    sd_path = tmp_path / "mnv3.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), sd_path)
    bb = tlfx.create_backbone("mobilenet_v3_small", weights=str(sd_path))
    assert bb.weights.sha256 and bb.classifier == "classifier.3"
    tpath = tmp_path / "timm.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), tpath)
    res = tlfx.extract("timm:resnet10t", "digits", str(tmp_path / "t.h5"), split="test", limit=8, weights=str(tpath),
                       image_size=64)
    assert res.dim == 512 and tlfx.FeatureStore(res.path).attrs["backbone"] == "timm:resnet10t"


@pytest.mark.slow
def test_vgg16_runs_from_hub_cache_checkpoint(tmp_path):
    _write_hub_checkpoint("vgg16", tmp_path / "torch")
    p = cli_here("extract", "--backbone", "vgg16", "--data", "digits", "--split", "test", "--limit", "8",
                "--image-size", "64", "--out", tmp_path / "v.h5", "--quiet", env={"TORCH_HOME": str(tmp_path / "torch")})
    assert p.returncode == 0, p.stderr
    assert tlfx.FeatureStore(str(tmp_path / "v.h5")).features.shape == (8, 4096)


def test_torchvision_stages_cover_every_listed_architecture():
    from tlfx_plugins.torchvision_backbones import ARCHS, build

    for arch in ARCHS:
        bb = build(arch, weights="none")
        assert len(bb.stages) >= 3, arch
        layers = bb.resolve_layers("multi")
        assert layers[-1] == "penultimate" and len(layers) == 4


def test_tlfx_lists(tmp_path):
    p = run_cli("backbones", env={"TLFX_OFFLINE": "1"})
    assert p.returncode == 0 and "efficientnet_lite0" in p.stdout and "offline" in p.stdout
    assert "vgg16" in p.stdout and "missing" in p.stdout
    assert "fashion-mnist" in cli_here("datasets").stdout
    plugins = cli_here("plugins").stdout
    assert "torchvision" in plugins and "efficientnet_lite" in plugins
