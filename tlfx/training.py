"""Fitting heads on features: the one path behind ``tlfx fit``, ``tlfx compare`` and :func:`tlfx.fit`.

A head is created, seeded, optionally tuned by a cross-validated grid search on the training rows only, and
fitted here; callers only decide what to do with the fitted estimator.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import TlfxError

SEED_PARAMS = ("random_state", "seed")
# ``tlfx fit`` without --stream/--no-stream streams a head that can when the store's features are larger than this
STREAM_ABOVE_BYTES = 2 << 30


def plain(v):
    """A numpy scalar as the Python value (JSON-safe); anything else unchanged."""
    return v.item() if isinstance(v, np.generic) else v


def seed_head(est, seed: int, fixed=()):
    """Set every ``random_state``/``seed`` parameter of ``est`` (nested ones too) to ``seed``, except those in
    ``fixed`` (set by the user). One seed drives forests, Nystroem landmarks, the linear head and CV folds."""
    names = [k for k in est.get_params(deep=True) if k.rsplit("__", 1)[-1] in SEED_PARAMS and k not in fixed]
    if names:
        est.set_params(**{k: seed for k in names})
    return est


def reseed_globals(seed: int):
    """Seed numpy's and torch's global generators, for heads that draw from them."""
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def create_seeded_head(name: str, params: dict | None, seed: int):
    """Head ``name`` with ``params``, seeded with ``seed`` wherever ``params`` leave a seed open."""
    from .heads import create_head

    params = dict(params or {})
    return seed_head(create_head(name, **params), seed, fixed=params)


@contextlib.contextmanager
def collect_warnings(into: list | None):
    """Keep library warnings (convergence, deprecations) out of the progress display; record them in ``into``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    if into is not None:
        for w in caught:
            msg = f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}"
            if msg not in into:
                into.append(msg)


def cv_folds(y, cv: int) -> int:
    """The number of stratified folds ``--search`` can use: ``cv``, or fewer when the smallest class is small."""
    counts = np.bincount(np.asarray(y, dtype=np.int64))
    smallest = int(counts[counts > 0].min()) if (counts > 0).any() else 0
    k = min(cv, smallest)
    if k < 2:
        raise TlfxError(f"--search needs at least 2 training rows per class (smallest class has {smallest}); "
                        f"drop --search or add data")
    return k


@dataclass
class SearchResult:
    """What a grid search chose and how every setting scored (cross-validated accuracy on the training rows)."""

    best_params: dict
    cv_score: float
    seconds: float
    folds: int
    grid: dict
    results: list = field(default_factory=list)
    normalize: str = "none"  # the chosen feature normalisation (tlfx.normalize); a grid dimension when several

    def record(self, seed: int) -> dict:
        """The JSON record kept in model files and reports."""
        return {"grid": {k: [plain(x) for x in v] for k, v in self.grid.items()}, "cv_folds": self.folds,
                "cv_score": self.cv_score, "best_params": self.best_params, "seed": seed,
                "search_seconds": self.seconds, "results": self.results, "normalize": self.normalize}


