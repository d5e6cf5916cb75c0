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
import stat
import tempfile
import time

import h5py
import numpy as np

from . import __version__
from .config import DEFAULTS, RESUME, FeatureConfig, components_problem, components_summary
from .errors import TlfxError
from .safetext import terminal

FORMAT_VERSION = 1
# a resumed store must agree with the run that continues it on the features' configuration and on its source
SOURCE_KEYS = ("dtype", "dataset", "split", "dataset_fingerprint")
CONFIG_KEYS = (*RESUME, *SOURCE_KEYS)
JSON_ATTRS = ("weights", "layers", "preprocess", "class_names", "stats", "calibration", "components")
_PART_RE = re.compile(r"^part-(\d{10})-(\d{10})\.h5$")
STR = h5py.string_dtype("utf-8")
_UMASK = os.umask(0o022)  # read once at import (single-threaded): temporaries get the mode a plain open() would give
os.umask(_UMASK)
_PART_TMP_RE = re.compile(r"^part-\d{10}-\d{10}\.h5\.tmp")

# Bounds on what a store may claim (a store may come from someone else): attributes are read, then measured
MAX_ATTRS = 256
MAX_ATTR_CHARS = 1 << 20
MAX_ROWS = 1 << 36
MAX_DIM = 1 << 20
MAX_CLASSES = 1 << 17
READ_BLOCK_BYTES = 64 << 20  # features are read in blocks of this size, so --verify and damage checks use bounded memory
_KINDS = {
    "format_version": int, "image_size": int, "n_items": int, "n": int, "dim": int, "limit": int, "part_size": int,
    "complete": bool,
    "tlfx_version": str, "backbone": str, "pooling": str, "precision": str, "dtype": str, "dataset": str, "split": str,
    "data_root": str, "dataset_fingerprint": str, "created": str, "runtime": str, "updated_from": str, "tta": str,
    "weights": dict, "preprocess": dict, "stats": dict, "layers": list, "class_names": list, "calibration": dict,
    "components": list,
}


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


