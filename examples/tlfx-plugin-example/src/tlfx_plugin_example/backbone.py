"""``colour_hog``: a joint colour histogram and a HOG descriptor, computed by a small torch module.

tlfx feeds a backbone's module the normalised input ``(x/255 - mean) / std`` as a float tensor ``[B, 3, H, W]``.
With ``classifier=None`` the module's output is the embedding itself, so it returns ``[B, D]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tlfx.backbone import Backbone, Preprocess, WeightsInfo
from tlfx.errors import TlfxError

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


class ColourHOG(nn.Module):
    """``bins**3`` colour-histogram features and ``orientations * cells**2`` HOG features per image.

    The HOG part: unsigned gradient orientations of the grey image in ``orientations`` bins, weighted by gradient
    magnitude, averaged over a ``cells x cells`` grid, each cell L2-normalised. The grid adapts to the input size,
    so the dimension does not depend on ``--image-size``.
    """

    def __init__(self, mean=MEAN, std=STD, bins: int = 4, orientations: int = 9, cells: int = 4):
        super().__init__()
        self.bins, self.orientations, self.cells = bins, orientations, cells
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("grey", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))
        self.register_buffer("dx", torch.tensor([[[[-0.5, 0.0, 0.5]]]]))

    @property
    def dim(self) -> int:
        return self.bins ** 3 + self.orientations * self.cells ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # histograms need exact arithmetic: run in float32 even when tlfx extracts under bf16/fp16 autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            rgb = (x.float() * self.std + self.mean).clamp(0.0, 1.0)
            return torch.cat([self._colour_histogram(rgb), self._hog(rgb)], 1)

    def _colour_histogram(self, rgb):
        b = self.bins
        q = (rgb * b).long().clamp_(0, b - 1)
        code = (q[:, 0] * b + q[:, 1]) * b + q[:, 2]
        flat = code.flatten(1)
        ones = torch.ones_like(flat, dtype=torch.float32)
        hist = torch.zeros(rgb.shape[0], b ** 3, device=rgb.device).scatter_add_(1, flat, ones)
        return hist / flat.shape[1]

    def _hog(self, rgb):
        grey = (rgb * self.grey).sum(1, keepdim=True)
        gx = F.conv2d(F.pad(grey, (1, 1, 0, 0), mode="replicate"), self.dx)
        gy = F.conv2d(F.pad(grey, (0, 0, 1, 1), mode="replicate"), self.dx.transpose(2, 3))
        magnitude = torch.sqrt(gx * gx + gy * gy)[:, 0]
        angle = torch.atan2(gy, gx)[:, 0].remainder(math.pi)  # unsigned orientation in [0, pi)
        index = (angle / math.pi * self.orientations).long().clamp_(0, self.orientations - 1)
        oriented = F.one_hot(index, self.orientations).permute(0, 3, 1, 2).float() * magnitude.unsqueeze(1)
        cells = F.adaptive_avg_pool2d(oriented, self.cells)  # [B, orientations, cells, cells]
        cells = cells / (cells.pow(2).sum(1, keepdim=True).sqrt() + 1e-6)
        return cells.flatten(1)


def build_colour_hog(weights=None, **options) -> Backbone:
    """The backbone factory tlfx calls: ``factory(weights=None, **options)`` -> :class:`tlfx.backbone.Backbone`."""
    if weights not in (None, "none"):
        raise TlfxError(f"backbone 'colour_hog' has no weights; drop --weights {weights!r}")
    if options:
        raise TlfxError(f"backbone 'colour_hog' takes no options, got {', '.join(sorted(options))}")
    module = ColourHOG(MEAN, STD)
    return Backbone(
        name="colour_hog",
        module=module,
        preprocess=Preprocess(resize=64, crop=64, mean=MEAN, std=STD, interpolation="bilinear"),
        weights=WeightsInfo("none"),
        stages=[],
        classifier=None,
    )