def search(name: str, X, y, *, fixed: dict | None = None, cv: int = 5, seed: int = 0, engine: str = "local",
           address: str | None = None, warn: list | None = None, normalize=None) -> SearchResult | None:
    """Grid-search head ``name``'s ``param_grid`` (minus the parameters in ``fixed``) with stratified ``cv``-fold
    CV on ``X, y``; None when nothing is left to search. A setting that fails to fit scores NaN and is reported in
    ``warn``; when every setting fails, the first failure is raised as one line.

    ``normalize``: a feature normalisation (:mod:`tlfx.normalize`) fitted in front of the head within each fold,
    or several (``"none,l2,power"`` or a list), which become one more grid dimension."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from . import normalize as nz
    from .engines import search_backend
    from .heads import param_grid

    fixed = dict(fixed or {})
    specs = nz.parse_specs(normalize)
    head_grid = {k: v for k, v in param_grid(name).items() if k not in fixed}
    est, prefix, norm_grid = nz.searchable(create_seeded_head(name, fixed, seed), specs)
    grid = {**{prefix + k: v for k, v in head_grid.items()}, **norm_grid}
    if not grid:
        return None
    folds = cv_folds(y, cv)
    t0 = time.perf_counter()
    reseed_globals(seed)
    # n_jobs unset: one process locally, every CPU of the cluster with --engine ray (joblib backend)
    gs = GridSearchCV(est, grid, scoring="accuracy", refit=False,
                      cv=StratifiedKFold(folds, shuffle=True, random_state=seed), error_score=np.nan)
    failures: list = []
    with collect_warnings(failures), search_backend(engine, address):
        gs.fit(X, y)
    if warn is not None:
        warn += [w for w in failures if w not in warn]
    means = np.asarray(gs.cv_results_["mean_test_score"], dtype=np.float64)
    if not np.isfinite(means).any():
        why = next((w for w in failures if "FitFailed" in w), "every setting failed to fit")
        raise TlfxError(f"head {name!r}: every setting of the --search grid failed to fit ({why}); check --param")
    def shown(p: dict) -> dict:  # the head's own parameter names; the normalisation as its spec string
        return {(k[len(prefix):] if k.startswith(prefix) else k): (nz.spec_value(v) if norm_grid and k == nz.STEP else plain(v))
                for k, v in p.items()}

    best = shown(gs.best_params_)
    chosen = best.pop(nz.STEP, specs[0])
    results = [{"params": shown(p), "mean": float(m), "std": float(s)}
               for p, m, s in zip(gs.cv_results_["params"], means, gs.cv_results_["std_test_score"])]
    shown_grid = {**head_grid, **({nz.STEP: specs} if norm_grid else {})}
    return SearchResult(best, float(gs.best_score_), time.perf_counter() - t0, folds, shown_grid, results, chosen)


def fit_head(name: str, X, y, params: dict | None = None, seed: int = 0, warn: list | None = None,
             normalize: str | None = None):
    """A fresh head ``name`` with ``params`` (seeded) fitted on ``X, y``; returns ``(estimator, fit seconds)``.

    ``normalize``: a feature normalisation fitted on ``X`` in front of the head (:func:`tlfx.normalize.with_normalizer`:
    the estimator is then a Pipeline ``normalize`` -> ``head``). A head that refuses its parameters or data
    (ValueError/TypeError) becomes one line naming the head."""
    from .normalize import with_normalizer

    est = with_normalizer(create_seeded_head(name, params, seed), normalize)
    return est, _timed_fit(name, params, seed, warn, lambda: est.fit(X, y))


def _timed_fit(name: str, params: dict | None, seed: int, warn: list | None, run) -> float:
    """Seed the global generators, call ``run()`` collecting warnings, and return its seconds; a head that refuses
    its parameters or data (ValueError/TypeError) becomes one line naming the head."""
    reseed_globals(seed)
    try:
        with collect_warnings(warn):
            t0 = time.perf_counter()
            run()
            return time.perf_counter() - t0
    except TlfxError:
        raise
    except (ValueError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TlfxError(f"head {name!r} with parameters {params or '(defaults)'} cannot be fitted: {msg}") from None


def can_stream(est) -> bool:
    """Whether a head trains on a store chunk by chunk: ``streaming = True`` and a ``fit_store`` method."""
    return bool(getattr(est, "streaming", False)) and callable(getattr(est, "fit_store", None))


def streaming_heads() -> list[str]:
    """The registered heads that can train chunk by chunk (builds each head once: for messages, not hot paths)."""
    from .heads import create_head, list_heads

    out = []
    for name in list_heads():
        try:
            if can_stream(create_head(name)):
                out.append(name)
        except Exception:  # a broken third-party head does not hide the others
            continue
    return out


def use_streaming(name: str, est, store, stream: bool | None, search: bool) -> bool:
    """Decide whether ``tlfx fit`` trains head ``name`` from the store chunk by chunk.

    ``stream`` True/False forces it (True is refused with ``search``, which cross-validates in memory, and for a
    head that cannot stream); None (auto) streams a head that can, without ``search``, on a complete store whose
    features take more than :data:`STREAM_ABOVE_BYTES`."""
    if stream is False:
        return False
    if stream and search:
        raise TlfxError("--stream cannot be combined with --search (the grid search cross-validates in memory); "
                        "drop one of them")
    if not can_stream(est):
        if stream:
            raise TlfxError(f"head {name!r} cannot train chunk by chunk; heads that can: "
                            f"{', '.join(streaming_heads()) or 'none'}; drop --stream")
        return False
    if stream:
        return True
    if search or not store.complete:
        return False
    a = store.attrs
    itemsize = 2 if a.get("dtype") == "float16" else 4
    return int(a.get("n", 0)) * int(a.get("dim", 0)) * itemsize > STREAM_ABOVE_BYTES


def fit_head_store(name: str, store, params: dict | None = None, seed: int = 0, chunk_rows: int | None = None,
                   warn: list | None = None):
    """Like :func:`fit_head`, but the head reads ``store`` itself, ``chunk_rows`` rows at a time
    (``est.fit_store``); returns ``(estimator, fit seconds)``."""
    est = create_seeded_head(name, params, seed)
    return est, _timed_fit(name, params, seed, warn, lambda: est.fit_store(store, chunk_rows=chunk_rows))
