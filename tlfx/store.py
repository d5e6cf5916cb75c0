"""The FeatureStore: one HDF5 file of features, labels and ids per (dataset split, backbone configuration).

While a store is being written, ``F.h5`` holds only its attributes (``complete`` = False) and the rows live in
parts ``F.h5.parts/part-<start>-<end>.h5`` covering dataset items ``[start, end)``. Each part is written under a
temporary name and renamed when whole, so a killed writer loses at most the part in flight and never corrupts
what is done. Independent writers (local threads, Ray actors) produce parts; ``finalize`` joins them into one
plain HDF5 file (copied, or as virtual datasets over the parts with ``virtual=True``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time

import h5py
import numpy as np

from . import __version__
from .errors import TlfxError

FORMAT_VERSION = 1
CONFIG_KEYS = ("backbone", "weights", "layers", "pooling", "image_size", "preprocess", "precision", "dtype",
               "dataset", "split", "dataset_fingerprint", "runtime")
JSON_ATTRS = ("weights", "layers", "preprocess", "class_names", "stats", "calibration")
_PART_RE = re.compile(r"^part-(\d{10})-(\d{10})\.h5$")
STR = h5py.string_dtype("utf-8")


def parts_dir(path: str) -> str:
    return path + ".parts"


# ----------------------------------------------------------------------------------------------------- locking
class StoreLock:
    """An exclusive lock file ``F.h5.lock`` taken before HDF5 opens anything for writing.

    A lock left by a dead process on this host is recognised as stale and taken over.
    """

    def __init__(self, path: str):
        self.path = path + ".lock"
        self.held = False

    def acquire(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and not self._stale(owner):
                    raise TlfxError(
                        f"store {self.path[:-5]!r} is being written by process {owner.get('pid')} on "
                        f"{owner.get('host')} (lock {self.path}); wait for it to finish"
                    ) from None
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            except PermissionError:
                raise TlfxError(f"cannot write in {os.path.dirname(self.path) or '.'!r} (permission denied); "
                                f"choose a writable --out") from None
            except OSError as exc:
                raise _os_error(exc, self.path) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise TlfxError(f"could not take the lock {self.path}; remove it if no tlfx process is writing")

    def _owner(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # half-written by a writer that died at once: stale

    @staticmethod
    def _stale(owner) -> bool:
        if owner.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, KeyError, TypeError):
            return False
        return False

    def release(self):
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _os_error(exc: OSError, path: str) -> TlfxError:
    if exc.errno == errno.ENOSPC:
        return TlfxError(f"disk full while writing {path!r}; free space and run the same command again to resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return TlfxError(f"cannot write {path!r} ({os.strerror(exc.errno)}); choose a writable --out")
    return TlfxError(f"cannot write {path!r}: {exc}")


def _fsync_dir(directory: str):
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_h5(path: str, fill):
    """Write an HDF5 file under a temporary name, fsync, then rename onto ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            fill(f)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise _os_error(exc, path) from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _set_attrs(f, attrs: dict):
    for k, v in attrs.items():
        f.attrs[k] = json.dumps(v) if (k in JSON_ATTRS or isinstance(v, (dict, list, tuple))) else v


def _get_attrs(f) -> dict:
    out = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        if k in JSON_ATTRS and isinstance(v, str):
            v = json.loads(v)
        out[k] = v
    return out


def config_of(attrs: dict) -> dict:
    # stores made before the OpenVINO runtime existed were all made with torch
    return {k: attrs.get(k, "torch" if k == "runtime" else None) for k in CONFIG_KEYS}


def config_diff(a: dict, b: dict) -> list[str]:
    def short(v):
        if isinstance(v, dict) and "sha256" in v:
            return f"{v.get('name')} {str(v.get('sha256'))[:12]}"
        return json.dumps(v) if not isinstance(v, str) else v

    return [f"{k}: {short(a.get(k))} -> {short(b.get(k))}" for k in CONFIG_KEYS if a.get(k) != b.get(k)]


