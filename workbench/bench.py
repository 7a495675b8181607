"""``python -m workbench bench moe|train``: what an MoE layer and a ViMoE cost against their dense equivalents.

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
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from .moe import MoEMlp, moe_aux_loss
from .provenance import ROOT as REPO_ROOT, provenance


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def saved_bytes(exclude: nn.Module | None = None):
    """Bytes autograd keeps for backward inside the block (each storage once), not counting ``exclude``'s
    parameters: the activation memory of a training step, which is what dispatch changes."""
    params = {p.untyped_storage().data_ptr() for p in exclude.parameters()} if exclude is not None else set()
    seen, total = set(), [0]

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and storage.data_ptr() not in params:
            seen.add(key)
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def _fresh_grads(module: nn.Module, x: torch.Tensor) -> None:
    """As a training step starts (``optimizer.zero_grad(set_to_none=True)``): the backward then writes the
    gradients instead of adding to last step's, which would charge each layer in proportion to its parameters."""
    module.zero_grad(set_to_none=True)
    x.grad = None


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype) -> None:
    _fresh_grads(module, x)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        y = module(x)
        if isinstance(module, MoEMlp):
            y = y + 0 * module.aux_loss  # the aux loss is part of the layer's real cost
    y.backward(grad.to(y.dtype))


def _memory(module, x, grad, dtype, device) -> int:
    """Activation memory of one forward: CUDA peak allocated above the baseline; on CPU the bytes saved for backward."""
    module.zero_grad(set_to_none=True)
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with autocast:
            y = module(x)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        y.backward(grad.to(y.dtype))
        return peak
    with saved_bytes(exclude=module) as total, autocast:
        y = module(x)
    y.backward(grad.to(y.dtype))
    return total[0]


