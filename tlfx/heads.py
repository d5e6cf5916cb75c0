"""Heads: scikit-learn estimators trained on cached features, created through the head registry.

Every head is a scikit-learn classifier (``fit`` / ``predict`` / ``predict_proba`` / ``get_params`` /
``set_params`` / ``classes_``) with flat parameter names, so ``tlfx fit --param C=10`` and
``GridSearchCV(create_head("svm"), {"C": [1, 10]})`` both work. First-party heads derive from
:class:`ClassifierHead`, which does the input validation scikit-learn's estimator checks ask for.

>>> from tlfx.heads import create_head
>>> head = create_head("logistic", C=0.5).fit(X_train, y_train)
>>> head.predict_proba(X_test)
"""

from __future__ import annotations

import json

import numpy as np

from .errors import TlfxError
from .plugins import registry

# scikit-learn takes seconds to import (scipy); it is imported when a head is first built, not on plugin discovery.


def list_heads() -> list[str]:
    """Names of every registered head."""
    return registry("head").names()


def create_head(name: str, **params):
    """A fresh, unfitted head: ``create_head("svm", C=10)``. Unknown parameters are refused with the valid ones."""
    est = registry("head").get(name).factory()
    valid = est.get_params()
    bad = [k for k in params if k not in valid]
    if bad:
        raise TlfxError(f"head {name!r} has no parameter {bad[0]!r}; valid parameters: {', '.join(sorted(valid))}")
    if params:
        est.set_params(**params)
    return est


def param_grid(name: str) -> dict:
    """The grid ``--search`` cross-validates over for a head (from its registration)."""
    return dict(registry("head").get(name).meta.get("param_grid") or {})


def head_description(name: str) -> str:
    return registry("head").get(name).description


def head_plugin(name: str) -> str:
    """The plugin that registered head ``name`` (first-party: ``sklearn_heads``, ``linear_head``)."""
    return registry("head").get(name).plugin


FIRST_PARTY_PLUGINS = ("sklearn_heads", "linear_head")


def first_party_heads() -> list[str]:
    """The heads tlfx ships (what ``tlfx demo`` fits): registered by the first-party head plugins."""
    return [e.name for e in registry("head").entries() if e.plugin in FIRST_PARTY_PLUGINS]


def head_types() -> list[str]:
    """Fully qualified class names of every registered head: the extra types a model file may contain."""
    out = []
    for entry in registry("head").entries():
        try:
            cls = entry.factory if isinstance(entry.factory, type) else type(entry.factory())
        except Exception:  # a head whose factory fails cannot have been saved either
            continue
        out.append(f"{cls.__module__}.{cls.__qualname__}")
    return sorted(set(out))


# ------------------------------------------------------------------------------------------- parameters
def parse_value(text: str):
    """JSON-ish: ``10`` -> int, ``0.1``/``1e-3`` -> float, ``true``/``false`` -> bool, ``none``/``null`` -> None,
    ``[1,2]`` -> list; anything else stays a string."""
    s = text.strip()
    low = s.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        pass
    if s[:1] in "[{\"":
        try:
            return json.loads(s)
        except ValueError:
            pass
    return s


def _type_ok(value, spec) -> bool:
    """``spec``: a tuple of allowed types and literal values, e.g. ``(float, "scale", "auto")``."""
    for allowed in spec:
        if isinstance(allowed, type):
            if allowed is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
            if allowed is int and isinstance(value, int) and not isinstance(value, bool):
                return True
            if allowed not in (int, float) and isinstance(value, allowed):
                return True
        elif value is allowed or (value == allowed and type(value) is type(allowed)):
            return True
    return False


class Bounds:
    """The allowed range of a numeric head parameter: ``Bounds(low=0, low_open=True)`` is ``> 0``.

    Heads declare them in ``param_bounds`` (``{"C": Bounds(0, low_open=True)}``, or per type:
    ``{int: Bounds(1), float: Bounds(0, 1, True, True)}``); ``--param`` and ``fit`` refuse values outside.
    Booleans, ``None`` and strings are not numbers and are left to ``param_types``.
    """

    def __init__(self, low=None, high=None, low_open=False, high_open=False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def contains(self, v) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def __str__(self):
        lo = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
        hi = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high}"
        return " and ".join(x for x in (lo, hi) if x) or "any number"


SEED_BOUNDS = Bounds(0, 2**32 - 1)  # what numpy and scikit-learn accept as a seed


def _bounds_error(value, bounds) -> str | None:
    """Why ``value`` is outside ``bounds`` (a :class:`Bounds` or ``{type: Bounds}``), or None when it is inside."""
    if bounds is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(bounds, dict):
        bounds = bounds.get(int if isinstance(value, int) else float)
        if bounds is None:
            return None
    if value != value:  # NaN compares false with everything
        return "a number, not nan"
    return None if bounds.contains(value) else str(bounds)


def _describe_spec(spec) -> str:
    return " or ".join(a.__name__ if isinstance(a, type) else repr(a) for a in spec)


