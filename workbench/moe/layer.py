"""``MoEMlp``: a drop-in ``mlp_layer`` for timm's ViT blocks that routes tokens (or images) to experts.

    y = [shared(x)] + sum_j gate_j * Expert_{e_j}(x)      (only kept assignments; dropped ones add nothing,
                                                           so the block's residual carries the token on)
Experts are stacked parameters ``w1 (E, d, h)``, ``w2 (E, h, d)`` with biases, so one tensor holds all experts
(cheap dispatch, DDP without ``find_unused_parameters``).
"""
from __future__ import annotations


import torch
import torch.nn as nn

from . import experts_choose as ec
from . import losses
from .dispatch import DISPATCH_MODES, DISPATCHERS, _matmul_dtype, dispatch_meta
from .router import IMAGE_POOLS, PRIORITIES, ROUTING_MODES, Router, Routing, assign_slots, autocast_enabled, \
    expert_capacity, slot_positions
from .soft import SoftRouter, expert_weights, soft_moe_ffn

SHARED_EXPERT_MODES = ("none", "add", "gated")
ROUTERS = ("topk", "experts_choose", "soft")


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

    ``router`` picks who chooses (vmoe's three routers):
      * ``'topk'`` (default): each token (or image) takes its top-k experts;
      * ``'experts_choose'``: each expert takes its top-C tokens, C = round(capacity_factor x N / E) per
        ``choice_group`` ('image' | 'batch'); ``capacity_factor`` (default 1.0) is the mean number of experts per
        token; balanced by construction, so no balance loss; see :mod:`.experts_choose`;
      * ``'soft'``: Soft MoE, ``slots_per_expert`` slots per expert and image, each a softmax-weighted mix of the
        image's tokens; ``soft_normalize`` l2-normalises the logits' inputs with a learned scale; see :mod:`.soft`.
    The last two route within an image's tokens (``routing='token'``), run their own batched matmuls (``dispatch``
    applies to top-k only) and take no ``top_k``, ``priority`` or balance/importance/load losses (z-loss applies).

    ``padded_max_rows`` (an attribute, not a constructor argument: it changes speed, never results, so
    checkpoints do not record it): with ``dispatch='grouped'``, an inference forward (``torch.no_grad()``, CPU)
    whose busiest expert has at most this many rows runs as one padded batched matmul per expert matrix (see
    :mod:`.dispatch`); None (default) takes ``dispatch.PADDED_MAX_ROWS`` (16), 0 always takes the sorted path.

    ``cpu_matmul`` (an attribute too, set by :func:`workbench.moe.set_cpu_matmul`): ``'blas'`` (default) or
    ``'onednn'``, the library that runs the grouped experts' fp32 matmuls on the CPU (:mod:`.kernels`); outputs
    agree to fp32 rounding.
    """

    padded_max_rows: float | None = None
    cpu_matmul: str = "blas"

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=nn.GELU, norm_layer=None, bias: bool = True, drop: float = 0.0, *,
                 num_experts: int = 8, top_k: int = 1, expert_hidden: int | None = None,
                 renormalize: bool | str = False, router_noise: float = 0.0, routing: str = "token",
                 image_pool: str = "mean", num_prefix_tokens: int = 1, capacity_factor: float | None = None,
                 priority: str = "position", shared_expert: str = "none", shared_hidden: int | None = None,
                 dispatch: str = "grouped", balance_weight: float = 0.01, importance_weight: float = 0.0,
                 load_weight: float = 0.0, zloss_weight: float = 0.0, router: str = "topk",
                 choice_group: str = "image", slots_per_expert: int = 1, soft_normalize: bool = False,
                 device=None, dtype=None, **kwargs):
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
               "capacity_factor", capacity_factor,
               "use None (dropless; experts_choose: 1.0) or a number > 0")
        _check(priority in PRIORITIES, "priority", priority, f"use one of {PRIORITIES}")
        _check(shared_expert in SHARED_EXPERT_MODES, "shared_expert", shared_expert,
               f"use one of {SHARED_EXPERT_MODES}")
        _check(dispatch in DISPATCH_MODES, "dispatch", dispatch, f"use one of {DISPATCH_MODES}")
        _check(router_noise >= 0, "router_noise", router_noise, "use a standard deviation >= 0")
        _check(norm_layer is None, "norm_layer", norm_layer, "MoEMlp has no inner norm; use None")
        for name, w in (("balance_weight", balance_weight), ("importance_weight", importance_weight),
                        ("load_weight", load_weight), ("zloss_weight", zloss_weight)):
            _check(w >= 0, name, w, "use a weight >= 0")
        _check_router(router, top_k, routing, dispatch, capacity_factor, renormalize, router_noise, priority,
                      importance_weight, load_weight, choice_group, slots_per_expert, soft_normalize)
        if router == "experts_choose" and capacity_factor is None:
            capacity_factor = 1.0

        self.num_experts, self.top_k = num_experts, top_k
        self.in_features, self.out_features, self.expert_hidden = in_features, out_features, hidden
        self.routing, self.image_pool, self.num_prefix_tokens = routing, image_pool, num_prefix_tokens
        self.capacity_factor, self.priority, self.dispatch = capacity_factor, priority, dispatch
        self.shared_expert_mode = shared_expert
        self.aux_weights = {"balance": balance_weight, "importance": importance_weight, "load": load_weight,
                            "zloss": zloss_weight}

        self.router_type, self.choice_group, self.slots_per_expert = router, choice_group, slots_per_expert
        if router == "soft":
            self.router = SoftRouter(in_features, num_experts, slots_per_expert, normalize=soft_normalize, **dd)
        else:
            self.router = Router(in_features, num_experts, top_k, renormalize=renormalize, noise_std=router_noise,
                                 **dd)
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
        routed = {"topk": self._forward_topk, "experts_choose": self._forward_experts_choose,
                  "soft": self._forward_soft}[self.router_type]
        y = self.drop(routed(x)).view(batch, tokens, -1)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + self.drop(shared).to(y.dtype)
        return y.to(x.dtype) if not autocast_enabled(x.device.type) else y

    def _forward_topk(self, x: torch.Tensor) -> torch.Tensor:
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
        if self.dispatch == "grouped":
            if self.padded_max_rows is not None:
                kwargs["padded_max_rows"] = self.padded_max_rows
            if self.cpu_matmul != "blas":
                kwargs["cpu_matmul"] = self.cpu_matmul
        elif self.dispatch == "einsum" and self.routing == "token" and self.capacity_factor is not None:
            order = torch.argsort(r.gates[:, 0], descending=True, stable=True) if self.priority == "gate" else None
            kwargs["positions"] = slot_positions(r.experts, self.num_experts, order)
        return dispatcher(flat, experts, gates, self.w1, self.b1, self.w2, self.b2, self.act, self.drop, **kwargs)

    def _weights(self, dtype: torch.dtype) -> tuple:
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return cast(self.w1), cast(self.b1), cast(self.w2), cast(self.b2)

    def _forward_experts_choose(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        logits, probs, _, _ = self.router(x.reshape(-1, dim))
        groups = (batch, tokens) if self.choice_group == "image" else (1, batch * tokens)
        cap = ec.capacity(groups[1], self.num_experts, self.capacity_factor)
        dtype = _matmul_dtype(x)
        y, chosen = ec.experts_choose_ffn(x.reshape(*groups, dim).to(dtype), probs.view(*groups, -1), cap,
                                          *self._weights(dtype), self.act, self.drop, self.router.renormalize)
        self._aux_logits(logits)
        with torch.no_grad():
            self.last_load = torch.full((self.num_experts,), float(groups[0] * cap), device=x.device)
            self.last_drop_rate = 1.0 - chosen.any(-1).float().mean()  # tokens no expert chose
        if self.capture_routing:
            self._capture(probs, chosen)
        return y.reshape(batch * tokens, -1)

    def _forward_soft(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        logits = self.router(x.reshape(-1, dim)).view(batch, tokens, -1)
        dtype = _matmul_dtype(x)
        y = soft_moe_ffn(x.to(dtype), logits, *self._weights(dtype), self.act, self.drop)
        self._aux_logits(logits)
        with torch.no_grad():
            self.last_load = torch.full((self.num_experts,), float(batch * self.slots_per_expert), device=x.device)
            self.last_drop_rate = torch.zeros((), device=x.device)
        if self.capture_routing:
            probs = expert_weights(logits.detach().reshape(batch * tokens, -1), self.num_experts)
            self._capture(probs, torch.ones_like(probs, dtype=torch.bool))
        return y.reshape(batch * tokens, -1)

    def _aux_logits(self, logits: torch.Tensor) -> None:
        """Experts-choose and Soft MoE: no balance term (balanced by construction / no discrete choice); z-loss."""
        self.aux_terms = {}
        self.aux_loss = torch.zeros((), device=logits.device)
        if self.aux_weights["zloss"] > 0:
            z = losses.z_loss(logits.reshape(-1, logits.shape[-1]))
            self.aux_loss = self.aux_weights["zloss"] * z
            self.aux_terms = {"zloss": z.detach()}

    def _capture(self, weights: torch.Tensor, chosen: torch.Tensor) -> None:
        """Store every expert per unit, chosen ones first by weight: ``experts[..., 0]`` is the dominant expert, and
        ``keep[..., 0]`` is False where no expert took the token (experts-choose)."""
        weights = weights.detach().float()
        order = (weights + 2.0 * chosen).argsort(dim=-1, descending=True)
        self.last_routing = {"probs": weights, "experts": order, "gates": (weights * chosen).gather(-1, order),
                             "keep": chosen.gather(-1, order)}

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
                "dispatch": self.dispatch, **{f"{k}_weight": v for k, v in self.aux_weights.items()},
                "router": self.router_type, "choice_group": self.choice_group,
                "slots_per_expert": self.slots_per_expert,
                "soft_normalize": getattr(self.router, "scale", None) is not None}

    def extra_repr(self) -> str:
        routed = {"topk": f"top_k={self.top_k}", "experts_choose": f"experts_choose({self.choice_group})",
                  "soft": f"soft(slots_per_expert={self.slots_per_expert})"}[self.router_type]
        return (f"d={self.in_features}, experts={self.num_experts}x{self.expert_hidden}, {routed}, "
                f"routing={self.routing}, capacity_factor={self.capacity_factor}, "
                f"shared={self.shared_expert_mode}, dispatch={self.dispatch}")

    def assignments_per_image(self, tokens: int) -> float:
        """Expert passes (token or slot through one expert) per image of ``tokens`` tokens, dropless: top-k
        ``tokens*k``; experts-choose ``E*C`` (per-image groups; per-batch groups average ``capacity_factor*tokens``);
        soft ``E*S``."""
        if self.router_type == "soft":
            return float(self.num_experts * self.slots_per_expert)
        if self.router_type == "experts_choose":
            if self.choice_group == "batch":
                return float(self.capacity_factor * tokens)
            return float(self.num_experts * ec.capacity(tokens, self.num_experts, self.capacity_factor))
        return float(tokens * self.top_k)

    def activated_hidden(self, tokens: int | None = None) -> float:
        """Hidden units each token passes through on average: the dense-equivalent FFN width (for experts-choose
        and soft routing it depends on the image's ``tokens``)."""
        shared = self.shared.fc1.out_features if self.shared is not None else 0
        if self.router_type == "topk":
            return self.top_k * self.expert_hidden + shared
        if tokens is None:
            raise ValueError(f"router={self.router_type!r}: the activated width depends on the number of tokens; "
                             "pass tokens=")
        return self.assignments_per_image(tokens) / tokens * self.expert_hidden + shared


def _check_router(router, top_k, routing, dispatch, capacity_factor, renormalize, router_noise, priority,
                  importance_weight, load_weight, choice_group, slots_per_expert, soft_normalize) -> None:
    """The combinations of ``router`` with the other switches that make sense; a ValueError names the rest."""
    _check(router in ROUTERS, "router", router, f"use one of {ROUTERS}")
    _check(choice_group in ec.GROUPS, "choice_group", choice_group, f"use one of {ec.GROUPS}")
    _check(isinstance(slots_per_expert, int) and slots_per_expert >= 1, "slots_per_expert", slots_per_expert,
           "use an integer >= 1")
    if router != "experts_choose":
        _check(choice_group == "image", "choice_group", choice_group, "it applies to router='experts_choose' only")
    if router != "soft":
        _check(slots_per_expert == 1, "slots_per_expert", slots_per_expert, "it applies to router='soft' only")
        _check(not soft_normalize, "soft_normalize", soft_normalize, "it applies to router='soft' only")
    if router == "topk":
        return
    other = "capacity_factor sets the mean experts per token" if router == "experts_choose" \
        else "slots_per_expert sets the work per expert"
    _check(top_k == 1, "top_k", top_k, f"top_k applies to router='topk'; with router={router!r} {other}")
    _check(routing == "token", "routing", routing,
           f"router={router!r} chooses among an image's tokens; use routing='token'")
    _check(dispatch == "grouped", "dispatch", dispatch,
           f"dispatch applies to router='topk'; router={router!r} runs its own batched matmuls")
    _check(priority == "position", "priority", priority, "it applies to router='topk' with a capacity")
    _check(importance_weight == 0 and load_weight == 0, "importance_weight/load_weight",
           (importance_weight, load_weight), f"router={router!r} needs no balance losses; use 0")
    if router == "soft":
        _check(capacity_factor is None, "capacity_factor", capacity_factor,
               "Soft MoE drops nothing; set slots_per_expert instead")
        _check(renormalize is False, "renormalize", renormalize, "Soft MoE's combine weights already sum to 1")
        _check(router_noise == 0, "router_noise", router_noise, "router noise applies to top-k and experts-choose")
