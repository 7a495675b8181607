"""Routing capture with stable names: a :class:`RoutingCache` keyed by block index, as TransformerLens keys its
activation cache, instead of ad-hoc hooks.

``run_with_routing`` gives one batch's routing per patch, on the patch grid (prefix tokens kept apart);
``collect_routing`` streams a whole dataset and keeps only aggregates (class x expert, position x expert, loads,
and each image's expert histogram), so memory does not grow with the number of tokens.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from ..train.progress import tqdm

from ..moe import MoEMlp, moe_modules


@dataclass
class LayerRouting:
    """One MoE layer's routing of a batch.

    Token routing: ``probs`` (B, gh, gw, E), ``experts``/``gates``/``keep`` (B, gh, gw, k) on the patch grid, and
    ``prefix_probs``/``prefix_experts`` (B, P, E)/(B, P, k) for the class/register tokens.
    Image routing: ``probs`` (B, E), ``experts``/``gates``/``keep`` (B, k): one choice per image.
    Experts-choose and Soft MoE (``router``): k = E, every expert per token with the dominant one first
    (experts-choose: chosen experts by gate, then the rest, ``keep`` False where an expert did not take the token;
    soft: ``probs``/``gates`` are the token's combine weight per expert), so ``top1()`` is the dominant expert and
    ``keep[..., 0]`` is False for a token no expert chose.
    """

    routing: str
    probs: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor
    keep: torch.Tensor
    prefix_probs: torch.Tensor | None = None
    prefix_experts: torch.Tensor | None = None
    router: str = "topk"

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    def top1(self) -> torch.Tensor:
        """The first-choice expert: (B, gh, gw) for token routing, (B,) for image routing."""
        return self.experts[..., 0]

    def expert_load(self) -> torch.Tensor:
        """(B, E): share of each image's kept assignments that went to each expert."""
        E = self.num_experts
        onehot = torch.nn.functional.one_hot(self.experts, E).float() * self.keep.unsqueeze(-1)
        counts = onehot.reshape(onehot.shape[0], -1, E).sum(1)
        return counts / counts.sum(-1, keepdim=True).clamp(min=1)


class RoutingCache(dict):
    """``{block index: LayerRouting}`` for one batch."""

    def layers(self) -> list[int]:
        return sorted(self)


@contextmanager
def capturing(model: nn.Module):
    layers = moe_modules(model)
    before = {i: layer.capture_routing for i, layer in layers.items()}
    for layer in layers.values():
        layer.capture_routing = True
    try:
        yield layers
    finally:
        for i, layer in layers.items():
            layer.capture_routing = before[i]
            if not before[i]:
                layer.last_routing = None


def _grid(model: nn.Module) -> tuple[int, int]:
    return tuple(model.patch_embed.grid_size)


def _layer_routing(layer: MoEMlp, batch: int, prefix: int, grid: tuple[int, int]) -> LayerRouting:
    r = layer.last_routing
    if layer.routing == "image":
        return LayerRouting("image", r["probs"], r["experts"], r["gates"], r["keep"])
    tokens = r["probs"].shape[0] // batch

    def split(t):
        t = t.view(batch, tokens, -1)
        return t[:, :prefix], t[:, prefix:].reshape(batch, *grid, t.shape[-1])

    pre_p, probs = split(r["probs"])
    pre_e, experts = split(r["experts"])
    _, gates = split(r["gates"])
    _, keep = split(r["keep"])
    return LayerRouting("token", probs, experts, gates, keep, pre_p, pre_e, layer.router_type)


@torch.no_grad()
def run_with_routing(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, RoutingCache]:
    """(logits, routing cache) for one batch of preprocessed images, in eval mode."""
    was_training = model.training
    model.eval()
    with capturing(model) as layers:
        logits = model(images)
        cache = RoutingCache({i: _layer_routing(layer, images.shape[0], model.num_prefix_tokens, _grid(model))
                              for i, layer in layers.items() if isinstance(i, int)})
    model.train(was_training)
    return logits, cache


@dataclass
class LayerStats:
    """Aggregates of one MoE layer over a dataset (first-choice experts of patch tokens, or of images)."""

    num_experts: int
    routing: str
    class_expert: torch.Tensor  # (C, E) counts
    position_expert: torch.Tensor | None  # (gh*gw, E) counts; None for image routing
    image_hist: torch.Tensor  # (N, E) share of each image's patches per expert (one-hot for image routing)
    load: torch.Tensor  # (E,) kept assignments (all k choices)
    drop_rate: float
    mean_gate: float  # mean first-choice gate of kept assignments
    mean_gate_sum: float = float("nan")  # mean over units of the sum of their kept gates (all k choices)
    gate_mass: torch.Tensor | None = None  # (E,) summed kept gates per expert


@dataclass
class RoutingStats:
    layers: dict[int, LayerStats]
    labels: torch.Tensor  # (N,)
    predictions: torch.Tensor  # (N,)
    num_classes: int
    grid: tuple[int, int]
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.labels).float().mean())


