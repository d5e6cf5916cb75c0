"""The example plugin's own tests: tlfx's contract checks, then the plugin's behaviour.

Run them with the package installed (``pip install -e .`` or ``pip install .``): the checks go through tlfx's
registry, so they test the entry point as well as the code.
"""

import numpy as np
import pytest
from click.testing import CliRunner
from tlfx_plugin_example import SHAPES, NearestClassMean, export_shapes, pca_logistic

import tlfx
from tlfx import extract
from tlfx.errors import TlfxError
from tlfx.testing import check_backbone, check_dataset, check_head, check_registration


def test_plugin_is_loaded_without_errors():
    rec = next((r for r in tlfx.get_plugin_manager().records if r.name == "example"), None)
    assert rec is not None, "the 'example' entry point is not installed; pip install -e examples/tlfx-plugin-example"
    assert rec.error is None
    for kind, name in (("backbone", "colour_hog"), ("head", "nearest_class_mean"), ("head", "pca_logistic"),
                       ("dataset", "shapes")):
        assert check_registration(kind, name).plugin == "example"


def test_backbone_contract():
    bb = check_backbone("colour_hog", weights=None, image_size=None)
    assert bb.weights.name == "none" and bb.classifier is None and bb.stages == []
    assert bb.module.dim == 208


def test_backbone_contract_at_another_size():
    check_backbone("colour_hog", weights=None, image_size=96)


@pytest.mark.parametrize("params", [{}, {"metric": "euclidean", "temperature": 0.3}])
def test_head_contract(params):
    check_head("nearest_class_mean", **params)
    check_head(NearestClassMean(**params))


@pytest.mark.parametrize("params", [{}, {"pca__n_components": 0.8, "logisticregression__C": 0.5}])
def test_pipeline_head_contract(params):
    """A Pipeline head: scikit-learn's checks, tlfx's own, and nested parameter names."""
    head = check_head("pca_logistic", **params)
    assert head.get_params()["pca__n_components"] == params.get("pca__n_components", 0.95)
    check_head(pca_logistic(**params))


def test_dataset_contract():
    for split in ("train", "test"):
        ds = check_dataset("shapes:3", split=split)
        assert len(ds) == 12 and ds.class_names == SHAPES
    check_dataset("shapes", limit=10)


def test_bad_input_is_one_clear_error():
    with pytest.raises(TlfxError, match="shapes:N with N >= 1"):
        tlfx.load_dataset("shapes:zero")
    with pytest.raises(TlfxError, match="has no weights"):
        tlfx.create_backbone("colour_hog", weights=__file__)
    with pytest.raises(ValueError, match="metric must be one of"):
        NearestClassMean(metric="manhattan").fit(np.eye(4), [0, 1, 0, 1])


def test_features_tell_the_shapes_apart(tmp_path):
    """End to end through tlfx's engine: extract both splits, fit the head, beat chance (25%) by far."""
    tr = extract("colour_hog", "shapes:25", str(tmp_path / "tr.h5"), split="train", workers=0)
    te = extract("colour_hog", "shapes:25", str(tmp_path / "te.h5"), split="test", workers=0)
    train, test = tlfx.FeatureStore(tr.path), tlfx.FeatureStore(te.path)
    assert train.features.shape == (100, 208) and train.class_names == SHAPES
    head = NearestClassMean().fit(train.features, train.labels)
    accuracy = float(np.mean(head.predict(test.features) == test.labels))
    assert accuracy >= 0.7, accuracy


def test_export_shapes_command_writes_an_image_folder(tmp_path):
    res = CliRunner().invoke(export_shapes, ["--out", str(tmp_path / "s"), "--per-class", "2", "--split", "test"])
    assert res.exit_code == 0, res.output
    assert "wrote 8 images" in res.output
    ds = check_dataset(f"imagefolder:{tmp_path / 's'}", split="test")
    assert ds.class_names == sorted(SHAPES) and len(ds) == 8
