"""``python -m workbench bench moe | peers``: what an MoE layer and a ViMoE cost against their dense equivalents.

The reference is always measured in the same run, interleaved with the candidate (A, B, A, B, ...), and reported
as a ratio of medians, so machine load and clock drift affect both sides alike.

* ``bench moe``: one layer, forward + backward, against ``timm.layers.Mlp`` with the *activated* hidden width
  (``top_k * expert_width`` + the shared expert's width).  Memory: on CUDA the peak allocated; on CPU the bytes
  autograd saves for backward (the activation memory a training step holds), which is deterministic.
* ``bench peers``: this project's dispatch paths and the MoE layers a user would otherwise pick (transformers'
  Mixtral and Qwen2-MoE blocks, st-moe-pytorch, mixture-of-experts), each against a dense FFN of its own form and
  activated width, forward + backward, at several thread counts.  The peers are an optional extra
  (``pip install -e '.[peers]'``); absent ones are skipped with a one-line message.
* ``bench train``: training images/s of the tiny ViMoE against the same dense tiny ViT, and the eval-forward latency
  of 1 and 8 images (what the app pays per request), as a ratio to dense and to what the MACs alone would predict.

This module: ``bench moe`` and ``bench peers`` (layers).  Imports: ``workbench.moe`` and ``.timing``.
"""
from __future__ import annotations

from typing import Callable

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import Mlp

from ..moe import MoEMlp, set_cpu_matmul

from .timing import (PEER_DISTRIBUTIONS, PEERS_INSTALL, PROGRESS_FORMAT, _fresh_grads, _memory, _plural, _step,
                     _versions, backward_with_aux, default_threads, load_note, machine, time_interleaved)


# ViT-scale layer shapes for ``bench moe --preset`` (the GPU check): a batch of 256 images of 197 tokens (224x224,
# 16x16 patches + CLS), h = 4d, E = 8 and 16, top-1 and top-2, bf16; only the default path against its dense FFN.
MOE_PRESETS = {"vit-s16": {"batch": 256, "tokens": 197, "dim": 384, "expert_hidden": 1536},
               "vit-b16": {"batch": 256, "tokens": 197, "dim": 768, "expert_hidden": 3072}}
PRESET_RUN = {"num_experts": [8, 16], "top_k": [1, 2], "dtype": "bf16", "dispatch": ["grouped"], "shared": ["none"],
              "routers": ["topk"]}


def bench_moe(*, batch: int = 128, tokens: int = 50, dim: int = 192, expert_hidden: int = 768,
              num_experts: int = 8, top_ks=(1, 2), dispatches=("grouped", "loop", "einsum"),
              shared=("none", "add"), reps: int = 30, warmup: int = 5, device: str | None = None,
              dtype: str | None = None, seed: int = 0, routers=("topk", "experts_choose", "soft"),
              progress: bool = False, cpu_matmul: str = "blas") -> list[dict]:
    """One MoE layer, fwd+bwd, against a dense FFN of the activated width, interleaved in one run (on the CPU both
    with their fp32 matmuls on ``cpu_matmul``: ``'blas'`` or ``'onednn'``).  Beside the
    top-k dispatch paths, at the same k: experts-choose with capacity factor k (per image: about k experts per
    token) and Soft MoE with round(k x tokens / E) slots per expert (about the same expert FLOPs).  ``progress``: a
    bar on stderr over every timing round, with the time it expects the rest to take."""
    from ..train.progress import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = []
    settings = [(k, mode) for k in top_ks for mode in shared]
    bar = tqdm(total=len(settings) * (warmup + reps), desc="bench moe", unit="round", disable=not progress,
               bar_format=PROGRESS_FORMAT, smoothing=0.1)
    for k, shared_mode in settings:
        bar.set_description(f"bench moe: top-{k}, shared {shared_mode}")
        torch.manual_seed(seed)
        shared_hidden = expert_hidden if shared_mode != "none" else 0
        dense = Mlp(dim, k * expert_hidden + shared_hidden).to(device)
        x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
        grad = torch.randn(batch, tokens, dim, device=device)
        layers = {d: MoEMlp(dim, expert_hidden, num_experts=num_experts, top_k=k, dispatch=d,
                            shared_expert=shared_mode).to(device) for d in dispatches} if "topk" in routers else {}
        if "experts_choose" in routers:
            layers[f"experts_choose(cf={k})"] = MoEMlp(dim, expert_hidden, num_experts=num_experts,
                                                       router="experts_choose", capacity_factor=float(k),
                                                       shared_expert=shared_mode).to(device)
        if "soft" in routers:
            slots = max(1, round(k * tokens / num_experts))
            layers[f"soft(S={slots})"] = MoEMlp(dim, expert_hidden, num_experts=num_experts, router="soft",
                                                slots_per_expert=slots, shared_expert=shared_mode).to(device)
        if device.type == "cpu":
            for m in (dense, *layers.values()):
                set_cpu_matmul(m, cpu_matmul)
        fns = {"dense": lambda: _step(dense, x, grad, dtype)}
        fns.update({d: (lambda m=m: _step(m, x, grad, dtype)) for d, m in layers.items()})
        med = time_interleaved(fns, reps, warmup, device, on_round=bar.update)
        mem_dense = _memory(dense, x, grad, dtype, device)
        for d, layer in layers.items():
            mem = _memory(layer, x, grad, dtype, device)
            rows.append({"top_k": k, "shared": shared_mode, "dispatch": d, "ms": round(med[d] * 1e3, 3),
                         "dense_ms": round(med["dense"] * 1e3, 3), "ratio": round(med[d] / med["dense"], 3),
                         "mem_bytes": mem, "dense_mem_bytes": mem_dense,
                         "mem_mb": round(mem / 2**20, 2), "dense_mem_mb": round(mem_dense / 2**20, 2),
                         "mem_ratio": round(mem / max(mem_dense, 1), 3)})
    bar.close()
    meta = {"batch": batch, "tokens": tokens, "dim": dim, "expert_hidden": expert_hidden,
            "num_experts": num_experts, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "threads": torch.get_num_threads(), "reps": reps,
            "cpu_matmul": cpu_matmul if device.type == "cpu" else None}
    for row in rows:
        row.update(meta)
    return rows




