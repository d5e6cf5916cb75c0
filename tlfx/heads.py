"""Heads: scikit-learn estimators trained on cached features, created through the head registry.

Every head is a scikit-learn classifier (``fit`` / ``predict`` / ``predict_proba`` / ``get_params`` /
``set_params`` / ``classes_``), so ``tlfx fit --param C=10`` (or ``--param step__C=10`` for a Pipeline head) and
``GridSearchCV(create_head("svm"), {"C": [1, 10]})`` both work. First-party heads are ordinary classes deriving
from :class:`tlfx_plugins.head_base.ClassifierHead`, registered by their plugins like any third-party head.

>>> from tlfx.heads import create_head
>>> head = create_head("logistic", C=0.5).fit(X_train, y_train)
>>> head.predict_proba(X_test)
"""

from __future__ import annotations

import json

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


FIRST_PARTY_PLUGINS = ("sklearn_heads", "linear_head")


def first_party_heads() -> list[str]:
    """The heads tlfx ships (what ``tlfx demo`` fits): registered by the first-party head plugins."""
    return [e.name for e in registry("head").entries() if e.plugin in FIRST_PARTY_PLUGINS]


def head_types() -> list[str]:
    """Fully qualified class names of every registered head: the extra types a model file may contain.

    A head registered as a ``"module:Class"`` string is imported here (a model is being loaded, it needs the
    class anyway), so the name is where the class is defined, which is what skops records.
    """
    out = []
    for entry in registry("head").entries():
        try:
            factory = entry.factory
            cls = factory if isinstance(factory, type) else type(factory())
        except Exception:  # a head whose factory fails cannot have been saved either
            continue
        out.append(f"{cls.__module__}.{cls.__qualname__}")
    return sorted(set(out))


def check_loadable(est, head: str = "") -> bytes:
    """Refuse a fitted head whose model file tlfx would refuse to load; return its skops bytes otherwise.

    ``tlfx fit`` calls this before writing, so that a head holding a type outside skops' trusted defaults and the
    registered head classes (a private scikit-learn class, a plugin's helper object) is refused with one line
    naming the type, instead of being written and then refused by every ``evaluate``/``predict``.
    """
    import skops.io as sio

    from .head_model import trusted_head_types

    label = f"head {head!r}" if head else f"head {type(est).__name__}"
    try:
        data = sio.dumps(est)
    except Exception as exc:
        raise TlfxError(f"{label} cannot be saved in a model file: skops refuses it ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); keep fitted state as numpy arrays or "
                        f"scikit-learn objects") from None
    refused = sorted(set(sio.get_untrusted_types(data=data)) - set(trusted_head_types()))
    if refused:
        raise TlfxError(f"{label} holds type {refused[0]!r}, which tlfx refuses to load from a model file (neither a "
                        f"registered head class nor a scikit-learn/numpy type); nothing written: keep fitted state as "
                        f"numpy arrays or scikit-learn objects, or register that class as a head")
    return data


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
    """``["C=10", "kernel=rbf"]`` -> ``{"C": 10, "kernel": "rbf"}`` for head ``name``; refuses unknown keys.

    Keys are the head's ``get_params(deep=True)`` names, so a Pipeline head takes ``logisticregression__C=10``."""
    est = create_head(name)
    valid = est.get_params(deep=True)  # nested ``step__param`` names too, as ``--search`` grids use them
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
