"""Similar and near-duplicate images in a feature store: cosine search over the stored features.

The default, ``exact``, reads the store in blocks of rows (chunked matrix products), so memory stays bounded by the
block size and ``k`` whatever the store's size. ``faiss`` (the optional ``ann`` extra) holds every vector in memory
in an inner-product index on L2-normalised float32 vectors: an exact ``IndexFlatIP`` for a query, an approximate
``IndexIVFFlat`` (cells compared with their nearest cells) for near-duplicate pairs. ``auto`` takes faiss only
where it was measured to pay (docs/performance.md, "Similar-image search: exact vs index") and only when the index
fits in memory.
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np

from .errors import TlfxError
from .export import iter_blocks

BLOCK_ROWS = 4096
MAX_TOP_K = 10000
MAX_PAIRS = 100000  # duplicate pairs kept at most (the most similar); the listing says when more were found
INDEX_CHOICES = ("exact", "faiss", "auto")
# Rows above which --index auto uses faiss, per mode (benchmarks/similar_index.py, 2 cores). One query never pays:
# building any index reads and copies every vector, which is already all an exact scan does.
AUTO_FAISS_ROWS = {"nearest": None, "duplicates": 20000}
IVF_NPROBE = 8  # duplicate pairs: each IVF cell is compared with this many nearest cells, itself included
FAISS_MEMORY_FRACTION = 0.5  # a faiss index may use at most this share of the memory available when it is built


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)


# ------------------------------------------------------------------------------------------------- index choice
def _faiss():
    """The faiss module, or one clear line saying how to get it."""
    try:
        import faiss
    except ImportError:
        raise TlfxError("--index faiss needs the faiss-cpu package: pip install 'tlfx[ann]' (or faiss-cpu), "
                        "or use --index exact") from None
    return faiss


def _available_bytes() -> int:
    """Memory available now (MemAvailable on Linux; physical pages free elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def faiss_bytes(store) -> int:
    """What a faiss index of ``store`` may hold in memory: every vector as float32 plus an int64 id a row, times 1.5
    (an IVF index's lists grow by doubling: 362 MiB measured for 244 MiB of vectors)."""
    return int(1.5 * len(store) * (4 * int(store.attrs.get("dim") or 0) + 8))


def choose_index(store, index: str, mode: str) -> dict:
    """Which index answers ``mode`` (``"nearest"`` or ``"duplicates"``) for ``--index`` ``index``: a dict with
    ``index`` (``"exact"`` or ``"faiss"``), ``exact`` (whether the answer is exact) and ``why`` (one line).

    ``faiss`` is refused with a clear line when faiss is not installed or its index would not fit in memory;
    ``auto`` then falls back to the exact chunked search, whose memory is bounded whatever the store's size."""
    if index not in INDEX_CHOICES:
        raise TlfxError(f"--index must be one of {', '.join(INDEX_CHOICES)}, got {index!r}")
    if mode not in AUTO_FAISS_ROWS:
        raise TlfxError(f"unknown search mode {mode!r}; valid: {', '.join(AUTO_FAISS_ROWS)}")
    exact = {"index": "exact", "exact": True}
    n, need = len(store), faiss_bytes(store)
    limit = int(_available_bytes() * FAISS_MEMORY_FRACTION)
    if index == "auto":
        rows = AUTO_FAISS_ROWS[mode]
        if rows is None or n <= rows:
            why = "one query: an index would not pay" if rows is None else f"{n} rows <= {rows}: exact is as fast"
            return {**exact, "why": why}
        try:
            _faiss()
        except TlfxError:
            return {**exact, "why": "faiss not installed"}
        if need > limit:
            return {**exact, "why": f"a faiss index would need {need / 2**30:.1f} GiB, over the {limit / 2**30:.1f} "
                                    f"GiB allowed; the exact search reads the store in blocks"}
        index = "faiss"
    if index == "exact":
        return {**exact, "why": "asked for"}
    _faiss()
    if need > limit:
        raise TlfxError(f"--index faiss on store {store.path!r} needs {need / 2**30:.1f} GiB in memory "
                        f"({n} rows), over the {limit / 2**30:.1f} GiB allowed (half the memory available); "
                        f"use --index exact, which reads the store in blocks")
    if mode == "nearest":
        return {"index": "faiss", "exact": True, "why": "faiss IndexFlatIP (exact inner product on unit vectors)"}
    return {"index": "faiss", "exact": False,
            "why": f"faiss IndexIVFFlat cells, each compared with its {IVF_NPROBE} nearest: a pair may be missed"}


# --------------------------------------------------------------------------------------------------------- search
def nearest(store, query: np.ndarray, top_k: int = 10, block_rows: int = BLOCK_ROWS, index: str = "exact") -> list[dict]:
    """The ``top_k`` rows of ``store`` most cosine-similar to the vector ``query``, most similar first.

    ``index="faiss"`` answers from a faiss ``IndexFlatIP`` (the same, exact answer; see :func:`choose_index`)."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise TlfxError(f"--top-k must be 1 to {MAX_TOP_K}, got {top_k}")
    q = _unit(np.asarray(query, np.float32).reshape(-1))
    dim = int(store.attrs.get("dim") or 0)
    if q.shape[0] != dim:
        raise TlfxError(f"the query has {q.shape[0]} features but store {store.path!r} has {dim}; "
                        f"embed it with the store's own backbone configuration")
    if index == "faiss":
        return _nearest_faiss(store, q, top_k, block_rows)
    best_s, best_i = np.empty(0, np.float32), np.empty(0, np.int64)
    for a, f, _, _ in iter_blocks(store, block_rows):
        s = _unit(f) @ q
        best_s = np.concatenate([best_s, s])
        best_i = np.concatenate([best_i, np.arange(a, a + len(f))])
        if len(best_s) > top_k:
            keep = np.argpartition(-best_s, top_k - 1)[:top_k]
            best_s, best_i = best_s[keep], best_i[keep]
    order = np.lexsort((best_i, -best_s))
    return _rows(store, [(int(best_i[j]), float(best_s[j])) for j in order])


def _nearest_faiss(store, q: np.ndarray, top_k: int, block_rows: int) -> list[dict]:
    faiss = _faiss()
    ix = faiss.IndexFlatIP(q.shape[0])
    for _, f, _, _ in iter_blocks(store, block_rows):
        ix.add(_unit(f))
    s, i = ix.search(q[None], min(top_k, ix.ntotal))
    hits = sorted(((int(r), float(v)) for r, v in zip(i[0], s[0]) if r >= 0), key=lambda t: (-t[1], t[0]))
    return _rows(store, hits)


def _rows(store, hits: list[tuple[int, float]]) -> list[dict]:
    """Id, label and class of each ``(row, similarity)`` hit (reading only those rows)."""
    from .store import _open_h5

    names = store.class_names
    out = []
    with _open_h5(store.path) as f:
        for r, s in hits:
            label = int(f["labels"][r])
            out.append({"rank": len(out) + 1, "row": r, "id": str(f["ids"].asstr()[r]), "label": label,
                        "class": names[label] if 0 <= label < len(names) else "", "similarity": round(s, 6)})
    return out


def row_of_id(store, id_: str) -> tuple[int, np.ndarray]:
    """The row number and feature vector of the stored image ``id_``."""
    from .store import _open_h5, read_rows

    for a, _, _, ids in iter_blocks(store, BLOCK_ROWS * 16):
        if id_ in ids:
            r = a + ids.index(id_)
            with _open_h5(store.path) as f:
                return r, read_rows(f["features"], store.path, "features", r, r + 1)[0]
    raise TlfxError(f"--id {id_!r} is not in store {store.path!r}; see the ids with tlfx export --format csv")


def duplicates(store, threshold: float = 0.98, block_rows: int = BLOCK_ROWS, index: str = "exact") -> tuple[list[dict], int]:
    """Pairs of rows with cosine similarity >= ``threshold`` (each pair once), most similar first, at most
    ``MAX_PAIRS``; returns (pairs, how many were found in all).

    ``index="faiss"`` finds them through the cells of a faiss ``IndexIVFFlat`` (see :func:`_pairs_faiss`):
    approximate (a pair whose rows fall in cells far apart is missed), each similarity reported is still exact."""
    if not -1.0 <= threshold <= 1.0:
        raise TlfxError(f"--threshold must be between -1 and 1 (cosine similarity), got {threshold}")
    if index == "faiss":
        found, total = _pairs_faiss(store, threshold, block_rows)
    else:
        found, total = _pairs_exact(store, threshold, block_rows)
    rows = {r for _, i, j in found for r in (i, j)}
    info = {r["row"]: r for r in _rows(store, [(r, 0.0) for r in sorted(rows)])}
    pairs = [{"rank": k + 1, "similarity": round(s, 6), "id_a": info[i]["id"], "class_a": info[i]["class"],
              "id_b": info[j]["id"], "class_b": info[j]["class"]} for k, (s, i, j) in enumerate(found)]
    return pairs, total


def _top_pairs(found: list[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
    return sorted(found, key=lambda t: (-t[0], t[1], t[2]))[:MAX_PAIRS]


def _pairs_exact(store, threshold: float, block_rows: int) -> tuple[list[tuple[float, int, int]], int]:
    found: list[tuple[float, int, int]] = []
    total = 0
    for a, fa, _, _ in iter_blocks(store, block_rows):
        ua = _unit(fa)
        for b, fb, _, _ in iter_blocks(store, block_rows):
            if b < a:
                continue
            s = ua @ _unit(fb).T
            if b == a:
                s = np.triu(s, k=1) + np.tril(np.full_like(s, -2.0))  # each pair once, never a row with itself
            ii, jj = np.nonzero(s >= threshold - 1e-6)
            total += len(ii)
            if len(ii) > MAX_PAIRS:  # a low threshold: keep this block's most similar pairs only (bounded memory)
                keep = np.argpartition(-s[ii, jj], MAX_PAIRS - 1)[:MAX_PAIRS]
                ii, jj = ii[keep], jj[keep]
            found += [(float(s[i, j]), a + int(i), b + int(j)) for i, j in zip(ii, jj)]
            if len(found) > 2 * MAX_PAIRS:
                found = _top_pairs(found)
    return _top_pairs(found), total


def _ivf(faiss, store, block_rows: int):
    """An ``IndexIVFFlat`` (inner product) of the store's unit vectors: ~sqrt(4n) cells, spherical k-means trained
    on an even sample of rows (30 a cell, 10 iterations), then every row added block by block."""
    n, dim = len(store), int(store.attrs.get("dim") or 0)
    nlist = int(max(1, min(n // 39, round((4 * n) ** 0.5))))
    step = max(1, n // (30 * nlist))
    sample = np.concatenate([_unit(f[(-a) % step::step]) for a, f, _, _ in iter_blocks(store, block_rows)])
    ix = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ix.cp.niter, ix.cp.seed, ix.cp.min_points_per_centroid = 10, 1234, 1
    ix.cp.spherical = True
    ix.train(sample)
    del sample
    for _, f, _, _ in iter_blocks(store, block_rows):
        ix.add(_unit(f))
    ix.nprobe = min(IVF_NPROBE, nlist)
    return ix


def _cell(faiss, ix, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers and unit vectors of the IVF cell ``c`` (views of the index's own memory, no copy)."""
    k = ix.invlists.list_size(c)
    if not k:
        return np.empty(0, np.int64), np.empty((0, ix.d), np.float32)
    ids = faiss.rev_swig_ptr(ix.invlists.get_ids(c), k)
    codes = faiss.rev_swig_ptr(ix.invlists.get_codes(c), k * ix.code_size)
    return ids.astype(np.int64, copy=False), codes.view(np.float32).reshape(k, ix.d)


def _pairs_faiss(store, threshold: float, block_rows: int) -> tuple[list[tuple[float, int, int]], int]:
    """Pairs through an IVF index: each cell is compared, by blocked matrix products, with itself and with the
    ``IVF_NPROBE - 1`` cells whose centroids are nearest to its own (each pair of cells once). A pair is missed
    only when its two rows fall in cells that are not among each other's nearest; every similarity is exact."""
    faiss = _faiss()
    ix = _ivf(faiss, store, block_rows)
    centroids = ix.quantizer.reconstruct_n(0, ix.nlist)
    _, near = ix.quantizer.search(centroids, min(IVF_NPROBE, ix.nlist))
    partners = [sorted({int(m) for m in near[c] if m > c}) for c in range(ix.nlist)]  # each pair of cells once
    found: list[tuple[float, int, int]] = []
    total = 0
    for c in range(ix.nlist):
        ids_c, vc = _cell(faiss, ix, c)
        if not len(ids_c):
            continue
        cells = [(ids_c, vc)] + [_cell(faiss, ix, m) for m in partners[c]]
        ids_o = np.concatenate([i for i, _ in cells])
        for a in range(0, len(ids_c), block_rows):  # blocks of both sides: memory bounded whatever a cell's size
            for b in range(a, len(ids_o), block_rows):  # the cell itself first: columns before row a are done
                cols = np.concatenate([v[max(0, b - o):b + block_rows - o] for o, (_, v) in
                                       zip(np.cumsum([0] + [len(i) for i, _ in cells[:-1]]), cells)
                                       if o < b + block_rows and o + len(v) > b])
                s = vc[a:a + block_rows] @ cols.T
                if b < len(ids_c):  # the cell with itself: each pair once, never a row with itself
                    r, q = np.arange(a, a + s.shape[0])[:, None], np.arange(b, b + s.shape[1])[None, :]
                    s = np.where(q > r, s, -2.0)
                ii, jj = np.nonzero(s >= threshold - 1e-6)
                total += len(ii)
                if len(ii) > MAX_PAIRS:
                    keep = np.argpartition(-s[ii, jj], MAX_PAIRS - 1)[:MAX_PAIRS]
                    ii, jj = ii[keep], jj[keep]
                x, y = ids_c[a + ii], ids_o[b + jj]
                found += [(float(v), int(p), int(q)) for v, p, q in zip(s[ii, jj], np.minimum(x, y), np.maximum(x, y))]
                if len(found) > 2 * MAX_PAIRS:
                    found = _top_pairs(found)
    return _top_pairs(found), total


def embed_query(store, image: str) -> np.ndarray:
    """The features of the image file ``image``, made with the store's own backbone configuration."""
    from .combine import embed
    from .safetext import terminal

    cfg = store.config
    if str(cfg.get("backbone") or "").startswith("imported:"):
        raise TlfxError(f"store {store.path!r} holds imported features ({terminal(cfg['backbone'])}), which tlfx "
                        f"cannot compute for a new image; use --id instead")
    feats, ok, bad = embed(cfg, [image], batch_size=1)  # a combined store: every source backbone, side by side
    if not ok:
        reason = bad[0][1] if bad else "unreadable"
        raise TlfxError(f"--image {terminal(image)!r} cannot be read as an image ({terminal(reason)}); give an image file")
    return feats[0]


# ---------------------------------------------------------------------------------------------------- contact sheet
def contact_sheet(store, title: str, groups: list[tuple[str, list[dict]]], size: int = 128) -> str:
    """A self-contained HTML page: for each ``(caption, hits)`` group, the hits' images as data URIs (read only as
    regular files under the store's recorded data_root, see :func:`tlfx.report.figures.gallery_images`), with id,
    class and similarity. Every value is escaped."""
    from .report.figures import gallery_images
    from .safetext import html as e

    ids = sorted({h[k] for _, hits in groups for h in hits for k in ("id", "id_a", "id_b") if k in h})
    images = dict(zip(ids, gallery_images(store.attrs, ids, size)))
    out = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\">",
           "<meta http-equiv=\"Content-Security-Policy\" "
           "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
           f"<title>{e(title)}</title><style>body{{font-family:sans-serif}} figure{{display:inline-block;margin:6px;"
           f"width:{size + 20}px;font-size:11px;word-break:break-all;vertical-align:top}} .miss{{width:{size}px;"
           f"height:{size}px;background:#eee;display:flex;align-items:center;justify-content:center}}</style></head><body>",
           f"<h1>{e(title)}</h1>"]
    for caption, hits in groups:
        out.append(f"<h2>{e(caption)}</h2><div>")
        for h in hits:
            keys = [("id_a", "class_a"), ("id_b", "class_b")] if "id_a" in h else [("id", "class")]
            for ik, ck in keys:
                img, reason = images.get(h[ik], (None, "not found"))
                pic = (f"<img src=\"{_png_uri(img)}\" alt=\"{e(h[ik])}\">" if img is not None
                       else f"<div class=\"miss\">{e(reason)}</div>")
                out.append(f"<figure>{pic}<figcaption>{e(h[ik])}<br>{e(h[ck])}<br>similarity "
                           f"{e(format(h['similarity'], '.4f'))}</figcaption></figure>")
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def _png_uri(img) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
