"""The ``pixels`` baseline backbones' module and factories: the image resized to 32x32 (``--image-size`` to
change), raw pixels flattened.

It has no weights and learns nothing, so heads trained on its "features" show what the task costs without
transfer learning. It is a tiny torch module, so it runs through the same extraction engine and store format as
every real backbone. ``pixels`` keeps RGB (3 x 32 x 32 = 3072 values), ``pixels_grey`` averages the channels
(1024 values). Values are in [0, 1] (preprocess mean 0, std 1).
"""

from __future__ import annotations

from torch import nn

from tlfx.backbone import Backbone, Preprocess, WeightsInfo
from tlfx.errors import TlfxError

SIZE = 32


class Pixels(nn.Module):
    """``[N, C, H, W]`` -> ``[N, C*H*W]`` (or ``[N, H*W]`` with ``grey``)."""

    def __init__(self, grey: bool = False):
        super().__init__()
        self.grey = grey

    def forward(self, x):
        if self.grey:
            x = x.mean(1, keepdim=True)
        return x.flatten(1)


def build(grey: bool, weights: str | None = None) -> Backbone:
    if weights not in (None, "none"):
        raise TlfxError(f"backbone 'pixels' has no weights; drop --weights {weights!r}")
    pre = Preprocess(SIZE, SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
    return Backbone(name="pixels_grey" if grey else "pixels", module=Pixels(grey), preprocess=pre,
                    weights=WeightsInfo("none"), stages=[], classifier=None)


def pixels(weights: str | None = None, **options) -> Backbone:
    """Factory of ``pixels``: RGB pixels, flattened."""
    return build(False, weights)


def pixels_grey(weights: str | None = None, **options) -> Backbone:
    """Factory of ``pixels_grey``: grey pixels, flattened."""
    return build(True, weights)
