"""Backbones: a frozen torch module plus its preprocessing, feature layers and weights record."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import POOLINGS
from .errors import TlfxError
from .plugins import registry
from .preprocess import Preprocess  # noqa: F401  (re-exported)
from .weights import WeightsInfo, file_sha256  # noqa: F401  (re-exported)


def pool(t: torch.Tensor, pooling: str = "avg", prefix_tokens: int = 0) -> torch.Tensor:
    """A layer's output -> ``[N, D]``: feature maps pooled over space, tokens (ViT-like) over the patch tokens
    (after ``prefix_tokens`` class/register tokens), else flattened."""
    if isinstance(t, (tuple, list)):
        t = t[0]
    if t.dim() == 4:
        return t.amax((2, 3)) if pooling == "max" else t.mean((2, 3))
    if t.dim() == 3:
        t = t[:, prefix_tokens:]
        return t.amax(1) if pooling == "max" else t.mean(1)
    return t.flatten(1)


@dataclass
class Backbone:
    """A frozen feature extractor.

    ``stages`` names the modules whose pooled outputs ``--layers multi`` concatenates (last stages of the
    network); ``classifier`` names the final linear layer whose *input* is the penultimate embedding.
    """

    name: str
    module: nn.Module
    preprocess: Preprocess
    weights: WeightsInfo
    stages: list[str] = field(default_factory=list)
    classifier: str | None = None
    multi_stages: int = 3
    extra: dict = field(default_factory=dict)

    def resolve_layers(self, layers: str | list[str]) -> list[str]:
        """'penultimate', 'multi' or comma-separated module names -> list of layer keys."""
        if isinstance(layers, (list, tuple)):
            names = list(layers)
        elif layers == "penultimate":
            return ["penultimate"]
        elif layers == "multi":
            return [*self.stages[-self.multi_stages:], "penultimate"]
        else:
            names = [n.strip() for n in str(layers).split(",")]
        hint = ", ".join(["penultimate", "multi", *self.stages])
        if not names or any(not n for n in names):
            raise TlfxError(f"--layers {layers!r} names an empty layer; pass penultimate, multi or comma-separated "
                            f"module names, e.g. {hint}")
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise TlfxError(f"--layers names {twice!r} twice; name each layer once")
        modules = dict(self.module.named_modules())
        for n in names:
            if n != "penultimate" and n not in modules:
                raise TlfxError(f"layer {n!r} is not a module of backbone {self.name!r}; try one of: {hint}")
        return names

    def config(self, layers, pooling: str, image_size: int | None = None) -> dict:
        """The configuration that makes features comparable; recorded in stores and models."""
        return {
            "backbone": self.name,
            "weights": self.weights.to_dict(),
            "layers": self.resolve_layers(layers),
            "pooling": pooling,
            "image_size": self.preprocess.with_image_size(image_size).crop,
            "preprocess": self.preprocess.with_image_size(image_size).to_dict(),
        }


class PooledLayers(nn.Module):
    """Runs a backbone once and returns the pooled outputs of the chosen layers, concatenated."""

    def __init__(self, backbone: Backbone, layers, pooling: str = "avg"):
        super().__init__()
        if pooling not in POOLINGS:
            raise TlfxError(f"unknown pooling {pooling!r}; valid choices: {', '.join(POOLINGS)}")
        self.backbone = backbone
        self.layers = backbone.resolve_layers(layers)
        self.pooling = pooling
        self.module = backbone.module
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        modules = dict(self.module.named_modules())
        for name in self.layers:
            if name == "penultimate":
                if backbone.classifier is None:
                    continue  # the module's output itself is the embedding
                self._handles.append(modules[backbone.classifier].register_forward_pre_hook(self._pre_hook))
            else:
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _pre_hook(self, module, args):
        self._outputs["penultimate"] = args[0]

    def _hook(self, name):
        def hook(module, args, output):
            self._outputs[name] = output

        return hook

    def forward(self, x):
        self._outputs.clear()
        out = self.module(x)
        feats = []
        for name in self.layers:
            t = out if (name == "penultimate" and self.backbone.classifier is None) else self._outputs[name]
            feats.append(pool(t, self.pooling, self.backbone.extra.get("prefix_tokens", 0)).float())
        self._outputs.clear()
        return torch.cat(feats, 1) if len(feats) > 1 else feats[0]


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return registry("backbone").names()


def create_backbone(name: str, weights: str | None = None, offline: bool = False, **options) -> Backbone:
    """Build a registered backbone, frozen and in eval mode. ``weights``: a state-dict path, or "none".

    ``offline=True`` forbids any weights download (as ``TLFX_OFFLINE=1`` does): cached weights or one error line.
    """
    if offline:
        from .weights import offline as no_network

        with no_network():
            return create_backbone(name, weights, **options)
    if weights not in (None, "none") and not os.path.isfile(weights):
        raise TlfxError(f"weights file {weights!r} does not exist; pass the path of a saved state dict")
    reg = registry("backbone")
    base, extra = resolve_backbone_name(name)
    if extra and base in reg and reg.get(base).meta.get("takes_argument"):
        entry = reg.get(base)
        options = {**extra, **options}
    else:
        entry = reg.get(name)
        if entry.meta.get("takes_argument") and "model" not in options:
            raise TlfxError(f"backbone {name!r} needs a model name: {name}:<model>, e.g. {name}:resnet18")
    bb = entry.factory(weights=weights, **options)
    bb.name = name
    bb.module.eval()
    for p in bb.module.parameters():
        p.requires_grad_(False)
    return bb


def resolve_backbone_name(name: str) -> tuple[str, dict]:
    """'timm:resnet18' -> ('timm', {'model': 'resnet18'}); other names unchanged."""
    if ":" in name:
        prefix, arg = name.split(":", 1)
        return prefix, {"model": arg}
    return name, {}


TRUST_ENV = "TLFX_TRUST_PICKLE"
_PREFIXES = ("module.", "model.", "_orig_mod.")  # DataParallel/DDP, Lightning, torch.compile


def load_state_dict_file(path: str) -> dict:
    """Load a state dict without running code: a torch state dict, a Lightning/trainer checkpoint (its
    ``state_dict``), or safetensors (told by content, not by name). A whole pickled module only when the user says
    they trust the file (``TLFX_TRUST_PICKLE=1``)."""
    if not os.path.isfile(path):
        raise TlfxError(f"weights file {path!r} is not a regular file; pass the path of a saved state dict")
    from .weights import _is_safetensors

    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = _torch_load(path)
    except TlfxError:
        raise
    except Exception as exc:
        raise TlfxError(f"cannot read weights file {path!r} ({type(exc).__name__}); pass a torch state dict, a "
                        f"Lightning checkpoint or a .safetensors file") from None
    sd = _unwrap_checkpoint(sd)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TlfxError(f"weights file {path!r} does not hold a state dict (names -> tensors); save one with "
                        f"torch.save(model.state_dict())")
    return sd


def _torch_load(path: str):
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if os.environ.get(TRUST_ENV) != "1":
            raise TlfxError(f"weights file {path!r} holds pickled Python objects (a whole module?), which could run "
                            f"code; save model.state_dict() instead, or set {TRUST_ENV}=1 if you trust the file") from None
    obj = torch.load(path, map_location="cpu", weights_only=False)  # the user vouched for this file
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def _unwrap_checkpoint(obj):
    """A trainer checkpoint keeps the weights under one key (Lightning: ``state_dict``)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict() if os.environ.get(TRUST_ENV) == "1" else None
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    return obj


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def fit_keys(sd: dict, target) -> dict:
    """``sd`` with the wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``) removed, as far as that makes
    more of its names those of ``target``."""
    target = set(target)
    best = sd
    for _ in range(3):  # nested wrappers: model.module.…
        options = [_strip(best, p) for p in _PREFIXES]
        better = max(options, key=lambda c: len(target & set(c)))
        if len(target & set(better)) <= len(target & set(best)):
            break
        best = better
    return best


def _first(names, n=3) -> str:
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def apply_state_dict(module: nn.Module, sd: dict, source: str):
    """Load ``sd`` into ``module`` strictly; one line naming the first missing/unexpected/misshapen tensors."""
    target = module.state_dict()
    sd = fit_keys(sd, target)
    missing = set(target) - set(sd)
    unexpected = set(sd) - set(target)
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(target[k].shape)}" for k in sorted(set(sd) & set(target))
              if sd[k].shape != target[k].shape]
    parts = ([f"missing {_first(missing)}"] if missing else []) + ([f"unexpected {_first(unexpected)}"] if unexpected
                                                                   else [])
    if shapes:
        parts.append(f"shape of {_first(shapes, 2)}")
    if parts:
        raise TlfxError(f"weights {source!r} do not fit this architecture: {'; '.join(parts)}")
    module.load_state_dict(sd)
