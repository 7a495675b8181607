"""MoE-aware parameters and FLOPs.

Convention: **MACs** (multiply-accumulates) as fvcore counts them; multiply by 2 for FLOPs.  Counts are *per image*.

fvcore traces the model with every MoE layer swapped for a stand-in (its routing is data dependent and its
grouped matmuls are invisible to fvcore), with a handle for ``scaled_dot_product_attention`` (which fvcore skips).
Each MoE layer is then counted analytically from a real forward, so capacity drops and image routing are exact:

    router  U * d * E            (U routing units: tokens, or images)
    experts kept assignments * tokens per unit * 2 * d * h
    shared  T * 2 * d * h_shared (+ T * d for the gate)

One-hot dispatch (the einsum path) is bookkeeping, not work, and is never counted.  The *dense-equivalent* model
is the same ViT with each MoE block's FFN back to one expert-wide dense FFN (the model it would be upcycled from).

Imports: fvcore, pandas, ``workbench.moe``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn as nn

from ..moe import MoEMlp, moe_modules


class _StandIn(nn.Module):
    """Takes an MoE layer's place while fvcore traces; returns zeros of the right shape and costs nothing."""

    def forward(self, x):
        return torch.zeros_like(x)


def _sdpa_handle(inputs, outputs) -> int:
    q, k = inputs[0].type().sizes(), inputs[1].type().sizes()
    v = inputs[2].type().sizes()
    batch_heads = 1
    for s in q[:-2]:
        batch_heads *= s
    return batch_heads * q[-2] * k[-2] * q[-1] + batch_heads * q[-2] * k[-2] * v[-1]  # QK^T + AV


def _fvcore_by_module(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, x)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return dict(analysis.by_module())


def router_macs(layer: MoEMlp, tokens: int) -> float:
    """Per-image MACs of routing: the router's linear map (per token, or per image for image routing); Soft MoE
    also mixes tokens into slots and slot outputs back into tokens (two (N, E*S) x d products)."""
    d, E = layer.in_features, layer.num_experts
    if layer.router_type == "soft":
        slots = E * layer.slots_per_expert
        return tokens * d * slots + 2 * tokens * slots * d
    return (1 if layer.routing == "image" else tokens) * d * E


def moe_layer_macs(layer: MoEMlp, batch: int, tokens: int) -> dict[str, float]:
    """Per-image MACs of one MoE layer from its last forward (``last_load`` counts kept assignments: token-expert
    pairs, or for Soft MoE the slots each expert processed)."""
    d, h = layer.in_features, layer.expert_hidden
    per_unit = tokens if layer.routing == "image" else 1
    if layer.last_load is not None:
        kept = float(layer.last_load.sum())
    else:
        kept = layer.assignments_per_image(tokens) * batch / per_unit
    out = {"router": float(router_macs(layer, tokens)),
           "experts": kept * per_unit * (d * h + h * layer.out_features) / batch,
           "shared": 0.0}
    if layer.shared is not None:
        hs = layer.shared.fc1.out_features
        out["shared"] = tokens * (d * hs + hs * d + (d if layer.shared_gate is not None else 0))
    return out


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _active_params(layer: MoEMlp, tokens: int) -> int:
    """Parameters one token passes through: router, k experts (experts-choose / soft: the mean number of expert
    passes per token, so it can be fractional before rounding), the shared expert."""
    per_expert = (layer.w1.numel() + layer.w2.numel()) // layer.num_experts
    if layer.b1 is not None:
        per_expert += (layer.b1.numel() + layer.b2.numel()) // layer.num_experts
    shared = _params(layer.shared) + (_params(layer.shared_gate) if layer.shared_gate is not None else 0) \
        if layer.shared is not None else 0
    per_token = layer.assignments_per_image(tokens) / tokens
    return round(layer.router.weight.numel() + per_token * per_expert + shared)


def _dense_ffn_params(layer: MoEMlp) -> int:
    d, h, o = layer.in_features, layer.expert_hidden, layer.out_features
    return d * h + h * o + ((h + o) if layer.b1 is not None else 0)


@dataclass
class Profile:
    params: int
    active_params: int  # per token
    macs: float  # activated, per image
    dense_params: int
    dense_macs: float
    blocks: pd.DataFrame
    input_size: tuple

    def summary(self) -> dict:
        return {"params": self.params, "active_params": self.active_params, "gmacs": round(self.macs / 1e9, 4),
                "dense_params": self.dense_params, "dense_gmacs": round(self.dense_macs / 1e9, 4),
                "params_x": round(self.params / self.dense_params, 3),
                "macs_x": round(self.macs / self.dense_macs, 3), "input_size": list(self.input_size)}


