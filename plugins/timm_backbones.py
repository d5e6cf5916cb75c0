"""timm backbones: ``timm:<name>`` for any model timm knows and ``hf-hub:<org>/<repo>``; weights from the Hugging Face
cache, downloaded through huggingface_hub on first use, or --weights PATH."""

from __future__ import annotations

import os

import tlfx
from tlfx.errors import TlfxError
from tlfx.preprocess import Preprocess
from tlfx.weights import WeightsInfo, file_sha256


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
    # penultimate = the input of the classifier = the model's own pre-logits (forward_head(pre_logits=True)): the
    # class token or the mean of patch tokens for a transformer, as its head does; pooled features for a CNN.
    # --layers on transformer blocks pools their patch tokens, after num_prefix_tokens class/register tokens.
    extra = {"prefix_tokens": int(getattr(model, "num_prefix_tokens", 0) or 0)}
    return Backbone(name=name, module=model, preprocess=pre, weights=info, stages=stages, classifier=classifier,
                    extra=extra)


def pretrained_hub_id(model_name: str) -> str | None:
    """``org/repo[@revision]`` where timm's default pretrained weights of ``model_name`` live on the hub, or None."""
    import timm

    if model_name.startswith("hf-hub:"):
        return model_name[len("hf-hub:"):]
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:
        return None
    return getattr(cfg, "hf_hub_id", None) or None


def _check_name(model_name: str):
    import timm

    if model_name.startswith("hf-hub:"):
        if not model_name[len("hf-hub:"):].count("/") == 1:
            raise TlfxError(f"hub name {model_name!r} is not hf-hub:<org>/<repo>; e.g. hf-hub:timm/resnet18.a1_in1k")
        return
    if model_name not in timm.list_models(pretrained=False) and not timm.is_model(model_name):
        raise TlfxError(f"timm has no model {model_name!r}; see timm.list_models('*pattern*')")


def create_pretrained(model_name: str):
    """timm's own ``create_model(pretrained=True)``: offline from the Hugging Face cache when the file is there,
    downloaded through huggingface_hub (HF_ENDPOINT honoured) on first use, one line naming the file otherwise."""
    import timm

    from tlfx.weights import hf_cached_file, hf_download, hf_network, hf_repo_dir, is_offline

    hub_id = pretrained_hub_id(model_name)
    what = f"timm:{model_name}"
    if hub_id is None:
        raise TlfxError(f"timm has no pretrained weights on the hub for {model_name!r}; pass --weights PATH or "
                        f"--weights none")
    cached = hf_cached_file(hub_id)
    if cached is None and is_offline():
        raise TlfxError(f"weights for {what!r} are not cached and the network is off (TLFX_OFFLINE/HF_HUB_OFFLINE): "
                        f"place model.safetensors of hf.co/{hub_id} in the Hugging Face cache with "
                        f"'tlfx weights import {what} FILE' ({hf_repo_dir(hub_id)}), or pass --weights PATH")
    if cached is None:
        model = hf_download(hub_id, what, lambda: timm.create_model(model_name, pretrained=True))
        cached = hf_cached_file(hub_id)
    else:
        try:
            with hf_network(False):  # later runs never ask the hub whether the file changed
                model = timm.create_model(model_name, pretrained=True)
        except Exception as exc:
            raise TlfxError(f"cached weights for {what!r} ({cached}) cannot be loaded ({type(exc).__name__}); delete "
                            f"{hf_repo_dir(hub_id)} and run again") from None
    if cached is None:
        raise TlfxError(f"timm loaded {what!r} but no weight file is in the Hugging Face cache; pass --weights PATH")
    return model, WeightsInfo(f"hf-hub:{hub_id}", file_sha256(cached), os.path.realpath(cached))


def build(model_name: str, weights: str | None = None):
    import timm

    from tlfx.backbone import apply_state_dict, load_state_dict_file

    _check_name(model_name)
    if weights is None:
        model, info = create_pretrained(model_name)
    elif weights == "none":
        model = timm.create_model(model_name, pretrained=False)
        info = WeightsInfo("random-init")
    else:
        model = timm.create_model(model_name, pretrained=False)
        apply_state_dict(model, load_state_dict_file(weights), weights)
        info = WeightsInfo(os.path.basename(weights), file_sha256(weights), os.path.abspath(weights))
    return backbone_from_timm(model, f"timm:{model_name}", info)


def _factory(weights=None, model=None, **options):
    return build(model, weights)


def _hf_factory(weights=None, model=None, **options):
    return build(f"hf-hub:{model}", weights)


@tlfx.hookimpl
def register_backbones(register):
    register("timm", _factory, description="any timm model: timm:<name> (weights: HF cache, downloaded on first use)",
             takes_argument=True)
    register("hf-hub", _hf_factory, description="a timm model on the Hugging Face hub: hf-hub:<org>/<repo>",
             takes_argument=True)
