"""Heads: scikit-learn estimators trained on cached features, created through the head registry."""

from __future__ import annotations

from .errors import TlfxError
from .plugins import registry


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
