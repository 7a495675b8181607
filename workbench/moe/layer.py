"""``MoEMlp``: a drop-in ``mlp_layer`` for timm's ViT blocks that routes tokens (or images) to experts.

    y = [shared(x)] + sum_j gate_j * Expert_{e_j}(x)      (only kept assignments; dropped ones add nothing,
                                                           so the block's residual carries the token on)
Experts are stacked parameters ``w1 (E, d, h)``, ``w2 (E, h, d)`` with biases, so one tensor holds all experts
(cheap dispatch, DDP without ``find_unused_parameters``).
"""
from __future__ import annotations


import torch
import torch.nn as nn

from . import losses
from .dispatch import DISPATCH_MODES, DISPATCHERS, dispatch_meta
from .router import IMAGE_POOLS, PRIORITIES, ROUTING_MODES, Router, Routing, assign_slots, autocast_enabled, \
    expert_capacity, slot_positions

SHARED_EXPERT_MODES = ("none", "add", "gated")


def _check(cond: bool, field: str, value, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{field}={value!r} is invalid: {allowed}")


class FeedForward(nn.Module):
    """The shared expert: a plain FFN (fc1, act, fc2) with the same layout as timm's ``Mlp``."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, bias: bool = True, drop: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias, device=device, dtype=dtype)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class MoEMlp(nn.Module):
    """Routed experts (+ optional shared expert) with timm's ``Mlp`` signature.

    Args beyond timm's: ``num_experts``, ``top_k``, ``expert_hidden`` (expert width; default ``hidden_features``),
    ``renormalize`` (top-k gates sum to 1; ``'straight_through'``: the same values with the normaliser detached,
    so that a top-1 router, whose renormalised gate p/p = 1 has no gradient, still learns from the task loss: the
    function-preserving upcycling setting), ``router_noise`` (std of Gaussian noise on the logits in training;
    V-MoE uses 1/E), ``routing`` ('token' | 'image'), ``image_pool`` ('mean' of patch tokens | 'cls'),
    ``num_prefix_tokens``, ``capacity_factor`` (None: dropless), ``priority`` ('position' | 'gate': V-MoE's Batch
    Prioritized Routing), ``shared_expert`` ('none' | 'add' | 'gated'), ``shared_hidden``, ``dispatch``
    ('grouped' | 'loop' | 'einsum'), and one weight per auxiliary loss: ``balance_weight``, ``importance_weight``,
    ``load_weight``, ``zloss_weight``.  ``device`` and ``dtype`` place the parameters, as in timm's layers (timm
    passes them to ``mlp_layer``).
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=nn.GELU, norm_layer=None, bias: bool = True, drop: float = 0.0, *,
                 num_experts: int = 8, top_k: int = 1, expert_hidden: int | None = None,
                 renormalize: bool | str = False, router_noise: float = 0.0, routing: str = "token",
                 image_pool: str = "mean", num_prefix_tokens: int = 1, capacity_factor: float | None = None,
                 priority: str = "position", shared_expert: str = "none", shared_hidden: int | None = None,
                 dispatch: str = "grouped", balance_weight: float = 0.01, importance_weight: float = 0.0,
                 load_weight: float = 0.0, zloss_weight: float = 0.0, device=None, dtype=None, **kwargs):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden = expert_hidden or hidden_features or in_features * 4
        _check(isinstance(num_experts, int) and num_experts >= 1, "num_experts", num_experts, "use an integer >= 1")
        _check(isinstance(top_k, int) and 1 <= top_k <= num_experts, "top_k", top_k,
               f"use an integer with 1 <= top_k <= num_experts ({num_experts})")
        _check(renormalize in (False, True, "straight_through"), "renormalize", renormalize,
               "use False, True or 'straight_through'")
        _check(routing in ROUTING_MODES, "routing", routing, f"use one of {ROUTING_MODES}")
        _check(image_pool in IMAGE_POOLS, "image_pool", image_pool, f"use one of {IMAGE_POOLS}")
        _check(not (routing == "image" and image_pool == "cls" and num_prefix_tokens < 1), "image_pool", image_pool,
               "'cls' pooling needs a class token; this model has none, use image_pool='mean'")
        _check(capacity_factor is None or (isinstance(capacity_factor, (int, float)) and capacity_factor > 0),
               "capacity_factor", capacity_factor, "use None (dropless) or a number > 0")
        _check(priority in PRIORITIES, "priority", priority, f"use one of {PRIORITIES}")
        _check(shared_expert in SHARED_EXPERT_MODES, "shared_expert", shared_expert,
               f"use one of {SHARED_EXPERT_MODES}")
        _check(dispatch in DISPATCH_MODES, "dispatch", dispatch, f"use one of {DISPATCH_MODES}")
        _check(router_noise >= 0, "router_noise", router_noise, "use a standard deviation >= 0")
        _check(norm_layer is None, "norm_layer", norm_layer, "MoEMlp has no inner norm; use None")
        for name, w in (("balance_weight", balance_weight), ("importance_weight", importance_weight),
                        ("load_weight", load_weight), ("zloss_weight", zloss_weight)):
            _check(w >= 0, name, w, "use a weight >= 0")

        self.num_experts, self.top_k = num_experts, top_k
        self.in_features, self.out_features, self.expert_hidden = in_features, out_features, hidden
        self.routing, self.image_pool, self.num_prefix_tokens = routing, image_pool, num_prefix_tokens
        self.capacity_factor, self.priority, self.dispatch = capacity_factor, priority, dispatch
        self.shared_expert_mode = shared_expert
        self.aux_weights = {"balance": balance_weight, "importance": importance_weight, "load": load_weight,
                            "zloss": zloss_weight}

        self.router = Router(in_features, num_experts, top_k, renormalize=renormalize, noise_std=router_noise, **dd)
        self.w1 = nn.Parameter(torch.empty(num_experts, in_features, hidden, **dd))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden, **dd)) if bias else None
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, out_features, **dd))
        self.b2 = nn.Parameter(torch.zeros(num_experts, out_features, **dd)) if bias else None
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)

        self.shared = None
        self.shared_gate = None
        if shared_expert != "none":
            _check(out_features == in_features, "shared_expert", shared_expert,
                   "a shared expert needs out_features == in_features")
            self.shared = FeedForward(in_features, shared_hidden or hidden, act_layer, bias, drop, **dd)
            if shared_expert == "gated":
                self.shared_gate = nn.Linear(in_features, 1, bias=True, **dd)
                nn.init.zeros_(self.shared_gate.weight)
                nn.init.zeros_(self.shared_gate.bias)

        # Per-forward state, overwritten every call (never appended): last_routing (when capture_routing is on),
        # aux_loss (weighted, with graph), aux_terms (unweighted, detached), last_load, last_drop_rate.
        self.capture_routing = False
        self.__dict__.update(self._fresh_state())

    # -- routing ---------------------------------------------------------------------------------------------
    def _route(self, x: torch.Tensor) -> Routing:
        """x: (B, N, d) -> Routing over units (B*N tokens, or B images)."""
        if self.routing == "image":
            if self.image_pool == "cls":
                units = x[:, 0]
            else:
                units = x[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            units = x.reshape(-1, x.shape[-1])
        logits, probs, experts, gates = self.router(units)
        capacity = expert_capacity(units.shape[0], self.num_experts, self.top_k, self.capacity_factor)
        keep = assign_slots(experts, gates, self.num_experts, capacity, self.priority)
        return Routing(logits, probs, experts, gates, keep)

    def _aux(self, r: Routing) -> None:
        terms = {"balance": losses.balance_loss(r.probs, r.experts)}
        if self.aux_weights["importance"] > 0:
            terms["importance"] = losses.importance_loss(r.probs)
        if self.aux_weights["load"] > 0:
            terms["load"] = losses.load_loss(r.logits, self.top_k, self.router.noise_std or 1.0 / self.num_experts)
        if self.aux_weights["zloss"] > 0:
            terms["zloss"] = losses.z_loss(r.logits)
        self.aux_loss = sum(self.aux_weights[name] * value for name, value in terms.items())
        self.aux_terms = {name: value.detach() for name, value in terms.items()}

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        r = self._route(x)
        self._aux(r)
        with torch.no_grad():
            self.last_load = r.load()
            self.last_drop_rate = r.drop_rate()
        if self.capture_routing:
            self.last_routing = {"probs": r.probs.detach(), "experts": r.experts.detach(),
                                 "gates": r.gates.detach(), "keep": r.keep.detach()}

        experts, gates = r.experts, r.gates * r.keep
        if self.routing == "image":  # every token of an image follows the image's choice
            experts = experts.repeat_interleave(tokens, dim=0)
            gates = gates.repeat_interleave(tokens, dim=0)
        flat = x.reshape(-1, dim)
        kwargs = {}
        dispatcher = dispatch_meta if flat.is_meta else DISPATCHERS[self.dispatch]  # meta: shapes only
        if self.dispatch == "einsum" and self.routing == "token" and self.capacity_factor is not None:
            order = torch.argsort(r.gates[:, 0], descending=True, stable=True) if self.priority == "gate" else None
            kwargs["positions"] = slot_positions(r.experts, self.num_experts, order)
        y = dispatcher(flat, experts, gates, self.w1, self.b1, self.w2, self.b2, self.act, self.drop, **kwargs)
        y = self.drop(y).view(batch, tokens, -1)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + self.drop(shared).to(y.dtype)
        return y.to(x.dtype) if not autocast_enabled(x.device.type) else y

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def _fresh_state(self) -> dict:
        return {"last_routing": None, "aux_loss": torch.zeros(()), "aux_terms": {}, "last_load": None,
                "last_drop_rate": None}

    def __deepcopy__(self, memo):
        """Copies weights and configuration, not the last forward's state (its aux loss holds an autograd graph,
        which tensors refuse to deep-copy)."""
        import copy

        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        fresh = self._fresh_state()
        for key, value in self.__dict__.items():
            new.__dict__[key] = fresh[key] if key in fresh else copy.deepcopy(value, memo)
        return new

    def config(self) -> dict:
        """The keyword arguments that rebuild this layer (used by checkpoints and ``info``)."""
        return {"num_experts": self.num_experts, "top_k": self.top_k, "expert_hidden": self.expert_hidden,
                "renormalize": self.router.renormalize, "router_noise": self.router.noise_std,
                "routing": self.routing, "image_pool": self.image_pool, "capacity_factor": self.capacity_factor,
                "priority": self.priority, "shared_expert": self.shared_expert_mode,
                "shared_hidden": self.shared.fc1.out_features if self.shared is not None else None,
                "dispatch": self.dispatch, **{f"{k}_weight": v for k, v in self.aux_weights.items()}}

    def extra_repr(self) -> str:
        return (f"d={self.in_features}, experts={self.num_experts}x{self.expert_hidden}, top_k={self.top_k}, "
                f"routing={self.routing}, capacity_factor={self.capacity_factor}, "
                f"shared={self.shared_expert_mode}, dispatch={self.dispatch}")

    def activated_hidden(self) -> int:
        """Hidden units each token passes through: the dense-equivalent FFN width."""
        shared = self.shared.fc1.out_features if self.shared is not None else 0
        return self.top_k * self.expert_hidden + shared