@dataclass(frozen=True)
class Contender:
    """An MoE layer in ``bench peers`` and the dense FFN it is measured against: the same form (activation, gating,
    biases) with the activated width, ``dense_width(top_k)``."""

    name: str
    build: Callable[[int], nn.Module]  # top_k -> the MoE layer
    dense_form: str  # a key of the forms dict passed along with the contenders
    dense_width: Callable[[int], int]
    top_ks: tuple[int, ...] = (1, 2)  # the top-k values the layer supports


def _init_normal(module: nn.Module, std: float = 0.02) -> nn.Module:
    """transformers' expert weights start as torch.empty and its Qwen2-MoE router as zeros (all tokens would tie):
    give every weight a small random value, as a checkpoint would."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def _workbench_contenders(dim: int, hidden: int, num_experts: int, dispatches) -> tuple[list, dict]:
    def moe(dispatch: str, **kw):
        return lambda k: MoEMlp(dim, hidden, num_experts=num_experts, top_k=k, dispatch=dispatch, **kw)

    contenders = [Contender(f"workbench `{d}`", moe(d), "GELU MLP", lambda k: k * hidden) for d in dispatches]
    if "grouped" in dispatches:
        contenders.append(Contender("workbench `grouped` + gated shared expert", moe("grouped", shared_expert="gated"),
                                    "GELU MLP", lambda k: (k + 1) * hidden))
    return contenders, {"GELU MLP": lambda w: Mlp(dim, w)}


def _transformers_contenders(dim: int, hidden: int, num_experts: int) -> tuple[list, dict]:
    from transformers import MixtralConfig, Qwen2MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP, Qwen2MoeSparseMoeBlock

    def mixtral(impl: str):
        return lambda k: _init_normal(MixtralSparseMoeBlock(MixtralConfig(
            hidden_size=dim, intermediate_size=hidden, num_local_experts=num_experts, num_experts_per_tok=k,
            experts_implementation=impl)))

    def qwen2(k: int) -> nn.Module:
        return _init_normal(Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
            hidden_size=dim, moe_intermediate_size=hidden, shared_expert_intermediate_size=hidden,
            num_experts=num_experts, num_experts_per_tok=k, experts_implementation="eager")))

    def swiglu(width: int) -> nn.Module:  # the dense FFN of these models (gate, up, down; no biases)
        return Qwen2MoeMLP(Qwen2MoeConfig(hidden_size=dim, intermediate_size=width), intermediate_size=width)

    return [Contender("transformers Mixtral sparse block (eager: a loop over experts)", mixtral("eager"), "SwiGLU",
                      lambda k: k * hidden),
            Contender("transformers Mixtral sparse block (`grouped_mm` experts)", mixtral("grouped_mm"), "SwiGLU",
                      lambda k: k * hidden),
            Contender("transformers Qwen2-MoE block (+ shared expert)", qwen2, "SwiGLU", lambda k: (k + 1) * hidden)], \
        {"SwiGLU": swiglu}


def _st_moe_contenders(dim: int, hidden: int, num_experts: int) -> tuple[list, dict]:
    from st_moe_pytorch import MoE
    from st_moe_pytorch.st_moe_pytorch import Expert

    def mult(width: int) -> float:  # Expert's width is int(dim * mult * 2 / 3)
        return (width + 0.5) * 3 / (2 * dim)

    def build(k: int) -> nn.Module:  # every token's k choices routed (threshold ~0); slots for T*k assignments
        return MoE(dim, num_experts=num_experts, gating_top_n=k, expert_hidden_mult=mult(hidden),
                   threshold_train=1e-9, capacity_factor_train=float(k))

    return [Contender("st-moe-pytorch (GShard one-hot dispatch, capacity factor k)", build, "GEGLU",
                      lambda k: k * hidden, top_ks=(2,))], {"GEGLU": lambda w: Expert(dim, hidden_mult=mult(w))}


def _gshard_contenders(dim: int, hidden: int, num_experts: int) -> tuple[list, dict]:
    from mixture_of_experts import MoE

    def build(k: int) -> nn.Module:  # top-2 gating; the second choice always kept (k=2) or never (k=1)
        return MoE(dim, num_experts=num_experts, hidden_dim=hidden, activation=nn.GELU,
                   second_policy_train="all" if k == 2 else "none", capacity_factor_train=float(k))

    return [Contender("mixture-of-experts (GShard one-hot dispatch, capacity factor k)", build, "GELU MLP, no biases",
                      lambda k: k * hidden)], {"GELU MLP, no biases": lambda w: Mlp(dim, w, bias=False)}


PEERS = {"transformers": _transformers_contenders, "st-moe-pytorch": _st_moe_contenders,
         "mixture-of-experts": _gshard_contenders}


def peer_contenders(dim: int, hidden: int, num_experts: int) -> tuple[list, dict, list[str]]:
    """The installed peers' contenders and dense forms, and the distributions that are not installed."""
    contenders, forms, missing = [], {}, []
    for dist, make in PEERS.items():
        try:
            found, dense = make(dim, hidden, num_experts)
        except ImportError:
            missing.append(dist)
            continue
        contenders += found
        forms.update(dense)
    return contenders, forms, missing


