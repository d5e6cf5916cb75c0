"""The fast paths give the same features as the plain ones: worker processes vs in-process threads, batched torch
resize vs Pillow per image, box resize vs resize-then-crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fashion_test_split, needs_fashion
from PIL import Image

from tlfx.backbone import Preprocess
from tlfx.datasets import load_dataset
from tlfx.extraction import FeatureComputer, extract
from tlfx.images import _RESAMPLE, preprocess_image, resize_plan
from tlfx.pipeline import DecodedImages, collate
from tlfx.store import FeatureStore


def _resize_then_crop(img, pre):
    nw, nh, left, top = resize_plan(*img.size, pre)
    img = img.resize((nw, nh), _RESAMPLE[pre.interpolation], reducing_gap=3.0)
    return np.asarray(img.crop((left, top, left + pre.crop, top + pre.crop)))


@needs_fashion
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos", "nearest"])
def test_box_resize_gives_the_pixels_of_resize_then_crop(interpolation):
    ds = fashion_test_split()
    pre = Preprocess(256, 224, interpolation=interpolation)
    for k, (w, h) in enumerate([(28, 28), (300, 200), (1000, 750), (257, 513)]):
        img = Image.fromarray(ds.images[k], "L").convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
        got, want = preprocess_image(img, pre).astype(int), _resize_then_crop(img, pre).astype(int)
        assert got.shape == (224, 224, 3)
        assert np.abs(got - want).max() <= 2, (interpolation, w, h)


@needs_fashion
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_batched_torch_resize_matches_pillow_per_image(fashion_png_dir, interpolation):
    ds = load_dataset(f"imagefolder:{fashion_png_dir}", limit=60)
    pre = Preprocess(146, 128, interpolation=interpolation)
    items = [DecodedImages(ds, pre, batch_resize=True)[i] for i in range(len(ds))]
    small = sum(a.shape[:2] != (128, 128) for _, a, _ in items)
    assert small >= 20  # the 28 px and 50x40 files really take the batched path
    batched = collate(items, pre)[2].numpy().astype(int)
    plain = collate([DecodedImages(ds, pre, batch_resize=False)[i] for i in range(len(ds))], pre)[2].numpy().astype(int)
    diff = np.abs(batched - plain)
    assert diff.max() <= 2  # Pillow resamples only the crop's box; torch the whole image, then crops
    assert diff.mean() < 0.05


@needs_fashion
def test_worker_processes_and_in_process_threads_give_the_same_rows(tmp_path, lite0, fashion_png_dir):
    stores = {}
    for workers in (0, 1):
        res = extract(lite0, f"imagefolder:{fashion_png_dir}", str(tmp_path / f"w{workers}.h5"), image_size=64, limit=30,
                           batch_size=8, workers=workers)
        stores[workers] = FeatureStore(res.path)
    a, b = stores[0], stores[1]
    assert list(a.ids) == list(b.ids) and len(a.ids) == 30
    assert np.array_equal(np.asarray(a.labels), np.asarray(b.labels))
    np.testing.assert_allclose(np.asarray(a.features), np.asarray(b.features), rtol=1e-5, atol=1e-5)


def test_network_input_is_channels_last_and_normalised(lite0):
    computer = FeatureComputer(lite0, image_size=64, precision="fp32", device="cpu")
    seen = []
    handle = computer.model.module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        batch = torch.full((2, 64, 64, 3), 255, dtype=torch.uint8)
        batch[1] = 0
        feats = computer(batch)
    finally:
        handle.remove()
    x = seen[0]
    assert x.shape == (2, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    mean, std = np.array(computer.pre.mean), np.array(computer.pre.std)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), (1 - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(x[1, :, 0, 0].numpy(), -mean / std, rtol=1e-6)
    assert feats.dtype == np.float32 and feats.shape == (2, 1280)


@pytest.mark.slow
def test_compiled_network_gives_the_eager_features_and_pads_the_short_last_batch(lite0):
    eager = FeatureComputer(lite0, image_size=32, precision="fp32", device="cpu")
    compiled = FeatureComputer(lite0, image_size=32, precision="fp32", device="cpu", compile=True)
    rng = np.random.default_rng(0)
    full, short = (torch.from_numpy(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)) for n in (4, 3))
    for batch in (full, short):
        got, want = compiled(batch), eager(batch)
        assert got.shape == want.shape == (len(batch), 1280) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert compiled._compiled_batch == 4
