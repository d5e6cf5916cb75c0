"""Datasets: labelled lists of images addressed by a data spec ``NAME[:ARG]`` (``imagefolder:DIR``, ``digits``...)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from PIL import Image

from .errors import TlfxError
from .images import open_image
from .plugins import registry
from .safetext import terminal

MAX_LIMIT = 10**12  # --limit: stored as a 64-bit attribute
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


class ImageDataset:
    """Base class for dataset plugins.

    Subclasses set ``ids`` (list of str: relative path or index), ``labels`` (int64 array, -1 if unlabeled),
    ``class_names`` (list of str, index = label) and implement :meth:`load`. ``listing_skips`` holds
    ``(id, reason)`` for what listing found but could not list or use (an unreadable folder, a FIFO, a folder
    reached again through a link): extraction records them in the store's ``/skipped`` like undecodable files.
    """

    spec: str = ""
    split: str | None = None
    root: str | None = None
    stable_ids: bool = False  # ids name the same image from one listing to the next (files): ``extract --update``

    def __init__(self):
        self.ids: list[str] = []
        self.labels = np.zeros(0, np.int64)
        self.class_names: list[str] = []
        self.listing_skips: list[tuple[str, str]] = []

    def __len__(self):
        return len(self.ids)

    def load(self, i: int, target: int | None = None) -> Image.Image:
        """Return image ``i`` as RGB; raise :class:`tlfx.images.BadImage` if it cannot be read."""
        raise NotImplementedError

    def take(self, n: int | None) -> ImageDataset:
        """Keep the first ``n`` items (deterministic, so a resumed run sees the same list)."""
        if n is not None and n < len(self):
            self.ids = self.ids[:n]
            self.labels = self.labels[:n]
            self._take(n)
        return self

    def _take(self, n):
        pass

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        # "all" is what stores record for "no split given": both must name the same images
        split = None if self.split == "all" else self.split
        h.update(json.dumps([self.spec, split, self.class_names]).encode())
        h.update("\n".join(self.ids).encode())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        self._fingerprint_content(h)
        return h.hexdigest()[:32]

    def _fingerprint_content(self, h):
        pass


class ArrayDataset(ImageDataset):
    """Images held in memory as a uint8 array ``[N, H, W]`` or ``[N, H, W, 3]`` (built-in datasets)."""

    def __init__(self, spec, split, images: np.ndarray, labels, class_names, index=None):
        super().__init__()
        self.spec, self.split = spec, split
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        idx = np.arange(len(images)) if index is None else np.asarray(index)
        self.ids = [str(int(i)) for i in idx]

    def _take(self, n):
        self.images = self.images[:n]

    def load(self, i, target=None):
        a = self.images[i]
        return Image.fromarray(a, "L" if a.ndim == 2 else "RGB").convert("RGB")

    def _fingerprint_content(self, h):
        h.update(hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).digest())


class FileDataset(ImageDataset):
    """Image files on disk; ``ids`` are paths relative to ``root``."""

    stable_ids = True

    def __init__(self, spec, split, root, rel_paths, labels, class_names):
        super().__init__()
        self.spec, self.split, self.root = spec, split, os.path.abspath(root)
        self.ids = list(rel_paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)

    def path(self, i) -> str:
        return os.path.join(self.root, self.ids[i])

    def load(self, i, target=None):
        return open_image(self.path(i), target)

    def _fingerprint_content(self, h):
        for i in range(len(self)):
            try:
                st = os.stat(self.path(i))
                h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
            except OSError:
                h.update(b"missing;")


def parse_spec(spec: str) -> tuple[str, str | None]:
    name, _, arg = spec.partition(":")
    return name, (arg or None)


def list_datasets() -> list[str]:
    """Names of every registered dataset."""
    return registry("dataset").names()


def load_dataset(spec: str, split: str | None = None, root: str | None = None, limit: int | None = None) -> ImageDataset:
    """Resolve a data spec through the dataset plugins: ``load_dataset("fashion-mnist", "test", limit=2000)``."""
    name, arg = parse_spec(spec)
    entry = registry("dataset").get(name)
    splits = entry.meta.get("splits")
    if split is not None and splits and split not in splits:
        raise TlfxError(f"unknown split {split!r} for dataset {name!r}; valid choices: {', '.join(splits)}")
    if entry.meta.get("needs_argument") and not arg:
        raise TlfxError(f"dataset {name!r} needs an argument: {name}:{entry.meta.get('argument', 'ARG')}")
    if limit is not None and not 1 <= limit <= MAX_LIMIT:
        raise TlfxError(f"--limit must be at least 1 and at most {MAX_LIMIT}, got {limit}")
    ds = entry.factory(arg, split=split, root=root)
    ds.spec = spec
    ds.take(limit)
    if len(ds) == 0:
        skips = getattr(ds, "listing_skips", [])
        why = f" ({len(skips)} skipped while listing, e.g. {terminal(skips[0][0])}: {skips[0][1]})" if skips else ""
        raise TlfxError(f"dataset '{terminal(spec)}' (split {split or 'all'}) holds no images{why}; check the path "
                        f"and the split")
    return ds