def _backward(out, grad: torch.Tensor) -> torch.Tensor:
    """Backward from a layer's output with ``grad``; where the layer also returns an auxiliary loss, that loss enters
    as the scalar a training loss adds (its gradient is part of the layer's cost), as :func:`.timing._step` does
    for this project's layers.  Returns the output tensor."""
    y, aux = (out, None) if isinstance(out, torch.Tensor) else (out[0], out[1])
    backward_with_aux(y, aux, grad)
    return y


def _peer_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    if isinstance(module, MoEMlp):
        return _step(module, x, grad, torch.float32)
    _fresh_grads(module, x)
    _backward(module(x), grad)


def _time_contenders(contenders: list, forms: dict, k: int, x, grad, reps: int, warmup: int, seed: int) -> list[dict]:
    """One round = each contender, each followed by its dense reference the first time that one is needed."""
    torch.manual_seed(seed)
    fns, refs = {}, {}
    for c in contenders:
        if k in c.top_ks:
            refs[c.name] = ref = (c.dense_form, c.dense_width(k))
            fns[c.name] = lambda m=c.build(k): _peer_step(m, x, grad)
            if ref not in fns:
                fns[ref] = lambda m=forms[ref[0]](ref[1]): _peer_step(m, x, grad)
    med = time_interleaved(fns, reps, warmup, torch.device("cpu"))
    return [{"layer": name, "top_k": k, "threads": torch.get_num_threads(), "ms": round(med[name] * 1e3, 3),
             "dense": f"{form} {width}", "dense_ms": round(med[(form, width)] * 1e3, 3),
             "ratio": round(med[name] / med[(form, width)], 3)} for name, (form, width) in refs.items()]


