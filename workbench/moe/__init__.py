"""Mixture-of-Experts building blocks: router, dispatch paths, auxiliary losses and the ``MoEMlp`` layer."""
from __future__ import annotations

import torch
import torch.nn as nn

from .dispatch import DISPATCH_MODES, HAS_GROUPED_MM
from .layer import SHARED_EXPERT_MODES, FeedForward, MoEMlp
from .losses import AUX_LOSSES
from .router import ROUTING_MODES, Router, Routing, assign_slots, expert_capacity

__all__ = ["MoEMlp", "FeedForward", "Router", "Routing", "assign_slots", "expert_capacity", "moe_modules",
           "moe_aux_loss", "moe_aux_terms", "set_capture", "DISPATCH_MODES", "ROUTING_MODES", "SHARED_EXPERT_MODES",
           "AUX_LOSSES", "HAS_GROUPED_MM"]


def moe_modules(model: nn.Module) -> dict[int, MoEMlp]:
    """MoE layers keyed by block index (``blocks.<i>.mlp``); other placements keyed by module name."""
    found: dict = {}
    for name, module in model.named_modules():
        if isinstance(module, MoEMlp):
            parts = name.split(".")
            key = int(parts[1]) if len(parts) == 3 and parts[0] == "blocks" and parts[2] == "mlp" else name
            found[key] = module
    return found


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Weighted sum of every MoE layer's auxiliary losses from the last forward (0 for a dense model)."""
    layers = moe_modules(model).values()
    total = sum((layer.aux_loss for layer in layers), torch.zeros(()))
    return total


def moe_aux_terms(model: nn.Module) -> dict[str, float]:
    """Unweighted auxiliary terms averaged over MoE layers, for logging."""
    sums: dict[str, list[float]] = {}
    for layer in moe_modules(model).values():
        for name, value in layer.aux_terms.items():
            sums.setdefault(name, []).append(float(value))
    return {name: sum(v) / len(v) for name, v in sums.items()}


def set_capture(model: nn.Module, enabled: bool = True) -> None:
    """Turn routing capture on or off in every MoE layer; off clears what was kept."""
    for layer in moe_modules(model).values():
        layer.capture_routing = enabled
        if not enabled:
            layer.last_routing = None
