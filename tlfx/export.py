"""Feature stores to and from other tools' formats: numpy, parquet (pyarrow) and CSV, read chunk by chunk.

``export_store`` writes a store's features with their ids, labels, class names and the store's configuration as
metadata; ``import_features`` turns a parquet of vectors (tlfx's own export, or another tool's) back into a store.
Data files hold the values as they are (they are data, not text for a terminal).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat

import numpy as np

from .errors import TlfxError
from .safetext import terminal
from .weights import sha256_of

FORMATS = ("npy", "parquet", "csv")
VECTOR = "vector"  # the parquet column of feature vectors
META_KEY = b"tlfx"  # the parquet schema metadata key holding the JSON metadata
BLOCK_ROWS = 4096  # rows read from a store or a parquet at a time: memory stays flat whatever the store's size
MAX_META_BYTES = 1 << 24


def open_complete(path: str):
    """The store at ``path``, refused unless complete (an export of half a store would look whole)."""
    from .store import FeatureStore

    return FeatureStore(path, allow_incomplete=False)


def iter_blocks(store, rows: int = BLOCK_ROWS):
    """``(start, features, labels, ids)`` for consecutive blocks of ``rows`` rows of a complete store."""
    from .store import _open_h5, read_rows

    with _open_h5(store.path) as f:
        n = f["features"].shape[0]
        for a in range(0, n, rows):
            b = min(a + rows, n)
            feats = read_rows(f["features"], store.path, "features", a, b)
            labels = read_rows(f["labels"], store.path, "labels", a, b).astype(np.int64)
            ids = [str(x) for x in f["ids"].asstr()[a:b]]
            yield a, feats, labels, ids


def metadata(store) -> dict:
    """What an export records besides the rows: class names, the configuration and the store's provenance."""
    a = store.attrs
    return {"format": 1, "class_names": store.class_names, "config": store.config, "n": len(store),
            "dim": int(a.get("dim") or 0), "dtype": a.get("dtype", "float32"), "source": os.path.basename(store.path),
            "tlfx_version": a.get("tlfx_version")}


def _check_out(out: str, overwrite: bool):
    if os.path.lexists(out):
        if not overwrite:
            raise TlfxError(f"--out {out!r} exists; pass --overwrite to replace it, or choose another --out")
        if os.path.isdir(out) and not os.path.islink(out):
            shutil.rmtree(out)
        else:
            os.unlink(out)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise TlfxError(f"output directory {parent!r} does not exist; create it or choose another --out")


def export_store(path: str, fmt: str, out: str, overwrite: bool = False, row_group_size: int = 65536) -> int:
    """Write the store at ``path`` as ``fmt`` (npy folder, parquet or csv file) to ``out``; returns the rows written.

    Written under a temporary name and renamed when whole, so a failed export leaves no half file at ``out``.
    """
    if fmt not in FORMATS:
        raise TlfxError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if row_group_size < 1:
        raise TlfxError(f"--row-group-size must be 1 or more rows, got {row_group_size}")
    store = open_complete(path)
    _check_out(out, overwrite)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.tlfx-tmp-{os.getpid()}")
    try:
        {"npy": _npy, "parquet": _parquet, "csv": _csv}[fmt](store, tmp, row_group_size)
        os.replace(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)
    return len(store)


def _npy(store, out: str, _rows: int):
    os.makedirs(out)
    n, meta = len(store), metadata(store)
    dim = meta["dim"]
    feats = np.lib.format.open_memmap(os.path.join(out, "features.npy"), mode="w+", dtype=meta["dtype"], shape=(n, dim))
    labels = np.empty(n, np.int64)
    ids: list[str] = []
    for a, f, lab, i in iter_blocks(store):
        feats[a:a + len(f)] = f
        labels[a:a + len(f)] = lab
        ids += i
    feats.flush()
    del feats
    np.save(os.path.join(out, "labels.npy"), labels)
    with open(os.path.join(out, "ids.json"), "w", encoding="utf-8") as fh:
        json.dump(ids, fh, ensure_ascii=False)
    with open(os.path.join(out, "ids.txt"), "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(i + "\n" for i in ids)  # as they are; ids.json is exact even for an id with a line break
    with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, ensure_ascii=False, default=str)


def _schema(dim: int, meta: dict):
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("label", pa.int64()), ("class", pa.string()),
                      (VECTOR, pa.list_(pa.float32(), dim))],
                     metadata={META_KEY: json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8")})


def _parquet(store, out: str, row_group_size: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = metadata(store)
    dim, names = meta["dim"], store.class_names
    schema = _schema(dim, meta)
    with pq.ParquetWriter(out, schema) as writer:
        for _, f, lab, ids in iter_blocks(store, row_group_size):
            flat = pa.array(np.ascontiguousarray(f, dtype=np.float32).reshape(-1), pa.float32())
            cls = [names[x] if 0 <= x < len(names) else None for x in lab.tolist()]
            table = pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(lab, pa.int64()), pa.array(cls, pa.string()),
                                          pa.FixedSizeListArray.from_arrays(flat, dim)], schema=schema)
            writer.write_table(table, row_group_size=row_group_size)


def _csv(store, out: str, _rows: int):
    names, dim = store.class_names, metadata(store)["dim"]
    with open(out, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "class", *(f"f{j}" for j in range(dim))])
        for _, f, lab, ids in iter_blocks(store):
            for i, x, row in zip(ids, lab.tolist(), f):
                w.writerow([i, x, names[x] if 0 <= x < len(names) else "", *(repr(float(v)) for v in row)])


