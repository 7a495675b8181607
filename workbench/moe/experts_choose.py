"""Experts-choose routing (Zhou et al. 2022, arXiv 2202.09368; vmoe's ``NoisyTopItemsPerExpertRouter``).

Instead of every token picking its top-k experts, every expert picks its top-C tokens by router probability,
within a group of tokens (one image, or the whole batch):

    C = max(1, round(capacity_factor * N / E))      (N tokens in the group, at most N)
    y_t = sum over experts e that chose t of  p_te * FFN_e(x_t)

so every expert processes exactly C tokens per group (perfect balance, no balance loss), and a token may be chosen
by 0, 1 or several experts.  Unchosen tokens get no MoE output; the block's residual carries them on.  On average a
token passes through ``E * C / N`` (about ``capacity_factor``) experts: the activated FLOPs of top-k with
k = capacity_factor.

Groups per image (default) make an image's output independent of the rest of its batch; per-batch groups (as in
the paper's language models) do not, and their cost per image depends on the batch (profile them at the batch they
run at).  Prefix tokens (CLS) compete for the experts like patches do.  Router noise (vmoe's default std 1/E) is
off unless ``router_noise`` is set.
"""
from __future__ import annotations

import math

import torch

GROUPS = ("image", "batch")


def capacity(group_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes per group: round(capacity_factor * N / E), between 1 and N."""
    return min(group_tokens, max(1, math.floor(capacity_factor * group_tokens / num_experts + 0.5)))


def choose(probs: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (G, N, E) -> (token index within the group (G, C, E), its probability (G, C, E)): each expert's top-C."""
    gates, index = probs.topk(cap, dim=1)
    return index, gates


def experts_choose_ffn(x: torch.Tensor, probs: torch.Tensor, cap: int, w1, b1, w2, b2, act, drop,
                       renormalize: bool | str = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (G, N, d), probs (G, N, E) fp32 -> (y (G, N, d_out), chosen (G*N, E) bool).

    One batched matmul per projection over the (E, G*C) chosen rows; the outputs are scattered back with
    ``index_add`` (a gather in the backward).  ``renormalize`` divides each token's gates by their sum over the
    experts that chose it ('straight_through': with that sum detached)."""
    groups, tokens, dim = x.shape
    num_experts = probs.shape[-1]
    dtype = x.dtype
    index, gates = choose(probs, cap)  # (G, C, E)
    flat = (index + torch.arange(groups, device=x.device).view(groups, 1, 1) * tokens).permute(2, 0, 1)
    flat = flat.reshape(num_experts, groups * cap)  # rows of x each expert takes
    gates = gates.permute(2, 0, 1).reshape(num_experts, groups * cap)
    if renormalize:
        total = torch.zeros(groups * tokens, device=x.device, dtype=gates.dtype).index_add_(
            0, flat.reshape(-1), gates.reshape(-1))
        norm = total[flat]
        gates = gates / (norm.detach() if renormalize == "straight_through" else norm)
    rows = x.reshape(groups * tokens, dim)[flat]  # (E, G*C, d)
    h = rows @ w1 if b1 is None else torch.baddbmm(b1.unsqueeze(1), rows, w1)
    h = drop(act(h))
    out = h @ w2 if b2 is None else torch.baddbmm(b2.unsqueeze(1), h, w2)
    out = out * gates.unsqueeze(-1).to(dtype)
    y = out.new_zeros(groups * tokens, out.shape[-1]).index_add_(0, flat.reshape(-1), out.reshape(-1, out.shape[-1]))
    chosen = torch.zeros(groups * tokens, num_experts, dtype=torch.bool, device=x.device)
    chosen[flat, torch.arange(num_experts, device=x.device).unsqueeze(1)] = True
    return y.view(groups, tokens, -1), chosen
