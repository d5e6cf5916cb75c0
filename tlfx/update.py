"""Incremental extraction (``tlfx extract --update``): bring a complete store up to date with a changed image folder.

The folder is listed again; the rows of files still there are copied from the old store bit for bit (labels come
from the new listing, so a changed class set maps correctly), rows of removed files are dropped, and only new files
(and files changed since the old store was made) go through the network. The new store is an ordinary one, built
beside the old under ``F.h5.update.h5`` (parts and all) and renamed over ``F.h5`` once complete, so a kill at any
point leaves the old store whole; the same command continues an interrupted update.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from .errors import TlfxError
from .extraction import SHOWN_SKIPS, ExtractResult, FeatureComputer, _PartWriter
from .safetext import terminal
from .store import (
    FeatureStore,
    StoreLock,
    StoreWriter,
    _fsync_dir,
    _open_h5,
    _unlink_quietly,
    config_diff,
    config_of,
    covered_until,
    parts_dir,
    read_attrs,
    read_rows,
)

SUFFIX = ".update.h5"  # the new store while it is built, beside the old one


def check_updatable(ds):
    """Refuse datasets whose ids do not name the same image from one listing to the next (only files do)."""
    if not getattr(ds, "stable_ids", False):
        raise TlfxError(f"--update needs a dataset whose items are files (imagefolder:DIR, csv:FILE); "
                        f"'{terminal(ds.spec)}' has no stable per-file ids; drop --update")


def update_store(o, ds, computer: FeatureComputer, attrs: dict) -> ExtractResult | None:
    """Bring the complete store ``o.out`` up to date with ``ds``; None when there is nothing to update from (no
    store yet, or an unfinished one of this very dataset), which the caller extracts as usual."""
    if not os.path.exists(o.out):
        return None
    with StoreLock(o.out):
        try:
            old_attrs = read_attrs(o.out)
        except TlfxError:
            raise TlfxError(f"{o.out!r} exists but is not a tlfx store; choose another --out") from None
        diff = config_diff(config_of(old_attrs), config_of(attrs))
        other = [d for d in diff if not d.startswith("dataset_fingerprint:")]
        if other:
            raise TlfxError(f"--update needs the configuration {o.out!r} was made with, but {'; '.join(other)}; run "
                            f"with that configuration, or with --overwrite instead of --update to extract everything")
        if not old_attrs.get("complete"):
            if not diff:
                return None
            raise TlfxError(f"{o.out!r} is unfinished and its dataset changed since; --update needs a complete store: "
                            f"pass --overwrite instead to extract everything again")
        old = FeatureStore(o.out)
        if not diff:
            _discard(o.out + SUFFIX)  # an update killed before the folder went back to how the store has it
            n = len(old)
            return ExtractResult(o.out, n, int(old_attrs.get("dim", 0)), len(old.skipped), 0.0, 0.0,
                                 already_complete=True, update=_counts(n, 0, 0, 0, 0))
        return _update(o, ds, computer, attrs, old)


def plan(ds, old_ids: list[str], since_ns: int | None) -> tuple[dict[int, int], int]:
    """``({dataset item: old row}, changed)``: the items whose row is kept; ``changed`` counts items whose file was
    modified at or after ``since_ns`` (they are extracted again)."""
    rows: dict[str, list[int]] = {}
    for r, i in enumerate(old_ids):
        rows.setdefault(i, []).append(r)
    keep, changed = {}, 0
    for i, name in enumerate(ds.ids):
        got = rows.get(name)
        if not got:
            continue
        if since_ns is not None and _modified_since(ds, i, since_ns):
            changed += 1
            continue
        keep[i] = got.pop(0) if len(got) > 1 else got[0]  # a file listed twice (csv) keeps its rows in order
    return keep, changed


def _modified_since(ds, i: int, since_ns: int) -> bool:
    try:
        return os.stat(ds.path(i)).st_mtime_ns >= since_ns
    except OSError:
        return True  # gone or unreadable now: extracting it records why


def _since_ns(attrs: dict) -> int | None:
    """When the old store was begun, rounded up to the next second (``created`` has seconds): a file modified then
    or later may differ from what the store holds. None when the store does not say."""
    try:
        return int(time.mktime(time.strptime(str(attrs.get("created")), "%Y-%m-%dT%H:%M:%S")) + 1) * 10**9
    except (ValueError, OverflowError):
        return None


def _counts(kept, added, dropped, changed, extracted) -> dict:
    return {"kept": kept, "added": added, "dropped": dropped, "changed": changed, "extracted": extracted}


def _discard(tmp: str):
    if os.path.exists(tmp) or os.path.isdir(parts_dir(tmp)):
        with StoreLock(tmp):
            _unlink_quietly(tmp)
            shutil.rmtree(parts_dir(tmp), ignore_errors=True)


def _resumable(tmp: str, attrs: dict) -> bool:
    """Whether an update left unfinished at ``tmp`` was made for this very update (same old store, same listing)."""
    if not os.path.exists(tmp):
        return False
    try:
        existing = read_attrs(tmp)
    except TlfxError:
        return False
    return not config_diff(config_of(existing), config_of(attrs)) and existing.get("updated_from") == attrs["updated_from"]


def _update(o, ds, computer, attrs, old: FeatureStore) -> ExtractResult:
    old_ids = old.ids
    keep, changed = plan(ds, old_ids, _since_ns(old.attrs))
    kept = len(keep)
    dropped = len(old_ids) - len(set(keep.values()))
    tmp = o.out + SUFFIX
    new_attrs = {**attrs, "updated_from": str(old.attrs.get("dataset_fingerprint"))}
    t0 = time.perf_counter()
    start = extracted = 0
    with StoreWriter(tmp, new_attrs, overwrite=not _resumable(tmp, new_attrs)) as writer:
        if not writer.already_complete:  # complete: killed before its rename; only that is left to do
            part_size = int(writer.attrs.get("part_size"))
            start = covered_until(writer.parts(), len(ds))
            extracted = _fill(computer, ds, o.out, keep, writer, start, part_size, o, int(old.attrs.get("dim", 0)))
            seconds = time.perf_counter() - t0
            n = _rows_written(writer.parts())
            stats = {"seconds": seconds, "images_per_s": extracted / seconds if seconds else 0.0,
                     "device": str(computer.device), "resumed_from": start,
                     "update": _counts(kept, n - kept, dropped, changed, extracted)}
            writer.finalize(stats)
        virtual_parts = os.path.isdir(parts_dir(o.out))  # a Ray store's parts: the new store no longer maps them
        os.replace(tmp, o.out)
        _fsync_dir(os.path.dirname(os.path.abspath(o.out)))
    if virtual_parts:
        shutil.rmtree(parts_dir(o.out), ignore_errors=True)
    seconds = time.perf_counter() - t0
    st = FeatureStore(o.out)
    skipped = st.skipped
    return ExtractResult(o.out, len(st), int(st.attrs.get("dim", 0)), len(skipped), seconds,
                         extracted / seconds if seconds else 0.0, resumed_from=start,
                         skipped_examples=skipped[:SHOWN_SKIPS],
                         update=_counts(kept, len(st) - kept, dropped, changed, extracted))


def _fill(computer, ds, old_path, keep, writer, start, part_size, o, dim) -> int:
    """Write the parts from item ``start`` on: kept rows copied from the old store, the other items extracted.
    Returns the number of images sent through the network."""
    from .progress import progress_bar

    n = len(ds)
    todo = [i for i in range(start, n) if i not in keep]
    bar = progress_bar(total=len(todo), unit="img", desc="update", disable=not o.progress, dynamic_ncols=True,
                       smoothing=0.1)
    batches = iter(computer.loader(ds, todo, o.batch_size, o.workers) if todo else ())
    made: dict[int, np.ndarray] = {}
    failed: dict[int, str] = {}
    pos = 0
    listed = list(getattr(ds, "listing_skips", None) or []) if start == 0 else []
    pw = _PartWriter(writer)
    try:
        with _open_h5(old_path) as f:
            old_feats = f["features"]
            for a in range(start, n, part_size):
                b = min(a + part_size, n)
                while pos < len(todo) and todo[pos] < b:  # batches run on over part boundaries; rows wait in made
                    idx, good, arr, bad = next(batches)
                    if bad and o.strict:
                        i, reason = bad[0]
                        raise TlfxError(f"cannot read '{terminal(ds.ids[i])}': {terminal(reason)} (--strict); fix or "
                                        f"remove it, then run again to resume")
                    failed.update(bad)
                    if arr is not None:
                        feats = computer(arr)
                        dim = feats.shape[1]
                        made.update(zip(good, feats))
                    pos += len(idx)
                    bar.update(len(idx))
                copied = _rows(old_feats, old_path, sorted({keep[i] for i in range(a, b) if i in keep}))
                rows, ids, labels, skipped = [], [], [], listed
                for i in range(a, b):
                    if i in keep:
                        rows.append(copied[keep[i]])
                    elif i in made:
                        rows.append(made.pop(i))
                    else:
                        skipped.append((ds.ids[i], failed.pop(i, "not read")))
                        continue
                    ids.append(ds.ids[i])
                    labels.append(ds.labels[i])
                feats = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
                pw.put(a, b, feats, np.asarray(labels, np.int64), ids, skipped)
                listed = []
        pw.close()
    except BaseException:
        pw.abort()
        raise
    finally:
        bar.close()
    return len(todo)


def _rows_written(parts) -> int:
    total = 0
    for _start, _end, p in parts:
        with _open_h5(p, "part") as f:
            total += int(f["ids"].shape[0])
    return total


def _rows(dset, path: str, wanted: list[int]) -> dict[int, np.ndarray]:
    """Rows ``wanted`` (sorted) of the old store's features, read a contiguous run at a time."""
    out: dict[int, np.ndarray] = {}
    k = 0
    while k < len(wanted):
        j = k
        while j + 1 < len(wanted) and wanted[j + 1] == wanted[j] + 1:
            j += 1
        block = read_rows(dset, path, "features", wanted[k], wanted[j] + 1)
        out.update(zip(wanted[k:j + 1], block))
        k = j + 1
    return out
