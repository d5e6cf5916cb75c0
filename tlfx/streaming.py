"""Training rows read chunk by chunk: what a streaming head (``streaming = True``) uses to fit a store larger than
memory.

A head that can train this way implements ``fit_store(store, chunk_rows=None)`` (tlfx's own heads get it from
:class:`tlfx_plugins.head_base.ClassifierHead`); ``tlfx fit`` hands it the store instead of a feature array (see
:func:`tlfx.training.use_streaming`). The pieces here keep memory bounded by ``chunk_rows``:

- :class:`StoreRows` / :class:`ArrayRows`: the same row-range reader over a store on disk or arrays in memory, so a
  head's chunked algorithm is one code path for both;
- :func:`holdout`: a stratified held-out set of row indices for early stopping, capped in bytes;
- :func:`scan`: one pass computing per-feature mean and variance (Chan's parallel merge, float64) and gathering the
  held-out rows;
- :func:`shuffled_chunks`: one epoch as in-memory chunks of about ``chunk_rows`` rows, each made of several blocks
  drawn in a seeded random order and shuffled row by row (a store sorted by class still gives mixed batches).
"""

from __future__ import annotations

import math

import numpy as np

CHUNK_BYTES = 64 << 20  # default chunk: ~64 MiB of float32 features (13k rows of 1280)
HOLDOUT_BYTES = 64 << 20  # the held-out rows kept in memory for early stopping
BLOCKS_PER_CHUNK = 8  # a chunk joins this many blocks from random places in the store


