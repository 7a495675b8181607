"""``python -m workbench bench split``: where a top-k MoE layer's forward + backward time goes beyond its dense FFN's.

``bench moe`` gives one ratio per layer; this splits it into three nested pieces of the same layer, each timed
forward + backward and interleaved with the dense FFN of the activated width (``timm.layers.Mlp``, k x h wide):

* ``experts``: the expert FFNs alone on rows already sorted by expert (the layer's own routing, fixed):
  the matmuls, activation and bias work at the experts' row counts, nothing around them;
* ``dispatch``: the routed FFN with the routing given (``dispatch_grouped``: the sort plan, the gather into
  expert order, the experts, the gates and the return to token order, with the gates' gradient);
* ``layer``: the whole ``MoEMlp`` step as ``bench moe`` times it (router, softmax, top-k, balance loss, dispatch);

and ``router`` alone (logits, softmax, top-k, balance loss, forward + backward) as a cross-check of
layer - dispatch.  Each increment is reported as a share of the dense time: experts - dense (what the same FLOPs
cost split over E experts), dispatch - experts (moving rows), layer - dispatch (routing).  Wall time, interleaved,
median: op-level profiles miss allocator and cache effects that a ratio of a few percent is made of.

Imports: torch, timm, ``workbench.moe`` and ``.timing``.
"""
from __future__ import annotations

import torch
from timm.layers import Mlp

from ..moe import MoEMlp
from ..moe.dispatch import SortedAssignments, dispatch_grouped, experts_on_sorted_rows
from .timing import _plural, _step, default_threads, time_interleaved

PIECES = ("dense", "experts", "dispatch", "layer", "router")
NESTED_TOL = 1e-4  # relative: fp32 rounding between the sorted path's pieces and the layer


def _pieces(batch: int, tokens: int, dim: int, hidden: int, num_experts: int, top_k: int, seed: int):
    """The five callables of one setting (each one training step's forward + backward, fresh gradients, returning
    its forward output), the rows each expert gets, and ``nested()``: how far apart the pieces' outputs are (the
    experts' rows gated and returned to token order against the dispatch piece; that against the whole layer),
    which is 0 up to fp32 rounding when each piece is the next one's inner work."""
    torch.manual_seed(seed)
    dense = Mlp(dim, top_k * hidden)
    moe = MoEMlp(dim, hidden, num_experts=num_experts, top_k=top_k)
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    grad = torch.randn(batch, tokens, dim)
    flat = x.detach().reshape(-1, dim)
    with torch.no_grad():
        _, _, experts, gates = moe.router(flat)
    plan = SortedAssignments.of(experts, num_experts)
    xs = plan.gather(flat).requires_grad_(True)
    grad_rows = plan.gather(grad.reshape(-1, dim))
    gates = gates.clone().requires_grad_(True)
    grad_gates = torch.randn(gates.shape)
    weights = (moe.w1, moe.b1, moe.w2, moe.b2)

    def fresh(*leaves):
        moe.zero_grad(set_to_none=True)
        for t in leaves:
            t.grad = None

    def experts_only():
        fresh(xs)
        rows = experts_on_sorted_rows(xs, *weights, plan, moe.act)
        rows.backward(grad_rows)
        return rows

    def dispatch():
        fresh(x, gates)
        y = dispatch_grouped(x.reshape(-1, dim), experts, gates, *weights, moe.act, moe.drop).view_as(x)
        y.backward(grad)
        return y

    def router():
        fresh(x)
        r = moe._route(x)
        moe._aux(r)
        torch.autograd.backward([r.gates, moe.aux_loss], [grad_gates, torch.ones(())])

    fns = {"dense": lambda: _step(dense, x, grad, torch.float32), "experts": experts_only, "dispatch": dispatch,
           "layer": lambda: _step(moe, x, grad, torch.float32), "router": router}

    def nested() -> dict:
        rows, routed, whole = (f().detach() for f in (experts_only, dispatch, fns["layer"]))
        returned = plan.scatter(rows * plan.sorted_gates(gates.detach())).view_as(x)

        def apart(a, b):  # the largest difference, relative to the largest output
            return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        return {"experts_vs_dispatch": apart(returned, routed), "dispatch_vs_layer": apart(routed, whole)}

    return fns, plan.counts, nested


