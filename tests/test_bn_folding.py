"""Batch-norm folding (tlfx.bn_folding) changes how fast features come out, never what they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from tlfx.backbone import create_backbone
from tlfx.bn_folding import conv_bn_pairs, fold_batchnorm
from tlfx.extraction import FeatureComputer


def _random_stats(m: nn.Module, seed=0) -> nn.Module:
    """Non-trivial running statistics, so that a fold that ignored any of them would show."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            mod.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
    return m.eval()


def _norms(m):
    return sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())


def test_resnet18_folds_every_norm_and_gives_the_same_logits():
    m = _random_stats(torchvision.models.resnet18(weights=None))
    folded, n = fold_batchnorm(m)
    assert n == 20 and _norms(folded) == 0
    assert _norms(m) == 20, "the original module must be left as it was"
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = m(x), folded(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


def test_timm_norm_act_keeps_its_activation(lite0):
    m = _random_stats(lite0.module)
    try:
        folded, n = fold_batchnorm(m)
    finally:
        lite0.module.load_state_dict(create_backbone("efficientnet_lite0").module.state_dict())
    assert n == 49 and _norms(folded) == 0
    assert isinstance(folded.bn2.act, nn.ReLU6), "BatchNormAct2d's activation must survive the fold"


@pytest.mark.parametrize("layers", ["multi", "bn2,blocks.6.0.bn3,conv_head,penultimate"])
def test_features_are_the_same_with_and_without_folding(layers):
    bb = create_backbone("efficientnet_lite0")
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8))
    plain = FeatureComputer(bb, layers, precision="fp32", device="cpu", fold_batchnorm=False)
    fast = FeatureComputer(bb, layers, precision="fp32", device="cpu")
    assert plain.folded == 0
    # conv_head is read directly, so its norm (bn2) must stay; every other conv -> norm pair is folded
    assert fast.folded == (48 if "conv_head" in layers else 49)
    want, got = plain(x), fast(x)
    assert want.shape == got.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


class _ConvBN(nn.Module):
    """One convolution and one batch norm; subclasses wire them in their own ``forward``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)


def test_a_convolution_read_twice_is_not_folded():
    class TwoReaders(_ConvBN):
        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    m = _random_stats(TwoReaders())
    assert conv_bn_pairs(m) == []
    assert fold_batchnorm(m) == (m, 0)


def test_untraceable_or_training_modules_come_back_unchanged():
    class Branchy(_ConvBN):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.bn(self.conv(x))

    m = _random_stats(Branchy())
    assert fold_batchnorm(m) == (m, 0)
    r = torchvision.models.resnet18(weights=None).train()
    assert fold_batchnorm(r) == (r, 0)
