"""Three ways of running tokens through their experts.  All compute

    y_t = sum_j keep_tj * gate_tj * FFN_{e_tj}(x_t)

with identical outputs and gradients (tested); they differ only in cost.

* ``grouped`` (default): sort the T*k assignments by expert once and run two grouped matmuls over the stacked
  expert weights (``torch._grouped_mm`` on CUDA: one kernel, no host sync; contiguous per-expert matmuls on CPU).
  No padding, no per-expert gathers; the same work as a dense FFN with the activated width.
* ``loop``: one small matmul per expert (HF Mixtral style).  The readable reference.
* ``einsum``: GShard / V-MoE one-hot dispatch and combine tensors of shape (T, E, C).  Spends work on the
  one-hot matmuls and on empty capacity slots; kept as the anchors' reference.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .router import autocast_enabled

DISPATCH_MODES = ("grouped", "loop", "einsum")
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")

Act = Callable[[torch.Tensor], torch.Tensor]


def _combine(per_assignment: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(T*k, d) expert outputs in assignment order, (T, k) gates -> (T, d).  A gather-free weighted sum."""
    tokens, k = gates.shape
    if k == 1:
        return per_assignment * gates
    return (per_assignment.view(tokens, k, -1) * gates.unsqueeze(-1).to(per_assignment.dtype)).sum(1)


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


class _GroupedFFN(torch.autograd.Function):
    """The whole expert FFN over expert-sorted, contiguous row groups: for each expert, fc1 (+bias), activation and
    fc2 (+bias) run back to back on its slice while it is still in cache, writing into shared buffers.  This is the
    CPU path of ``grouped``: torch's CPU ``_grouped_mm`` is a loop of matmuls too, with extra copies, and a separate
    full-buffer activation pass between two grouped matmuls costs a trip through memory."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, counts: list[int], act: Act):
        out = x.new_empty(x.shape[0], w2.shape[2])
        pres, posts = [], []  # per-expert activations, kept for backward (fresh tensors: fastest elementwise path)
        start = 0
        for e, n in enumerate(counts):
            if n:
                r = slice(start, start + n)
                pre = torch.addmm(b1[e], x[r], w1[e])
                post = act(pre)
                torch.addmm(b2[e], post, w2[e], out=out[r])
                pres.append(pre)
                posts.append(post)
            start += n
        ctx.save_for_backward(x, w1, w2, *pres, *posts)
        ctx.counts, ctx.act = counts, act
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, *acts = ctx.saved_tensors
        pres, posts = acts[:len(acts) // 2], acts[len(acts) // 2:]
        grad = grad.contiguous()
        gx, gw1, gw2 = torch.empty_like(x), torch.zeros_like(w1), torch.zeros_like(w2)
        gb1 = w1.new_zeros(w1.shape[0], w1.shape[2])
        gb2 = w2.new_zeros(w2.shape[0], w2.shape[2])
        start, i = 0, 0
        for e, n in enumerate(ctx.counts):
            if n:
                r = slice(start, start + n)
                g = grad[r]
                torch.mm(posts[i].t(), g, out=gw2[e])
                torch.sum(g, 0, out=gb2[e])
                gpre = _act_backward(ctx.act, g @ w2[e].t(), pres[i])
                torch.mm(x[r].t(), gpre, out=gw1[e])
                torch.sum(gpre, 0, out=gb1[e])
                torch.mm(gpre, w1[e].t(), out=gx[r])
                i += 1
            start += n
        return gx, gw1, gb1, gw2, gb2, None, None


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (N, d) sorted by group, w (G, d, h), offsets (G,) int32 cumulative ends -> (N, h).
    One ``torch._grouped_mm`` kernel on CUDA; per-group matmuls over contiguous slices elsewhere."""
    if x.is_cuda and HAS_GROUPED_MM:
        return torch._grouped_mm(x, w, offsets)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    return torch.cat([x[s:s + n] @ w[e] for e, (s, n) in enumerate(zip([0] + offsets.tolist()[:-1], counts))])


def dispatch_grouped(x, experts, gates, w1, b1, w2, b2, act: Act, drop: Act) -> torch.Tensor:
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
    fused = not (x.is_cuda and HAS_GROUPED_MM) and b1 is not None and not (isinstance(drop, nn.Dropout)
                                                                            and drop.p > 0 and drop.training)
    if fused:
        xs = _ToAssignments.apply(x.to(dtype), order, inverse, k)
        out = _GroupedFFN.apply(xs, w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype), counts.tolist(), act)
        return _combine(_FromAssignments.apply(out, order, inverse), gates.to(dtype))
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
