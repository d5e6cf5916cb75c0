"""Light records shared by backbones, stores and models: preprocessing and weights provenance (no torch)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass


@dataclass
class Preprocess:
    """How an image becomes the network's input: resize the short side, centre-crop, scale to [0,1], normalise."""

    resize: int
    crop: int
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def with_image_size(self, size: int | None) -> Preprocess:
        if not size or size == self.crop:
            return self
        resize = max(size, round(size * self.resize / self.crop))
        return Preprocess(resize, size, self.mean, self.std, self.interpolation)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = [float(x) for x in self.mean], [float(x) for x in self.std]
        return d


@dataclass
class WeightsInfo:
    name: str
    sha256: str = ""
    path: str = ""

    def to_dict(self):
        return {"name": self.name, "sha256": self.sha256, "path": self.path}


_SHA_CACHE: dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


