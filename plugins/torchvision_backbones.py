"""torchvision backbones: weights through torchvision's own weights API (torch hub cache, downloaded on first use) or
``--weights PATH``."""

from __future__ import annotations

import os

import tlfx
from tlfx.errors import TlfxError
from tlfx.preprocess import Preprocess
from tlfx.weights import WeightsInfo, file_sha256

# torch and torchvision are imported inside the functions: plugin discovery must stay fast.

ARCHS = {
    "alexnet": "AlexNet (2012), 4096-d fc7 embedding",
    "vgg16": "VGG-16, 4096-d fc7 embedding",
    "vgg19": "VGG-19, 4096-d fc7 embedding",
    "resnet18": "ResNet-18, 512-d",
    "resnet34": "ResNet-34, 512-d",
    "resnet50": "ResNet-50, 2048-d",
    "resnet101": "ResNet-101, 2048-d",
    "densenet121": "DenseNet-121, 1024-d",
    "mobilenet_v3_large": "MobileNetV3-Large, 1280-d",
    "mobilenet_v3_small": "MobileNetV3-Small, 1024-d",
    "efficientnet_b0": "EfficientNet-B0, 1280-d",
    "convnext_tiny": "ConvNeXt-Tiny, 768-d",
}


def default_weights(arch: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError):
        raise TlfxError(f"torchvision has no model {arch!r}; see torchvision.models.list_models()") from None


def hub_checkpoint_path(arch: str, url: str | None = None) -> str:
    """Where torchvision's weights API looks for (and downloads) the default weights of ``arch``."""
    from tlfx.weights import torch_cached_path

    return torch_cached_path(url or default_weights(arch).url)


def weights_status(arch: str, url: str | None = None) -> dict:
    """cached (with its path and size) or downloadable (with the file's size torchvision records), or missing
    when offline."""
    from tlfx.weights import is_offline, mirrored_url

    meta = default_weights(arch)
    path = hub_checkpoint_path(arch, url)
    if os.path.isfile(path):
        return {"status": "cached", "size": os.path.getsize(path), "where": path}
    mb = meta.meta.get("_file_size")
    size = int(mb * 1024 * 1024) if mb and not url else None
    if is_offline():
        return {"status": "missing", "size": size,
                "where": f"offline: place {os.path.basename(path)} in {os.path.dirname(path)}"}
    return {"status": "downloadable", "size": size, "where": mirrored_url(url or meta.url)}


def weights_available(arch: str):
    st = weights_status(arch)
    return st["status"] == "cached", st["where"]


def preprocess_from_weights(weights) -> Preprocess:
    t = weights.transforms()
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    interp = getattr(t.interpolation, "value", str(t.interpolation))
    return Preprocess(int(resize), int(crop), tuple(t.mean), tuple(t.std), str(interp))


def stage_names(model) -> list[str]:
    """Module names of the ends of the network's stages (outputs just before each downsampling, and the last)."""
    import torch
    from torch import nn

    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return [f"layer{i}" for i in range(1, 5)]
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        return []
    sizes = []
    hooks = [c.register_forward_hook(lambda m, a, o: sizes.append(o.shape[-1])) for c in features]
    with torch.inference_mode():
        model.eval()(torch.zeros(1, 3, 96, 96))
    for h in hooks:
        h.remove()
    n = len(sizes)
    names = [name for name, _ in features.named_children()]  # "0", "1"... or DenseNet's "denseblock1"...
    return [f"features.{names[i]}" for i in range(n) if i == n - 1 or sizes[i + 1] < sizes[i]]


def last_linear(model) -> str:
    from torch import nn

    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def build(arch: str, weights: str | None = None, url: str | None = None):
    """A torchvision backbone. ``weights``: None (the default pretrained weights: hub cache, else downloaded on first
    use), "none" (random init) or a local file. ``url`` replaces the default weights' URL (a plugin registering its
    own checkpoint; torchvision's file-name convention ``name-<sha256 prefix>.pth`` gives the hash to check)."""
    import torchvision

    from tlfx.backbone import Backbone, apply_state_dict, load_state_dict_file
    from tlfx.weights import load_torch_hub_state_dict

    meta = default_weights(arch)
    model = torchvision.models.get_model(arch, weights=None)
    if weights == "none":
        info = WeightsInfo("random-init")
    elif weights:
        apply_state_dict(model, load_state_dict_file(weights), weights)
        info = WeightsInfo(os.path.basename(weights), file_sha256(weights), os.path.abspath(weights))
    else:
        sd, path = load_torch_hub_state_dict(url or meta.url, arch)
        apply_state_dict(model, sd, path)
        info = WeightsInfo(str(meta) if not url else os.path.basename(path), file_sha256(path), path)
    return Backbone(
        name=arch,
        module=model,
        preprocess=preprocess_from_weights(meta),
        weights=info,
        stages=stage_names(model),
        classifier=last_linear(model),
    )


def _factory(arch):
    def factory(weights=None, **options):
        return build(arch, weights)

    return factory


def _any_factory(weights=None, model=None, **options):
    return build(model, weights)


def weights_meta(arch: str, url: str | None = None, name: str | None = None) -> dict:
    """The registry entries that let ``tlfx backbones`` and ``tlfx weights import`` handle a torchvision backbone's
    default weights (``url``: a plugin's own checkpoint instead of torchvision's default)."""
    from tlfx.weights import import_torch_hub_file

    return {
        "weights_available": lambda: (lambda st: (st["status"] == "cached", st["where"]))(weights_status(arch, url)),
        "weights_status": lambda: weights_status(arch, url),
        "import_weights": lambda file: import_torch_hub_file(url or default_weights(arch).url, name or arch, file),
    }


@tlfx.hookimpl
def register_backbones(register):
    for arch, desc in ARCHS.items():
        register(arch, _factory(arch), description=f"torchvision {desc}", **weights_meta(arch))
    register("torchvision", _any_factory, description="any torchvision classification model: torchvision:<name>",
             takes_argument=True)
