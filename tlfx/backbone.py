"""Backbones: a frozen torch module plus its preprocessing, feature layers and weights record."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import TlfxError
from .plugins import registry
from .preprocess import Preprocess, WeightsInfo, file_sha256  # noqa: F401  (re-exported)

POOLINGS = ("avg", "max")


def pool(t: torch.Tensor, pooling: str = "avg") -> torch.Tensor:
    """A layer's output -> ``[N, D]``: feature maps pooled over space, tokens (ViT-like) over tokens, else flattened."""
    if isinstance(t, (tuple, list)):
        t = t[0]
    if t.dim() == 4:
        return t.amax((2, 3)) if pooling == "max" else t.mean((2, 3))
    if t.dim() == 3:
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
            names = [n.strip() for n in str(layers).split(",") if n.strip()]
        modules = dict(self.module.named_modules())
        for n in names:
            if n != "penultimate" and n not in modules:
                hint = ", ".join(["penultimate", "multi", *self.stages])
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


class FeatureExtractor(nn.Module):
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
            feats.append(pool(t, self.pooling).float())
        self._outputs.clear()
        return torch.cat(feats, 1) if len(feats) > 1 else feats[0]

    def logits(self, x):
        return self.module(x)


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return registry("backbone").names()


def create_backbone(name: str, weights: str | None = None, **options) -> Backbone:
    """Build a registered backbone, frozen and in eval mode. ``weights``: a state-dict path, or "none"."""
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


def load_state_dict_file(path: str) -> dict:
    """Load a state dict safely (tensors only, no code) from .pth/.pt or .safetensors."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TlfxError(f"cannot read weights file {path!r} ({type(exc).__name__}); pass a torch state dict") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise TlfxError(f"weights file {path!r} does not hold a state dict; save one with torch.save(model.state_dict())")
    return sd


def apply_state_dict(module: nn.Module, sd: dict, source: str):
    try:
        module.load_state_dict(sd)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        msg = first[1].strip() if len(first) > 1 else first[0]
        raise TlfxError(f"weights {source!r} do not fit this architecture ({msg[:200]})") from None


def dumps_config(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)
