"""Several stores of the same images, one feature set: ``tlfx combine A.h5 B.h5 --out AB.h5``.

The sources (other backbones, other layers of one backbone) must hold the same rows: the same ids in the same
order, the same labels, classes and dataset. The combined store is an ordinary store whose features are the sources'
columns side by side; its configuration is ``backbone = "combined"`` with ``components``, each source's whole
feature configuration, its columns and the file it came from (name, sha256). ``FeatureConfig.diff`` compares the
components (configurations and columns, not the files), so a head fitted on a combined train store evaluates on a
test store combined from sources made the same way, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import numpy as np

from . import store as _store
from .config import FeatureConfig
from .errors import TlfxError
from .safetext import terminal
from .store import STR, FeatureStore, StoreLock, parts_dir, remove_stale_temporaries, store_attrs_base
from .weights import sha256_of

BLOCK_BYTES = 32 << 20  # rows are read and written in blocks of about this many output bytes
# what the sources must share besides ids and labels: the images they were made from
SAME_ATTRS = ("dataset", "split", "limit", "dataset_fingerprint")


def combine_stores(paths, out: str, *, overwrite: bool = False, block_rows: int | None = None) -> FeatureStore:
    """Write ``out``: the features of the complete stores ``paths`` side by side (in that order) for the same rows.

    Refuses (one line naming the file and what differs) sources of other images, an ``out`` that is one of the
    sources, and an existing ``out`` unless ``overwrite``. The file is written under a temporary name and renamed,
    so a failure leaves no half-written store. Features are float32, or float16 when every source is float16;
    ``block_rows`` rows are copied at a time (default: about 32 MiB of output). Returns the new store.
    """
    paths = [os.fspath(p) for p in paths]
    out = os.fspath(out)
    if len(paths) < 2:
        raise TlfxError(f"tlfx combine needs at least 2 stores, got {len(paths)}; name two or more feature stores")
    if block_rows is not None and block_rows < 1:
        raise TlfxError(f"block_rows = {block_rows} must be at least 1")
    _check_paths(paths, out, overwrite)
    stores = [FeatureStore(p, allow_incomplete=False) for p in paths]
    ids, labels = _check_same_rows(stores)
    ref = stores[0]
    dims = [int(s.attrs.get("dim") or 0) for s in stores]
    for s, d in zip(stores, dims):
        if d < 1 and len(ids):
            raise TlfxError(f"store {s.path!r} has no feature columns; extract it again")
    dim = sum(dims)
    dtype = "float16" if all(s.attrs.get("dtype") == "float16" for s in stores) else "float32"
    attrs = {**store_attrs_base(), "backbone": "combined", "layers": [], "components": _components(stores, dims),
             "dtype": dtype, "class_names": ref.class_names, "n_items": int(ref.attrs.get("n_items") or len(ids)),
             "data_root": ref.attrs.get("data_root") or "", **{k: ref.attrs[k] for k in SAME_ATTRS if k in ref.attrs},
             "complete": True, "n": len(ids), "dim": dim}
    skipped = ref.skipped
    step = block_rows or max(1, BLOCK_BYTES // max(1, dim * 4))

    def fill(f):
        _store._set_attrs(f, attrs)
        n = len(ids)
        checked = n > 0 and dim > 0
        feats = f.create_dataset("features", shape=(n, dim), dtype=dtype, fletcher32=checked,
                                 chunks=(_store._chunk_rows(n, dim * np.dtype(dtype).itemsize), dim) if checked else None)
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(s.rows()) for s in stores]
            for a in range(0, n, step):
                b = min(a + step, n)
                feats[a:b] = np.hstack([r.features(a, b).astype(dtype, copy=False) for r in readers])
        f.create_dataset("labels", data=labels, dtype=np.int64, chunks=(_store._chunk_rows(n, 8),) if n else None,
                         fletcher32=n > 0)
        f.create_dataset("ids", data=ids, dtype=STR)
        g = f.create_group("skipped")
        g.create_dataset("ids", data=[i for i, _ in skipped], dtype=STR)
        g.create_dataset("reasons", data=[r for _, r in skipped], dtype=STR)

    need = len(ids) * (dim * np.dtype(dtype).itemsize + 8) + sum(len(i) + 32 for i in ids) + (1 << 20)
    with StoreLock(out):
        remove_stale_temporaries(out)
        _store._atomic_h5(out, fill, need)
        shutil.rmtree(parts_dir(out), ignore_errors=True)  # an unfinished store replaced by --overwrite
    return FeatureStore(out)


def _check_paths(paths: list[str], out: str, overwrite: bool):
    seen: dict[str, str] = {}
    for p in paths:
        if not os.path.isfile(p):
            if os.path.lexists(p):
                raise TlfxError(f"feature store {p!r} is not a regular file (a directory, FIFO, device or link loop); "
                                f"name the .h5 file tlfx extract wrote")
            raise TlfxError(f"feature store {p!r} does not exist; make it with tlfx extract")
        key = os.path.realpath(p)
        if key in seen:
            raise TlfxError(f"store {p!r} is named twice (also as {seen[key]!r}); name each store once")
        seen[key] = p
    if os.path.realpath(out) in seen or (os.path.exists(out) and any(os.path.samefile(out, p) for p in paths)):
        raise TlfxError(f"--out {out!r} is one of the stores to combine; choose another --out")
    if os.path.lexists(out) and not overwrite:
        raise TlfxError(f"{out!r} exists; pass --overwrite to replace it, or choose another --out")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise TlfxError(f"output directory {directory!r} does not exist; create it or choose another --out")


def _check_same_rows(stores: list[FeatureStore]) -> tuple[list[str], np.ndarray]:
    """The ids and labels the stores share; one line naming the first store and the first thing that differs."""
    ref = stores[0]
    ids, labels = ref.ids, ref.labels
    ref_ids = np.asarray(ids, dtype=object)
    fix = "combine stores extracted from the same images (same --data, --split and --limit)"
    for s in stores[1:]:
        what = f"cannot combine {s.path!r} with {ref.path!r}"
        for k in SAME_ATTRS:
            if s.attrs.get(k) != ref.attrs.get(k):
                raise TlfxError(f"{what}: {k} differs ({terminal(str(s.attrs.get(k)))[:80]} vs "
                                f"{terminal(str(ref.attrs.get(k)))[:80]}); {fix}")
        if s.class_names != ref.class_names:
            i = next((j for j, (x, y) in enumerate(zip(s.class_names, ref.class_names)) if x != y),
                     min(len(s.class_names), len(ref.class_names)))
            raise TlfxError(f"{what}: class names differ ({len(s.class_names)} vs {len(ref.class_names)} classes, "
                            f"first at class {i}); {fix}")
        other = np.asarray(s.ids, dtype=object)
        if len(other) != len(ref_ids):
            raise TlfxError(f"{what}: it has {len(other)} rows, the other {len(ref_ids)}; {fix}")
        bad = np.flatnonzero(other != ref_ids)
        if bad.size:
            i = int(bad[0])
            raise TlfxError(f"{what}: ids differ at row {i} ({terminal(str(other[i]))[:80]!r} vs "
                            f"{terminal(str(ref_ids[i]))[:80]!r}, {bad.size} rows in all); {fix}")
        bad = np.flatnonzero(s.labels != labels)
        if bad.size:
            i = int(bad[0])
            raise TlfxError(f"{what}: labels differ at row {i} ({int(s.labels[i])} vs {int(labels[i])}); {fix}")
    return [str(i) for i in ids], labels


def _components(stores: list[FeatureStore], dims: list[int]) -> list[dict]:
    """Each source's configuration, columns and file; a combined source contributes its own components, moved."""
    out, start = [], 0
    for s, d in zip(stores, dims):
        cfg = FeatureConfig.from_dict(s.config)
        if cfg.components:
            for c in cfg.components:
                a, b = c["columns"]
                out.append({**c, "columns": [start + a, start + b]})
        else:
            out.append({"config": cfg.to_dict(), "columns": [start, start + d],
                        "source": {"name": os.path.basename(s.path), "sha256": sha256_of(s.path)}})
        start += d
    return out


