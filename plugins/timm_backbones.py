"""timm backbones: ``timm:<name>`` for any model timm knows, weights from the local Hugging Face cache or --weights."""

from __future__ import annotations

import os

import tlfx
from tlfx.errors import TlfxError
from tlfx.preprocess import Preprocess, WeightsInfo, file_sha256


def backbone_from_timm(model, name: str, info: WeightsInfo, mean=None, std=None):
    """Wrap a timm classification model: preprocessing from its pretrained config, stages from feature_info."""
    import timm
    import torch

    from tlfx.backbone import Backbone

    cfg = timm.data.resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    resize = int(round(crop / cfg.get("crop_pct", 0.875)))
    pre = Preprocess(resize, crop, tuple(mean or cfg["mean"]), tuple(std or cfg["std"]), cfg.get("interpolation", "bilinear"))
    stages = [f["module"] for f in getattr(model, "feature_info", [])]
    classifier = model.pretrained_cfg.get("classifier") if getattr(model, "num_classes", 0) else None
    modules = dict(model.named_modules())
    if classifier not in modules or not isinstance(modules.get(classifier), torch.nn.Linear):
        classifier = None
    return Backbone(name=name, module=model, preprocess=pre, weights=info, stages=stages, classifier=classifier)


def _offline_by_default():
    """Weights come from the local cache only (unless the user set HF_HUB_OFFLINE themselves). huggingface_hub reads
    the variable once, when it is imported (timm imports it), so its constant is set too when it is already loaded."""
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE"):
        hub.HF_HUB_OFFLINE = True


def build(model_name: str, weights: str | None = None):
    _offline_by_default()
    import timm

    from tlfx.backbone import apply_state_dict, load_state_dict_file

    if model_name not in timm.list_models(pretrained=False) and not timm.is_model(model_name):
        raise TlfxError(f"timm has no model {model_name!r}; see timm.list_models('*pattern*')")
    if weights in (None, "none"):
        pretrained = weights is None
        try:
            model = timm.create_model(model_name, pretrained=pretrained)
        except Exception:
            raise TlfxError(
                f"pretrained weights for timm:{model_name} are not in the local Hugging Face cache "
                f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); pass --weights PATH to a state dict"
            ) from None
        info = WeightsInfo(f"timm/{model_name}" if pretrained else "random-init")
    else:
        model = timm.create_model(model_name, pretrained=False)
        apply_state_dict(model, load_state_dict_file(weights), weights)
        info = WeightsInfo(os.path.basename(weights), file_sha256(weights), os.path.abspath(weights))
    return backbone_from_timm(model, f"timm:{model_name}", info)


def _factory(weights=None, model=None, **options):
    return build(model, weights)


@tlfx.hookimpl
def register_backbones(register):
    register("timm", _factory, description="any timm model: timm:<name> (weights: local HF cache or --weights)",
             takes_argument=True)
