"""Fold inference-mode batch norms into the convolutions that feed them.

In eval mode ``bn(conv(x))`` is one affine map per output channel applied after the convolution, so it can be
baked into the convolution's weight and bias. The batch-norm module is then replaced by ``nn.Identity`` under the
same name (timm's norm + activation modules by their activation): forward hooks on it (``--layers`` naming a
norm layer) still see the same tensor, and the pass over
the activation that the norm cost is gone (on a CPU without AMX that pass is a noticeable share of resnet18).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

# convolutions whose forward is linear in (weight, bias), and norms that are a plain batch norm (timm's
# BatchNormAct2d is one followed by its own dropout and activation, kept after folding); exact types only, since
# a subclass may transform its weight (e.g. weight-standardised convolutions)
_TIMM_CONVS = {"Conv2dSame"}
_TIMM_NORMS = {"BatchNormAct2d"}


def _is_timm(m: nn.Module, names: set[str]) -> bool:
    return type(m).__name__ in names and type(m).__module__.startswith("timm.")


def _foldable_conv(m) -> bool:
    return type(m) is nn.Conv2d or _is_timm(m, _TIMM_CONVS)


def _foldable_norm(m) -> bool:
    return type(m) is nn.BatchNorm2d or (_is_timm(m, _TIMM_NORMS) and hasattr(m, "act") and hasattr(m, "drop"))


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return _foldable_conv(m) or _foldable_norm(m) or super().is_leaf_module(m, qualname)


def conv_bn_pairs(module: nn.Module, keep: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """``(conv name, batch-norm name)`` pairs where the norm is the only consumer of the convolution's output.

    Found by tracing the module with ``torch.fx``; a module that does not trace gives no pairs. Convolutions
    named in ``keep`` (layers whose own output is read) are left out.
    """
    try:
        graph = _Tracer().trace(module)
    except Exception:  # noqa: BLE001 - any untraceable model simply is not folded
        return []
    modules = dict(module.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable_norm(modules.get(node.target)):
            continue
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or not _foldable_conv(modules.get(src.target)) or len(src.users) != 1:
            continue
        if src.target in keep:
            continue
        bn = modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None or bn.training:
            continue
        pairs.append((src.target, node.target))
    return pairs


def _copy_without_hooks(module: nn.Module) -> nn.Module:
    """``deepcopy`` minus the hooks: other extractors' hooks on the caller's module must not follow the copy."""
    saved = []
    for m in module.modules():
        for k, v in vars(m).items():
            if "hook" in k and isinstance(v, dict) and v:
                saved.append((m, k, v))
    try:
        for m, k, v in saved:
            setattr(m, k, type(v)())
        return copy.deepcopy(module)
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


@torch.no_grad()
def fold_batchnorm(module: nn.Module, keep=()) -> tuple[nn.Module, int]:
    """A copy of ``module`` (in eval mode) with every foldable conv -> batch-norm pair folded.

    Returns ``(module, number of norms folded)``; with nothing to fold the original module comes back unchanged
    (no copy). ``keep``: module names whose outputs must stay exactly as they are (hooked convolutions).
    """
    if module.training:
        return module, 0
    pairs = conv_bn_pairs(module, frozenset(keep))
    if not pairs:
        return module, 0
    module = _copy_without_hooks(module)
    for conv_name, bn_name in pairs:
        conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
        scale = bn.running_var.float().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.float()
        shift = -bn.running_mean.float() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        w = conv.weight.float() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
        b = shift if conv.bias is None else conv.bias.float() * scale + shift
        conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)
        rest = nn.Identity() if type(bn) is nn.BatchNorm2d else nn.Sequential(OrderedDict(drop=bn.drop, act=bn.act))
        _set(module, bn_name, rest)
    return module, len(pairs)