@torch.no_grad()
def collect_routing(model: nn.Module, data, *, batch_size: int = 500, device=None, num_classes: int | None = None,
                    progress: bool = True) -> RoutingStats:
    """Stream ``data`` (anything with ``batches(batch_size, shuffle=False)``) through the model, aggregating routing
    per MoE layer.  Memory: O(classes x experts + positions x experts + images x experts) per layer."""
    import time

    device = torch.device(device or next(model.parameters()).device)
    num_classes = num_classes or getattr(model, "num_classes", None) or int(data.labels.max()) + 1
    grid = _grid(model)
    acc: dict[int, dict] = {}
    labels_all, preds_all = [], []
    started = time.time()
    total = data.num_batches(batch_size) if hasattr(data, "num_batches") else None
    for images, labels in tqdm(data.batches(batch_size, shuffle=False), total=total, disable=not progress,
                               desc="routing", leave=False):
        images, labels = images.to(device), labels.to(device)
        logits, cache = run_with_routing(model, images)
        labels_all.append(labels.cpu())
        preds_all.append(logits.argmax(-1).cpu())
        class_onehot = torch.nn.functional.one_hot(labels, num_classes).float()
        for i, lr in cache.items():
            E = lr.num_experts
            a = acc.setdefault(i, {"class_expert": torch.zeros(num_classes, E, device=device),
                                   "position_expert": torch.zeros(grid[0] * grid[1], E, device=device)
                                   if lr.routing == "token" else None,
                                   "image_hist": [], "load": torch.zeros(E, device=device), "drop": 0.0,
                                   "kept": 0.0, "gate": 0.0, "units": 0, "routing": lr.routing, "E": E,
                                   "gate_sum": 0.0, "routed": 0, "mass": torch.zeros(E, device=device)})
            # the expert that processed each unit; a unit no expert took (capacity drop, or experts-choose leaving
            # it out) counts nowhere
            first = torch.nn.functional.one_hot(lr.top1(), E).float() * lr.keep[..., :1]  # (B, [gh, gw,] E)
            if lr.routing == "token":
                per_image = first.flatten(1, 2).sum(1)  # (B, E)
                a["position_expert"] += first.flatten(1, 2).sum(0)
                hist = per_image / per_image.sum(-1, keepdim=True).clamp(min=1)
            else:
                per_image = hist = first
            a["class_expert"] += class_onehot.t() @ per_image
            a["image_hist"].append(hist.half().cpu())
            keep = lr.keep
            a["load"] += (torch.nn.functional.one_hot(lr.experts, E).float() * keep.unsqueeze(-1)).reshape(-1, E).sum(0)
            dropped = keep if lr.router == "topk" else keep[..., :1]  # unchosen tokens, not unchosen pairs
            a["drop"] += float((~dropped).sum())
            a["units"] += dropped.numel()
            kept_first = keep[..., 0]
            a["gate"] += float((lr.gates[..., 0] * kept_first).sum())
            a["kept"] += float(kept_first.sum())
            kept_gates = lr.gates * keep
            a["gate_sum"] += float(kept_gates.sum())
            a["routed"] += kept_first.numel()
            a["mass"] += (torch.nn.functional.one_hot(lr.experts, E).float() * kept_gates.unsqueeze(-1)).reshape(
                -1, E).sum(0)
    layers = {i: LayerStats(a["E"], a["routing"], a["class_expert"].cpu(),
                            a["position_expert"].cpu() if a["position_expert"] is not None else None,
                            torch.cat(a["image_hist"]).float(), a["load"].cpu(), a["drop"] / max(1, a["units"]),
                            a["gate"] / max(1.0, a["kept"]), a["gate_sum"] / max(1, a["routed"]), a["mass"].cpu())
              for i, a in sorted(acc.items())}
    return RoutingStats(layers, torch.cat(labels_all), torch.cat(preds_all), num_classes, grid,
                        seconds=time.time() - started)