# ------------------------------------------------------------------------------------------------------ parts
def list_parts(path: str) -> list[tuple[int, int, str]]:
    d = parts_dir(path)
    if not os.path.isdir(d):
        return []
    out = []
    for name in os.listdir(d):
        m = _PART_RE.match(name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), os.path.join(d, name)))
    return sorted(out)


def write_part(path: str, start: int, end: int, features: np.ndarray, labels, ids, skipped, dtype="float32"):
    """Write the rows of items ``[start, end)`` as one durable part. ``skipped``: list of (id, reason)."""
    d = parts_dir(path)
    os.makedirs(d, exist_ok=True)
    target = os.path.join(d, f"part-{start:010d}-{end:010d}.h5")

    def fill(f):
        f.create_dataset("features", data=np.asarray(features, dtype=dtype))
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        f.create_dataset("ids", data=list(ids), dtype=STR)
        f.create_dataset("skipped_ids", data=[s[0] for s in skipped], dtype=STR)
        f.create_dataset("skipped_reasons", data=[s[1] for s in skipped], dtype=STR)

    _atomic_h5(target, fill)
    return target


def covered_until(parts, n_items: int) -> int:
    """Items [0, k) are covered by contiguous parts; returns k."""
    k = 0
    for start, end, _ in parts:
        if start == k:
            k = end
        elif start > k:
            break
    return min(k, n_items)


def missing_ranges(parts, n_items: int, block: int) -> list[tuple[int, int]]:
    """Blocks of ``block`` items not yet covered by any part (for independent writers)."""
    done = {(s, e) for s, e, _ in parts}
    return [(s, min(s + block, n_items)) for s in range(0, n_items, block) if (s, min(s + block, n_items)) not in done]


# ---------------------------------------------------------------------------------------------------- writing
class StoreWriter:
    """Creates or resumes a store; refuses to mix configurations. Use as a context manager (holds the lock)."""

    def __init__(self, path: str, attrs: dict, overwrite: bool = False):
        self.path = path
        self.attrs = dict(attrs)
        self.overwrite = overwrite
        self.lock = StoreLock(path)
        self.already_complete = False

    def __enter__(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise TlfxError(f"output directory {directory!r} does not exist; create it or choose another --out")
        self.lock.acquire()
        try:
            self._open()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc):
        self.lock.release()

    def _open(self):
        if os.path.exists(self.path) and not self.overwrite:
            try:
                existing = read_attrs(self.path)
            except TlfxError:
                raise TlfxError(f"{self.path!r} exists but is not a tlfx store; pass --overwrite to replace it") from None
            diff = config_diff(config_of(existing), config_of(self.attrs))
            if diff:
                raise TlfxError(f"{self.path!r} was made with another configuration ({'; '.join(diff)}); "
                                f"pass --overwrite to replace it, or choose another --out")
            if existing.get("complete"):
                self.already_complete = True
                return
            self.attrs = {**existing, **{k: v for k, v in self.attrs.items() if k not in CONFIG_KEYS}}
            self.attrs["complete"] = False
            return
        if os.path.isdir(parts_dir(self.path)):
            shutil.rmtree(parts_dir(self.path))
        header = {**self.attrs, "complete": False}
        _atomic_h5(self.path, lambda f: _set_attrs(f, header))

    def parts(self):
        return list_parts(self.path)

    def write_part(self, start, end, features, labels, ids, skipped):
        return write_part(self.path, start, end, features, labels, ids, skipped, self.attrs.get("dtype", "float32"))

    def finalize(self, stats: dict | None = None, virtual: bool = False):
        finalize(self.path, self.attrs, stats, virtual=virtual)