def bench_peers(*, batch: int = 128, tokens: int = 50, dim: int = 192, expert_hidden: int = 768,
                num_experts: int = 8, top_ks=(1, 2), threads=None, dispatches=("grouped", "loop", "einsum"),
                peers: bool = True, reps: int = 10, warmup: int = 2, seed: int = 0) -> dict:
    """Forward + backward time of each contender over that of its dense reference, measured interleaved in one run
    (every contender and reference once per round), fp32 on the CPU, at each thread count in ``threads``."""
    threads = list(threads or default_threads())
    note = load_note()
    contenders, forms = _workbench_contenders(dim, expert_hidden, num_experts, dispatches)
    missing = []
    if peers:
        found, peer_forms, missing = peer_contenders(dim, expert_hidden, num_experts)
        contenders, forms = contenders + found, {**forms, **peer_forms}
    if missing:
        print(f"peers not installed, skipped: {', '.join(missing)} ({PEERS_INSTALL})")
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    grad = torch.randn(batch, tokens, dim)
    before, rows = torch.get_num_threads(), []
    try:
        for n in threads:
            torch.set_num_threads(n)
            for k in top_ks:
                rows += _time_contenders(contenders, forms, k, x, grad, reps, warmup, seed)
    finally:
        torch.set_num_threads(before)
    return {"rows": rows, "layers": [c.name for c in contenders], "skipped": missing, "threads": threads,
            "top_ks": list(top_ks), "batch": batch, "tokens": tokens, "dim": dim, "expert_hidden": expert_hidden,
            "num_experts": num_experts, "dtype": "float32", "reps": reps, "machine": machine(),
            "torch": torch.__version__, "peer_versions": _versions(PEER_DISTRIBUTIONS), **note}




def format_peers_table(result: dict) -> str:
    """Two Markdown tables, one row per layer, one column per (thread count, top-k): time / dense reference, then
    the milliseconds behind each ratio (the layer's, its dense reference's)."""
    cols = [(n, k) for n in result["threads"] for k in result["top_ks"]]
    cell = {(r["layer"], r["threads"], r["top_k"]): r["ratio"] for r in result["rows"]}
    forms = {r["layer"]: r["dense"].rsplit(" ", 1)[0] for r in result["rows"]}
    lines = ["| layer | dense reference | " + " | ".join(f"top-{k}, {_plural(n, 'thread')}" for n, k in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for layer in result["layers"]:
        values = [f"{cell[(layer, n, k)]:.2f}x" if (layer, n, k) in cell else "n/a" for n, k in cols]
        lines.append(f"| {layer} | {forms.get(layer, '')} | " + " | ".join(values) + " |")
    # the same runs in milliseconds: layers whose dense references differ in form compare here, not in the ratios
    ms = {(r["layer"], r["threads"], r["top_k"]): (r["ms"], r["dense_ms"]) for r in result["rows"]}
    lines += ["\n| layer: fwd+bwd ms (its dense reference's ms) | " + " | ".join(
        f"top-{k}, {_plural(n, 'thread')}" for n, k in cols) + " |", "|---|" + "---:|" * len(cols)]
    for layer in result["layers"]:
        values = [f"{ms[(layer, n, k)][0]:.1f} ({ms[(layer, n, k)][1]:.1f})" if (layer, n, k) in ms else "n/a"
                  for n, k in cols]
        lines.append(f"| {layer} | " + " | ".join(values) + " |")
    r = result
    lines.append(f"\nfwd+bwd time / a dense FFN of the same form and activated width, interleaved in one run (median "
                 f"of {r['reps']}); T = {r['batch'] * r['tokens']:,} tokens, d = {r['dim']}, h = {r['expert_hidden']}, "
                 f"E = {r['num_experts']}, fp32; {r['machine']}; torch {r['torch']}; 1-min load average "
                 f"{r['load_avg_1min']} at the start ({'quiet' if r['quiet'] else 'under load: erratic'})"
                 + (f"; {r['allocator']}" if r.get("allocator") else ""))
    if r["skipped"]:
        lines.append(f"not installed, skipped: {', '.join(r['skipped'])} ({PEERS_INSTALL})")
    return "\n".join(lines)




def format_moe_table(rows: list[dict]) -> str:
    lines = [f"{'top_k':>5} {'shared':<6} {'dispatch / router':<19} {'ms':>9} {'dense ms':>9} {'ratio':>6} "
             f"{'mem MB':>8} {'dense MB':>8} {'mem x':>6}"]
    for r in rows:
        lines.append(f"{r['top_k']:>5} {r['shared']:<6} {r['dispatch']:<19} {r['ms']:>9.2f} {r['dense_ms']:>9.2f} "
                     f"{r['ratio']:>6.2f} {r['mem_mb']:>8.1f} {r['dense_mem_mb']:>8.1f} {r['mem_ratio']:>6.2f}")
    r = rows[0]
    lines.append(f"({r['batch']} images x {r['tokens']} tokens, d={r['dim']}, expert width {r['expert_hidden']}, "
                 f"E={r['num_experts']}, {r['dtype']} on {r['device']}"
                 + (f" (matmuls: {r['cpu_matmul']})" if r.get("cpu_matmul") else "")
                 + f", {r['threads']} threads, median of {r['reps']}; "
                 "ratio = time / dense FFN of the activated width)")
    return "\n".join(lines)


