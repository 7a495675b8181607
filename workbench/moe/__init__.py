"""Mixture-of-Experts building blocks: router, dispatch paths, auxiliary losses and the ``MoEMlp`` layer."""
from __future__ import annotations

import torch
import torch.nn as nn

from .dispatch import DISPATCH_MODES, HAS_GROUPED_MM
from .kernels import CPU_MATMULS, OneDNNLinear, check_cpu_matmul
from .layer import SHARED_EXPERT_MODES, FeedForward, MoEMlp
from .losses import AUX_LOSSES
from .router import ROUTING_MODES, Router, Routing, assign_slots, expert_capacity

__all__ = ["MoEMlp", "FeedForward", "Router", "Routing", "assign_slots", "expert_capacity", "moe_modules",
           "moe_aux_loss", "moe_aux_terms", "set_capture", "DISPATCH_MODES", "ROUTING_MODES", "SHARED_EXPERT_MODES",
           "AUX_LOSSES", "HAS_GROUPED_MM", "CPU_MATMULS", "set_cpu_matmul"]


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


def set_cpu_matmul(model: nn.Module, backend: str = "blas") -> int:
    """Run the model's fp32 CPU matmuls on ``backend`` (``'blas'`` or ``'onednn'``, see :mod:`.kernels`): every
    ``nn.Linear`` becomes :class:`~.kernels.OneDNNLinear` (or back; the parameters stay the same objects) and every
    MoE layer's experts follow.  Returns how many linear layers and MoE layers it set."""
    check_cpu_matmul(backend)
    cls = OneDNNLinear if backend == "onednn" else nn.Linear
    count = 0
    for module in model.modules():
        if type(module) in (nn.Linear, OneDNNLinear):
            module.__class__ = cls
            count += 1
        elif isinstance(module, MoEMlp):
            module.cpu_matmul = backend
            count += 1
    return count
