"""How an image becomes a network's input: the preprocessing record shared by backbones, stores and models (no torch)."""

from __future__ import annotations

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
