"""Every first-party plugin passes tlfx.testing's contract checks, and the checks catch real contract violations.

Parametrised at collection time from the registries, so a newly registered backbone, head or dataset is checked
without editing this file (backbones and datasets not listed below are checked in the slow run, or must be added).
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from conftest import assert_imagenet_top5, needs_fashion
from PIL import Image
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted
from torch import nn

from tlfx.backbone import Backbone, Preprocess, WeightsInfo, create_backbone
from tlfx.datasets import ArrayDataset
from tlfx.heads import list_heads
from tlfx.plugins import get_plugin_manager
from tlfx.testing import check_backbone, check_dataset, check_head, check_registration


def first_party(kind: str) -> list:
    """Entries of ``kind`` registered by tlfx's own plugins (tlfx.plugins.DEFAULT_PLUGINS)."""
    pm = get_plugin_manager()
    ours = {r.name for r in pm.records if r.first_party}
    return [e for e in pm.registry(kind).entries() if e.plugin in ours]


# ------------------------------------------------------------------------------------------------ backbones

FAST_BACKBONES = {"resnet18", "pixels", "pixels_grey", "timm:resnet18"}  # + efficientnet_lite0, real weights
ARGUMENT_EXAMPLES = {"timm": "timm:resnet18", "torchvision": "torchvision:mobilenet_v3_small"}


def backbone_cases():
    cases = []
    for e in first_party("backbone"):
        if e.name == "efficientnet_lite0":
            continue  # test_efficientnet_lite0_with_real_weights
        name = ARGUMENT_EXAMPLES.get(e.name, e.name) if e.meta.get("takes_argument") else e.name
        marks = [] if name in FAST_BACKBONES else [pytest.mark.slow]
        if e.name == "hf-hub":  # the architecture itself comes from the hub repo's config.json
            marks.append(pytest.mark.skip(reason="hf-hub:<org>/<repo> reads its architecture from a hub repo; its "
                                                 "download path is the timm one that tests/test_weights.py serves"))
        cases.append(pytest.param(name, marks=marks, id=name))
    return cases


def test_efficientnet_lite0_with_real_weights(lite0):
    check_registration("backbone", "efficientnet_lite0")
    bb = check_backbone(lite0, image_size=64)
    assert len(bb.weights.sha256) == 64 and os.path.isfile(bb.weights.path)  # the real ImageNet weights


@pytest.mark.parametrize("name", backbone_cases())
def test_backbone_contract(name):
    """Random initialisation (weights="none"): no weights file needed, the architecture's contract is the same."""
    check_backbone(name, weights="none", image_size=64)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [1, 2])
def test_efficientnet_lite_larger_with_their_weights(variant):
    name = f"efficientnet_lite{variant}"
    ok, where = get_plugin_manager().registry("backbone").get(name).meta["weights_available"]()
    if not ok:
        pytest.skip(f"{name} weights not installed: {where}")
    check_backbone(name, weights=None, image_size=64)
    assert_imagenet_top5(create_backbone(name))


# ---------------------------------------------------------------------------------------------------- heads

# Contract violations found by these checks, reported to the heads' owner; strict, so a fix shows up as XPASS
# (then delete the entry).
KNOWN_HEAD_VIOLATIONS: dict[str, str] = {}


def head_cases():
    return [pytest.param(h, id=h, marks=[pytest.mark.xfail(reason=KNOWN_HEAD_VIOLATIONS[h], strict=True,
                                                            raises=AssertionError)]
                         if h in KNOWN_HEAD_VIOLATIONS else [])
            for h in list_heads()]


@pytest.mark.parametrize("name", head_cases())
def test_head_contract(name):
    check_registration("head", name)
    check_head(name, sklearn_checks=False)  # scikit-learn's checks: tests/test_sklearn_checks.py, one test per check