def check_param(head: str, key: str, value, spec, valid=(), bounds=None):
    """Raise :class:`TlfxError` when ``value`` does not fit the parameter's declared types/choices and range."""
    if spec and not _type_ok(value, spec):
        also = f"; valid parameters: {', '.join(sorted(valid))}" if valid else ""
        raise TlfxError(f"--param {key}={value!r} is not valid for head {head!r}: {key} must be "
                        f"{_describe_spec(spec)}{also}")
    why = _bounds_error(value, bounds)
    if why:
        raise TlfxError(f"--param {key}={value!r} is out of range for head {head!r}: {key} must be {why}")


def parse_params(name: str, items) -> dict:
    """``["C=10", "kernel=rbf"]`` -> ``{"C": 10, "kernel": "rbf"}`` for head ``name``; refuses unknown keys."""
    est = create_head(name)
    valid = est.get_params(deep=False)
    out = {}
    for item in items or ():
        if "=" not in item:
            raise TlfxError(f"--param {item!r} is not KEY=VALUE; valid parameters of head {name!r}: "
                            f"{', '.join(sorted(valid))}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            raise TlfxError(f"head {name!r} has no parameter {key!r}; valid parameters: {', '.join(sorted(valid))}")
        value = parse_value(raw)
        check_param(name, key, value, getattr(est, "param_types", {}).get(key), valid,
                    getattr(est, "param_bounds", {}).get(key))
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------- base class
def lazy_classes(module_globals: dict, define) -> callable:
    """Module ``__getattr__`` that runs ``define()`` (which imports scikit-learn and returns ``{name: class}``) on
    first access, so plugin discovery stays fast. Classes get the module's name, so pickle and skops find them."""

    def __getattr__(name):
        if name.startswith("__"):  # import machinery probes (__path__, __spec__...): answer without importing
            raise AttributeError(name)
        if module_globals.get("_defined") is None:
            module_globals["_defined"] = True
            for cls_name, cls in define().items():
                cls.__module__ = module_globals["__name__"]
                cls.__qualname__ = cls_name
                module_globals[cls_name] = cls
        if name in module_globals:
            return module_globals[name]
        raise AttributeError(f"module {module_globals['__name__']!r} has no attribute {name!r}")

    return __getattr__


def _define_base():
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted

    try:  # scikit-learn >= 1.6
        from sklearn.utils.validation import validate_data as _validate_data
    except ImportError:  # pragma: no cover - older scikit-learn
        def _validate_data(est, X="no_validation", y="no_validation", reset=True, **kw):
            return est._validate_data(X, y, reset=reset, **kw)

    class ClassifierHead(ClassifierMixin, BaseEstimator):
        """Base of tlfx's heads: validates inputs, maps labels to ``classes_`` and predicts by argmax of probabilities.

        Subclasses implement ``_fit(X, y_idx, n_classes)`` (``y_idx`` are indices into ``classes_``) and
        ``_proba(X) -> [n, n_classes]``. ``predict`` is the argmax of ``predict_proba``, so the two always agree.
        ``param_types`` maps each parameter to its allowed types and literal values, ``param_bounds`` numeric ones
        to their :class:`Bounds`; both are checked by ``tlfx fit --param`` and at ``fit``.
        """

        param_types: dict = {}
        param_bounds: dict = {}

        def _check_params(self):
            for key, value in self.get_params(deep=False).items():
                spec = self.param_types.get(key)
                if spec and not _type_ok(value, spec):
                    raise ValueError(f"{type(self).__name__}: parameter {key}={value!r} must be {_describe_spec(spec)}")
                why = _bounds_error(value, self.param_bounds.get(key))
                if why:
                    raise ValueError(f"{type(self).__name__}: parameter {key}={value!r} must be {why}")

        def fit(self, X, y):
            """Train on features ``X [n, d]`` and labels ``y [n]`` (any hashable labels). Returns ``self``."""
            self._check_params()
            X, y = _validate_data(self, X, y, dtype=[np.float64, np.float32])
            check_classification_targets(y)
            self.classes_, y_idx = np.unique(y, return_inverse=True)
            if len(self.classes_) < 2:
                raise ValueError(f"{type(self).__name__} needs at least 2 classes to train, got 1 class "
                                 f"({self.classes_[0]!r})")
            self._fit(X, np.asarray(y_idx, dtype=np.int64).ravel(), len(self.classes_))
            return self

        def predict_proba(self, X):
            """Class probabilities ``[n, len(classes_)]``, columns in the order of ``classes_``."""
            check_is_fitted(self)
            X = _validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
            return np.asarray(self._proba(X), dtype=np.float64)

        def predict(self, X):
            """The most probable class of each row."""
            proba = self.predict_proba(X)  # raises NotFittedError before classes_ is looked up
            return self.classes_[np.argmax(proba, axis=1)]

        def _fit(self, X, y_idx, n_classes):  # pragma: no cover - abstract
            raise NotImplementedError

        def _proba(self, X):  # pragma: no cover - abstract
            raise NotImplementedError

    return {"ClassifierHead": ClassifierHead}


__getattr__ = lazy_classes(globals(), _define_base)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
