"""Similar and near-duplicate images in a feature store: exact cosine search over the stored features.

Everything is read in blocks of rows (chunked matrix products), so memory stays bounded by the block size and
``k`` whatever the store's size. No approximate index: the answers are exact.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from .errors import TlfxError
from .export import iter_blocks

BLOCK_ROWS = 4096
MAX_TOP_K = 10000
MAX_PAIRS = 100000  # duplicate pairs kept at most (the most similar); the listing says when more were found


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)


def nearest(store, query: np.ndarray, top_k: int = 10, block_rows: int = BLOCK_ROWS) -> list[dict]:
    """The ``top_k`` rows of ``store`` most cosine-similar to the vector ``query``, most similar first."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise TlfxError(f"--top-k must be 1 to {MAX_TOP_K}, got {top_k}")
    q = _unit(np.asarray(query, np.float32).reshape(-1))
    dim = int(store.attrs.get("dim") or 0)
    if q.shape[0] != dim:
        raise TlfxError(f"the query has {q.shape[0]} features but store {store.path!r} has {dim}; "
                        f"embed it with the store's own backbone configuration")
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


def duplicates(store, threshold: float = 0.98, block_rows: int = BLOCK_ROWS) -> tuple[list[dict], int]:
    """Pairs of rows with cosine similarity >= ``threshold`` (each pair once), most similar first, at most
    ``MAX_PAIRS``; returns (pairs, how many were found in all)."""
    if not -1.0 <= threshold <= 1.0:
        raise TlfxError(f"--threshold must be between -1 and 1 (cosine similarity), got {threshold}")
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
                found = sorted(found, key=lambda t: (-t[0], t[1], t[2]))[:MAX_PAIRS]
    found = sorted(found, key=lambda t: (-t[0], t[1], t[2]))[:MAX_PAIRS]
    rows = {r for _, i, j in found for r in (i, j)}
    info = {r["row"]: r for r in _rows(store, [(r, 0.0) for r in sorted(rows)])}
    pairs = [{"rank": k + 1, "similarity": round(s, 6), "id_a": info[i]["id"], "class_a": info[i]["class"],
              "id_b": info[j]["id"], "class_b": info[j]["class"]} for k, (s, i, j) in enumerate(found)]
    return pairs, total


def embed_query(store, image: str) -> np.ndarray:
    """The features of the image file ``image``, made with the store's own backbone configuration."""
    from .extraction import FeatureComputer, embed_images
    from .safetext import terminal

    cfg = store.config
    if str(cfg.get("backbone") or "").startswith("imported:"):
        raise TlfxError(f"store {store.path!r} holds imported features ({terminal(cfg['backbone'])}), which tlfx "
                        f"cannot compute for a new image; use --id instead")
    if cfg.get("components"):  # a combined store: every source backbone, side by side
        from .combine import embed_components

        feats, ok, bad = embed_components(cfg, [image])
    else:
        feats, ok, bad = embed_images(FeatureComputer.from_config(cfg), [image], batch_size=1)
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