# ------------------------------------------------------------------------------------------------------ import
def _parquet_meta(pf, path: str) -> dict:
    raw = (pf.schema_arrow.metadata or {}).get(META_KEY)
    if raw is None:
        return {}
    if len(raw) > MAX_META_BYTES:
        raise TlfxError(f"parquet {path!r} has {len(raw)} bytes of tlfx metadata (at most {MAX_META_BYTES})")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise TlfxError(f"parquet {path!r} has tlfx metadata that is not valid JSON; export it again") from None
    return meta if isinstance(meta, dict) else {}


def _class_names(meta: dict, path: str) -> list[str] | None:
    names = meta.get("class_names")
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
        raise TlfxError(f"parquet {path!r}: metadata class_names is not a list of strings; export it again")
    return names


def _vectors(column, path: str, start: int) -> np.ndarray:
    """A block of the vector column as an (n, dim) float32 array; ragged, null or NaN rows are refused."""
    import pyarrow as pa

    if column.null_count:
        raise TlfxError(f"parquet {path!r}: column {VECTOR!r} has empty (null) rows near row {start}; drop or fill them")
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
    else:
        lengths = np.asarray(column.value_lengths())
        if len(lengths) and (lengths != lengths[0]).any():
            bad = int(np.argmax(lengths != lengths[0]))
            raise TlfxError(f"parquet {path!r}: ragged column {VECTOR!r}: row {start + bad} has {lengths[bad]} values, "
                            f"row {start} has {lengths[0]}; every vector must have the same length")
        dim = int(lengths[0]) if len(lengths) else 0
    values = column.flatten()
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise TlfxError(f"parquet {path!r}: column {VECTOR!r} holds {terminal(values.type)}, expected numbers")
    if values.null_count:
        raise TlfxError(f"parquet {path!r}: column {VECTOR!r} has null values near row {start}; fill them")
    arr = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), dim)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise TlfxError(f"parquet {path!r}: vector of row {start + int(np.argmax(bad))} is NaN or infinite "
                        f"({int(bad.sum())} such rows in this block); fix or drop those rows")
    return arr


def import_features(path: str, out: str, overwrite: bool = False, part_rows: int = 65536) -> int:
    """A store at ``out`` from the parquet at ``path``: column ``vector`` (lists of numbers, one length), optional
    ``id``, ``label`` and ``class`` columns, class names from tlfx's metadata. Returns the rows imported.

    The store's configuration is marked ``imported:<file name>``, so heads fitted on it only evaluate on stores
    imported from a file of that name (its features mean whatever the other tool made them mean).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .store import StoreWriter, store_attrs_base

    try:
        st = os.stat(path)
    except OSError as exc:
        raise TlfxError(f"cannot read parquet {path!r}: {os.strerror(exc.errno or 0)}; give an existing file") from None
    if not stat.S_ISREG(st.st_mode):
        raise TlfxError(f"{path!r} is not a regular file; give a parquet file")
    if os.path.lexists(out) and not overwrite:
        raise TlfxError(f"--out {out!r} exists; pass --overwrite to replace it, or choose another --out")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise TlfxError(f"{path!r} is not a readable parquet file ({terminal(str(exc).splitlines()[0][:120])})") from None
    cols = pf.schema_arrow.names
    if VECTOR not in cols:
        raise TlfxError(f"parquet {path!r} has no {VECTOR!r} column (columns: {terminal(', '.join(cols[:20]))}); "
                        f"name the column of feature vectors {VECTOR!r}")
    meta = _parquet_meta(pf, path)
    names = _class_names(meta, path)
    n = pf.metadata.num_rows
    name = os.path.basename(path)
    sha = sha256_of(path)
    want = [c for c in ("id", "label", VECTOR) if c in cols]
    max_label = -1
    attrs = {**store_attrs_base(), "backbone": f"imported:{name}", "dtype": "float32", "dataset": f"imported:{name}",
             "split": "all", "data_root": "", "limit": 0, "dataset_fingerprint": sha, "n_items": n, "part_size": part_rows}
    # every row is checked (labels, vector lengths, NaN) before anything is written: a refused file leaves no store
    dim, start = None, 0
    for batch in pf.iter_batches(batch_size=part_rows, columns=[c for c in ("label", VECTOR) if c in cols]):
        vec = _vectors(batch.column(VECTOR), path, start)
        if dim is not None and vec.shape[1] != dim:
            raise TlfxError(f"parquet {path!r}: ragged column {VECTOR!r}: rows from {start} have {vec.shape[1]} "
                            f"values, earlier rows {dim}; every vector must have the same length")
        dim = vec.shape[1]
        if "label" in cols:
            lab = batch.column("label")
            if not pa.types.is_integer(lab.type) or lab.null_count:
                raise TlfxError(f"parquet {path!r}: column 'label' must hold integers without nulls (-1 = unlabelled)")
            arr = lab.to_numpy()
            if len(arr):
                if arr.min() < -1:
                    raise TlfxError(f"parquet {path!r}: label {int(arr.min())} is below -1 (-1 = unlabelled)")
                max_label = max(max_label, int(arr.max()))
        start += batch.num_rows
    if names is None:
        names = [str(i) for i in range(max_label + 1)]
    if max_label >= len(names):
        raise TlfxError(f"parquet {path!r}: label {max_label} is outside its {len(names)} class names; export it again")
    attrs["class_names"] = names
    with StoreWriter(out, attrs, overwrite=overwrite) as w:
        start = 0
        for batch in pf.iter_batches(batch_size=part_rows, columns=want):
            k = batch.num_rows
            vec = _vectors(batch.column(VECTOR), path, start)
            ids = ([str(x) for x in batch.column("id").to_pylist()] if "id" in cols
                   else [str(i) for i in range(start, start + k)])
            labels = batch.column("label").to_numpy() if "label" in cols else np.full(k, -1, np.int64)
            w.write_part(start, start + k, vec, labels, ids, [])
            start += k
        w.finalize()
    return n