def _atomic_h5(path: str, fill, need: int = 0):
    """Write an HDF5 file under a fresh temporary name, fsync, then rename onto ``path``.

    The temporary is created exclusively (``mkstemp``: never through a file or link planted at a guessable name) and
    must still be the file we created when it is renamed. ``need``: the bytes the file will take; with less free
    space nothing is started, since HDF5 running out of space mid-write can crash the process (seen: SIGSEGV).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if need and _free_bytes(directory) < need:
        raise _os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp", dir=directory)
    except OSError as exc:
        raise _os_error(exc, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        made = os.fstat(fd)
        with h5py.File(tmp, "w") as f:
            fill(f)
        now = os.lstat(tmp)
        if (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino):
            raise TlfxError(f"the temporary file {tmp!r} was replaced by something else while tlfx wrote it; "
                            f"check who else writes in {directory!r}")
        os.fsync(fd)
        os.replace(tmp, path)
        _fsync_dir(directory)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _os_error(exc, path) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    finally:
        os.close(fd)


def _free_bytes(directory: str) -> int:
    try:
        st = os.statvfs(directory)
    except OSError:
        return 1 << 62  # cannot tell: let the write itself find out
    return st.f_bavail * st.f_frsize


def _unlink_quietly(path: str):
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_stale_temporaries(path: str):
    """Remove temporaries a killed writer of this store left (``F.h5.tmp*``, ``F.h5.parts/*.h5.tmp*``).

    Called with the store's lock held, so no live writer of this store owns them. Links are removed, never followed.
    """
    store_tmp = re.compile(re.escape(os.path.basename(path)) + r"\.tmp")
    for directory, pattern in ((os.path.dirname(os.path.abspath(path)), store_tmp), (parts_dir(path), _PART_TMP_RE)):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if pattern.match(name):
                _unlink_quietly(os.path.join(directory, name))


def _set_attrs(f, attrs: dict):
    for k, v in attrs.items():
        f.attrs[k] = json.dumps(v) if (k in JSON_ATTRS or isinstance(v, (dict, list, tuple))) else v


def _refuse(path: str, what: str) -> TlfxError:
    """The one line for a store that is damaged or inconsistent."""
    return TlfxError(f"feature store {path!r} is damaged or inconsistent: {what}; extract it again "
                     f"(tlfx extract ... --overwrite)")


def _get_attrs(f, path: str) -> dict:
    """The store's attributes, decoded and checked: bounded sizes, JSON where JSON is due, the documented types."""
    names = list(f.attrs.keys())
    if len(names) > MAX_ATTRS:
        raise _refuse(path, f"{len(names)} attributes (at most {MAX_ATTRS})")
    out = {}
    for k in names:
        if len(k) > 256:
            raise _refuse(path, f"an attribute name of {len(k)} characters")
        if f.attrs.get_id(k).get_storage_size() > MAX_ATTR_CHARS:
            raise _refuse(path, f"attribute {terminal(k)!r} is larger than {MAX_ATTR_CHARS} bytes")
        try:
            v = f.attrs[k]
        except (OSError, TypeError, ValueError) as exc:
            raise _refuse(path, f"attribute {terminal(k)!r} cannot be read ({terminal(exc)})") from None
        out[k] = _attr_value(path, k, v)
    return out


def _attr_value(path: str, k: str, v):
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, str) and len(v) > MAX_ATTR_CHARS:
        raise _refuse(path, f"attribute {terminal(k)!r} is larger than {MAX_ATTR_CHARS} characters ({len(v)})")
    want = _KINDS.get(k)
    if want in (dict, list) and isinstance(v, str):
        try:
            v = json.loads(v)
        except (ValueError, RecursionError):
            raise _refuse(path, f"attribute {k!r} is not valid JSON") from None
    if want is None:
        return v if isinstance(v, (str, int, float, bool)) else terminal(v)[:200]
    if want is bool and isinstance(v, int) and v in (0, 1):
        v = bool(v)
    ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
    if not ok:
        raise _refuse(path, f"attribute {k!r} should be {_KIND_NAMES[want]}, found {type(v).__name__} "
                            f"{terminal(repr(v))[:60]}")
    if want is int and not 0 <= v <= MAX_ROWS:
        raise _refuse(path, f"attribute {k!r} = {v} is out of range (0 to {MAX_ROWS})")
    if k in ("layers", "class_names"):
        if not all(isinstance(x, str) for x in v):
            raise _refuse(path, f"attribute {k!r} should be a JSON list of strings")
        if k == "class_names" and len(v) > MAX_CLASSES:
            raise _refuse(path, f"{len(v)} class names (at most {MAX_CLASSES})")
    if k == "components" and components_problem(v):
        raise _refuse(path, terminal(components_problem(v)))
    if k == "stats" and not all(isinstance(v.get(x, 0), (int, float)) for x in ("seconds", "images_per_s")):
        raise _refuse(path, "attribute 'stats' should give seconds and images_per_s as numbers")
    return v


_KIND_NAMES = {int: "an integer", bool: "true or false", str: "a string", dict: "a JSON object", list: "a JSON list"}


def config_of(attrs: dict) -> dict:
    # stores made before the OpenVINO runtime existed were all made with torch, before TTA without it
    return {k: attrs.get(k, DEFAULTS.get(k)) for k in CONFIG_KEYS}


def config_diff(existing: dict, new: dict) -> list[str]:
    """What a run would change in a store: the feature configuration (:meth:`FeatureConfig.diff`, precision
    included) and where the images come from."""
    diff = FeatureConfig.from_dict(existing).diff(FeatureConfig.from_dict(new), names=("store", "now"), keys=RESUME)
    return diff + [f"{k}: store {existing.get(k)} vs now {new.get(k)}" for k in SOURCE_KEYS if existing.get(k) != new.get(k)]


# ------------------------------------------------------------------------------------------------------ parts
def list_parts(path: str) -> list[tuple[int, int, str]]:
    """The whole parts of a store being written, sorted by their first item."""
    try:
        names = os.listdir(parts_dir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        m = _PART_RE.match(name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), os.path.join(parts_dir(path), name)))
    return sorted(out)


def _checked_dataset(f, name: str, data: np.ndarray):
    """A dataset chunked by rows (~1 MiB chunks) with HDF5's fletcher32 checksum on every chunk: bit rot is caught
    on read instead of changing results. Empty arrays cannot be chunked and are written plainly."""
    if data.size == 0:
        return f.create_dataset(name, data=data)
    rows = _chunk_rows(data.shape[0], int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize)
    return f.create_dataset(name, data=data, chunks=(rows, *data.shape[1:]), fletcher32=True)


def _chunk_rows(n: int, row_bytes: int) -> int:
    """Rows per chunk: chunks of at most ~1 MiB, evened out over ``n`` rows (HDF5 allocates the last chunk whole)."""
    most = max(1, (1 << 20) // max(row_bytes, 1))
    return max(1, -(-n // -(-n // most)))


def write_part(path: str, start: int, end: int, features: np.ndarray, labels, ids, skipped, dtype="float32"):
    """Write the rows of items ``[start, end)`` as one durable part. ``skipped``: list of (id, reason)."""
    d = parts_dir(path)
    os.makedirs(d, exist_ok=True)
    target = os.path.join(d, f"part-{start:010d}-{end:010d}.h5")

    def fill(f):
        _checked_dataset(f, "features", np.asarray(features, dtype=dtype))
        _checked_dataset(f, "labels", np.asarray(labels, dtype=np.int64))
        f.create_dataset("ids", data=list(ids), dtype=STR)
        f.create_dataset("skipped_ids", data=[s[0] for s in skipped], dtype=STR)
        f.create_dataset("skipped_reasons", data=[s[1] for s in skipped], dtype=STR)

    ids = list(ids)
    need = (np.asarray(features).size * np.dtype(dtype).itemsize + 8 * len(labels) + sum(len(str(i)) + 32 for i in ids)
            + sum(len(str(a)) + len(str(b)) + 64 for a, b in skipped) + (64 << 10))  # + HDF5's own structures
    _atomic_h5(target, fill, need)
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
            remove_stale_temporaries(self.path)
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
            if diff and existing.get("complete") and all(d.startswith("dataset_fingerprint:") for d in diff):
                raise TlfxError(f"{self.path!r} was made from another state of the dataset (its files changed: "
                                f"{diff[0]}); pass --update to extract only the new files and drop the removed ones, "
                                f"--overwrite to extract everything again, or choose another --out")
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
        _atomic_h5(self.path, lambda f: _set_attrs(f, header), need=len(json.dumps(header, default=str)) + (64 << 10))

    def parts(self):
        return list_parts(self.path)

    def write_part(self, start, end, features, labels, ids, skipped):
        return write_part(self.path, start, end, features, labels, ids, skipped, self.attrs.get("dtype", "float32"))

    def finalize(self, stats: dict | None = None, virtual: bool = False):
        finalize(self.path, self.attrs, stats, virtual=virtual)


def finalize(path: str, attrs: dict, stats: dict | None = None, virtual: bool = False):
    """Join the parts into ``path`` (rows in item order) and mark it complete; removes the parts unless virtual.

    Refuses before writing anything when the disk cannot hold the joined file (the parts stay for the next run).
    """
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
    for start, end, p in chain:
        with _open_h5(p) as f:
            metas.append((p, _check_part(f, p, start, end, None), 0))  # labels are checked by readers
    dim = next((s[1] for _, s, _ in metas if s[0] > 0), 0)
    n = sum(s[0] for _, s, _ in metas)
    dtype = attrs.get("dtype", "float32")
    final_attrs = {**attrs, "complete": True, "n": n, "dim": dim, "stats": stats or attrs.get("stats") or {}}
    _check_space(path, [p for _, _, p in chain], virtual)

    def fill(f):
        _set_attrs(f, final_attrs)
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
            checked = n > 0 and dim > 0
            chunk_rows = _chunk_rows(n, dim * np.dtype(dtype).itemsize)
            feats = f.create_dataset("features", shape=(n, dim), dtype=dtype, chunks=(chunk_rows, dim) if checked else None,
                                     fletcher32=checked)
            labels = f.create_dataset("labels", shape=(n,), dtype=np.int64, chunks=(_chunk_rows(n, 8),) if n else None,
                                      fletcher32=n > 0)
        ids = f.create_dataset("ids", shape=(n,), dtype=STR)
        sk_ids, sk_reasons = [], []
        row = 0
        for p, shape, _ in metas:
            with _open_h5(p) as src:
                k = shape[0]
                if k:
                    if not virtual:
                        feats[row:row + k] = read_rows(src["features"], p, "features")
                        labels[row:row + k] = read_rows(src["labels"], p, "labels")
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


def _check_space(path: str, part_paths: list[str], virtual: bool):
    """Refuse to join when the disk cannot hold the joined file: HDF5 running out of space mid-write can crash the
    process (seen: a segmentation fault), so the join never starts what it cannot finish."""
    directory = os.path.dirname(os.path.abspath(path))
    size = sum(os.path.getsize(p) for p in part_paths)
    need = (size // 8 if virtual else size + size // 20) + (1 << 20)  # ids, skipped and HDF5's own overhead
    free = _free_bytes(directory)
    if free < need:
        raise TlfxError(f"disk full: joining the {len(part_paths)} parts of {path!r} needs about {_mb(need)} but "
                        f"{directory!r} has {_mb(free)} free; free space and run the same extract command again "
                        f"(the parts are kept)")


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"


# ---------------------------------------------------------------------------------------------------- reading
class _Vanished(TlfxError):
    """A file of the store disappeared while being read (a writer joined or replaced it)."""


def _open_h5(path: str, what: str = "feature store"):
    """Open an HDF5 file for reading: a regular file only (a FIFO or device would hang or stream forever)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise TlfxError(f"{what} {path!r} is not a regular file; give the path of an HDF5 store made by tlfx extract")
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise _Vanished(f"{what} {path!r} does not exist; make one with tlfx extract") from None
    except OSError:
        raise TlfxError(f"{path!r} is not a readable HDF5 feature store; extract it again") from None


def read_attrs(path: str) -> dict:
    """The checked attributes of the store at ``path``; refuses what is not a store of a format this tlfx reads."""
    with _open_h5(path) as f:
        attrs = _get_attrs(f, path)
    if "format_version" not in attrs:
        raise TlfxError(f"{path!r} is not a tlfx feature store (no format_version attribute)")
    if int(attrs["format_version"]) > FORMAT_VERSION:
        raise TlfxError(f"{path!r} has store format {attrs['format_version']}, newer than this tlfx reads "
                        f"({FORMAT_VERSION}); upgrade tlfx")
    return attrs


def _dataset(f, path: str, name: str, ndim: int, kinds: str):
    """``f[name]``, refused unless it is a dataset in this file with ``ndim`` dimensions and a dtype kind in ``kinds``
    (``s``: strings)."""
    link = f.get(name, getlink=True)
    if link is None:
        raise _refuse(path, f"it has no /{name} dataset")
    if not isinstance(link, h5py.HardLink):
        raise _refuse(path, f"/{name} is a link to elsewhere, not a dataset of this file")
    d = f[name]
    if not isinstance(d, h5py.Dataset):
        raise _refuse(path, f"/{name} is not a dataset")
    if d.ndim != ndim:
        raise _refuse(path, f"/{name} has {d.ndim} dimensions {d.shape}, expected {ndim}")
    kind = "s" if h5py.check_string_dtype(d.dtype) else d.dtype.kind
    if kind not in kinds:
        want = {"f": "floats", "iu": "integers", "s": "strings"}[kinds]
        raise _refuse(path, f"/{name} holds {d.dtype} values, expected {want}")
    return d


def _check_layout(f, path: str, n_classes: int | None, skipped=("skipped/ids", "skipped/reasons")) -> tuple[int, int]:
    """Check the datasets of a store or a part against each other and the class list (``n_classes`` None: labels
    unchecked); returns (rows, dim)."""
    feats = _dataset(f, path, "features", 2, "f")
    labels = _dataset(f, path, "labels", 1, "iu")
    ids = _dataset(f, path, "ids", 1, "s")
    n, dim = feats.shape
    if n > MAX_ROWS or dim > MAX_DIM:
        raise _refuse(path, f"/features claims {n} x {dim} (at most {MAX_ROWS} x {MAX_DIM})")
    if labels.shape[0] != n or ids.shape[0] != n:
        raise _refuse(path, f"/features has {n} rows but /labels has {labels.shape[0]} and /ids {ids.shape[0]}")
    sk_ids = _dataset(f, path, skipped[0], 1, "s")
    sk_reasons = _dataset(f, path, skipped[1], 1, "s")
    if sk_ids.shape != sk_reasons.shape:
        raise _refuse(path, f"/{skipped[0]} has {sk_ids.shape[0]} entries but /{skipped[1]} {sk_reasons.shape[0]}")
    for i in range(0, n if n_classes is not None else 0, 1 << 20):
        block = read_rows(labels, path, "labels", i, i + (1 << 20))
        bad = block[(block < -1) | (block >= n_classes)]
        if bad.size:
            raise _refuse(path, f"label {int(bad[0])} is outside the {n_classes} classes of class_names "
                                f"(labels run from 0 to {n_classes - 1}, -1 = unlabelled)")
    return n, dim


def _check_virtual_sources(ds, path: str, name: str):
    """A virtual dataset may only map this store's own parts (never another file on this machine)."""
    if not ds.is_virtual:
        return
    own = os.path.realpath(parts_dir(path))
    base = os.path.dirname(os.path.abspath(path))
    for src in ds.virtual_sources():
        target = os.path.realpath(os.path.join(base, src.file_name))
        if os.path.dirname(target) != own or not _PART_RE.match(os.path.basename(target)):
            raise _refuse(path, f"/{name} maps {terminal(src.file_name)!r}, which is not one of its parts")


def _check_part(f, path: str, start: int, end: int, n_classes: int | None) -> tuple[int, int]:
    rows, dim = _check_layout(f, path, n_classes, skipped=("skipped_ids", "skipped_reasons"))
    if rows > end - start:
        raise _refuse(path, f"the part of items {start}-{end} holds {rows} rows")
    return rows, dim


def _ranges_text(ranges) -> str:
    shown = ", ".join(f"{a}-{b - 1}" for a, b in ranges[:10])
    return shown + (f" and {len(ranges) - 10} more ranges" if len(ranges) > 10 else "")


def damaged_ranges(ds, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
    """Row ranges ``[a, b)`` of ``ds`` in ``[start, stop)`` that cannot be read (a chunk failing its checksum)."""
    stop = ds.shape[0] if stop is None else min(stop, ds.shape[0])
    step = ds.chunks[0] if ds.chunks else max(1, stop - start)
    out: list[tuple[int, int]] = []
    for a in range(start - start % step, stop, step):
        b = min(a + step, stop)
        try:
            ds[max(a, start):b]
        except OSError:
            if out and out[-1][1] == max(a, start):
                out[-1] = (out[-1][0], b)
            else:
                out.append((max(a, start), b))
    return out


def _block_rows(ds) -> int:
    row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    rows = max(1, READ_BLOCK_BYTES // row_bytes)
    return max(ds.chunks[0], rows - rows % ds.chunks[0]) if ds.chunks else rows


def read_rows(ds, path: str, name: str, start: int = 0, stop: int | None = None, offset: int = 0) -> np.ndarray:
    """Rows ``[start, stop)`` of dataset ``ds`` of file ``path``, read in bounded blocks; a block that fails its
    checksum ends in one line naming the damaged rows (``offset``: the first row's number in the whole store)."""
    stop = ds.shape[0] if stop is None else min(stop, ds.shape[0])
    out = np.empty((max(0, stop - start), *ds.shape[1:]), dtype=ds.dtype)
    step = _block_rows(ds)
    for a in range(start, stop, step):
        b = min(a + step, stop)
        try:
            out[a - start:b - start] = ds[a:b]
        except OSError:
            ranges = [(x + offset, y + offset) for x, y in damaged_ranges(ds, a, b)] or [(a + offset, b + offset)]
            raise TlfxError(f"feature store {path!r} has damaged rows {_ranges_text(ranges)} (/{name} fails its "
                            f"checksum: the file changed on disk); extract it again") from None
    return out


def _strings(ds) -> np.ndarray:
    return ds.asstr()[...] if h5py.check_string_dtype(ds.dtype) else ds[...]


class FeatureStore:
    """Read access to a store: ``FeatureStore("t.h5").features`` (complete or, for a partial store, what is done).

    Opening checks the attributes and, for a complete store, the datasets against each other and the class list.
    An incomplete store is read once, as one snapshot of the parts present then (features, labels, ids and skipped
    all from the same parts), so a writer adding parts meanwhile never makes them disagree.
    """

    def __init__(self, path: str, allow_incomplete: bool = True):
        self.path = path
        self.attrs = read_attrs(path)
        self._snap: dict | None = None
        if not self.complete and not allow_incomplete:
            raise TlfxError(f"store {path!r} is incomplete ({self._progress()}); finish it by running the same "
                            f"extract command again, or pass --allow-incomplete")
        if self.complete:
            self._check_complete()

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def _check_complete(self):
        with _open_h5(self.path) as f:
            n, dim = _check_layout(f, self.path, len(self.class_names))
            dtype = f["features"].dtype.name
            for name in ("features", "labels"):
                _check_virtual_sources(f[name], self.path, name)
        a = self.attrs
        if a.get("n") != n:
            raise _refuse(self.path, f"attribute n = {a.get('n')} but /features has {n} rows")
        if a.get("dim", dim) != dim:
            raise _refuse(self.path, f"attribute dim = {a.get('dim')} but /features has {dim} columns")
        if n and a.get("dtype", dtype) != dtype:
            raise _refuse(self.path, f"attribute dtype = {terminal(a.get('dtype'))} but /features holds {dtype}")

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

    # --- an incomplete store: one snapshot of its parts
    def _snapshot(self) -> dict | None:
        """Features, labels, ids and skipped of the parts present now (None once the store is complete)."""
        if self.complete:
            return None
        if self._snap is None:
            for _ in range(2):
                try:
                    snap = self._read_parts(list_parts(self.path))
                except _Vanished:
                    snap = None  # a part went away: the writer joined them; look again
                self.attrs = read_attrs(self.path)
                if self.complete:  # completed meanwhile: read the joined file instead
                    self._check_complete()
                    return None
                if snap is not None:
                    self._snap = snap
                    break
            else:
                raise TlfxError(f"store {self.path!r} changed twice while being read (a writer is working on it); "
                                f"run the command again")
        return self._snap

    def _read_parts(self, parts) -> dict:
        feats, labels, ids, sk_ids, sk_reasons, row, dim = [], [], [], [], [], 0, None
        n_classes = len(self.class_names)
        for start, end, p in parts:
            with _open_h5(p, "part") as f:
                rows, d = _check_part(f, p, start, end, n_classes)
                if rows and dim is not None and d != dim:
                    raise _refuse(self.path, f"part {os.path.basename(p)} has {d} features per row, the others {dim}")
                if rows:
                    dim = d
                    feats.append(read_rows(f["features"], p, "features", offset=row))
                    labels.append(read_rows(f["labels"], p, "labels", offset=row).astype(np.int64))
                    ids += [str(x) for x in _strings(f["ids"])]
                sk_ids += [str(x) for x in _strings(f["skipped_ids"])]
                sk_reasons += [str(x) for x in _strings(f["skipped_reasons"])]
                row += rows
        return {"features": np.concatenate(feats) if feats else np.zeros((0, 0), np.float32),
                "labels": np.concatenate(labels) if labels else np.zeros((0,), np.int64),
                "ids": ids, "skipped": list(zip(sk_ids, sk_reasons))}

    def _read(self, name):
        with _open_h5(self.path) as f:
            d = f[name]
            return _strings(d) if h5py.check_string_dtype(d.dtype) else read_rows(d, self.path, name)

    @property
    def features(self) -> np.ndarray:
        snap = self._snapshot()
        return snap["features"] if snap is not None else self._read("features")

    @property
    def labels(self) -> np.ndarray:
        snap = self._snapshot()
        return snap["labels"] if snap is not None else self._read("labels").astype(np.int64)

    @property
    def ids(self) -> list[str]:
        snap = self._snapshot()
        return list(snap["ids"]) if snap is not None else [str(x) for x in self._read("ids")]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        snap = self._snapshot()
        if snap is not None:
            return list(snap["skipped"])
        with _open_h5(self.path) as f:
            return list(zip(_strings(f["skipped/ids"]), _strings(f["skipped/reasons"])))

    def rows(self) -> RowReader:
        """A reader of row ranges that keeps the file open: ``with store.rows() as r: X = r.features(a, b)``.

        Memory is what the caller asks for: a complete store is read from disk range by range (an incomplete one
        from its snapshot of the parts, already in memory)."""
        return RowReader(self)

    def iter_chunks(self, rows: int = 8192, labeled_only: bool = False):
        """``(start, features, labels)`` for consecutive blocks of ``rows`` rows, in bounded memory.

        ``labeled_only`` drops the rows labelled -1 from each block (``start`` stays the block's first row)."""
        if rows < 1:
            raise TlfxError(f"chunk rows = {rows} must be at least 1")
        labels = self.labels
        with self.rows() as r:
            for a in range(0, len(labels), rows):
                b = min(a + rows, len(labels))
                X, y = r.features(a, b), labels[a:b]
                if labeled_only:
                    keep = y >= 0
                    if not keep.all():
                        X, y = X[keep], y[keep]
                yield a, X, y

    def __len__(self):
        snap = self._snapshot()
        return len(snap["labels"]) if snap is not None else int(self.attrs.get("n", 0))

    # --- integrity
    def verify(self) -> tuple[int, bool, list[tuple[int, int]]]:
        """Read every row, chunk by chunk, in bounded memory: ``(rows, checked, damaged row ranges)``.

        ``checked`` is False for a store written without checksums (before fletcher32 was added): its rows were
        read without error, but bit rot in them would not show.
        """
        if self.complete and not self._virtual():
            sources = [(self.path, 0)]
        else:
            sources, row = [], 0
            for _, _, p in list_parts(self.path):
                sources.append((p, row))
                with _open_h5(p, "part") as f:
                    row += f["features"].shape[0] if "features" in f else 0
        damaged: list[tuple[int, int]] = []
        checked, total = True, 0
        for p, offset in sources:
            with _open_h5(p, "part" if p != self.path else "feature store") as f:
                for name in ("features", "labels"):
                    d = _dataset(f, p, name, 2 if name == "features" else 1, "f" if name == "features" else "iu")
                    checked &= bool(d.fletcher32) or d.shape[0] == 0
                    step = _block_rows(d)
                    for a in range(0, d.shape[0], step):
                        try:
                            d[a:a + step]
                        except OSError:
                            damaged += [(x + offset, y + offset) for x, y in damaged_ranges(d, a, a + step)]
                total += f["features"].shape[0]
        return total, checked, _merge(damaged)

    def _virtual(self) -> bool:
        with _open_h5(self.path) as f:
            return bool("features" in f and f["features"].is_virtual)

    def describe(self) -> str:
        """A few lines for a terminal; every value read from the file is escaped (it may come from anyone)."""
        a, t = self.attrs, terminal
        lines = [t(self.path)]
        if self.complete:
            lines.append(f"  status      complete: {a.get('n')} rows x {a.get('dim')} ({t(a.get('dtype', 'float32'))})")
        else:
            lines.append(f"  status      INCOMPLETE: {self._progress()}; run the same extract command to resume")
        w = a.get("weights") or {}
        pre = a.get("preprocess") or {}
        if a.get("components"):  # tlfx combine: the sources' columns side by side
            lines.append(f"  combined    {t(components_summary(a['components']))}")
            for c in a["components"]:
                cfg, src = c["config"], c.get("source") or {}
                cw = cfg.get("weights") if isinstance(cfg.get("weights"), dict) else {}
                lines.append(f"    columns {c['columns'][0]}-{c['columns'][1] - 1}: {t(cfg.get('backbone'))} "
                             f"(weights {t(cw.get('name'))}, layers {t(', '.join(map(str, cfg.get('layers') or [])))}, "
                             f"{t(cfg.get('image_size'))} px) from {t(src.get('name'))} "
                             f"(sha256 {t(str(src.get('sha256', ''))[:12])})")
        else:
            lines += [
                f"  backbone    {t(a.get('backbone'))}  weights {t(w.get('name'))} (sha256 {t(str(w.get('sha256', ''))[:16])})",
                f"  layers      {t(', '.join(a.get('layers') or []))}  pooling {t(a.get('pooling'))}"
                + (f"  tta {t(a.get('tta'))}" if a.get("tta", "none") != "none" else ""),
                f"  image       {a.get('image_size')} px (resize {t(pre.get('resize'))}, {t(pre.get('interpolation'))}, "
                f"mean {t(pre.get('mean'))}, std {t(pre.get('std'))})",
            ]
        lines += [
            f"  dataset     {t(a.get('dataset'))} split {t(a.get('split'))}  ({a.get('n_items')} items, fingerprint "
            f"{t(str(a.get('dataset_fingerprint'))[:12])})",
            f"  classes     {len(self.class_names)}: {t(', '.join(self.class_names[:12]))}"
            f"{' ...' if len(self.class_names) > 12 else ''}",
        ]
        if self.complete:
            lab = self.labels
            counts = np.bincount(lab[lab >= 0], minlength=len(self.class_names)) if len(lab) else []
            lines.append(f"  per class   {', '.join(str(int(c)) for c in counts)}")
            sk = self.skipped
            lines.append(f"  skipped     {len(sk)}" + (f"  e.g. {t(sk[0][0])}: {t(sk[0][1])}" if sk else ""))
        st = a.get("stats") or {}
        if st:
            lines.append(f"  made with   {t(st.get('device'))} {t(a.get('precision'))} in {st.get('seconds', 0):.1f} s "
                         f"({st.get('images_per_s', 0):.0f} images/s), tlfx {t(a.get('tlfx_version'))}")
        return "\n".join(lines)


class RowReader:
    """Row ranges of a store's ``/features`` with the file held open (see :meth:`FeatureStore.rows`)."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self._file = None
        self._ds = None
        self._snap = store._snapshot()
        if self._snap is not None:
            self.n, self.dim = self._snap["features"].shape[0], (self._snap["features"].shape[1] if
                                                                 self._snap["features"].ndim == 2 else 0)
        else:
            self.n, self.dim = int(store.attrs.get("n", 0)), int(store.attrs.get("dim", 0))

    def __enter__(self):
        if self._snap is None:
            self._file = _open_h5(self.store.path)
            self._ds = self._file["features"]
            self.n, self.dim = self._ds.shape
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()
            self._file = self._ds = None

    @property
    def hdf5_chunk_rows(self) -> int:
        """Rows per HDF5 chunk of ``/features`` (the natural unit of a read); 1 for an in-memory snapshot."""
        return int(self._ds.chunks[0]) if self._ds is not None and self._ds.chunks else 1

    def features(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``/features`` (a damaged chunk ends in one line naming its rows)."""
        if self._snap is not None:
            return self._snap["features"][start:stop]
        if self._ds is None:
            raise RuntimeError("RowReader used outside its with-block")
        return read_rows(self._ds, self.store.path, "features", start, stop)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def store_attrs_base() -> dict:
    return {"format_version": FORMAT_VERSION, "tlfx_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