def component_computers(config: dict, device=None) -> list:
    """The backbone of each component of a combined configuration, rebuilt and verified from its record."""
    from .extraction import FeatureComputer

    return [FeatureComputer.from_config(c["config"], device=device) for c in FeatureConfig.from_dict(config).components]


def computer_for(config: dict, device=None):
    """What computes the features a store or model records, rebuilt and verified: its backbone, or for a combined
    configuration the list of its components' backbones."""
    if FeatureConfig.from_dict(config).components:
        return component_computers(config, device=device)
    from .extraction import FeatureComputer

    return FeatureComputer.from_config(config, device=device)


def embed(config: dict, paths: list[str], computer=None, **kw):
    """Features of image files for a store's or model's configuration (``tlfx predict``, ``tlfx similar --image``):
    one backbone's, or a combined configuration's components side by side in column order. Returns what
    :func:`tlfx.extraction.embed_images` returns; ``computer``: what :func:`computer_for` built, when already built;
    ``kw`` goes to ``embed_images``."""
    from .extraction import embed_images

    computer = computer or computer_for(config)
    if not isinstance(computer, list):
        return embed_images(computer, list(paths), **kw)
    return _embed_components(config, paths, computer, **kw)


def _embed_components(config: dict, paths: list[str], computers: list, **kw):
    from .extraction import embed_images

    comps = FeatureConfig.from_dict(config).components
    blocks, ok, bad = [], None, []
    for c, computer in zip(comps, computers):
        feats, ok_c, bad_c = embed_images(computer, list(paths), **kw)
        if ok is None:
            ok, bad = ok_c, bad_c
        elif ok_c != ok:
            raise TlfxError("the combined backbones could not all read the same images; pass images every one reads")
        a, b = c["columns"]
        if ok and feats.shape[1] != b - a:
            raise TlfxError(f"backbone {terminal(str(c['config'].get('backbone')))!r} as installed here makes "
                            f"{feats.shape[1]} features, the combined store had {b - a}; fit the head again")
        blocks.append(feats)
    if not ok:
        return np.zeros((0, 0), np.float32), [], bad
    return np.hstack(blocks), ok, bad