def default_chunk_rows(dim: int, itemsize: int = 4, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk of ``dim`` features takes about ``budget`` bytes (at least 256)."""
    return max(256, budget // max(1, dim * itemsize))


class ArrayRows:
    """Features in memory behind the reader interface of :class:`StoreRows` (``labels``: one int per row)."""

    def __init__(self, X, labels, chunk_rows: int | None = None):
        self.X = np.asarray(X)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.n, self.dim = self.X.shape
        self.chunk_rows = int(chunk_rows or default_chunk_rows(self.dim))
        self.block_rows = max(1, self.chunk_rows // BLOCKS_PER_CHUNK)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def features(self, start: int, stop: int) -> np.ndarray:
        return self.X[start:stop]


class StoreRows(ArrayRows):
    """The rows of a :class:`tlfx.FeatureStore`, read range by range with the file open (use as a context manager).

    ``labels`` (8 bytes a row) are read whole, the features only ever ``chunk_rows`` at a time."""

    def __init__(self, store, chunk_rows: int | None = None):
        self.store = store
        self.labels = np.asarray(store.labels, dtype=np.int64)
        self._reader = store.rows()
        self.n, self.dim = len(self.labels), self._reader.dim
        self.chunk_rows = int(chunk_rows or default_chunk_rows(self.dim))
        self.block_rows = max(1, self.chunk_rows // BLOCKS_PER_CHUNK)

    def __enter__(self):
        self._reader.__enter__()
        hdf5 = self._reader.hdf5_chunk_rows  # whole HDF5 chunks per block: no chunk is decoded twice in an epoch
        if self.block_rows > hdf5:
            self.block_rows -= self.block_rows % hdf5
        return self

    def __exit__(self, *exc):
        self._reader.__exit__(*exc)

    def features(self, start: int, stop: int) -> np.ndarray:
        return self._reader.features(start, stop)


def holdout(targets, fraction: float, seed: int, dim: int, max_bytes: int = HOLDOUT_BYTES) -> np.ndarray:
    """Sorted indices of held-out rows: ``fraction`` of each class's labelled rows (``targets >= 0``), drawn with
    ``seed``, at most ``max_bytes`` of float32 features in all (the cap shrinks every class alike). Classes with
    fewer than 2 rows stay in training."""
    targets = np.asarray(targets)
    if fraction <= 0:
        return np.zeros(0, np.int64)
    labelled = int((targets >= 0).sum())
    cap = max(1, max_bytes // max(1, 4 * dim))
    frac = min(fraction, cap / max(1, labelled))
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(targets[targets >= 0]):
        rows = rng.permutation(np.flatnonzero(targets == c))
        k = int(round(len(rows) * frac))
        if len(rows) >= 2 and k >= 1:
            out.append(rows[:min(k, len(rows) - 1)])
    return np.sort(np.concatenate(out)).astype(np.int64) if out else np.zeros(0, np.int64)


def scan(rows, use, pick=(), standardize: bool = True):
    """One pass over ``rows``: ``(mean, var, features of the rows in pick)``.

    ``mean``/``var`` (float64, population variance) are over the rows where the boolean mask ``use`` is true,
    merged block by block with Chan's formula; when ``standardize`` is false they are zeros and ones and no pass
    is spent on them. ``pick`` (sorted row indices) are gathered in the same pass."""
    use = np.asarray(use, dtype=bool)
    pick = np.asarray(pick, dtype=np.int64)
    picked = np.empty((len(pick), rows.dim), dtype=np.float32)
    n_tot, mean, m2 = 0, np.zeros(rows.dim), np.zeros(rows.dim)
    step = rows.block_rows  # float64 temporaries of a block, not of a chunk
    for a in range(0, rows.n, step) if (standardize or len(pick)) else ():
        b = min(a + step, rows.n)
        keep = use[a:b]
        if not (keep.any() or (len(pick) and pick[0] < b and pick[-1] >= a)):
            continue
        X = rows.features(a, b)
        lo, hi = np.searchsorted(pick, [a, b])
        if hi > lo:
            picked[lo:hi] = X[pick[lo:hi] - a]
        if standardize and keep.any():
            Xk = np.asarray(X[keep], dtype=np.float64)
            k = len(Xk)
            m = Xk.mean(axis=0)
            d = m - mean
            m2 += ((Xk - m) ** 2).sum(axis=0) + d * d * n_tot * k / (n_tot + k)
            mean += d * k / (n_tot + k)
            n_tot += k
    if not standardize or n_tot == 0:
        return np.zeros(rows.dim), np.ones(rows.dim), picked
    return mean, m2 / n_tot, picked


def shuffled_chunks(rows, targets, train, rng):
    """One epoch over the rows where ``train`` is true: ``(features, targets)`` chunks of about ``rows.chunk_rows``
    rows, in random order.

    The store is cut into blocks of ``rows.block_rows`` rows; the blocks are visited in an order drawn from ``rng``
    (a ``numpy.random.Generator``), :data:`BLOCKS_PER_CHUNK` at a time (read in file order for the disk), and the
    rows of those blocks are shuffled together. Only one chunk is in memory at a time."""
    train = np.asarray(train, dtype=bool)
    bs = rows.block_rows
    blocks = [i for i in range(math.ceil(rows.n / bs)) if train[i * bs:(i + 1) * bs].any()]
    order = rng.permutation(len(blocks)) if blocks else np.zeros(0, np.int64)
    per = max(1, rows.chunk_rows // bs)
    for g in range(0, len(order), per):
        picked = sorted(blocks[j] for j in order[g:g + per])
        spans = [(i * bs, min((i + 1) * bs, rows.n)) for i in picked]
        total = int(sum(train[a:b].sum() for a, b in spans))
        pos = rng.permutation(total)  # where each row lands: rows are shuffled as they are read, one buffer only
        X = y = None
        off = 0
        for a, b in spans:
            keep = train[a:b]
            block = rows.features(a, b)
            if not keep.all():
                block = block[keep]
            if X is None:
                X = np.empty((total, rows.dim), dtype=block.dtype)
                y = np.empty(total, dtype=np.int64)
            k = len(block)
            X[pos[off:off + k]] = block
            y[pos[off:off + k]] = targets[a:b][keep]
            off += k
        yield X, y