def finalize(path: str, attrs: dict, stats: dict | None = None, virtual: bool = False):
    """Join the parts into ``path`` (rows in item order) and mark it complete; removes the parts unless virtual."""
    parts = list_parts(path)
    n_items = int(attrs["n_items"])
    if covered_until(parts, n_items) < n_items or any(e > n_items for _, e, _ in parts):
        raise TlfxError(f"store {path!r} is missing parts; run the same extract command again to finish it")
    chain, k = [], 0
    for part in parts:  # only the contiguous chain from item 0: parts left by another engine's layout never add rows twice
        if part[0] == k:
            chain.append(part)
            k = part[1]
    metas = []
    for _, _, p in chain:
        with h5py.File(p, "r") as f:
            metas.append((p, f["features"].shape, f["skipped_ids"].shape[0]))
    dim = next((s[1] for _, s, _ in metas if len(s) == 2 and s[0] > 0), 0)
    n = sum(s[0] for _, s, _ in metas)
    dtype = attrs.get("dtype", "float32")
    final_attrs = {**attrs, "complete": True, "n": n, "dim": dim, "stats": stats or attrs.get("stats") or {}}

    def fill(f):
        _set_attrs(f, final_attrs)
        chunk_rows = max(1, min(max(n, 1), (1 << 20) // max(dim * 4, 1)))
        if virtual:
            layout = h5py.VirtualLayout(shape=(n, dim), dtype=dtype)
            lab_layout = h5py.VirtualLayout(shape=(n,), dtype=np.int64)
            row = 0
            for p, shape, _ in metas:
                rel = os.path.relpath(p, os.path.dirname(os.path.abspath(path)))
                if shape[0]:
                    layout[row:row + shape[0]] = h5py.VirtualSource(rel, "features", shape=(shape[0], dim))
                    lab_layout[row:row + shape[0]] = h5py.VirtualSource(rel, "labels", shape=(shape[0],))
                row += shape[0]
            f.create_virtual_dataset("features", layout, fillvalue=np.nan)  # a lost part reads as NaN, not as zeros
            f.create_virtual_dataset("labels", lab_layout, fillvalue=-1)
        else:
            feats = f.create_dataset("features", shape=(n, dim), dtype=dtype, chunks=(chunk_rows, dim) if n and dim else None)
            labels = f.create_dataset("labels", shape=(n,), dtype=np.int64)
        ids = f.create_dataset("ids", shape=(n,), dtype=STR)
        sk_ids, sk_reasons = [], []
        row = 0
        for p, shape, _ in metas:
            with h5py.File(p, "r") as src:
                k = shape[0]
                if k:
                    if not virtual:
                        feats[row:row + k] = src["features"][...]
                        labels[row:row + k] = src["labels"][...]
                    ids[row:row + k] = src["ids"][...]
                sk_ids += list(src["skipped_ids"].asstr()[...])
                sk_reasons += list(src["skipped_reasons"].asstr()[...])
                row += k
        g = f.create_group("skipped")
        g.create_dataset("ids", data=sk_ids, dtype=STR)
        g.create_dataset("reasons", data=sk_reasons, dtype=STR)

    _atomic_h5(path, fill)
    if not virtual:
        shutil.rmtree(parts_dir(path), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- reading
def read_attrs(path: str) -> dict:
    try:
        with h5py.File(path, "r") as f:
            attrs = _get_attrs(f)
    except FileNotFoundError:
        raise TlfxError(f"feature store {path!r} does not exist; make one with tlfx extract") from None
    except OSError:
        raise TlfxError(f"{path!r} is not a readable HDF5 feature store") from None
    if "format_version" not in attrs:
        raise TlfxError(f"{path!r} is not a tlfx feature store (no format_version attribute)")
    if int(attrs["format_version"]) > FORMAT_VERSION:
        raise TlfxError(f"{path!r} has store format {attrs['format_version']}, newer than this tlfx reads "
                        f"({FORMAT_VERSION}); upgrade tlfx")
    return attrs


class FeatureStore:
    """Read access to a store: ``FeatureStore("t.h5").features`` (complete or, for a partial store, what is done)."""

    def __init__(self, path: str, allow_incomplete: bool = True):
        self.path = path
        self.attrs = read_attrs(path)
        if not self.complete and not allow_incomplete:
            raise TlfxError(f"store {path!r} is incomplete ({self._progress()}); finish it by running the same "
                            f"extract command again, or pass --allow-incomplete")

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def _progress(self) -> str:
        n_items = int(self.attrs.get("n_items", 0))
        done = covered_until(list_parts(self.path), n_items)
        return f"{done} of {n_items} items extracted"

    @property
    def config(self) -> dict:
        return config_of(self.attrs)

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs.get("class_names") or [])

    def _read(self, name):
        if self.complete:
            with h5py.File(self.path, "r") as f:
                d = f[name]
                return d.asstr()[...] if d.dtype.kind == "O" else d[...]
        chunks = []
        for _, _, p in list_parts(self.path):
            with h5py.File(p, "r") as f:
                d = f[name]
                chunks.append(d.asstr()[...] if d.dtype.kind == "O" else d[...])
        if not chunks:
            return np.zeros((0,), np.int64) if name == "labels" else np.zeros((0,), object)
        return np.concatenate(chunks)

    @property
    def features(self) -> np.ndarray:
        if not self.complete and not list_parts(self.path):
            return np.zeros((0, 0), np.float32)
        return self._read("features")

    @property
    def labels(self) -> np.ndarray:
        return self._read("labels").astype(np.int64)

    @property
    def ids(self) -> list[str]:
        return [str(x) for x in self._read("ids")]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        if self.complete:
            with h5py.File(self.path, "r") as f:
                g = f["skipped"]
                return list(zip(g["ids"].asstr()[...], g["reasons"].asstr()[...]))
        return list(zip(self._read("skipped_ids"), self._read("skipped_reasons")))

    def __len__(self):
        if self.complete:
            return int(self.attrs.get("n", 0))
        return len(self.labels)

    def iter_batches(self, rows: int = 8192):
        """Yield ``(features, labels)`` blocks without loading the whole store."""
        if not self.complete:
            yield self.features, self.labels
            return
        with h5py.File(self.path, "r") as f:
            n = f["labels"].shape[0]
            for i in range(0, n, rows):
                yield f["features"][i:i + rows], f["labels"][i:i + rows]

    def describe(self) -> str:
        a = self.attrs
        lines = [f"{self.path}"]
        if self.complete:
            lines.append(f"  status      complete: {a.get('n')} rows x {a.get('dim')} ({a.get('dtype', 'float32')})")
        else:
            lines.append(f"  status      INCOMPLETE: {self._progress()}; run the same extract command to resume")
        w = a.get("weights") or {}
        pre = a.get("preprocess") or {}
        lines += [
            f"  backbone    {a.get('backbone')}  weights {w.get('name')} (sha256 {str(w.get('sha256', ''))[:16]})",
            f"  layers      {', '.join(a.get('layers') or [])}  pooling {a.get('pooling')}",
            f"  image       {a.get('image_size')} px (resize {pre.get('resize')}, {pre.get('interpolation')}, "
            f"mean {pre.get('mean')}, std {pre.get('std')})",
            f"  dataset     {a.get('dataset')} split {a.get('split')}  ({a.get('n_items')} items, fingerprint "
            f"{str(a.get('dataset_fingerprint'))[:12]})",
            f"  classes     {len(self.class_names)}: {', '.join(self.class_names[:12])}"
            f"{' ...' if len(self.class_names) > 12 else ''}",
        ]
        if self.complete:
            lab = self.labels
            counts = np.bincount(lab[lab >= 0], minlength=len(self.class_names)) if len(lab) else []
            lines.append(f"  per class   {', '.join(str(int(c)) for c in counts)}")
            sk = self.skipped
            lines.append(f"  skipped     {len(sk)}" + (f"  e.g. {sk[0][0]}: {sk[0][1]}" if sk else ""))
        st = a.get("stats") or {}
        if st:
            lines.append(f"  made with   {st.get('device')} {a.get('precision')} in {st.get('seconds', 0):.1f} s "
                         f"({st.get('images_per_s', 0):.0f} images/s), tlfx {a.get('tlfx_version')}")
        return "\n".join(lines)


def store_attrs_base() -> dict:
    return {"format_version": FORMAT_VERSION, "tlfx_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
