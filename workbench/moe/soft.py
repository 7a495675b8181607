"""Soft MoE (Puigcerver et al. 2023, arXiv 2308.00951; vmoe's ``SoftRouter``).

Per image, with tokens X (N, d) and slot parameters Phi (d, E*S) (S slots per expert):

    logits = X Phi                                   (N, E*S)   [normalised: scale * l2norm(X) l2norm(Phi)]
    D = softmax over tokens  (each slot's dispatch weights)      C = softmax over slots (each token's combine weights)
    slot inputs  X~ = D^T X  (E*S, d);   slot outputs Y~_s = FFN_{expert of s}(X~_s);   Y = C Y~   (N, d)

Every slot is a convex combination of the image's tokens and every output a convex combination of slot outputs:
fully differentiable, no drops, no balance loss.  Each expert processes S slots per image, so the expert FLOPs are
those of E*S tokens through one FFN, whatever N is (S = N/E matches top-1).  The router's parameter is stored as
``weight`` (E*S, d), rows grouped by expert, so it is read and replaced like a top-k router's (E, d) weight.

Defaults differ from vmoe's ``SoftRouter``, which always normalises (``soft_normalize=True`` here) and initialises
the slot parameters at a larger scale: here the logits are unnormalised and the weights start at std 0.02, like the
top-k router's, so at initialisation every slot is close to the mean token.  Prefix tokens (CLS) are mixed into
the slots like patches.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .router import autocast_off


class SoftRouter(nn.Module):
    """Slot logits, in fp32: x (U, d) -> (U, E*S)."""

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, *, normalize: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.num_experts, self.slots_per_expert, self.normalize = num_experts, slots_per_expert, normalize
        self.weight = nn.Parameter(torch.empty(num_experts * slots_per_expert, dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, std=0.02)
        self.scale = nn.Parameter(torch.ones((), device=device, dtype=dtype)) if normalize else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x.device.type):
            return slot_logits(x.float(), self.weight.float(), self.scale)


def slot_logits(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(U, d) x (E*S, d) -> (U, E*S); with ``scale`` both sides are l2-normalised over d first (the paper's
    normalised variant, which keeps logits in range as d grows)."""
    if scale is None:
        return F.linear(x, weight)
    return scale.float() * F.linear(F.normalize(x, dim=-1), F.normalize(weight, dim=-1))


def expert_weights(logits: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(..., E*S) slot logits -> (..., E): each token's combine weight summed over each expert's slots."""
    combine = logits.softmax(dim=-1)
    return combine.view(*combine.shape[:-1], num_experts, -1).sum(-1)


def soft_moe_ffn(x: torch.Tensor, logits: torch.Tensor, w1, b1, w2, b2, act, drop) -> torch.Tensor:
    """x (B, N, d), logits (B, N, E*S) fp32 -> y (B, N, d_out)."""
    batch, tokens, _ = x.shape
    num_experts = w1.shape[0]
    slots = logits.shape[-1]
    dispatch = logits.softmax(dim=1).to(x.dtype)  # over tokens
    combine = logits.softmax(dim=2).to(x.dtype)  # over slots
    slot_in = torch.einsum("bnd,bns->bsd", x, dispatch)  # (B, E*S, d)
    per_expert = slot_in.view(batch, num_experts, slots // num_experts, -1).transpose(0, 1).reshape(
        num_experts, batch * (slots // num_experts), -1)  # (E, B*S, d)
    h = per_expert @ w1 if b1 is None else torch.baddbmm(b1.unsqueeze(1), per_expert, w1)
    h = drop(act(h))
    out = h @ w2 if b2 is None else torch.baddbmm(b2.unsqueeze(1), h, w2)  # (E, B*S, d_out)
    out = out.view(num_experts, batch, slots // num_experts, -1).transpose(0, 1).reshape(batch, slots, -1)
    return torch.einsum("bns,bsd->bnd", combine, out)
