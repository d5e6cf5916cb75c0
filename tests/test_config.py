"""The one feature-configuration record and the one extraction-options record (issue #15)."""

from __future__ import annotations

import h5py
import pytest

from tlfx.config import COMPARED, ExtractOptions, FeatureConfig
from tlfx.errors import TlfxError
from tlfx.models import check_config


def _config(**over):
    base = {"backbone": "efficientnet_lite0", "weights": {"name": "w", "sha256": "ab" * 32, "path": "/a/w.pth"},
            "layers": ["penultimate"], "pooling": "avg", "image_size": 64,
            "preprocess": {"resize": 73, "crop": 64, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]},
            "precision": "bf16"}
    return {**base, **over}


def test_diff_names_each_field_that_differs_and_ignores_where_weights_lie():
    a = FeatureConfig.from_dict(_config())
    assert a.diff(FeatureConfig.from_dict(_config(weights={"name": "w", "sha256": "ab" * 32, "path": "/b/w.pth"}))) == []
    assert a.diff(FeatureConfig.from_dict(_config(precision="fp32"))) == []  # recorded, not compared
    d = a.diff(FeatureConfig.from_dict(_config(image_size=96, layers=("penultimate", "blocks.5"))))
    assert [x.split(":")[0] for x in d] == ["layers", "image_size"]
    assert d[1] == "image_size: model 64 vs store 96"
    other_weights = FeatureConfig.from_dict(_config(weights={"name": "w", "sha256": "cd" * 32}))
    assert a.diff(other_weights)[0].startswith("weights: model w (sha256 abababababab) vs store w (sha256 cdcdcdcdcdcd)")
    assert a.diff(FeatureConfig.from_dict(_config(precision="fp32")), keys=(*COMPARED, "precision")) == [
        "precision: model bf16 vs store fp32"]


def test_store_attributes_and_model_records_round_trip(digits_stores):
    with h5py.File(digits_stores[0]) as f:
        from tlfx.store import FeatureStore

        cfg = FeatureConfig.from_dict(FeatureStore(digits_stores[0]).config)
        assert f.attrs["backbone"] == cfg.backbone == "efficientnet_lite0"
    again = FeatureConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.diff(cfg) == []
    check_config(cfg.to_dict(), FeatureStore(digits_stores[1]).config, "test store")  # same backbone: no error
    with pytest.raises(TlfxError, match="image_size: model 64 vs 96"):
        check_config(cfg.to_dict(), {**cfg.to_dict(), "image_size": 96}, "store 'x.h5'")


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "float64", "unknown dtype 'float64'"),
    ("pooling", "median", "unknown pooling 'median'"),
    ("batch_size", 0, "--batch-size must be at least 1"),
    ("image_size", 8, "--image-size must be 16 to 2048"),
    ("part_size", 0, "--part-size must be at least 1"),
    ("workers", -1, "--workers must be 0 or more"),
])
def test_extract_options_refuse_bad_values_in_one_line(field, value, message):
    with pytest.raises(TlfxError, match=message):
        ExtractOptions(**{field: value}).validate()


def test_python_api_and_ray_engine_take_the_same_options(tmp_path):
    import tlfx
    from tlfx.engines.ray_engine import extract_ray

    with pytest.raises(TlfxError, match="--image-size must be 16 to 2048"):
        tlfx.extract("efficientnet_lite0", "digits", str(tmp_path / "a.h5"), image_size=4096)
    with pytest.raises(TypeError):
        tlfx.extract("efficientnet_lite0", "digits", str(tmp_path / "a.h5"), image_sise=64)
    with pytest.raises(TlfxError, match="--batch-size must be at least 1"):
        extract_ray("efficientnet_lite0", "digits", str(tmp_path / "b.h5"), batch_size=0)
    assert not any(tmp_path.iterdir())