def profile(model: nn.Module, x: torch.Tensor | None = None, batch: int = 1) -> Profile:
    """Parameters and activated MACs per image of ``model`` on ``x`` (default: ``batch`` zero images of the model's
    input size).  A batch gives the per-image mean, which is what capacity drops make input dependent, and what
    experts-choose over the whole batch (``choice_group='batch'``) depends on: profile those at the batch they run
    at.  The model is counted in eval mode; every module's own training flag is put back afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    if x is None:
        x = torch.zeros(batch, *model.pretrained_cfg["input_size"])
    try:
        with torch.no_grad():
            return _profile(model.eval(), x)
    finally:
        for module, training in modes:
            module.training = training


def _profile(model: nn.Module, x: torch.Tensor | None) -> Profile:
    if x is None:
        x = torch.zeros(1, *model.pretrained_cfg["input_size"])
    x = x.to(next(model.parameters()).device)
    batch = x.shape[0]
    layers = moe_modules(model)
    model(x)  # real routing: loads and drops for the analytic MoE count
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    moe_macs = {name: moe_layer_macs(layer, batch, tokens) for name, layer in layers.items()}
    originals = {}
    for name, layer in layers.items():
        parent = model.blocks[name] if isinstance(name, int) else model.get_submodule(name.rsplit(".", 1)[0])
        attr = "mlp" if isinstance(name, int) else name.rsplit(".", 1)[1]
        originals[name] = (parent, attr, layer)
        setattr(parent, attr, _StandIn())
    try:
        by_module = _fvcore_by_module(model, x)
    finally:
        for parent, attr, layer in originals.values():
            setattr(parent, attr, layer)

    rows = []
    for i, block in enumerate(model.blocks):
        layer = layers.get(i)
        attn = by_module.get(f"blocks.{i}.attn", 0) / batch
        if layer is None:
            ffn = by_module.get(f"blocks.{i}.mlp", 0) / batch
            rows.append({"block": i, "kind": "dense", "params": _params(block), "active_params": _params(block),
                         "attn_macs": attn, "ffn_macs": ffn, "router_macs": 0.0, "shared_macs": 0.0,
                         "macs": by_module.get(f"blocks.{i}", 0) / batch, "dense_params": _params(block),
                         "dense_macs": by_module.get(f"blocks.{i}", 0) / batch})
            continue
        m = moe_macs[i]
        rest = by_module.get(f"blocks.{i}", 0) / batch  # attention, norms: everything but the stand-in
        other_params = _params(block) - _params(layer)
        dense_ffn_macs = tokens * (layer.in_features * layer.expert_hidden + layer.expert_hidden * layer.out_features)
        rows.append({"block": i, "kind": "moe", "params": _params(block),
                     "active_params": other_params + _active_params(layer, tokens), "attn_macs": attn,
                     "ffn_macs": m["experts"], "router_macs": m["router"], "shared_macs": m["shared"],
                     "macs": rest + m["experts"] + m["router"] + m["shared"],
                     "dense_params": other_params + _dense_ffn_params(layer), "dense_macs": rest + dense_ffn_macs})
    blocks = pd.DataFrame(rows)
    total_blocks = by_module.get("blocks", 0) / batch
    outside = by_module.get("", 0) / batch - total_blocks  # patch embed, head, final norm
    outside_params = _params(model) - sum(_params(b) for b in model.blocks)
    return Profile(params=_params(model), active_params=int(outside_params + blocks["active_params"].sum()),
                   macs=float(outside + blocks["macs"].sum()), dense_params=int(outside_params + blocks["dense_params"].sum()),
                   dense_macs=float(outside + blocks["dense_macs"].sum()), blocks=blocks, input_size=tuple(x.shape[1:]))


def analytic_macs(model: nn.Module, routed_tokens_per_expert_slot: bool = True) -> float:
    """Closed-form MACs per image of a timm ViT (dropless MoE layers): the cross-check for :func:`profile`."""
    embed = model.patch_embed
    d = model.embed_dim
    n_patches = embed.num_patches
    tokens = n_patches + model.num_prefix_tokens
    in_chans = embed.proj.in_channels
    ph, pw = embed.patch_size
    total = n_patches * in_chans * ph * pw * d
    layers = moe_modules(model)
    for i, block in enumerate(model.blocks):
        heads = block.attn.num_heads
        total += tokens * d * 3 * d + tokens * d * d  # qkv + proj
        total += 2 * heads * tokens * tokens * (d // heads)  # QK^T + AV
        layer = layers.get(i)
        if layer is None:
            total += tokens * (d * block.mlp.fc1.out_features + block.mlp.fc1.out_features * d)
        else:
            total += router_macs(layer, tokens) + tokens * layer.activated_hidden(tokens) * 2 * d
            if layer.shared_gate is not None:
                total += tokens * d
    if getattr(model, "head", None) is not None and isinstance(model.head, nn.Linear):
        total += model.head.in_features * model.head.out_features
    return float(total)
