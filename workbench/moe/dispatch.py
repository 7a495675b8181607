"""Three ways of running tokens through their experts.  All compute

    y_t = sum_j keep_tj * gate_tj * FFN_{e_tj}(x_t)

with identical outputs and gradients (tested); they differ only in cost.

* ``grouped`` (default): sort the T*k assignments by expert once and run each expert on its contiguous slice of the
  sorted rows; no padding, the same work as a dense FFN with the activated width.  On CPU the routed FFN is one
  autograd node (:class:`_SortedExperts`: fc1, activation and fc2 back to back per expert, rows moved with
  ``index_select`` / ``index_add_``), and under ``torch.no_grad()`` its forward runs alone, saving nothing.  On
  CUDA two ``torch._grouped_mm`` kernels over the stacked expert weights, no host sync.
  Few rows per expert under ``torch.no_grad()`` on CPU (the busiest expert at most ``PADDED_MAX_ROWS`` = 16 rows,
  and the padded buffer at most ``PADDED_MAX_FILL`` = 2 times the T*k rows it holds: one image of 50 tokens routed
  evenly): :func:`padded_experts_inference`, every expert's rows in one zero-padded (E, C, d) buffer and two
  ``baddbmm`` calls in place of 2E small matmuls; the same outputs to fp32 rounding.  Training (autograd on) always
  takes the sorted path above, so training runs do not change.
* ``loop``: one small matmul per expert (HF Mixtral style).  The readable reference.
* ``einsum``: GShard / V-MoE one-hot dispatch and combine tensors of shape (T, E, C).  Spends work on the
  one-hot matmuls and on empty capacity slots; kept as the anchors' reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import a_bt, a_tb, usable, x_w
from .router import autocast_enabled

DISPATCH_MODES = ("grouped", "loop", "einsum")
# ``grouped`` under torch.no_grad() on CPU runs padded_experts_inference when the busiest expert has at most
# PADDED_MAX_ROWS rows (MoEMlp's ``padded_max_rows`` overrides it per layer; 0 turns it off) and E x those rows is at
# most PADDED_MAX_FILL x the T*k rows.  Measured on the shipped ViMoE's last MoE layer (d=192, h=768, E=8, 1 thread,
# CPU time, a 2-core Xeon, without these limits): at batch 1 on random inputs, whose tokens spread over the
# experts, the padded path took 0.94x the sorted one; on Fashion-MNIST images, whose tokens crowd into a few experts
# (the busiest holds about 20 of 50), 1.25x, and at batch 8 (50 rows per expert on average) 1.0-1.12x.  Where the padding is small the one batched
# call saves the per-expert calls; where it is not, the padded rows cost more than the calls.
PADDED_MAX_ROWS = 16
PADDED_MAX_FILL = 2.0
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")

Act = Callable[[torch.Tensor], torch.Tensor]


def _combine(per_assignment: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(T*k, d) expert outputs in assignment order, (T, k) gates -> (T, d).  A gather-free weighted sum."""
    tokens, k = gates.shape
    if k == 1:
        return per_assignment * gates
    # .to(): CUDA autocast runs ``sum`` in float32, which would hand a bf16 model a float32 activation
    return (per_assignment.view(tokens, k, -1) * gates.unsqueeze(-1).to(per_assignment.dtype)).sum(1).to(
        per_assignment.dtype)


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    if autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _ToAssignments(torch.autograd.Function):
    """Token rows into expert-sorted assignment order, ``x[order // k]``.  Its backward is a gather plus a sum over
    each token's k copies (autograd's default would be an accumulating scatter: slower, and nondeterministic on
    CUDA)."""

    @staticmethod
    def forward(ctx, x, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = grad[inverse]
        if ctx.k > 1:
            grad = grad.view(-1, ctx.k, grad.shape[1]).sum(1)
        return grad, None, None, None


class _FromAssignments(torch.autograd.Function):
    """Expert-sorted rows back to assignment order (token-major), ``y[inverse]``; backward is ``grad[order]``."""

    @staticmethod
    def forward(ctx, y, order, inverse):
        ctx.save_for_backward(order)
        return y[inverse]

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return grad[order], None, None


def _act_backward(act: Act, grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    if isinstance(act, nn.GELU):
        return torch.ops.aten.gelu_backward(grad, pre, approximate=act.approximate)
    with torch.enable_grad():
        pre = pre.detach().requires_grad_(True)
        return torch.autograd.grad(act(pre), pre, grad)[0]


@dataclass(frozen=True)
class SortedAssignments:
    """The T*k (token, choice) assignments sorted by expert, stably (so tokens keep their order within an expert).

    ``order[i]``: the token-major assignment (``t * k + j``) in sorted row i; ``token[i]``: its token;
    ``counts``: rows per expert, on the host (one small copy per forward, which the CPU loop needs anyway);
    ``inverse`` (top-1 only): the sorted row of each token, so that returning to token order is a gather."""

    order: torch.Tensor
    token: torch.Tensor
    inverse: torch.Tensor | None
    counts: list[int]
    tokens: int
    k: int

    @classmethod
    def of(cls, experts: torch.Tensor, num_experts: int) -> "SortedAssignments":
        tokens, k = experts.shape
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        inverse = None
        if k == 1:
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(tokens, device=order.device))
        token = order if k == 1 else torch.div(order, k, rounding_mode="floor")
        return cls(order, token, inverse, counts, tokens, k)

    def slices(self):
        """(expert, row slice) of every expert that has rows."""
        start = 0
        for e, n in enumerate(self.counts):
            if n:
                yield e, slice(start, start + n)
            start += n

    def unused(self) -> list[int]:
        """Experts without rows (their weight gradients are zero)."""
        return [e for e, n in enumerate(self.counts) if not n]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) token rows -> (T*k, d) sorted rows (``index_select``: several times faster than ``x[index]``)."""
        return x.index_select(0, self.token)

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """(T*k, d) sorted rows -> (T, d), each token the sum of its k rows: the adjoint of :meth:`gather`."""
        if self.k == 1:
            return rows.index_select(0, self.inverse)
        return rows.new_zeros(self.tokens, rows.shape[1]).index_add_(0, self.token, rows)

    def sorted_gates(self, gates: torch.Tensor) -> torch.Tensor:
        """(T, k) gates -> (T*k, 1): a column, to scale the sorted rows."""
        return gates.reshape(-1).index_select(0, self.order).unsqueeze(1)

    def unsort_gates(self, sorted_gates: torch.Tensor) -> torch.Tensor:
        """(T*k,) values in sorted order -> (T, k) in token order."""
        return torch.empty_like(sorted_gates).scatter_(0, self.order, sorted_gates).view(self.tokens, self.k)


def _bias(b: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if b is None else b[e]


def _experts_forward(xs, w1, b1, w2, b2, plan: SortedAssignments, act: Act, saved: list | None = None,
                     backend: str = "blas"):
    """Sorted rows -> each row through its expert: fc1, activation and fc2 back to back on the expert's slice while
    it is in cache, three ops per expert.  ``saved`` (training) collects each expert's (pre, post) activations.
    ``backend``: the CPU matmul library (:mod:`.kernels`)."""
    out = xs.new_empty(xs.shape[0], w2.shape[2])
    for e, r in plan.slices():
        pre = x_w(xs[r], w1[e], _bias(b1, e), backend=backend)
        post = act(pre)
        x_w(post, w2[e], _bias(b2, e), out=out[r], backend=backend)
        if saved is not None:
            saved += [pre, post]
    return out


def _experts_backward(grad, xs, w1, w2, acts, plan: SortedAssignments, act: Act, bias: bool, backend: str = "blas"):
    """Gradients of :func:`_experts_forward`: grad (sorted rows of d out) -> d xs, d w1, d b1, d w2, d b2."""
    gx, gw1, gw2 = torch.empty_like(xs), torch.empty_like(w1), torch.empty_like(w2)
    gb1 = w1.new_empty(w1.shape[0], w1.shape[2]) if bias else None
    gb2 = w2.new_empty(w2.shape[0], w2.shape[2]) if bias else None
    for e in plan.unused():
        for g in (gw1, gw2, gb1, gb2):
            if g is not None:
                g[e].zero_()
    for i, (e, r) in enumerate(plan.slices()):
        pre, post, g = acts[2 * i], acts[2 * i + 1], grad[r]
        a_tb(post, g, out=gw2[e], backend=backend)
        gpre = _act_backward(act, a_bt(g, w2[e], backend=backend), pre)
        a_tb(xs[r], gpre, out=gw1[e], backend=backend)
        a_bt(gpre, w1[e], out=gx[r], backend=backend)
        if bias:
            torch.sum(g, 0, out=gb2[e])
            torch.sum(gpre, 0, out=gb1[e])
    return gx, gw1, gb1, gw2, gb2


class _SortedExperts(torch.autograd.Function):
    """The whole routed FFN on the CPU: token rows in, gated sum per token out.  One gather into expert-sorted rows,
    the experts on contiguous slices, the gates, one gather (top-1) or index-add (top-k) back; the backward walks
    the experts the same way.  Autograd records one node, and each (T*k, d) buffer moves once each way."""

    @staticmethod
    def forward(ctx, x, gates, w1, b1, w2, b2, plan: SortedAssignments, act: Act, backend: str = "blas"):
        xs, g, acts = plan.gather(x), plan.sorted_gates(gates), []
        out = _experts_forward(xs, w1, b1, w2, b2, plan, act, acts, backend)
        ctx.save_for_backward(xs, out, g, w1, w2, *acts)
        ctx.plan, ctx.act, ctx.bias, ctx.backend = plan, act, b1 is not None, backend
        return plan.scatter(out * g)

    @staticmethod
    def backward(ctx, grad):
        xs, out, g, w1, w2, *acts = ctx.saved_tensors
        plan = ctx.plan
        grows = plan.gather(grad.contiguous())  # d(gated rows), sorted
        dgates = plan.unsort_gates((grows * out).sum(1))
        gxs, gw1, gb1, gw2, gb2 = _experts_backward(grows.mul_(g), xs, w1, w2, acts, plan, ctx.act, ctx.bias,
                                                     ctx.backend)
        return plan.scatter(gxs), dgates, gw1, gb1, gw2, gb2, None, None, None


class _ExpertsOnSortedRows(torch.autograd.Function):
    """The expert FFNs alone, on rows already in expert order: :class:`_SortedExperts` without its gather, gates and
    return to token order, forward and backward."""

    @staticmethod
    def forward(ctx, xs, w1, b1, w2, b2, plan: SortedAssignments, act: Act, backend: str = "blas"):
        acts = []
        out = _experts_forward(xs, w1, b1, w2, b2, plan, act, acts, backend)
        ctx.save_for_backward(xs, w1, w2, *acts)
        ctx.plan, ctx.act, ctx.bias, ctx.backend = plan, act, b1 is not None, backend
        return out

    @staticmethod
    def backward(ctx, grad):
        xs, w1, w2, *acts = ctx.saved_tensors
        gxs, gw1, gb1, gw2, gb2 = _experts_backward(grad.contiguous(), xs, w1, w2, acts, ctx.plan, ctx.act, ctx.bias,
                                                     ctx.backend)
        return gxs, gw1, gb1, gw2, gb2, None, None, None


def experts_on_sorted_rows(xs, w1, b1, w2, b2, plan: SortedAssignments, act: Act, backend: str = "blas"):
    """(T*k, d) rows sorted by expert (``plan.gather(x)``) -> each row through its expert, in the same order; CPU,
    autograd-aware.  The routed FFN's matmul work with nothing around it: ``bench split`` times it against the
    dense FFN to separate what the experts cost from what moving rows and routing cost."""
    return _ExpertsOnSortedRows.apply(xs, w1, b1, w2, b2, plan, act, backend)


def _sorted_experts_inference(x, gates, w1, b1, w2, b2, plan: SortedAssignments, act: Act,
                              backend: str = "blas") -> torch.Tensor:
    """:class:`_SortedExperts`'s forward without autograd: nothing saved, the gates applied in place."""
    out = _experts_forward(plan.gather(x), w1, b1, w2, b2, plan, act, backend=backend)
    return plan.scatter(out.mul_(plan.sorted_gates(gates)))


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (N, d) sorted by group, w (G, d, h), offsets (G,) int32 cumulative ends -> (N, h).
    One ``torch._grouped_mm`` kernel on CUDA; per-group matmuls over contiguous slices elsewhere."""
    if x.is_cuda and HAS_GROUPED_MM:
        return torch._grouped_mm(x, w, offsets)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    return torch.cat([x[s:s + n] @ w[e] for e, (s, n) in enumerate(zip([0] + offsets.tolist()[:-1], counts))])


def _dropout_active(drop: Act) -> bool:
    return isinstance(drop, nn.Dropout) and drop.p > 0 and drop.training


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def padded_experts_inference(x, experts, gates, w1, b1, w2, b2, act: Act) -> torch.Tensor:
    """Inference at few tokens per expert: each expert's rows in its block of a zero-padded (E, C, d) buffer (C: the
    busiest expert's rows), both expert matmuls as one ``baddbmm`` each, and each assignment's row read back out.
    Padding rows are computed and never read.  Forward only (no autograd)."""
    tokens, k = experts.shape
    num_experts, dim = w1.shape[0], w1.shape[1]
    dtype = _matmul_dtype(x)
    flat = experts.reshape(-1)
    onehot = F.one_hot(flat, num_experts)
    seen = onehot.cumsum(0)  # (T*k, E): assignments to each expert so far, token-major
    cap = int(seen[-1].max())
    slot = flat * cap + (seen - 1).mul_(onehot).sum(1)  # each assignment's row in the buffer
    rows = x.to(dtype) if k == 1 else x.to(dtype).repeat_interleave(k, 0)
    buf = rows.new_zeros(num_experts * cap, dim).index_copy_(0, slot, rows).view(num_experts, cap, dim)
    w1, w2 = w1.to(dtype), w2.to(dtype)
    pre = torch.bmm(buf, w1) if b1 is None else torch.baddbmm(b1.to(dtype).unsqueeze(1), buf, w1)
    post = act(pre)
    out = torch.bmm(post, w2) if b2 is None else torch.baddbmm(b2.to(dtype).unsqueeze(1), post, w2)
    return _combine(out.view(num_experts * cap, -1).index_select(0, slot), gates.to(dtype))


def dispatch_grouped(x, experts, gates, w1, b1, w2, b2, act: Act, drop: Act,
                     padded_max_rows: float = PADDED_MAX_ROWS, cpu_matmul: str = "blas") -> torch.Tensor:
    """Expert-sorted rows through the experts.  On CPU (no dropout inside the experts): :class:`_SortedExperts`, or
    under ``torch.no_grad()`` its forward alone, or :func:`padded_experts_inference` where the busiest expert has at
    most ``padded_max_rows`` rows and padding at most doubles the rows.  On CUDA: two ``torch._grouped_mm``
    kernels, no host sync.  ``cpu_matmul='onednn'`` runs the sorted path's fp32 matmuls on oneDNN
    (:mod:`.kernels`) and leaves out the padded path (its batched matmul is BLAS's)."""
    if not (x.is_cuda and HAS_GROUPED_MM) and not _dropout_active(drop):
        backend = "onednn" if usable(x, cpu_matmul) else "blas"
        if backend == "blas" and not torch.is_grad_enabled() and experts.numel() <= padded_max_rows * w1.shape[0]:
            busiest = int(torch.bincount(experts.reshape(-1), minlength=w1.shape[0]).max())
            if busiest <= padded_max_rows and busiest * w1.shape[0] <= PADDED_MAX_FILL * experts.numel():
                return padded_experts_inference(x, experts, gates, w1, b1, w2, b2, act)
        dtype = _matmul_dtype(x)
        plan = SortedAssignments.of(experts, w1.shape[0])
        args = (x.to(dtype), gates.to(dtype), w1.to(dtype), _cast(b1, dtype), w2.to(dtype), _cast(b2, dtype), plan, act,
                backend)
        if not torch.is_grad_enabled():
            return _sorted_experts_inference(*args)
        return _SortedExperts.apply(*args)
    return _dispatch_grouped_mm(x, experts, gates, w1, b1, w2, b2, act, drop)


def _dispatch_grouped_mm(x, experts, gates, w1, b1, w2, b2, act: Act, drop: Act) -> torch.Tensor:
    """Two grouped matmuls over expert-sorted rows.  The first bias rides inside the first matmul (a ones column on
    the input, the bias as an extra weight row); the second is applied after combining, as (gates by expert) @ b2.
    So no (T*k, h) bias gather exists, forward or backward."""
    num_experts, tokens = w1.shape[0], x.shape[0]
    k = experts.shape[1]
    dtype = _matmul_dtype(x)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = counts.cumsum(0).to(torch.int32)
    x = x.to(dtype)
    w1 = w1.to(dtype)
    if b1 is not None:  # _grouped_mm wants row strides in multiples of 16 bytes: pad the ones column with zeros
        pad = -(x.shape[1] + 1) % (16 // x.element_size())
        x = torch.cat([x, x.new_ones(tokens, 1), x.new_zeros(tokens, pad)], dim=1)
        w1 = torch.cat([w1, b1.to(dtype).unsqueeze(1), w1.new_zeros(num_experts, pad, w1.shape[2])], dim=1)
    h = drop(act(grouped_matmul(_ToAssignments.apply(x, order, inverse, k), w1, offsets)))
    out = _FromAssignments.apply(grouped_matmul(h, w2.to(dtype), offsets), order, inverse)
    gates = gates.to(dtype)
    y = _combine(out, gates)
    if b2 is not None:
        by_expert = torch.zeros(tokens, num_experts, dtype=dtype, device=x.device).scatter_add(1, experts, gates)
        y = y + by_expert @ b2.to(dtype)
    return y


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
        rows = x[idx // k].to(dtype)
        if b1 is not None:
            h = drop(act(torch.addmm(b1[e].to(dtype), rows, w1[e].to(dtype))))
            per_assignment.index_copy_(0, idx, torch.addmm(b2[e].to(dtype), h, w2[e].to(dtype)))
        else:  # bias-free experts
            h = drop(act(rows @ w1[e].to(dtype)))
            per_assignment.index_copy_(0, idx, h @ w2[e].to(dtype))
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
    pre = torch.einsum("ecd,edh->ech", expert_in, w1.to(dtype))
    if b1 is not None:
        pre = pre + b1.to(dtype).unsqueeze(1)
    expert_out = torch.einsum("ech,ehd->ecd", drop(act(pre)), w2.to(dtype))
    if b2 is not None:
        expert_out = expert_out + b2.to(dtype).unsqueeze(1)
    return torch.einsum("ecd,tec->td", expert_out, combine)


def dispatch_meta(x, experts, gates, w1, b1, w2, b2, act: Act, drop: Act, **unused) -> torch.Tensor:
    """Shapes and dtypes only, for tensors without data (the ``meta`` device, as used by ``init_empty_weights``-style
    loaders and timm's tooling): the real paths read expert counts, ``nonzero`` or ``item()``, which meta tensors
    cannot answer.  Every token goes through expert 0, scaled by the sum of its gates."""
    dtype = _matmul_dtype(x)
    h = x.to(dtype) @ w1[0].to(dtype)
    if b1 is not None:
        h = h + b1[0].to(dtype)
    out = drop(act(h)) @ w2[0].to(dtype)
    if b2 is not None:
        out = out + b2[0].to(dtype)
    return out * gates.sum(dim=-1, keepdim=True).to(dtype)


DISPATCHERS = {"grouped": dispatch_grouped, "loop": dispatch_loop, "einsum": dispatch_einsum}
