"""Python API mirroring the CLI: ``fit``, ``evaluate``, ``predict``, ``load_model``.

>>> import tlfx
>>> model = tlfx.fit("train.h5", "svm", params={"C": 10}, out="svm.tlfx")
>>> tlfx.evaluate(model, "test.h5")["accuracy"]
>>> tlfx.predict("svm.tlfx", ["shoe.png"], top_k=3)
"""

from __future__ import annotations

import os
import time

import numpy as np

from . import __version__
from .errors import TlfxError
from .head_model import HeadModel
from .models import Model
from .models import load_model as _load_model
from .store import FeatureStore

DEFAULT_CV = 5


def load_model(path: str, trust_types=(), trust_pickle: bool = False) -> Model:
    """Open a model file (``tlfx fit``/``tlfx finetune`` output). Nothing in it runs: a head file may hold only
    scikit-learn/numpy types, registered head classes and the ``module.Class`` names in ``trust_types``
    (``--trust-type``); a pickle export (``.joblib``) opens only with ``trust_pickle=True`` (``--trust-pickle``),
    which runs any code the file holds."""
    return _load_model(path, trust_types=trust_types, trust_pickle=trust_pickle)


def _as_model(model, trust_types=(), trust_pickle: bool = False) -> Model:
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        model = load_model(path, trust_types=trust_types, trust_pickle=trust_pickle)
        model.path = path
    return model


def _labeled(store: FeatureStore):
    X, y = store.features, store.labels
    keep = y >= 0
    if not keep.all():
        X, y = X[keep], y[keep]
    return X, y


def fit(features, head: str, params: dict | None = None, search: bool = False, out: str | None = None, *,
        cv: int = DEFAULT_CV, seed: int = 0, allow_incomplete: bool = False,
        export_joblib: bool = False, engine: str = "local", address: str | None = None,
        stream: bool | None = None, chunk_rows: int | None = None, normalize=None) -> HeadModel:
    """Train head ``head`` on the store at ``features`` and return a :class:`~tlfx.head_model.HeadModel`.

    ``params`` fix head parameters; ``search`` cross-validates the head's ``param_grid`` (StratifiedKFold with
    ``cv`` folds) on the training store only, then refits the best setting on all of it. ``seed`` seeds the folds
    and the head's ``random_state``/``seed`` unless ``params`` set them. ``out`` saves the
    model (``export_joblib`` also writes a pickle copy ``<out stem>.joblib``). ``engine="ray"`` fans the
    cross-validation out through joblib's Ray backend (``address`` of a running cluster, or a local one).
    ``stream``: train a head that can (``linear``, ``sgd``) by reading the store ``chunk_rows`` rows at a time
    instead of loading it; None decides by size (:func:`tlfx.training.use_streaming`).
    ``normalize``: the feature normalisation fitted in front of the head on the training rows and saved with it
    (``none``, ``l2``, ``power``, ``pca-whiten`` or ``pca-whiten:N``; :mod:`tlfx.normalize`); with ``search``,
    several (``"none,l2,power"`` or a list) are cross-validated like the head's parameters.
    """
    from . import training
    from .heads import check_loadable
    from .normalize import parse_specs
    from .streaming import default_chunk_rows

    store = features if isinstance(features, FeatureStore) else FeatureStore(features, allow_incomplete=allow_incomplete)
    params = dict(params or {})
    probe = training.create_seeded_head(head, params, seed)  # unknown parameters -> one line, before any work
    specs = parse_specs(normalize)
    if len(specs) > 1 and not search:
        raise TlfxError(f"--normalize {','.join(specs)} names several methods, which only --search chooses between; "
                        f"add --search or name one")
    if chunk_rows is not None and chunk_rows < 1:
        raise TlfxError(f"chunk_rows = {chunk_rows} must be at least 1 (rows read at a time)")
    if stream and specs != ["none"]:
        raise TlfxError(f"--stream cannot be combined with --normalize {','.join(specs)} (the normalisation is "
                        f"fitted in memory); drop one of them")
    streamed = specs == ["none"] and training.use_streaming(head, probe, store, stream, search)
    if streamed:  # labels only (8 bytes a row): the head reads the features chunk by chunk
        y = store.labels
        y = y[y >= 0]
        X = None
    else:
        X, y = _labeled(store)
    present = np.unique(y)
    if len(y) == 0:
        raise TlfxError(f"store {store.path!r} has no labeled rows; fit needs labeled training features")
    if len(present) < 2:
        name = store.class_names[present[0]] if present[0] < len(store.class_names) else str(present[0])
        raise TlfxError(f"store {store.path!r} has only one class ({name!r}) among its labeled rows; a classifier "
                        f"needs at least 2 classes")
    extra: dict = {}
    if search:
        found = training.search(head, X, y, fixed=params, cv=cv, seed=seed, engine=engine, address=address,
                                normalize=specs)
        if found is None:
            raise TlfxError(f"head {head!r} has no parameters left to search (its grid is empty or fixed by "
                            f"--param); drop --search")
        extra["search"] = found.record(seed)
        params = {**params, **found.best_params}
        specs = [found.normalize]
    if streamed:
        est, fit_seconds = training.fit_head_store(head, store, params, seed, chunk_rows)
        extra["streamed"] = {"chunk_rows": int(chunk_rows or default_chunk_rows(int(est.n_features_in_)))}
        n_features = int(est.n_features_in_)
    else:
        est, fit_seconds = training.fit_head(head, X, y, params, seed, normalize=specs[0])
        n_features = int(X.shape[1])
    model = HeadModel.from_estimator(est, head=head, params=params, config=store.config,
                                     class_names=store.class_names, store=store,
                                     extra={**extra, "n_train": int(len(y)), "n_features": n_features,
                                            "fit_seconds": fit_seconds, "train_seconds": fit_seconds,
                                            "seed": seed, "tlfx_version": __version__})
    if out:
        check_loadable(est, head)  # a file evaluate/predict would refuse is not written
        model.save(out)
        model.path = out
        if export_joblib:
            model.joblib_path = model.export_joblib(os.path.splitext(out)[0] + ".joblib")
    elif export_joblib:
        raise TlfxError("export_joblib needs out=PATH (the joblib file is written beside the model file)")
    return model


