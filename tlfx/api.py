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
from .models import Model, check_config
from .models import load_model as _load_model
from .store import FeatureStore

DEFAULT_CV = 5


def load_model(path: str, trust: bool = False) -> Model:
    """Open a model file (``tlfx fit``/``tlfx finetune`` output). Nothing in it runs unless ``trust=True``,
    which is also the only way to open a pickle export (``.joblib``)."""
    return _load_model(path, trust=trust)


def _as_model(model, trust: bool = False) -> Model:
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        model = load_model(path, trust=trust)
        model.path = path
    return model


def _labeled(store: FeatureStore):
    X, y = store.features, store.labels
    keep = y >= 0
    if not keep.all():
        X, y = X[keep], y[keep]
    return X, y


def _search_folds(y, cv: int) -> int:
    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min())
    k = min(cv, smallest)
    if k < 2:
        raise TlfxError(f"--search needs at least 2 training rows per class (smallest class has {smallest}); "
                        f"drop --search or add data")
    return k


def fit(features, head: str, params: dict | None = None, search: bool = False, out: str | None = None, *,
        cv: int = DEFAULT_CV, seed: int = 0, allow_incomplete: bool = False,
        export_joblib: bool = False, engine: str = "local", address: str | None = None) -> HeadModel:
    """Train head ``head`` on the store at ``features`` and return a :class:`~tlfx.head_model.HeadModel`.

    ``params`` fix head parameters; ``search`` cross-validates the head's ``param_grid`` (StratifiedKFold with
    ``cv`` folds) on the training store only, then refits the best setting on all of it. ``seed`` seeds the folds
    and the head's ``random_state``/``seed`` unless ``params`` set them. ``out`` saves the
    model (``export_joblib`` also writes a pickle copy ``<out stem>.joblib``). ``engine="ray"`` fans the
    cross-validation out through joblib's Ray backend (``address`` of a running cluster, or a local one).
    """
    from sklearn.base import clone

    from .heads import check_loadable, create_head, param_grid

    store = features if isinstance(features, FeatureStore) else FeatureStore(features, allow_incomplete=allow_incomplete)
    params = dict(params or {})
    est = create_head(head, **params)
    # one seed for everything random (CV folds, forests, Nystroem landmarks, the linear head), unless set by params
    est.set_params(**{k: seed for k in ("random_state", "seed") if k in est.get_params(deep=False) and k not in params})
    X, y = _labeled(store)
    present = np.unique(y)
    if len(y) == 0:
        raise TlfxError(f"store {store.path!r} has no labeled rows; fit needs labeled training features")
    if len(present) < 2:
        name = store.class_names[present[0]] if present[0] < len(store.class_names) else str(present[0])
        raise TlfxError(f"store {store.path!r} has only one class ({name!r}) among its labeled rows; a classifier "
                        f"needs at least 2 classes")
    extra: dict = {}
    t0 = time.perf_counter()
    try:
        if search:
            from sklearn.model_selection import GridSearchCV, StratifiedKFold

            grid = {k: v for k, v in param_grid(head).items() if k not in params}
            if not grid:
                raise TlfxError(f"head {head!r} has no parameters left to search (its grid is empty or fixed by "
                                f"--param); drop --search")
            folds = _search_folds(y, cv)
            gs = GridSearchCV(est, grid, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                              scoring="accuracy", refit=False, n_jobs=None, error_score="raise")
            from .engines import search_backend

            with search_backend(engine, address):
                gs.fit(X, y)
            best = {k: _plain(v) for k, v in gs.best_params_.items()}
            extra["search"] = {"grid": {k: [_plain(x) for x in v] for k, v in grid.items()}, "cv_folds": folds,
                               "cv_score": float(gs.best_score_), "best_params": best, "seed": seed,
                               "search_seconds": time.perf_counter() - t0,
                               "results": [{"params": {k: _plain(v) for k, v in p.items()}, "mean": float(m), "std": float(s)}
                                           for p, m, s in zip(gs.cv_results_["params"], gs.cv_results_["mean_test_score"],
                                                              gs.cv_results_["std_test_score"])]}
            params = {**params, **best}
            est = clone(est).set_params(**best)
        t1 = time.perf_counter()
        est.fit(X, y)
        fit_seconds = time.perf_counter() - t1
    except TlfxError:
        raise
    except (ValueError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TlfxError(f"head {head!r} with parameters {params or '(defaults)'} cannot be fitted: {msg}") from None
    model = HeadModel.from_estimator(est, head=head, params=params, config=store.config,
                                     class_names=store.class_names, store=store,
                                     extra={**extra, "n_train": int(len(y)), "n_features": int(X.shape[1]),
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


def evaluate(model, features, *, trust: bool = False, allow_incomplete: bool = False) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix of ``model`` (a model
    object or file) on the labeled rows of the store at ``features``. Works for every model kind."""
    from .metrics import classification_report_dict

    m = _as_model(model, trust)
    store = features if isinstance(features, FeatureStore) else FeatureStore(features, allow_incomplete=allow_incomplete)
    if getattr(m, "reads_features", True):  # a fine-tuned network reads the store's images, not its features
        check_config(m.config, store.config, f"store {store.path!r}")
    if m.class_names and store.class_names and m.class_names != store.class_names:
        raise TlfxError(f"store {store.path!r} has classes {store.class_names[:5]}... but the model was trained on "
                        f"{m.class_names[:5]}...; evaluate on a store of the same dataset")
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
                "features": os.path.abspath(store.path), "predict_seconds": seconds})
    return rep


def predict(model, paths, top_k: int = 3, *, trust: bool = False) -> list[dict]:
    """Run backbone + head on image files. One dict per input path, in order: ``{"path", "top": [{"class",
    "probability"}, ...]}`` for readable images, ``{"path", "error"}`` for files that could not be read."""
    if top_k < 1:
        raise TlfxError(f"--top-k must be at least 1, got {top_k}")
    m = _as_model(model, trust)
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


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    return v
