"""Contract checks for tlfx plugins, in the spirit of scikit-learn's ``check_estimator``.

A plugin author calls them from their own tests; tlfx runs them over every first-party plugin::

    from tlfx.testing import check_backbone, check_dataset, check_head

    def test_contracts():
        check_backbone("colour_hog")          # a registered name, a factory, or a Backbone
        check_head("nearest_class_mean")      # a registered name, an estimator, or an estimator class
        check_dataset("shapes:5")             # a data spec, a factory, or an ImageDataset

Each check raises :class:`AssertionError` whose message names the plugin, what is wrong and what tlfx expects,
and returns the object it checked (the built backbone, the fitted head, the loaded dataset) for further tests.
The checks use tiny inputs, so they take seconds on a CPU (a large backbone takes as long as one small batch).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

__all__ = ["check_backbone", "check_head", "check_dataset", "check_registration", "PIPELINE_EXPECTED_FAILED"]

# scikit-learn's own Pipeline fails these two checks (it fits its steps in place), so a Pipeline head is expected to
PIPELINE_EXPECTED_FAILED = {
    "check_estimators_overwrite_params": "a scikit-learn Pipeline fits its steps in place (Pipeline itself fails it)",
    "check_dont_overwrite_parameters": "a scikit-learn Pipeline fits its steps in place (Pipeline itself fails it)",
}

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _fail(what: str, message: str):
    raise AssertionError(f"{what}: {message}")


def _check(cond, what: str, message: str):
    if not cond:
        _fail(what, message)


def _json(obj, what: str, label: str):
    try:
        return json.dumps(obj, sort_keys=True)
    except (TypeError, ValueError) as exc:
        _fail(what, f"{label} is not JSON-serialisable ({exc}); stores and models record it as JSON")


# ------------------------------------------------------------------------------------------------ registration


def check_registration(kind: str, name: str):
    """Check how ``name`` is registered as a ``kind`` ('backbone', 'head', 'dataset'), without building it.

    A description for ``tlfx <kind>s``; for a backbone, ``weights_available`` (if given) returns ``(bool, message)``;
    for a head, ``param_grid`` (if given) maps parameter names to non-empty lists; for a dataset, ``splits``
    (if given) is a tuple of names. Returns the registry :class:`~tlfx.plugins.Entry`.
    """
    from .plugins import registry

    entry = registry(kind).get(name)
    what = f"{kind} {name!r} (plugin {entry.plugin!r})"
    _check(isinstance(entry.description, str) and entry.description.strip(), what,
           f"register it with description=... (tlfx {kind}s shows it)")
    meta = entry.meta
    if kind == "backbone" and meta.get("weights_available") is not None:
        check = meta["weights_available"]
        _check(callable(check), what, "weights_available must be a function returning (bool, message)")
        res = check()
        _check(isinstance(res, tuple) and len(res) == 2 and isinstance(res[0], bool) and isinstance(res[1], str),
               what, f"weights_available() must return (bool, message), got {res!r}")
    if kind == "head" and meta.get("param_grid") is not None:
        grid = meta["param_grid"]
        _check(isinstance(grid, dict) and all(isinstance(k, str) for k in grid), what,
               f"param_grid must be a dict of parameter name -> list of values, got {grid!r}")
        for key, values in grid.items():
            _check(isinstance(values, (list, tuple)) and len(values) > 0, what, f"param_grid[{key!r}] must be a non-empty list")
    if kind == "dataset" and meta.get("splits") is not None:
        splits = meta["splits"]
        _check(isinstance(splits, (list, tuple)) and all(isinstance(x, str) for x in splits), what,
               f"splits must be a tuple of names, got {splits!r}")
    return entry


# --------------------------------------------------------------------------------------------------- backbones


def _test_images(size: int, seed: int = 0):
    """Four PIL images of different sizes and content: noise, a gradient, flat grey, black with a white square."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, (size + 7, size + 21, 3), dtype=np.uint8), "RGB")
    ramp = np.linspace(0, 255, size * 2, dtype=np.float64)
    gradient = Image.fromarray(np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[::-1], (size, 1)),
                                         np.full((size, size * 2), 90.0)], -1).astype(np.uint8), "RGB")
    grey = Image.new("RGB", (max(3, size // 3), max(5, size // 2)), (128, 128, 128))
    square = np.zeros((size, size, 3), np.uint8)
    square[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return [noise, gradient, grey, Image.fromarray(square, "RGB")]


def check_backbone(backbone, *, weights: str | None = "none", image_size: int | None = 64, **options):
    """Check a backbone plugin against the contract tlfx relies on; returns the built :class:`~tlfx.backbone.Backbone`.

    ``backbone``: a registered name (built with :func:`tlfx.create_backbone`), a factory
    ``factory(weights=None, **options)``, or a built ``Backbone``. ``weights``: passed to the factory
    (``"none"``: random initialisation, so no weights file is needed; ``None``: the default pretrained weights).
    ``image_size``: the input size the features are checked at (small keeps the check fast; ``None`` for the
    backbone's own size).

    Checked: a torch module; sane preprocessing (sizes, mean/std, interpolation, odd-sized images crop to
    ``crop x crop``); a weights record; stages and classifier that name real modules; ``config()`` JSON-serialisable
    and stable; features ``[N, D]`` finite, varying with the image, of one dimension ``D`` whatever the batch, the
    same for an image alone or in a batch and from run to run (eval mode, deterministic), for layers
    ``penultimate`` and, where the backbone has stages, ``multi`` (larger than ``penultimate``).
    """
    import torch
    from torch import nn

    from .backbone import Backbone, Preprocess, WeightsInfo, create_backbone
    from .extraction import FeatureComputer
    from .images import _RESAMPLE, preprocess_image

    if isinstance(backbone, str):
        what = f"backbone {backbone!r}"
        check_registration("backbone", backbone.split(":", 1)[0])
        bb = create_backbone(backbone, weights=weights, **options)
    elif isinstance(backbone, Backbone):
        what, bb = f"backbone {backbone.name!r}", backbone
    elif callable(backbone):
        what = f"backbone factory {getattr(backbone, '__name__', backbone)!r}"
        bb = backbone(weights=weights, **options)
    else:
        raise TypeError(f"check_backbone takes a name, a factory or a Backbone, not {type(backbone).__name__}")

    _check(isinstance(bb, Backbone), what, f"the factory returned {type(bb).__name__}, expected tlfx.backbone.Backbone")
    what = f"backbone {bb.name!r}" if isinstance(bb.name, str) and bb.name else what
    _check(isinstance(bb.name, str) and bb.name, what, "Backbone.name must be a non-empty str")
    _check(isinstance(bb.module, nn.Module), what, f"Backbone.module must be a torch.nn.Module, got {type(bb.module).__name__}")
    bb.module.eval()  # what create_backbone does; factories handed in directly are frozen here the same way
    for p in bb.module.parameters():
        p.requires_grad_(False)

    # preprocessing
    pre = bb.preprocess
    _check(isinstance(pre, Preprocess), what, f"Backbone.preprocess must be a tlfx.backbone.Preprocess, got {type(pre).__name__}")
    _check(isinstance(pre.crop, int) and isinstance(pre.resize, int) and pre.crop >= 8, what,
           f"preprocess sizes must be ints with crop >= 8, got resize={pre.resize!r} crop={pre.crop!r}")
    _check(pre.resize >= pre.crop, what, f"preprocess resize ({pre.resize}) must be >= crop ({pre.crop})")
    for label, vals, lo, hi in (("mean", pre.mean, 0.0, 1.0), ("std", pre.std, 1e-6, 1.0)):
        ok = len(vals) == 3 and all(isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi for v in vals)
        _check(ok, what, f"preprocess {label} must be 3 numbers in [{lo:g}, {hi:g}] (images are scaled to [0, 1] first), "
                         f"got {tuple(vals)!r}")
    _check(pre.interpolation in _RESAMPLE, what,
           f"preprocess interpolation {pre.interpolation!r} is not one of {', '.join(_RESAMPLE)}")
    _json(pre.to_dict(), what, "preprocess")
    sized = pre.with_image_size(image_size)
    for img in _test_images(17):
        arr = preprocess_image(img, sized)
        _check(arr.shape == (sized.crop, sized.crop, 3) and arr.dtype == np.uint8, what,
               f"a {img.size[0]}x{img.size[1]} image preprocesses to {arr.shape} {arr.dtype}, "
               f"expected ({sized.crop}, {sized.crop}, 3) uint8")

    # weights record
    w = bb.weights
    _check(isinstance(w, WeightsInfo), what, f"Backbone.weights must be a tlfx.backbone.WeightsInfo, got {type(w).__name__}")
    _check(isinstance(w.name, str) and w.name, what, "WeightsInfo.name must say which weights these are ('none' if none)")
    _check(w.sha256 == "" or bool(_HEX64.match(str(w.sha256))), what, f"WeightsInfo.sha256 must be '' or 64 hex digits, "
                                                                      f"got {w.sha256!r}")
    if w.path:
        import os

        _check(os.path.isfile(w.path), what, f"WeightsInfo.path {w.path!r} is not a file")
    _json(w.to_dict(), what, "the weights record")

    # layers
    modules = dict(bb.module.named_modules())
    _check(isinstance(bb.stages, list) and all(isinstance(s, str) for s in bb.stages), what,
           f"Backbone.stages must be a list of module names, got {bb.stages!r}")
    missing = [s for s in bb.stages if s not in modules]
    _check(not missing, what, f"stages {missing} are not modules of the network (see module.named_modules())")
    if bb.classifier is not None:
        _check(bb.classifier in modules, what, f"classifier {bb.classifier!r} is not a module of the network")
    layer_choices = ["penultimate"] + (["multi"] if bb.stages else [])
    for layers in layer_choices:
        for pooling in ("avg", "max"):
            cfg = bb.config(layers, pooling, image_size)
            text = _json(cfg, what, f"config({layers!r}, {pooling!r})")
            _check(text == _json(bb.config(layers, pooling, image_size), what, "config()"), what,
                   "config() differs between two calls; it must depend only on the configuration")
            for key in ("backbone", "weights", "layers", "pooling", "image_size", "preprocess"):
                _check(key in cfg, what, f"config() lacks {key!r}")

    # features
    batch = torch.from_numpy(np.stack([preprocess_image(img, sized) for img in _test_images(sized.crop)]))
    dims = {}
    for layers in layer_choices:
        label = f"features (layers={layers!r}, {sized.crop} px)"
        try:
            computer = FeatureComputer(bb, layers, "avg", image_size, precision="fp32", device="cpu")
            feats = computer(batch)
            again = computer(batch)
            alone = computer(batch[1:2])
        except AssertionError:
            raise
        except Exception as exc:
            _fail(what, f"computing {label} failed: {type(exc).__name__}: {exc}")
        _check(isinstance(feats, np.ndarray) and feats.ndim == 2 and feats.shape[0] == len(batch) and feats.shape[1] > 0,
               what, f"{label} must be [N, D] with D > 0, got {getattr(feats, 'shape', type(feats))}")
        _check(np.isfinite(feats).all(), what, f"{label} hold NaN or inf")
        _check(alone.shape == (1, feats.shape[1]), what,
               f"{label}: a batch of 1 gives {alone.shape[1:]} features, a batch of {len(batch)} gives {feats.shape[1]}")
        scale = max(1.0, float(np.abs(feats).max()))
        _check(np.allclose(feats, again, rtol=1e-4, atol=1e-5 * scale), what,
               f"{label} differ between two runs on the same images (max diff {np.abs(feats - again).max():.3g}); "
               f"the module must be deterministic in eval mode (no dropout or batch statistics at inference)")
        _check(np.allclose(feats[1:2], alone, rtol=1e-3, atol=1e-4 * scale), what,
               f"{label} of an image depend on the other images in its batch (max diff "
               f"{np.abs(feats[1:2] - alone).max():.3g}); use eval-mode layers only")
        _check(np.ptp(feats, axis=0).max() > 0, what, f"{label} are the same for every image; they must depend on the input")
        dims[layers] = feats.shape[1]
    if "multi" in dims:
        _check(dims["multi"] > dims["penultimate"], what,
               f"layers='multi' gives {dims['multi']} features, not more than penultimate's {dims['penultimate']}")
    return bb


# ------------------------------------------------------------------------------------------------------- heads


def _blobs(labels, n_per_class=30, n_features=12, seed=0):
    centres = np.random.default_rng(0).normal(0, 1, (len(labels), n_features))  # the same classes for every seed
    centres *= 6.0 / np.linalg.norm(centres, axis=1, keepdims=True)  # well apart: any sane classifier separates them
    rng = np.random.default_rng(seed)
    X = np.concatenate([c + rng.normal(0, 1, (n_per_class, n_features)) for c in centres]).astype(np.float32)
    y = np.repeat(np.asarray(labels, dtype=np.int64), n_per_class)
    order = rng.permutation(len(y))
    return X[order], y[order]


def check_head(head, *, expected_failed: dict[str, str] | None = None, sklearn_checks: bool = True, **params):
    """Check a head plugin against the contract tlfx relies on; returns the head fitted on a small test set.

    ``head``: a registered name (built with :func:`tlfx.heads.create_head`, ``params`` applied; nested
    ``step__param`` names work for a Pipeline head), an estimator instance (cloned, so it is not changed), or an
    estimator class.

    The scikit-learn estimator contract (``get_params``/``set_params``/``clone``, ``NotFittedError`` before
    ``fit``, input validation, pickling, ``classes_``...) is scikit-learn's own :func:`check_estimator`;
    ``expected_failed`` maps the checks your head is known to fail to the reason (scikit-learn's
    ``expected_failed_checks``); a ``Pipeline`` head is expected to fail :data:`PIPELINE_EXPECTED_FAILED`.
    ``sklearn_checks=False`` leaves them out, for a test suite that runs them one test per check with
    :func:`sklearn.utils.estimator_checks.parametrize_with_checks`, as tlfx's own does.

    tlfx's own checks: the registered ``param_grid`` names real (nested) parameters; float32 features with labels
    1, 4, 7 give ``classes_ == [1, 4, 7]`` and a head that learns them; ``predict`` is exactly the ``classes_``
    entry of the largest ``predict_proba`` column, whose rows sum to one (tlfx ranks top-k classes by
    probability); an image's probabilities do not depend on the other rows of its batch; and the skops round trip
    model files use holds no type tlfx refuses to load and gives the same predictions.
    """
    from sklearn.base import clone

    grid = None
    if isinstance(head, str):
        from .heads import create_head

        what = f"head {head!r}"
        grid = check_registration("head", head).meta.get("param_grid")
        est = create_head(head, **params)
    elif isinstance(head, type):
        what = f"head {head.__name__}"
        est = head(**params)
    else:
        what = f"head {type(head).__name__}"
        est = head
    for method in ("fit", "predict", "predict_proba", "get_params", "set_params"):
        _check(callable(getattr(est, method, None)), what,
               f"has no {method}(); a head is a scikit-learn classifier with fit/predict/predict_proba/get_params/set_params")
    if grid:
        names = est.get_params(deep=True)
        for key in grid:
            _check(key in names, what, f"param_grid names {key!r}, which is not a parameter ({', '.join(sorted(names))})")
    if sklearn_checks:
        from sklearn.pipeline import Pipeline

        known = PIPELINE_EXPECTED_FAILED if isinstance(est, Pipeline) else {}
        _sklearn_checks(est, what, {**known, **(expected_failed or {})})
    try:
        est = clone(est)
    except Exception as exc:
        _fail(what, f"sklearn.base.clone fails ({type(exc).__name__}: {exc}); __init__ must store each parameter "
                    f"unchanged under its own name")
    return _tlfx_head_checks(est, what)


def _sklearn_checks(est, what: str, expected_failed: dict):
    """scikit-learn's check_estimator; the first unexpected failure becomes one AssertionError naming the check."""
    import warnings

    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(est, expected_failed_checks=expected_failed, on_fail=None)
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        first = failed[0]
        exc = first["exception"]
        text = " ".join(str(exc).split())[:400] or type(exc).__name__
        others = f" (and {len(failed) - 1} more: {', '.join(r['check_name'] for r in failed[1:4])})" if len(failed) > 1 else ""
        _fail(what, f"scikit-learn's {first['check_name']} fails{others}: {type(exc).__name__}: {text}; fix it, or "
                    f"list it in expected_failed={{check name: reason}} if it cannot apply to this head")


def _tlfx_head_checks(est, what: str):
    """What tlfx needs beyond scikit-learn's contract: label handling, predict/proba agreement, batch
    invariance, and a model file that loads back."""
    X, y = _blobs([1, 4, 7])
    X_test, y_test = _blobs([1, 4, 7], n_per_class=10, seed=1)
    X_before = X.copy()
    try:
        fitted = est.fit(X, y)
    except Exception as exc:
        _fail(what, f"fit on float32 features [90, 12] with labels 1, 4, 7 failed: {type(exc).__name__}: {exc}")
    _check(fitted is est, what, "fit() must return self")
    _check(np.array_equal(X, X_before), what, "fit() modified the features passed to it")
    classes = getattr(est, "classes_", None)
    _check(classes is not None and np.array_equal(np.asarray(classes), [1, 4, 7]), what,
           f"after fit, classes_ must be the sorted distinct labels [1, 4, 7], got {classes!r}")
    pred = np.asarray(est.predict(X_test))
    proba = np.asarray(est.predict_proba(X_test), dtype=np.float64)
    _check(proba.shape == (len(X_test), 3), what,
           f"predict_proba must return [N, n_classes] = {(len(X_test), 3)}, got {proba.shape}")
    _check(np.isfinite(proba).all() and proba.min() >= -1e-6 and proba.max() <= 1 + 1e-6, what,
           "predict_proba must be probabilities in [0, 1]")
    _check(np.allclose(proba.sum(1), 1.0, atol=1e-4), what,
           f"predict_proba rows must sum to 1 (got sums from {proba.sum(1).min():.4f} to {proba.sum(1).max():.4f})")
    argmax = np.asarray(classes)[proba.argmax(1)]
    bad = np.flatnonzero(argmax != pred)
    _check(len(bad) == 0, what, f"predict disagrees with the argmax of predict_proba on {len(bad)} of {len(pred)} rows "
                                f"(first: row {bad[0] if len(bad) else -1}); the columns must follow classes_ and "
                                f"predict must pick the most probable class")
    acc = float(np.mean(pred == y_test))
    _check(acc >= 0.8, what, f"accuracy {acc:.0%} on three well-separated classes; the head does not learn")
    order = np.arange(len(X_test))[::-1]
    alone = np.concatenate([np.asarray(est.predict_proba(X_test[i:i + 1]), dtype=np.float64) for i in range(4)])
    shuffled = np.asarray(est.predict_proba(X_test[order]), dtype=np.float64)[np.argsort(order)]
    _check(np.allclose(alone, proba[:4], atol=1e-6) and np.allclose(shuffled, proba, atol=1e-6), what,
           "a row's predict_proba changes with the other rows of its batch (alone, or in another order); "
           "predictions must not depend on what else is predicted")
    _check_skops(est, X_test, pred, what)
    return est


def _check_skops(est, X_test, pred, what):
    """Model files store heads with skops and refuse to load types other than skops' trusted defaults and the
    registered heads' own classes: check that this head survives that round trip."""
    import skops.io as sio

    try:
        data = sio.dumps(est)
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:
        _fail(what, f"skops cannot save the fitted head ({type(exc).__name__}: {exc}); tlfx stores heads with skops.io")
    allowed = {f"{type(est).__module__}.{type(est).__qualname__}"}
    try:  # exactly what the model loader accepts beyond skops' defaults
        from .head_model import trusted_head_types

        allowed |= set(trusted_head_types())
    except ImportError:  # pragma: no cover - a core without head model files
        pass
    refused = sorted(set(untrusted) - allowed)
    _check(not refused, what, f"a saved model would hold types tlfx refuses to load: {', '.join(refused)}; keep fitted "
                              f"state in numpy arrays, Python scalars/lists/dicts and scikit-learn objects")
    try:
        restored = sio.loads(data, trusted=untrusted)
    except Exception as exc:
        _fail(what, f"skops cannot load the saved head ({type(exc).__name__}: {exc})")
    _check(np.array_equal(np.asarray(restored.predict(X_test)), pred), what, "predictions change after a skops round trip")


# ---------------------------------------------------------------------------------------------------- datasets


def check_dataset(dataset, *, split: str | None = None, root: str | None = None, limit: int | None = None,
                  arg: str | None = None, samples: int = 6):
    """Check a dataset plugin against the contract tlfx relies on; returns the loaded dataset.

    ``dataset``: a data spec (``"shapes:5"``, loaded with :func:`tlfx.load_dataset`), a factory
    ``factory(arg, split, root)`` (called with ``arg``), or an :class:`~tlfx.datasets.ImageDataset`.
    Checked: an ImageDataset with at least one item; ``ids`` unique strings; ``labels`` an int64 vector in
    ``-1 .. len(class_names) - 1``; ``class_names`` unique strings; ``load(i)`` gives the same RGB PIL image every
    time for ``samples`` items spread over the dataset (also with a ``target`` size hint); ``take(n)`` keeps the
    first n; the same items in the same order and the same ``fingerprint()`` when loaded again.
    """
    from PIL import Image

    from .datasets import ImageDataset, load_dataset

    if isinstance(dataset, str):
        what = f"dataset {dataset!r}"
        check_registration("dataset", dataset.partition(":")[0])

        def load():
            return load_dataset(dataset, split=split, root=root, limit=limit)
    elif isinstance(dataset, ImageDataset):
        what, load = f"dataset {dataset.spec or type(dataset).__name__!r}", None
    elif callable(dataset):
        what = f"dataset factory {getattr(dataset, '__name__', dataset)!r}"

        def load():
            return dataset(arg, split=split, root=root).take(limit)
    else:
        raise TypeError(f"check_dataset takes a data spec, a factory or an ImageDataset, not {type(dataset).__name__}")

    ds = load() if load else dataset
    _check(isinstance(ds, ImageDataset), what, f"got {type(ds).__name__}, expected a tlfx.datasets.ImageDataset")
    n = len(ds)
    _check(n > 0, what, "holds no items")
    _check(isinstance(ds.ids, list) and len(ds.ids) == n, what, f"ids must be a list of {n} strings")
    bad = next((i for i in ds.ids if not isinstance(i, str) or not i), None)
    _check(bad is None and all(isinstance(i, str) and i for i in ds.ids), what, f"every id must be a non-empty str, got {bad!r}")
    if len(set(ds.ids)) != n:
        seen = set()
        dup = next(i for i in ds.ids if i in seen or seen.add(i))
        _fail(what, f"ids are not unique: {dup!r} appears more than once (stores index items by id)")
    labels = ds.labels
    _check(isinstance(labels, np.ndarray) and labels.dtype == np.int64 and labels.shape == (n,), what,
           f"labels must be an int64 numpy vector of length {n}, got "
           f"{type(labels).__name__} {getattr(labels, 'dtype', '')} {getattr(labels, 'shape', '')}")
    names = ds.class_names
    _check(isinstance(names, list) and all(isinstance(c, str) for c in names), what,
           f"class_names must be a list of str, got {names!r}")
    _check(len(set(names)) == len(names), what, f"class_names are not unique: {names!r}")
    if n:
        _check(labels.min() >= -1 and labels.max() < len(names), what,
               f"labels must be -1 (unlabelled) or 0..{len(names) - 1} (indexes into class_names), "
               f"got {labels.min()}..{labels.max()}")
    _check(ds.split is None or isinstance(ds.split, str), what, f"split must be a str or None, got {ds.split!r}")

    picks = sorted({int(round(k * (n - 1) / max(1, samples - 1))) for k in range(samples)})
    for i in picks:
        pixels = []
        for call in ("load(i)", "load(i)", "load(i, target=32)"):
            try:
                img = ds.load(i, target=32) if "target" in call else ds.load(i)
            except Exception as exc:
                _fail(what, f"{call.replace('i', str(i), 1)} failed for item {ds.ids[i]!r}: {type(exc).__name__}: {exc}")
            _check(isinstance(img, Image.Image), what, f"load({i}) returned {type(img).__name__}, expected a PIL image")
            _check(img.mode == "RGB", what, f"load({i}) returned a {img.mode} image; convert to RGB (tlfx.images.to_rgb)")
            _check(img.width > 0 and img.height > 0, what, f"load({i}) returned an empty image")
            pixels.append(np.asarray(img))
        _check(np.array_equal(pixels[0], pixels[1]), what, f"load({i}) returns different pixels on two calls")

    fp = ds.fingerprint()
    _check(isinstance(fp, str) and fp, what, "fingerprint() must return a non-empty str")
    _check(ds.fingerprint() == fp, what, "fingerprint() differs between two calls")
    if load:
        again = load()
        _check(again.ids == ds.ids, what, "loading it again gives other ids or another order; the order must be stable "
                                          "(resumed extraction depends on it)")
        _check(np.array_equal(again.labels, ds.labels), what, "loading it again gives other labels")
        _check(again.fingerprint() == fp, what, "loading it again gives another fingerprint(); it must depend only on "
                                                "the data, so that finished stores are recognised")
        if n > 1:
            part = load().take(n - 1)
            _check(len(part) == n - 1 and part.ids == ds.ids[: n - 1], what, f"take({n - 1}) must keep the first {n - 1} items")
            _check(part.fingerprint() != fp, what, "take(n) does not change the fingerprint")
            _check(np.array_equal(np.asarray(part.load(n - 2)), np.asarray(ds.load(n - 2))), what,
                   f"after take({n - 1}), load({n - 2}) gives another image")
    return ds
