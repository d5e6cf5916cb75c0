"""``tlfx.Embedder``: a frozen backbone as a scikit-learn transformer, from images to float32 features.

>>> from sklearn.pipeline import make_pipeline
>>> clf = make_pipeline(tlfx.Embedder("efficientnet_lite0", image_size=64), tlfx.create_head("svm"))
>>> clf.fit(train_paths, train_labels).score(test_paths, test_labels)

The images go through exactly what ``tlfx extract`` runs (:class:`tlfx.extraction.FeatureComputer` and the
decode/resize/batch pipeline of :mod:`tlfx.pipeline`), so for the same configuration an image file gets the row
``tlfx extract`` writes for it. ``cache=`` names a feature store whose rows are reused for the files it holds.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin

from .datasets import ImageDataset
from .errors import TlfxError
from .images import open_image, to_rgb
from .safetext import terminal

_ARRAY_HINT = "an image array must be uint8 HxW, HxWx1, HxWx3 or HxWx4 (a batch: NxHxWxC)"


class _Items(ImageDataset):
    """The inputs of one ``transform`` call as a dataset: paths decoded like ``imagefolder`` files, in-memory
    images (PIL or uint8 arrays) converted to RGB the way array datasets are."""

    spec = "embedder"

    def __init__(self, items: list):
        super().__init__()
        self.items = items
        self.ids = [str(i) for i in range(len(items))]
        self.labels = np.full(len(items), -1, np.int64)

    def load(self, i, target=None):
        item = self.items[i]
        if isinstance(item, str):
            return open_image(item, target)
        if isinstance(item, np.ndarray):
            a = item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item
            item = Image.fromarray(np.ascontiguousarray(a), {2: "L", 3: "RGB" if a.ndim == 3 and a.shape[2] == 3
                                                                   else "RGBA"}[a.ndim])
        return to_rgb(item)


def _check_array(a: np.ndarray, where: str) -> np.ndarray:
    if a.dtype != np.uint8:
        raise TlfxError(f"{where} is a {a.dtype} array; {_ARRAY_HINT}: convert it, e.g. (x * 255).astype('uint8')")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))) or min(a.shape[:2]) < 1:
        raise TlfxError(f"{where} has shape {a.shape}; {_ARRAY_HINT}")
    return a


def as_items(X) -> list:
    """The images of ``X`` as a list of absolute paths, PIL images and uint8 HxW[xC] arrays (one per sample).

    ``X``: a sequence (list, tuple, pandas Series, 1-D or ``[n, 1]`` array of paths) whose items are paths, PIL
    images or uint8 arrays; or one uint8 array, ``NxHxWxC`` (a batch) or ``HxWxC`` (one image).
    """
    if isinstance(X, (str, bytes, os.PathLike, Image.Image)):
        raise TlfxError(f"Embedder takes a list of images (one per sample), got a single {type(X).__name__}; "
                        f"wrap it in a list: [x]")
    if isinstance(X, np.ndarray) and X.dtype != object and X.dtype.kind not in "US":
        if X.ndim == 4:
            return [_check_array(a, f"image {i} of the batch") for i, a in enumerate(X)]
        return [_check_array(X, "the array")]
    if isinstance(X, np.ndarray) and X.ndim == 2 and X.shape[1] == 1:  # one column of paths (ColumnTransformer)
        X = X[:, 0]
    try:
        seq = list(X)
    except TypeError:
        raise TlfxError(f"Embedder takes a list of image paths, PIL images or uint8 arrays, got "
                        f"{type(X).__name__}") from None
    out = []
    for i, item in enumerate(seq):
        if isinstance(item, (str, os.PathLike)):
            out.append(os.path.abspath(os.fspath(item)))
        elif isinstance(item, bytes):
            out.append(os.path.abspath(os.fsdecode(item)))
        elif isinstance(item, Image.Image):
            out.append(item)
        elif isinstance(item, np.ndarray):
            out.append(_check_array(item, f"item {i}"))
        else:
            raise TlfxError(f"item {i} is a {type(item).__name__}; Embedder takes image paths, PIL images or uint8 "
                            f"arrays")
    return out


def _describe(item, i: int) -> str:
    return f"'{terminal(item)}'" if isinstance(item, str) else f"item {i} ({type(item).__name__})"


class Embedder(TransformerMixin, BaseEstimator):
    """Images -> float32 features ``[n, d]`` from a frozen backbone, as a stateless scikit-learn transformer.

    Parameters are those of ``tlfx extract``: ``backbone``, ``layers`` (``penultimate``, ``multi``, ``a,b``),
    ``pooling``, ``image_size``, ``weights`` (a local file), ``precision``, ``runtime``, ``device``,
    ``batch_size``, ``tta`` (``flip``: the mean of each image's and its mirror's features). ``cache``: a feature
    store (``tlfx extract`` output, same configuration) whose rows are returned for the image files it holds,
    matched by absolute path; only the other inputs run the network.

    ``fit`` builds nothing: the network is built on the first ``transform`` and kept out of ``get_params`` and
    out of pickles, so ``clone``, grid search and ``pickle`` stay cheap. An input that cannot be read raises a
    :class:`~tlfx.errors.TlfxError` naming it: ``transform`` returns exactly one row per input.
    """

    def __init__(self, backbone="efficientnet_lite0", *, layers="penultimate", pooling="avg", image_size=None,
                 weights=None, precision="auto", runtime="torch", device=None, batch_size=32, cache=None, tta="none"):
        self.backbone = backbone
        self.layers = layers
        self.pooling = pooling
        self.image_size = image_size
        self.weights = weights
        self.precision = precision
        self.runtime = runtime
        self.device = device
        self.batch_size = batch_size
        self.cache = cache
        self.tta = tta

    # ------------------------------------------------------------------------------------ scikit-learn
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False  # stateless: nothing is learned from the training images
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.non_deterministic = self.precision not in ("fp32",)
        return tags

    def __sklearn_is_fitted__(self):
        return True

    def fit(self, X, y=None):
        """Check the parameters and return self; nothing is learned (the backbone is frozen and pretrained)."""
        self._check_params()
        return self

    def transform(self, X) -> np.ndarray:
        """Features of the images in ``X`` (paths, PIL images, uint8 arrays): float32 ``[len(X), d]``."""
        items = as_items(X)
        out: np.ndarray | None = None
        todo = list(range(len(items)))
        if self.cache is not None:
            rows, todo = self._from_cache(items)
            if rows:
                dim = len(next(iter(rows.values())))
                out = np.empty((len(items), dim), np.float32)
                for i, row in rows.items():
                    out[i] = row
        if todo:
            feats = self._compute([items[i] for i in todo], todo)
            if out is None:
                out = np.empty((len(items), feats.shape[1]), np.float32)
            out[todo] = feats
        if out is None:  # no inputs at all
            out = np.zeros((0, self.n_features_out()), np.float32)
        return out

    def get_feature_names_out(self, input_features=None):
        return np.asarray([f"embedding{i}" for i in range(self.n_features_out())], dtype=object)

    def n_features_out(self) -> int:
        """The feature dimension (builds the network when it is not built yet)."""
        import torch

        c = self.computer()
        if not hasattr(self, "_dim"):
            with torch.inference_mode():
                self._dim = int(c(torch.zeros((1, c.pre.crop, c.pre.crop, 3), dtype=torch.uint8)).shape[1])
        return self._dim

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_computer", "_built_with", "_dim", "_cache_rows"):
            state.pop(key, None)  # rebuilt on first use after unpickling
        return state

    # ------------------------------------------------------------------------------------------ network
    def _check_params(self):
        from .config import ExtractOptions

        try:
            bs = int(self.batch_size)
        except (TypeError, ValueError):
            raise TlfxError(f"batch_size must be a whole number, got {self.batch_size!r}") from None
        ExtractOptions(backbone=self.backbone, layers=self.layers, pooling=self.pooling, image_size=self.image_size,
                       weights=self.weights, batch_size=bs, precision=self.precision, runtime=self.runtime,
                       device=self.device, tta=self.tta).validate()

    def _key(self):
        return tuple(repr(v) for v in self.get_params(deep=False).values())

    def computer(self):
        """The :class:`~tlfx.extraction.FeatureComputer` for the current parameters (built once, rebuilt after
        ``set_params``)."""
        from .backbone import Backbone, create_backbone
        from .extraction import FeatureComputer

        if getattr(self, "_computer", None) is None or self._built_with != self._key():
            self._check_params()
            bb = self.backbone if isinstance(self.backbone, Backbone) else create_backbone(self.backbone, self.weights)
            self._computer = FeatureComputer(bb, self.layers, self.pooling, self.image_size, self.precision,
                                             self.device, runtime=self.runtime, tta=self.tta)
            self._built_with = self._key()
            self.__dict__.pop("_dim", None)
            self.__dict__.pop("_cache_rows", None)
        return self._computer

    def config(self) -> dict:
        """The feature configuration these features have (the keys stores and model files record)."""
        c = self.computer()
        return {**c.backbone.config(c.layers, self.pooling, self.image_size), "runtime": c.runtime,
                "precision": c.precision, "tta": c.tta}

    def _compute(self, items: list, positions: list[int]) -> np.ndarray:
        c = self.computer()
        feats = []
        for _idx, _good, arr, bad in c.loader(_Items(items), range(len(items)), int(self.batch_size), workers=0):
            if bad:
                i, reason = bad[0]
                more = f" ({len(bad) - 1} more in the same batch)" if len(bad) > 1 else ""
                raise TlfxError(f"cannot read image {_describe(items[i], positions[i])}: {terminal(reason)}{more}; "
                                f"fix or remove it (transform returns one row per input)")
            if arr is not None:
                feats.append(c(arr))
        return np.concatenate(feats).astype(np.float32, copy=False)

    # -------------------------------------------------------------------------------------------- cache
    def _from_cache(self, items: list) -> tuple[dict, list[int]]:
        """``({position: row}, [positions to compute])``. A file changed after the store was written is computed
        again (its modification time is later than the store's), never answered with a stale row."""
        from .store import _open_h5, read_rows

        path, where, written_ns = self._cache_index()
        hits = {}
        for i, it in enumerate(items):
            r = where.get(it) if isinstance(it, str) else None
            if r is not None:
                try:
                    fresh = os.stat(it).st_mtime_ns <= written_ns
                except OSError:
                    fresh = False  # gone or unreadable: computing it raises the error naming the file
                if fresh:
                    hits[i] = r
        todo = [i for i in range(len(items)) if i not in hits]
        rows = {}
        if hits:
            wanted = sorted(set(hits.values()))
            with _open_h5(path) as f:
                d = f["features"]
                got, lo = {}, 0
                while lo < len(wanted):  # contiguous runs of rows, read as slices (bounded by what was asked)
                    hi = lo
                    while hi + 1 < len(wanted) and wanted[hi + 1] == wanted[hi] + 1:
                        hi += 1
                    block = read_rows(d, path, "features", wanted[lo], wanted[hi] + 1)
                    for k, r in enumerate(range(wanted[lo], wanted[hi] + 1)):
                        got[r] = block[k]
                    lo = hi + 1
            rows = {i: np.asarray(got[r], dtype=np.float32) for i, r in hits.items()}
        return rows, todo

    def _cache_index(self):
        """``(store path, {absolute file path: row}, store written at ns)`` of ``cache``, checked once."""
        path = os.fspath(self.cache)
        if getattr(self, "_cache_rows", None) is not None and self._cache_rows[0] == path:
            return self._cache_rows
        from .models import check_config
        from .store import FeatureStore

        store = FeatureStore(path, allow_incomplete=False)
        check_config(self.config(), store.config, f"cache store {path!r}",
                     "pass a store extracted with the Embedder's configuration, or cache=None")
        root = store.attrs.get("data_root") or ""
        if not root:
            raise TlfxError(f"cache store {path!r} records no data root (its ids are not file paths); pass a store "
                            f"extracted from an image folder or a CSV of files, or cache=None")
        where = {os.path.normpath(os.path.join(root, i)): r for r, i in enumerate(store.ids)}
        self._cache_rows = (path, where, os.stat(path).st_mtime_ns)
        return self._cache_rows