# ------------------------------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """A real image folder with train/test splits and the files uncurated folders hold: PNG, JPEG, grey, RGBA,
    palette, odd sizes; plus a CSV (path,label,split with a header) over the same files."""
    root = tmp_path_factory.mktemp("imgtree")
    rng = np.random.default_rng(0)
    rows = []
    for split in ("train", "test"):
        for cls in ("cat", "dog", "fish"):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(3):
                a = rng.integers(0, 256, (20 + 7 * k, 31 - 5 * k, 3), dtype=np.uint8)
                img = Image.fromarray(a, "RGB")
                name = f"{cls}{k}"
                if k == 0:
                    img.save(d / f"{name}.jpg", quality=90)
                    fn = f"{name}.jpg"
                elif k == 1:
                    img.convert("L").save(d / f"{name}.png")
                    fn = f"{name}.png"
                else:
                    img.convert("RGBA").save(d / f"{name}.png")
                    fn = f"{name}.png"
                rows.append((f"{split}/{cls}/{fn}", cls, split))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return root


def dataset_cases():
    """(spec, check_dataset kwargs, expected length or None)."""
    return [
        pytest.param("digits", {"split": "train"}, 1347, id="digits-train"),
        pytest.param("digits", {"split": "test"}, 450, id="digits-test"),
        pytest.param("fashion-mnist", {"split": "test"}, 10000, id="fashion-mnist-test", marks=needs_fashion),
        pytest.param("imagefolder:{tree}", {"split": "train"}, 9, id="imagefolder-train"),
        pytest.param("imagefolder:{tree}/test", {}, 9, id="imagefolder-nosplit"),
        pytest.param("csv:{tree}/labels.csv", {"split": "test"}, 9, id="csv-test"),
        pytest.param("csv:{tree}/labels.csv", {}, 18, id="csv-all"),
        pytest.param("cifar10", {"split": "test"}, 10000, id="cifar10-test", marks=pytest.mark.skipif(
            not os.path.isdir(os.path.expanduser("~/.cache/tlfx/cifar10/cifar-10-batches-py")),
            reason="CIFAR-10 not present in ~/.cache/tlfx/cifar10 (never downloaded at test time)")),
    ]


@pytest.mark.parametrize(("spec", "kwargs", "length"), dataset_cases())
def test_dataset_contract(spec, kwargs, length, image_tree):
    spec = spec.format(tree=image_tree)
    check_registration("dataset", spec.partition(":")[0])
    ds = check_dataset(spec, **kwargs)
    assert len(ds) == length
    if str(image_tree) in spec:
        assert ds.class_names == ["cat", "dog", "fish"]


def test_every_first_party_dataset_has_a_contract_case():
    covered = {p.values[0].partition(":")[0] for p in dataset_cases()}
    missing = sorted(e.name for e in first_party("dataset") if e.name not in covered)
    assert not missing, f"add a case to dataset_cases() for {missing}"


def test_every_first_party_registration():
    for kind in ("backbone", "head", "dataset"):
        entries = first_party(kind)
        assert entries, f"no first-party {kind}"
        for e in entries:
            check_registration(kind, e.name)


# ------------------------------------------------------------------- the checks catch contract violations


def _backbone(module, **kw):
    args = {"name": "broken", "module": module, "preprocess": Preprocess(16, 16), "weights": WeightsInfo("none")}
    return Backbone(**{**args, **kw})


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _mean_pool(x):
    return x.mean((2, 3))


@pytest.mark.parametrize(("bb", "message"), [
    (_backbone(_Lambda(lambda x: nn.functional.dropout(x.flatten(1), 0.5, training=True))), "differ between two runs"),
    (_backbone(_Lambda(lambda x: x.mean((2, 3)) - x.mean((0, 2, 3)))), "depend on the other images in its batch"),
    (_backbone(_Lambda(lambda x: x.mean((2, 3)) / 0.0)), "NaN or inf"),
    (_backbone(_Lambda(lambda x: torch.ones(len(x), 4))), "the same for every image"),
    (_backbone(_Lambda(_mean_pool), preprocess=Preprocess(16, 16, mean=(124.0, 117.0, 104.0))), "mean must be 3 numbers"),
    (_backbone(_Lambda(_mean_pool), preprocess=Preprocess(16, 24)), "resize (16) must be >= crop (24)"),
    (_backbone(_Lambda(_mean_pool), preprocess=Preprocess(16, 16, interpolation="area")), "interpolation 'area'"),
    (_backbone(_Lambda(_mean_pool), weights=WeightsInfo("mine", sha256="abc")), "sha256 must be"),
    (_backbone(_Lambda(_mean_pool), stages=["layer9"]), "stages ['layer9'] are not modules"),
    (_backbone(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)), classifier="fc"), "classifier 'fc' is not a module"),
])
def test_check_backbone_catches(bb, message):
    with pytest.raises(AssertionError, match=f"backbone 'broken': .*{_re(message)}"):
        check_backbone(bb, image_size=None)


def test_check_backbone_refuses_a_factory_returning_a_bare_module():
    with pytest.raises(AssertionError, match="returned Sequential, expected tlfx.backbone.Backbone"):
        check_backbone(lambda weights=None: nn.Sequential(nn.Flatten()))


class _Scores(ClassifierMixin, BaseEstimator):
    """A deliberately broken head: raw scores as probabilities, or 0..K-1 instead of the labels as classes_."""

    def __init__(self, mistake="scores"):
        self.mistake = mistake

    def fit(self, X, y):
        self.lr_ = LogisticRegression().fit(X, y)
        self.classes_ = np.arange(len(self.lr_.classes_)) if self.mistake == "classes" else self.lr_.classes_
        return self

    def predict(self, X):
        check_is_fitted(self)
        return self.lr_.predict(X)

    def predict_proba(self, X):
        check_is_fitted(self)
        if self.mistake == "scores":
            return self.lr_.decision_function(X)
        if self.mistake == "order":
            return self.lr_.predict_proba(X)[:, ::-1]
        return self.lr_.predict_proba(X)


class _NoProba(BaseEstimator):
    def fit(self, X, y):
        return self

    def predict(self, X):
        return np.zeros(len(X))


class _Mutates(_Scores):
    def __init__(self, mistake="none"):
        self.mistake = mistake.upper()  # clone() requires parameters stored unchanged


@pytest.mark.parametrize(("head", "message"), [
    (_Scores("scores"), "probabilities in \\[0, 1\\]"),
    (_Scores("classes"), "classes_ must be the sorted distinct labels"),
    (_Scores("order"), "predict disagrees with the argmax of predict_proba"),
    (_NoProba(), "has no predict_proba"),
])
def test_check_head_catches(head, message):
    """tlfx's own checks (scikit-learn's are left out here, to see these fire)."""
    with pytest.raises(AssertionError, match=message):
        check_head(head, sklearn_checks=False)


class _BatchDependent(_Scores):
    def predict_proba(self, X):  # normalised over the batch: a row's answer depends on its neighbours
        p = self.lr_.predict_proba(X) + np.abs(np.asarray(X, dtype=np.float64)).mean()
        return p / p.sum(1, keepdims=True)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(1)]


def test_check_head_catches_batch_dependence():
    with pytest.raises(AssertionError, match="changes with the other rows of its batch"):
        check_head(_BatchDependent("none"), sklearn_checks=False)


class _RawScores(LogisticRegression):
    def predict_proba(self, X):  # decision values, not probabilities
        return self.decision_function(X)


@pytest.mark.parametrize(("head", "check"), [
    (_Mutates("none"), "check_estimator_cloneable"),
    (_RawScores(), "check_classifiers_train"),
])
def test_check_head_delegates_to_sklearn_and_names_the_check(head, check):
    with pytest.raises(AssertionError, match=f"scikit-learn's ({check}) fails"):
        check_head(head)


def test_check_head_catches_an_unfitted_predict_without_notfittederror():
    class Sloppy(_Scores):
        def predict(self, X):
            return self.classes_[np.zeros(len(X), int)]  # looks classes_ up before any fitted check

    with pytest.raises(AssertionError, match="scikit-learn's check_estimators_unfitted fails"):
        check_head(Sloppy("none"))


class _UnfittedAttributeError(LogisticRegression):
    def predict(self, X):  # classes_ is looked up before predict_proba's fitted check
        return self.classes_[self.predict_proba(X).argmax(1)]


def test_check_head_expected_failed_is_passed_to_sklearn():
    """A documented exclusion lets a head that cannot meet one scikit-learn check pass the rest."""
    with pytest.raises(AssertionError, match="check_estimators_unfitted"):
        check_head(_UnfittedAttributeError())
    check_head(_UnfittedAttributeError(), expected_failed={"check_estimators_unfitted": "demonstration"})


def _ds(images=None, labels=(0, 1, 0, 1), names=("a", "b")):
    images = np.zeros((4, 8, 8, 3), np.uint8) if images is None else images
    return ArrayDataset("toy", "train", images, labels, names)


def test_check_dataset_accepts_a_good_one():
    ds = check_dataset(_ds(np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)))
    assert len(ds) == 4


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: setattr(d, "ids", ["0", "1", "1", "3"]), "ids are not unique: '1'"),
    (lambda d: setattr(d, "ids", [0, 1, 2, 3]), "every id must be a non-empty str"),
    (lambda d: setattr(d, "labels", d.labels.astype(np.float32)), "labels must be an int64 numpy vector"),
    (lambda d: setattr(d, "labels", np.array([0, 1, 2, 1])), "labels must be -1 .*or 0..1"),
    (lambda d: setattr(d, "class_names", ["a", "a"]), "class_names are not unique"),
    (lambda d: setattr(d, "load", lambda i, target=None: Image.new("L", (8, 8))), "returned a L image; convert to RGB"),
    (lambda d: setattr(d, "load", lambda i, target=None: np.zeros((8, 8, 3))), "expected a PIL image"),
    (lambda d: setattr(d, "load", lambda i, target=None: Image.effect_noise((8, 8), 50).convert("RGB")),
     "different pixels on two calls"),
])
def test_check_dataset_catches(mutate, message):
    ds = _ds()
    mutate(ds)
    with pytest.raises(AssertionError, match=f"dataset 'toy': .*{message}"):
        check_dataset(ds)


def test_check_dataset_catches_an_unstable_order():
    rng = np.random.default_rng()

    def shuffled(arg, split=None, root=None):
        order = rng.permutation(6)
        return ArrayDataset("shuffled", split, np.zeros((6, 4, 4, 3), np.uint8), order % 2, ["a", "b"], index=order)

    with pytest.raises(AssertionError, match="loading it again gives other ids or another order"):
        check_dataset(shuffled)


def _re(text: str) -> str:
    import re

    return re.escape(text)
