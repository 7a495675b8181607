"""Three ways of running tokens through their experts.  All compute

    y_t = sum_j keep_tj * gate_tj * FFN_{e_tj}(x_t)

with identical outputs and gradients (tested); they differ only in cost.

* ``grouped`` (default): sort the T*k assignments by expert and run two ``torch._grouped_mm`` calls over the
  stacked expert weights.  No padding, no per-expert kernel launches, no host sync; the same work as a dense FFN
  with the activated width.  Falls back to ``loop`` where torch has no ``_grouped_mm``.
* ``loop``: one small matmul per expert (HF Mixtral style).  The readable reference.
* ``einsum``: GShard / V-MoE one-hot dispatch and combine tensors of shape (T, E, C).  Spends work on the
  one-hot matmuls and on empty capacity slots; kept as the anchors' reference.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

DISPATCH_MODES = ("grouped", "loop", "einsum")
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")

Act = Callable[[torch.Tensor], torch.Tensor]


def _combine(per_assignment: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(T*k, d) expert outputs in assignment order, (T, k) gates -> (T, d).  A gather-free weighted sum."""
    tokens, k = gates.shape
    out = per_assignment.view(tokens, k, -1)
    if k == 1:
        return out[:, 0] * gates
    return torch.einsum("tkd,tk->td", out, gates.to(out.dtype))


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def dispatch_grouped(x, experts, gates, w1, b1, w2, b2, act: Act, drop: Act) -> torch.Tensor:
    if not HAS_GROUPED_MM:
        return dispatch_loop(x, experts, gates, w1, b1, w2, b2, act, drop)
    num_experts = w1.shape[0]
    k = experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    offsets = torch.bincount(flat, minlength=num_experts).cumsum(0).to(torch.int32)
    dtype = _matmul_dtype(x)
    xs = x[order // k].to(dtype)
    h = torch._grouped_mm(xs, w1.to(dtype), offsets) + b1[sorted_experts].to(dtype)
    h = drop(act(h))
    out = torch._grouped_mm(h, w2.to(dtype), offsets) + b2[sorted_experts].to(dtype)
    unsorted = out[torch.argsort(order)]
    return _combine(unsorted, gates.to(unsorted.dtype))


def dispatch_loop(x, experts, gates, w1, b1, w2, b2, act: Act, drop: Act) -> torch.Tensor:
    num_experts = w1.shape[0]
    k = experts.shape[1]
    flat = experts.reshape(-1)
    dtype = _matmul_dtype(x)
    per_assignment = x.new_zeros(flat.shape[0], w2.shape[-1], dtype=dtype)
    for e in range(num_experts):
        idx = (flat == e).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        h = drop(act(torch.addmm(b1[e].to(dtype), x[idx // k].to(dtype), w1[e].to(dtype))))
        per_assignment.index_copy_(0, idx, torch.addmm(b2[e].to(dtype), h, w2[e].to(dtype)))
    return _combine(per_assignment, gates.to(dtype))


def dispatch_einsum(x, experts, gates, w1, b1, w2, b2, act: Act, drop: Act,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """GShard dispatch.  ``positions`` (T, k): slot of each assignment in its expert buffer (computed if absent);
    the buffer is just large enough to hold every kept assignment."""
    from .router import slot_positions

    num_experts = w1.shape[0]
    if positions is None:
        positions = slot_positions(experts, num_experts)
    live = gates != 0
    capacity = int(positions[live].max().item()) + 1 if live.any() else 1
    dtype = _matmul_dtype(x)
    slot = F.one_hot(positions.clamp(max=capacity - 1), capacity) * live.unsqueeze(-1)  # (T, k, C)
    expert_onehot = F.one_hot(experts, num_experts)  # (T, k, E)
    dispatch = torch.einsum("tke,tkc->tec", expert_onehot.to(dtype), slot.to(dtype))
    combine = torch.einsum("tke,tkc,tk->tec", expert_onehot.to(dtype), slot.to(dtype), gates.to(dtype))
    expert_in = torch.einsum("td,tec->ecd", x.to(dtype), dispatch)
    h = drop(act(torch.einsum("ecd,edh->ech", expert_in, w1.to(dtype)) + b1.to(dtype).unsqueeze(1)))
    expert_out = torch.einsum("ech,ehd->ecd", h, w2.to(dtype)) + b2.to(dtype).unsqueeze(1)
    return torch.einsum("ecd,tec->td", expert_out, combine)


DISPATCHERS = {"grouped": dispatch_grouped, "loop": dispatch_loop, "einsum": dispatch_einsum}
