"""Execution engines: ``local`` (this process, :func:`tlfx.extract`) and ``ray`` (a Ray cluster, optional extra).

Nothing here imports Ray at module import time: ``import tlfx`` and the local engine work without it installed.
``--engine ray`` without Ray ends with one line telling how to install it.

- :func:`extract_with` runs an extraction on the chosen engine.
- :func:`search_backend` is the context manager that fans a scikit-learn search (``GridSearchCV``) out over the
  chosen engine: ``with search_backend("ray"): search.fit(X, y)``.
"""

from __future__ import annotations

import contextlib

from ..errors import TlfxError

ENGINES = ("local", "ray")
RAY_MISSING = "--engine ray needs Ray, which is not installed: pip install tlfx[ray]"


def check_engine(engine: str | None) -> str:
    """Validate an engine name (``None`` means ``local``)."""
    engine = engine or "local"
    if engine not in ENGINES:
        raise TlfxError(f"unknown engine {engine!r}; valid choices: {', '.join(ENGINES)}")
    return engine


def require_ray():
    """Import and return the ``ray`` module, or fail with one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise TlfxError(RAY_MISSING) from None
    return ray


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray (``address``: ``auto``, ``HOST:PORT``, ``ray://HOST:10001``; none: ``RAY_ADDRESS`` or a new
    local instance). Returns True when this call started the connection (the caller then shuts it down)."""
    import logging

    ray = require_ray()
    if ray.is_initialized():
        return False
    if address and address != "auto" and "://" not in address:
        _check_reachable(address)  # ray.init would retry an unreachable GCS for minutes
    kwargs = {"include_dashboard": False} if not address else {}
    if num_cpus is not None and not address:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(address=address or None, logging_level=logging.WARNING, **kwargs)
    except ConnectionError as exc:
        raise TlfxError(f"cannot reach a Ray cluster at --address {address!r} ({str(exc).splitlines()[0]}); "
                        f"start one with 'ray start --head' or leave --address out for a local instance") from None
    return True


def _check_reachable(address: str, timeout: float = 5.0):
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TlfxError(f"--address {address!r} is not auto, HOST:PORT or ray://HOST:PORT; e.g. --address 10.0.0.5:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise TlfxError(f"cannot reach a Ray cluster at --address {address} ({exc.strerror or exc}); start one there "
                        f"with 'ray start --head --port={port}', or leave --address out for a local instance") from None


def extract_with(engine: str, opts, **ray_options):
    """Run the extraction described by ``opts`` (:class:`tlfx.config.ExtractOptions`) on ``local`` (this process)
    or ``ray`` (:func:`tlfx.engines.ray_engine.extract_ray`).

    ``ray_options`` (``address``, ``num_workers``, ``gpus_per_worker``) apply to Ray only; the local engine refuses
    them when set.
    """
    engine = check_engine(engine)
    if engine == "ray":
        if getattr(opts, "update", False):
            raise TlfxError("--update runs on the local engine; drop --engine ray")
        require_ray()
        from .ray_engine import run_ray

        return run_ray(opts, **{k: v for k, v in ray_options.items() if v is not None})
    given = [k for k, v in ray_options.items() if v not in (None, 0)]
    if given:
        raise TlfxError(f"--{given[0].replace('_', '-')} only applies to --engine ray; add --engine ray or drop it")
    from ..extraction import run_extraction

    return run_extraction(opts)


@contextlib.contextmanager
def search_backend(engine: str | None = "local", address: str | None = None):
    """Context manager for scikit-learn searches: ``local`` runs them here (joblib's default backend); ``ray`` runs
    every (parameters, fold) fit as a Ray task through joblib's Ray backend, on all of the cluster's CPUs.

    >>> with search_backend("ray"):
    ...     GridSearchCV(SVC(), grid).fit(X, y)   # leave n_jobs unset (None): the backend supplies -1

    Connects to ``address`` (or ``RAY_ADDRESS``, or starts a local instance) unless Ray is already initialized,
    and disconnects on exit only if it connected.
    """
    engine = check_engine(engine)
    if engine == "local":
        yield
        return
    ray = require_ray()
    import joblib
    from ray.util.joblib import register_ray

    started = connect_ray(address)
    try:
        register_ray()
        with joblib.parallel_backend("ray", n_jobs=-1):
            yield
    finally:
        if started:
            ray.shutdown()


def search_engine_options(f):
    """click options ``--engine local|ray`` and ``--address`` for commands that run a search (fit, compare)."""
    import click

    f = click.option("--address", default=None, metavar="ADDR",
                     help="Ray cluster for --engine ray (auto, HOST:PORT); default: a local one.")(f)
    f = click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
                     help="Where --search runs its fits: local, or ray (joblib's Ray backend; pip install tlfx[ray]).")(f)
    return f


__all__ = ["ENGINES", "check_engine", "require_ray", "connect_ray", "extract_with", "search_backend",
           "search_engine_options"]