def time_interleaved(fns: dict, reps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each callable, run round-robin ``reps`` times after ``warmup`` rounds."""
    times = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def bench_moe(*, batch: int = 128, tokens: int = 50, dim: int = 192, expert_hidden: int = 768,
              num_experts: int = 8, top_ks=(1, 2), dispatches=("grouped", "loop", "einsum"),
              shared=("none", "add"), reps: int = 30, warmup: int = 5, device: str | None = None,
              dtype: str | None = None, seed: int = 0, routers=("topk", "experts_choose", "soft")) -> list[dict]:
    """One MoE layer, fwd+bwd, against a dense FFN of the activated width, interleaved in one run.  Beside the
    top-k dispatch paths, at the same k: experts-choose with capacity factor k (per image: about k experts per
    token) and Soft MoE with round(k x tokens / E) slots per expert (about the same expert FLOPs)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = []
    for k in top_ks:
        for shared_mode in shared:
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
            fns = {"dense": lambda: _step(dense, x, grad, dtype)}
            fns.update({d: (lambda m=m: _step(m, x, grad, dtype)) for d, m in layers.items()})
            med = time_interleaved(fns, reps, warmup, device)
            mem_dense = _memory(dense, x, grad, dtype, device)
            for d, layer in layers.items():
                mem = _memory(layer, x, grad, dtype, device)
                rows.append({"top_k": k, "shared": shared_mode, "dispatch": d, "ms": round(med[d] * 1e3, 3),
                             "dense_ms": round(med["dense"] * 1e3, 3), "ratio": round(med[d] / med["dense"], 3),
                             "mem_bytes": mem, "dense_mem_bytes": mem_dense,
                             "mem_mb": round(mem / 2**20, 2), "dense_mem_mb": round(mem_dense / 2**20, 2),
                             "mem_ratio": round(mem / max(mem_dense, 1), 3)})
    meta = {"batch": batch, "tokens": tokens, "dim": dim, "expert_hidden": expert_hidden,
            "num_experts": num_experts, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "threads": torch.get_num_threads(), "reps": reps}
    for row in rows:
        row.update(meta)
    return rows


# -- bench peers ---------------------------------------------------------------------------------------------------
PEERS_INSTALL = "pip install -e '.[peers]'"
PEER_DISTRIBUTIONS = ("transformers", "st-moe-pytorch", "mixture-of-experts")
LOAD_LIMIT = 0.5  # 1-min load average above which timings are flagged as taken under load


def load_note() -> dict:
    """The 1-min load average now, and whether the machine looks quiet enough for timings (a warning if not)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    quiet = load <= LOAD_LIMIT
    if not quiet:
        print(f"warning: 1-min load average is {load:.2f} (> {LOAD_LIMIT}): other processes share the CPU, so these "
              "timings are erratic; re-run on a quiet machine for figures to record", file=sys.stderr)
    return {"load_avg_1min": round(load, 2), "quiet": quiet}


def steady_allocator() -> str:
    """Pin glibc malloc's adaptive thresholds, as ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` would:
    tensors up to 32 MiB then reuse the heap, as in a steady training loop, instead of being mapped afresh, so
    that a layer is not charged page faults that depend on what ran before it in the round (which moved the dense
    reference by 10% between rounds).  Returns what was done, for the record."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        pinned = libc.mallopt(-3, 32 << 20) == 1 and libc.mallopt(-1, 2**31 - 1) == 1  # M_MMAP_/M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pinned = False
    return "glibc malloc: mmap threshold 32 MiB, no trimming" if pinned else "default allocator"


def machine() -> str:
    """The CPU's model name and core count (the thread counts vary within a run, so they are not part of it)."""
    from .provenance import device_description

    return f"{device_description('cpu').split(': ', 1)[1].rsplit(',', 1)[0]}, {os.cpu_count()} cores"


def default_threads() -> list[int]:
    return sorted({1, os.cpu_count() or 1})


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


def _output(out) -> torch.Tensor:
    """A layer's output tensor, plus 0 x its auxiliary loss where it returns one (the loss is part of its cost)."""
    if isinstance(out, torch.Tensor):
        return out
    y, aux = out[0], out[1]
    return y + 0 * aux


def _peer_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    if isinstance(module, MoEMlp):
        return _step(module, x, grad, torch.float32)
    _fresh_grads(module, x)
    _output(module(x)).backward(grad)


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


def _versions(distributions) -> dict[str, str]:
    found = {}
    for dist in distributions:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def format_peers_table(result: dict) -> str:
    """A Markdown table: one row per layer, one column per (thread count, top-k), cells = time / dense reference."""
    cols = [(n, k) for n in result["threads"] for k in result["top_ks"]]
    cell = {(r["layer"], r["threads"], r["top_k"]): r["ratio"] for r in result["rows"]}
    forms = {r["layer"]: r["dense"].rsplit(" ", 1)[0] for r in result["rows"]}
    lines = ["| layer | dense reference | " + " | ".join(f"top-{k}, {_plural(n, 'thread')}" for n, k in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for layer in result["layers"]:
        values = [f"{cell[(layer, n, k)]:.2f}x" if (layer, n, k) in cell else "n/a" for n, k in cols]
        lines.append(f"| {layer} | {forms.get(layer, '')} | " + " | ".join(values) + " |")
    r = result
    lines.append(f"\nfwd+bwd time / a dense FFN of the same form and activated width, interleaved in one run (median "
                 f"of {r['reps']}); T = {r['batch'] * r['tokens']:,} tokens, d = {r['dim']}, h = {r['expert_hidden']}, "
                 f"E = {r['num_experts']}, fp32; {r['machine']}; torch {r['torch']}; 1-min load average "
                 f"{r['load_avg_1min']} at the start ({'quiet' if r['quiet'] else 'under load: erratic'})"
                 + (f"; {r['allocator']}" if r.get("allocator") else ""))
    if r["skipped"]:
        lines.append(f"not installed, skipped: {', '.join(r['skipped'])} ({PEERS_INSTALL})")
    return "\n".join(lines)


def _train_step(model, opt, x, y, dtype):
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = F.cross_entropy(model(x).float(), y) + moe_aux_loss(model).to(x.device)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_train(*, model: str = "vimoe_tiny_patch4_28", dense_model: str | None = None, moe_layers: str = "last-3",
                num_experts: int = 8, top_k: int = 1, batch: int = 128, steps: int = 12, warmup: int = 3,
                device: str | None = None, latency_reps: int = 50, latency_batches=(1, 8), threads=None,
                compile: bool = False, **model_kwargs) -> dict:
    """Training images/s and eval-forward latency of a ViMoE against its dense model, at each thread count in
    ``threads`` (default: the current one).  The first thread count's figures are also at the top level."""
    import timm

    import workbench  # noqa: F401

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    moe = timm.create_model(model, moe_layers=moe_layers, num_experts=num_experts, top_k=top_k,
                            **model_kwargs).to(device)
    if dense_model is None:
        dense = timm.create_model(model, moe_layers="none", **model_kwargs).to(device)
    else:
        dense = timm.create_model(dense_model, **model_kwargs).to(device)
    macs_ratio = _macs_ratio(moe, dense)
    threads = list(threads or [torch.get_num_threads()])
    before, training, latency = torch.get_num_threads(), [], []
    try:
        for n in threads:
            torch.set_num_threads(n)
            training.append(_training_speed(moe, dense, batch, steps, warmup, device, dtype, compile))
            latency += _latency(moe, dense, latency_batches, latency_reps, device, macs_ratio)
    finally:
        torch.set_num_threads(before)
    first = next(r for r in latency if r["threads"] == threads[0] and r["batch"] == latency_batches[0])
    return {"model": model, "dense_model": dense_model or f"{model}(moe_layers='none')", "moe_layers": moe_layers,
            "num_experts": num_experts, "top_k": top_k, **model_kwargs, "batch": batch, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), **training[0],
            "moe_latency_ms": first["moe_ms"], "dense_latency_ms": first["dense_ms"], "macs_ratio": macs_ratio,
            "training": training, "latency": latency,
            "params_moe": sum(p.numel() for p in moe.parameters()),
            "params_dense": sum(p.numel() for p in dense.parameters())}


def _macs_ratio(moe: nn.Module, dense: nn.Module) -> float:
    """Activated MACs of one image, ViMoE over dense (the router and a shared expert count; experts count k times)."""
    from .flops import profile

    x = torch.zeros(1, *moe.pretrained_cfg["input_size"], device=next(moe.parameters()).device)
    return round(profile(moe, x).macs / profile(dense, x).macs, 4)


def _training_speed(moe, dense, batch, steps, warmup, device, dtype, compile) -> dict:
    x = torch.randn(batch, *moe.pretrained_cfg["input_size"], device=device)
    y = torch.randint(0, moe.num_classes, (batch,), device=device)
    models = {"moe": moe.train(), "dense": dense.train()}
    if compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    med = time_interleaved({k: (lambda k=k: _train_step(models[k], opts[k], x, y, dtype)) for k in models},
                           steps, warmup, device)
    return {"threads": torch.get_num_threads(), "moe_img_s": round(batch / med["moe"], 1),
            "dense_img_s": round(batch / med["dense"], 1), "throughput_ratio": round(med["dense"] / med["moe"], 3)}


def _latency(moe, dense, batches, reps: int, device, macs_ratio: float) -> list[dict]:
    """Eval forward under ``torch.no_grad()``, interleaved; ``vs_macs`` = (ViMoE / dense) / MACs ratio, so 1.0 means
    the ViMoE costs exactly what its extra MACs predict."""
    rows = []
    moe.eval()
    dense.eval()
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, *moe.pretrained_cfg["input_size"], device=device)
            med = time_interleaved({"moe": lambda: moe(x), "dense": lambda: dense(x)}, reps, 5, device)
            ratio = med["moe"] / med["dense"]
            rows.append({"threads": torch.get_num_threads(), "batch": b, "moe_ms": round(med["moe"] * 1e3, 2),
                         "dense_ms": round(med["dense"] * 1e3, 2), "ratio": round(ratio, 3),
                         "vs_macs": round(ratio / macs_ratio, 3)})
    return rows


def bench_app(checkpoint=None, reps: int = 30) -> dict:
    """Per-request latency of the routing explorer (decode + preprocess, forward with capture, first overlay),
    over the shipped example images, after one warm-up request that loads the checkpoint."""
    from .explorer import DEFAULT_CHECKPOINT, Explorer, example_images

    explorer = Explorer()
    examples = example_images()
    checkpoint = checkpoint or DEFAULT_CHECKPOINT
    explorer.analyse(examples[0], checkpoint)
    timings = []
    for i in range(reps):
        analysis = explorer.analyse(examples[i % len(examples)], checkpoint)
        t0 = time.perf_counter()
        analysis.overlay(analysis.layers[-1])  # what the page shows first
        overlay_ms = (time.perf_counter() - t0) * 1e3
        t = analysis.timings
        timings.append({**t, "overlay_ms": overlay_ms, "total_ms": t["total_ms"] + overlay_ms})
    med = {k: round(statistics.median(t[k] for t in timings), 2) for k in timings[0]}
    return {"checkpoint": str(checkpoint), "reps": reps, "threads": torch.get_num_threads(), **med}


def format_moe_table(rows: list[dict]) -> str:
    lines = [f"{'top_k':>5} {'shared':<6} {'dispatch / router':<19} {'ms':>9} {'dense ms':>9} {'ratio':>6} "
             f"{'mem MB':>8} {'dense MB':>8} {'mem x':>6}"]
    for r in rows:
        lines.append(f"{r['top_k']:>5} {r['shared']:<6} {r['dispatch']:<19} {r['ms']:>9.2f} {r['dense_ms']:>9.2f} "
                     f"{r['ratio']:>6.2f} {r['mem_mb']:>8.1f} {r['dense_mem_mb']:>8.1f} {r['mem_ratio']:>6.2f}")
    r = rows[0]
    lines.append(f"({r['batch']} images x {r['tokens']} tokens, d={r['dim']}, expert width {r['expert_hidden']}, "
                 f"E={r['num_experts']}, {r['dtype']} on {r['device']}, {r['threads']} threads, median of {r['reps']}; "
                 "ratio = time / dense FFN of the activated width)")
    return "\n".join(lines)


def format_train(result: dict) -> str:
    r = result
    lines = [f"training {r['model']} (moe_layers={r['moe_layers']}, E={r['num_experts']}, top-{r['top_k']}) vs "
             f"{r['dense_model']}, batch {r['batch']}, {r['dtype']} on {r['device']}"]
    for t in r["training"]:
        lines.append(f"  {_plural(t['threads'], 'thread'):>10}: ViMoE {t['moe_img_s']:.1f} img/s   dense "
                     f"{t['dense_img_s']:.1f} img/s   ratio {t['throughput_ratio']:.3f}")
    lines.append(f"eval forward latency (ViMoE MACs = {r['macs_ratio']:.3f}x dense; vs MACs = latency ratio / MACs "
                 "ratio, 1.00 = costs what its MACs predict)")
    lines.append(f"  {'threads':>7} {'batch':>5} {'ViMoE ms':>9} {'dense ms':>9} {'ratio':>6} {'vs MACs':>8}")
    for t in r["latency"]:
        lines.append(f"  {t['threads']:>7} {t['batch']:>5} {t['moe_ms']:>9.2f} {t['dense_ms']:>9.2f} "
                     f"{t['ratio']:>6.3f} {t['vs_macs']:>8.3f}")
    return "\n".join(lines)


def repo_relative(value):
    """``value`` with every absolute path inside the repository (a string or a Path, in dicts and lists at any
    depth) written relative to the repository root, so a recorded result names no machine's folders."""
    if isinstance(value, dict):
        return {k: repo_relative(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [repo_relative(v) for v in value]
    if isinstance(value, (str, Path)) and Path(value).is_absolute():
        for candidate in (Path(value), Path(value).resolve()):  # REPO_ROOT is resolved; the path may not be
            if candidate.is_relative_to(REPO_ROOT):
                return candidate.relative_to(REPO_ROOT).as_posix()
    return str(value) if isinstance(value, Path) else value


def write_result(kind: str, payload, folder: str | Path) -> Path:
    from .checkpoint import atomic_write_text

    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    path = folder / f"{kind}-{dev}-{stamp}.json"
    record = {"kind": kind, "results": repo_relative(payload), "provenance": provenance()}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def register_cli(sub) -> None:
    p = sub.add_parser("bench", help="speed and memory of MoE layers and ViMoE training vs dense equivalents")
    bsub = p.add_subparsers(dest="bench", required=True)
    m = bsub.add_parser("moe", help="one MoE layer, forward + backward, vs a dense FFN of the activated width")
    m.add_argument("--batch", type=int, default=128)
    m.add_argument("--tokens", type=int, default=50)
    m.add_argument("--dim", type=int, default=192)
    m.add_argument("--expert-hidden", type=int, default=768)
    m.add_argument("--num-experts", type=int, default=8)
    m.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    m.add_argument("--dispatch", nargs="+", default=["grouped", "loop", "einsum"],
                   choices=["grouped", "loop", "einsum"])
    m.add_argument("--shared", nargs="+", default=["none", "add"], choices=["none", "add", "gated"])
    m.add_argument("--routers", nargs="+", default=["topk", "experts_choose", "soft"],
                   choices=["topk", "experts_choose", "soft"],
                   help="routers to time: top-k (each --dispatch path), experts-choose (capacity factor k), Soft MoE "
                        "(about k x tokens / E slots per expert) (default: all three)")
    m.add_argument("--reps", type=int, default=30)
    m.add_argument("--dtype", choices=["fp32", "bf16"])
    m.add_argument("--device")
    m.add_argument("--threads", type=int)
    m.add_argument("--json", action="store_true")
    m.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench")
    m.set_defaults(func=_cmd_moe)
    t = bsub.add_parser("train", help="training img/s of the tiny ViMoE vs the dense tiny ViT; 1- and 8-image latency")
    t.add_argument("--model", default="vimoe_tiny_patch4_28")
    t.add_argument("--dense-model", help="timm name of the dense reference (default: the same model, no MoE)")
    t.add_argument("--moe-layers", default="last-3")
    t.add_argument("--num-experts", type=int, default=8)
    t.add_argument("--top-k", type=int, default=1)
    t.add_argument("--shared-expert", default="none", choices=["none", "add", "gated"])
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--steps", type=int, default=12)
    t.add_argument("--device")
    t.add_argument("--threads", type=_thread_list, default=None,
                   help="comma-separated thread counts, e.g. 1,2 (default: 1 and all cores)")
    t.add_argument("--compile", action="store_true")
    t.add_argument("--json", action="store_true")
    t.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench")
    t.set_defaults(func=_cmd_train)
    q = bsub.add_parser("peers", help="MoE layers a user would otherwise pick (transformers, st-moe-pytorch, "
                                      f"mixture-of-experts; {PEERS_INSTALL}) vs this project's dispatch paths")
    q.add_argument("--batch", type=int, default=128)
    q.add_argument("--tokens", type=int, default=50)
    q.add_argument("--dim", type=int, default=192)
    q.add_argument("--expert-hidden", type=int, default=768)
    q.add_argument("--num-experts", type=int, default=8)
    q.add_argument("--top-k", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    q.add_argument("--dispatch", nargs="+", default=["grouped", "loop", "einsum"],
                   choices=["grouped", "loop", "einsum"])
    q.add_argument("--threads", type=_thread_list, default=None,
                   help="comma-separated thread counts, e.g. 1,2 (default: 1 and all cores)")
    q.add_argument("--no-peers", action="store_true", help="only this project's dispatch paths")
    q.add_argument("--reps", type=int, default=10)
    q.add_argument("--warmup", type=int, default=2)
    q.add_argument("--json", action="store_true")
    q.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench")
    q.set_defaults(func=_cmd_peers)
    a = bsub.add_parser("app", help="per-request latency of the routing explorer (preprocess, forward, overlay)")
    a.add_argument("--checkpoint", help="default: the shipped checkpoint")
    a.add_argument("--reps", type=int, default=30)
    a.add_argument("--threads", type=int)
    a.add_argument("--json", action="store_true")
    a.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench")
    a.set_defaults(func=_cmd_app)


def _emit(args, kind: str, payload, text: str) -> int:
    """Print a benchmark's table (or JSON) and, with --save, record it with provenance."""
    print(json.dumps(payload, indent=2) if args.json else text)
    if args.save:
        print(f"saved {write_result(kind, payload, args.save)}")
    return 0


def _cmd_app(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    r = bench_app(args.checkpoint, args.reps)
    return _emit(args, "app", r, f"routing explorer, {r['checkpoint']} ({r['threads']} threads, median of "
                                 f"{r['reps']}):\n  request {r['total_ms']:.1f} ms = decode+preprocess "
                                 f"{r['preprocess_ms']:.1f} ms + forward {r['forward_ms']:.1f} ms + overlay "
                                 f"{r['overlay_ms']:.1f} ms")


def _cmd_moe(args) -> int:
    steady_allocator()
    load_note()  # warns on stderr when other processes share the CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(not 1 <= k <= args.num_experts for k in args.top_k):
        raise ValueError(f"--top-k {args.top_k} is invalid: each must be in 1..{args.num_experts}")
    rows = bench_moe(batch=args.batch, tokens=args.tokens, dim=args.dim, expert_hidden=args.expert_hidden,
                     num_experts=args.num_experts, top_ks=args.top_k, dispatches=args.dispatch, shared=args.shared,
                     reps=args.reps, device=args.device, dtype=args.dtype, routers=args.routers)
    return _emit(args, "moe", rows, format_moe_table(rows))


def _thread_list(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use thread counts >= 1, comma-separated, e.g. 1,2")
    return counts


def _cmd_train(args) -> int:
    note = {**load_note(), "allocator": steady_allocator()}
    result = bench_train(model=args.model, dense_model=args.dense_model, moe_layers=args.moe_layers,
                         num_experts=args.num_experts, top_k=args.top_k, batch=args.batch, steps=args.steps,
                         device=args.device, threads=args.threads or default_threads(), compile=args.compile,
                         **({"shared_expert": args.shared_expert} if args.shared_expert != "none" else {}))
    result.update(note)
    return _emit(args, "train", result, format_train(result))


def _cmd_peers(args) -> int:
    allocator = steady_allocator()
    result = bench_peers(batch=args.batch, tokens=args.tokens, dim=args.dim, expert_hidden=args.expert_hidden,
                         num_experts=args.num_experts, top_ks=args.top_k, threads=args.threads,
                         dispatches=args.dispatch, peers=not args.no_peers, reps=args.reps, warmup=args.warmup)
    result["allocator"] = allocator
    return _emit(args, "peers", result, format_peers_table(result))