def bench_split(*, batch: int = 128, tokens: int = 50, dim: int = 192, expert_hidden: int = 768,
                num_experts: int = 8, top_ks=(1,), threads=None, reps: int = 15, warmup: int = 3,
                seed: int = 0) -> dict:
    """Median ms of each piece per (thread count, top-k), fp32 on the CPU with BLAS matmuls, interleaved, and each
    piece's ratio to the dense FFN."""
    threads = list(threads or default_threads())
    before, rows = torch.get_num_threads(), []
    try:
        for n in threads:
            torch.set_num_threads(n)
            for k in top_ks:
                fns, counts, nested = _pieces(batch, tokens, dim, expert_hidden, num_experts, k, seed)
                med = time_interleaved(fns, reps, warmup, torch.device("cpu"))
                dense = med["dense"]
                row = {"threads": n, "top_k": k, "rows_per_expert": counts, **nested(),
                       **{f"{p}_ms": round(med[p] * 1e3, 3) for p in PIECES}}
                row.update({f"{p}_ratio": round(med[p] / dense, 3) for p in PIECES if p != "dense"})
                row.update({"expert_matmuls": round((med["experts"] - dense) / dense, 3),
                            "moving_rows": round((med["dispatch"] - med["experts"]) / dense, 3),
                            "routing": round((med["layer"] - med["dispatch"]) / dense, 3)})
                rows.append(row)
    finally:
        torch.set_num_threads(before)
    return {"batch": batch, "tokens": tokens, "dim": dim, "expert_hidden": expert_hidden, "num_experts": num_experts,
            "dtype": "float32", "device": "cpu", "cpu_matmul": "blas", "reps": reps, "rows": rows}


def format_split(result: dict) -> str:
    r = result
    lines = [f"where one top-k MoE layer's fwd+bwd time goes, against a dense FFN of the activated width "
             f"({r['batch']} images x {r['tokens']} tokens, d={r['dim']}, expert width {r['expert_hidden']}, "
             f"E={r['num_experts']}, {r['dtype']} on {r['device']}, matmuls: {r['cpu_matmul']}; interleaved, "
             f"median of {r['reps']})",
             f"  {'threads':>7} {'top-k':>5} {'dense ms':>9} {'experts':>8} {'dispatch':>9} {'layer':>7} "
             f"{'router alone':>12}   excess over dense: {'matmuls':>8} {'rows':>7} {'routing':>8}"]
    for row in r["rows"]:
        lines.append(f"  {row['threads']:>7} {row['top_k']:>5} {row['dense_ms']:>9.2f} {row['experts_ratio']:>7.3f}x "
                     f"{row['dispatch_ratio']:>8.3f}x {row['layer_ratio']:>6.3f}x {row['router_ratio']:>11.3f}x"
                     f"   {'':>18}{row['expert_matmuls']:>+8.3f} {row['moving_rows']:>+7.3f} {row['routing']:>+8.3f}")
    lines.append("  (experts: the expert FFNs on rows already sorted by expert; dispatch: + sort, gather, gates, "
                 "return; layer: + router, balance loss and the layer's bookkeeping;\n   excess: experts - dense, "
                 "dispatch - experts, layer - dispatch, each / dense)")
    worst = max(max(row["experts_vs_dispatch"], row["dispatch_vs_layer"]) for row in r["rows"])
    lines.append(f"  nested: each piece's output equals the next one's inner work (largest difference {worst:.1e} of the largest output"
                 + ("; NOT NESTED: the split does not describe this layer)" if worst > NESTED_TOL else ")"))
    for row in r["rows"]:
        lines.append(f"  rows per expert, {_plural(row['threads'], 'thread')}, top-{row['top_k']}: "
                     f"{', '.join(map(str, row['rows_per_expert']))}")
    return "\n".join(lines)
