"""Router: which experts each routing unit (a token, or a whole image) goes to, and with what gate.

The router is a bias-free linear map computed in fp32 (even under autocast: low-precision logits make
top-k unstable), followed by a softmax and a top-k.  Capacity is applied afterwards by
:func:`assign_slots`, so that every dispatch path drops exactly the same assignments.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTING_MODES = ("token", "image")
IMAGE_POOLS = ("mean", "cls")
PRIORITIES = ("position", "gate")


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for device types autocast does not know (``meta``), where
    ``torch.is_autocast_enabled`` and ``torch.autocast`` raise."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """A context that turns autocast off for ``device_type`` where it is on; otherwise a no-op (nothing to undo, and
    devices such as ``meta`` have no autocast to enter)."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


@dataclass
class Routing:
    """One forward's routing decision, at the level of routing units (tokens or images).

    logits/probs: (U, E) fp32.  experts/gates: (U, k).  keep: (U, k) bool, False where capacity dropped the
    assignment.  Aggregates needed by the losses and the trainer are derived from these.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor
    keep: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[-1]

    def load(self) -> torch.Tensor:
        """Kept assignments per expert, (E,) float."""
        onehot = F.one_hot(self.experts, self.num_experts).to(self.probs.dtype)
        return (onehot * self.keep.unsqueeze(-1)).sum(dim=(0, 1))

    def drop_rate(self) -> torch.Tensor:
        return 1.0 - self.keep.float().mean()


class Router(nn.Module):
    """Linear (no bias) + softmax + top-k, always in fp32."""

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, *, renormalize: bool | str = False,
                 noise_std: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.noise_std = noise_std
        self.weight = nn.Parameter(torch.empty(num_experts, dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (U, d) -> (clean logits (U, E), probs (U, E), experts (U, k), gates (U, k))."""
        with autocast_off(x.device.type):
            logits = F.linear(x.float(), self.weight.float())
            noisy = logits
            if self.training and self.noise_std > 0:
                noisy = logits + self.noise_std * torch.randn_like(logits)
            probs = noisy.softmax(dim=-1)
            gates, experts = probs.topk(self.top_k, dim=-1)
            if self.renormalize == "straight_through":  # sums to 1, yet the router still learns from the task
                gates = gates / gates.sum(dim=-1, keepdim=True).detach()
            elif self.renormalize:
                gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, probs, experts, gates


def expert_capacity(num_units: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    """Slots per expert: ceil(capacity_factor * U * k / E), at least 1; None means dropless."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * num_units * top_k / num_experts))


def slot_positions(experts: torch.Tensor, num_experts: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Position of every assignment inside its expert's buffer, (U, k) long.

    Priority (GShard / V-MoE): all first choices before any second choice; within a choice rank, units in
    ``order`` (default: their position; Batch Prioritized Routing passes units sorted by gate).
    """
    units, k = experts.shape
    ranked = experts if order is None else experts[order]
    onehot = F.one_hot(ranked.t().reshape(-1), num_experts)  # (k*U, E), choice-rank major
    pos = (onehot.cumsum(dim=0) - 1).mul_(onehot).sum(dim=-1).view(k, units).t()
    if order is not None:
        pos = torch.empty_like(pos).index_copy_(0, order, pos)
    return pos


def assign_slots(experts: torch.Tensor, gates: torch.Tensor, num_experts: int, capacity: int | None,
                 priority: str = "position") -> torch.Tensor:
    """keep mask (U, k): False for assignments beyond their expert's capacity."""
    if capacity is None:
        return torch.ones_like(experts, dtype=torch.bool)
    order = torch.argsort(gates[:, 0], descending=True, stable=True) if priority == "gate" else None
    return slot_positions(experts, num_experts, order) < capacity
