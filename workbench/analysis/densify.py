"""Turn chosen MoE layers back into dense FFNs (timm ``Mlp``), for pruning the layers whose routing does not
specialise.

Methods (``top`` and ``merge`` keep the shared expert, if any, by concatenating its hidden units with the
routed expert's: one Mlp of width h_shared + h that computes exactly shared(x) + expert(x)):

* ``shared``: keep the shared expert only (the layer needs ``shared_expert='add'``).
* ``top``: keep the most used expert.
* ``merge``: average the experts' weights, weighted by the gate mass each receives (how often it is chosen
  times the gates it is given; the load when no gates are known).

Routed outputs were scaled by their gates; the dense copy scales the routed part by ``gate_scale``: with routing
statistics, the mean over tokens of the sum of their kept gates (all k choices: a renormalised top-k layer
gets 1, an unnormalised top-2 layer the mean of g1 + g2), else 1.  For a layer whose experts are still identical
(just upcycled) and whose kept gates sum to 1, the dense copy computes exactly the MoE layer.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from timm.layers import Mlp

from ..moe import MoEMlp, moe_modules

METHODS = ("shared", "top", "merge")


@torch.no_grad()
def dense_from_moe(layer: MoEMlp, method: str = "merge", usage: torch.Tensor | None = None,
                   gate_scale: float = 1.0) -> Mlp:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: use one of {METHODS}")
    if layer.shared_gate is not None:
        raise ValueError("densify does not fold a 'gated' shared expert (its gate is per token); use "
                         "shared_expert='add' or 'none'")
    if layer.b1 is None:
        raise ValueError("densify needs experts with biases (bias=True)")
    d, o = layer.in_features, layer.out_features
    parts = []  # (fc1 weight (h, d), fc1 bias, fc2 weight (o, h), fc2 bias)
    if method == "shared":
        if layer.shared is None:
            raise ValueError("method='shared' needs a shared expert; this layer has none: use 'top' or 'merge'")
    else:
        usage = layer.last_load if usage is None else usage
        if usage is None:
            raise ValueError("no expert usage known: run the model on data first or pass usage=")
        usage = usage.float().to(layer.w1.device)
        if method == "top":
            weights = torch.nn.functional.one_hot(usage.argmax(), layer.num_experts).float()
        else:
            weights = usage / usage.sum().clamp(min=1e-12)
        w1 = torch.einsum("e,edh->hd", weights, layer.w1)
        b1 = weights @ layer.b1
        w2 = torch.einsum("e,eho->oh", weights, layer.w2) * gate_scale
        b2 = (weights @ layer.b2) * gate_scale
        parts.append((w1, b1, w2, b2))
    if layer.shared is not None:
        s = layer.shared
        parts.insert(0, (s.fc1.weight, s.fc1.bias, s.fc2.weight, s.fc2.bias))
    hidden = sum(p[0].shape[0] for p in parts)
    mlp = Mlp(d, hidden, o, act_layer=type(layer.act), bias=True).to(layer.w1.device, layer.w1.dtype)
    mlp.fc1.weight.copy_(torch.cat([p[0] for p in parts]))
    mlp.fc1.bias.copy_(torch.cat([p[1] for p in parts]))
    mlp.fc2.weight.copy_(torch.cat([p[2] for p in parts], dim=1))
    mlp.fc2.bias.copy_(sum(p[3] for p in parts))
    return mlp


def densify(model: nn.Module, layers, method: str = "merge", stats=None, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` whose MoE blocks in ``layers`` are dense again.  ``stats`` (a RoutingStats from
    ``collect_routing``) supplies expert usage and mean gates; without it the layers' last forward is used."""
    moe = moe_modules(model)
    missing = [i for i in layers if i not in moe]
    if missing:
        raise ValueError(f"blocks {missing} are not MoE layers (MoE blocks: {sorted(k for k in moe if isinstance(k, int))})")
    out = model if inplace else copy.deepcopy(model)
    out_moe = moe_modules(out)
    for i in layers:
        layer = out_moe[i]
        usage, scale = moe[i].last_load, 1.0  # the copy has no forward state: read the original's
        if stats is not None and i in stats.layers:
            s = stats.layers[i]
            usage = s.gate_mass if s.gate_mass is not None and s.gate_mass.sum() > 0 else s.load
            if not math.isnan(s.mean_gate_sum):
                scale = s.mean_gate_sum
            else:  # statistics recorded before gate sums were kept
                scale = 1.0 if (layer.router.renormalize and layer.top_k == 1) else s.mean_gate
        out.blocks[i].mlp = dense_from_moe(layer, method, usage, scale)
    if hasattr(out, "moe_kwargs"):
        out.moe_layers_spec = sorted(k for k in moe_modules(out) if isinstance(k, int))
    return out