def evaluate(model, features, *, trust_types=(), trust_pickle: bool = False, allow_incomplete: bool = False) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix of ``model`` (a model
    object or file) on the labeled rows of the store at ``features``. Works for every model kind.
    ``trust_types``/``trust_pickle``: see :func:`load_model`."""
    from .metrics import classification_report_dict

    m = _as_model(model, trust_types, trust_pickle)
    store = features if isinstance(features, FeatureStore) else FeatureStore(features, allow_incomplete=allow_incomplete)
    m.check_store(store)  # the backbone configuration and the classes must be the model's
    t0 = time.perf_counter()
    proba = np.asarray(m.predict_proba_store(store))
    seconds = time.perf_counter() - t0
    y = store.labels
    if proba.shape[0] != len(y):
        raise TlfxError(f"the model returned {proba.shape[0]} predictions for {len(y)} rows of {store.path!r}")
    keep = y >= 0
    if not keep.any():
        raise TlfxError(f"store {store.path!r} has no labeled rows to evaluate on")
    pred = proba.argmax(axis=1)
    rep = classification_report_dict(y[keep], pred[keep], m.class_names or store.class_names)
    rep.update({"model": getattr(m, "path", None), "kind": m.kind, "head": m.meta.get("head"),
                "normalize": m.meta.get("normalize") or "none",
                "features": os.path.abspath(store.path), "predict_seconds": seconds})
    return rep


def predict(model, paths, top_k: int = 3, *, trust_types=(), trust_pickle: bool = False) -> list[dict]:
    """Run backbone + head on image files. One dict per input path, in order: ``{"path", "top": [{"class",
    "probability"}, ...]}`` for readable images, ``{"path", "error"}`` for files that could not be read.
    ``trust_types``/``trust_pickle``: see :func:`load_model`."""
    if top_k < 1:
        raise TlfxError(f"--top-k must be at least 1, got {top_k}")
    m = _as_model(model, trust_types, trust_pickle)
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise TlfxError("no image files given; pass one or more paths")
    proba, ok, bad = m.predict_proba_images(paths)
    names = m.class_names
    rows = {}
    for i, p in enumerate(ok):
        pr = np.asarray(proba[i], dtype=np.float64)
        order = np.argsort(-pr, kind="stable")[:top_k]
        rows[p] = {"path": p, "top": [{"class": names[j] if j < len(names) else str(j), "probability": float(pr[j])}
                                      for j in order]}
    for p, reason in bad:
        rows[p] = {"path": p, "error": reason}
    return [rows.get(p, {"path": p, "error": "not processed"}) for p in paths]


