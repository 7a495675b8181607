"""``python -m workbench bench moe|train``: what an MoE layer and a ViMoE cost against their dense equivalents.

The reference is always measured in the same run, interleaved with the candidate (A, B, A, B, ...), and reported
as a ratio of medians, so machine load and clock drift affect both sides alike.

* ``bench moe``: one layer, forward + backward, against ``timm.layers.Mlp`` with the *activated* hidden width
  (``top_k * expert_width`` + the shared expert's width).  Memory: on CUDA the peak allocated; on CPU the bytes
  autograd saves for backward (the activation memory a training step holds), which is deterministic.
* ``bench train``: training images/s of the tiny ViMoE against the same dense tiny ViT, and the forward latency
  of one image (what the app pays per request).
"""
from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

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


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype) -> None:
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
              dtype: str | None = None, seed: int = 0) -> list[dict]:
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
                                shared_expert=shared_mode).to(device) for d in dispatches}
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


def _train_step(model, opt, x, y, dtype):
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = F.cross_entropy(model(x).float(), y) + moe_aux_loss(model).to(x.device)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_train(*, model: str = "vimoe_tiny_patch4_28", dense_model: str | None = None, moe_layers: str = "last-3",
                num_experts: int = 8, top_k: int = 1, batch: int = 128, steps: int = 12, warmup: int = 3,
                device: str | None = None, latency_reps: int = 50, compile: bool = False, **model_kwargs) -> dict:
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
    cfg = moe.pretrained_cfg
    x = torch.randn(batch, *cfg["input_size"], device=device)
    y = torch.randint(0, moe.num_classes, (batch,), device=device)
    models = {"moe": moe, "dense": dense}
    if compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    med = time_interleaved({k: (lambda k=k: _train_step(models[k], opts[k], x, y, dtype)) for k in models},
                           steps, warmup, device)
    one = x[:1]
    lat = {}
    for k, m in (("moe", moe), ("dense", dense)):
        m.eval()
    with torch.no_grad():
        lat = time_interleaved({k: (lambda m=m: m(one)) for k, m in (("moe", moe), ("dense", dense))},
                               latency_reps, 5, device)
    return {"model": model, "dense_model": dense_model or f"{model}(moe_layers='none')", "moe_layers": moe_layers,
            "num_experts": num_experts, "top_k": top_k, "batch": batch, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "moe_img_s": round(batch / med["moe"], 1), "dense_img_s": round(batch / med["dense"], 1),
            "throughput_ratio": round(med["dense"] / med["moe"], 3),
            "moe_latency_ms": round(lat["moe"] * 1e3, 2), "dense_latency_ms": round(lat["dense"] * 1e3, 2),
            "params_moe": sum(p.numel() for p in moe.parameters()),
            "params_dense": sum(p.numel() for p in dense.parameters())}


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
    lines = [f"{'top_k':>5} {'shared':<6} {'dispatch':<8} {'ms':>9} {'dense ms':>9} {'ratio':>6} {'mem MB':>8} "
             f"{'dense MB':>8} {'mem x':>6}"]
    for r in rows:
        lines.append(f"{r['top_k']:>5} {r['shared']:<6} {r['dispatch']:<8} {r['ms']:>9.2f} {r['dense_ms']:>9.2f} "
                     f"{r['ratio']:>6.2f} {r['mem_mb']:>8.1f} {r['dense_mem_mb']:>8.1f} {r['mem_ratio']:>6.2f}")
    r = rows[0]
    lines.append(f"({r['batch']} images x {r['tokens']} tokens, d={r['dim']}, expert width {r['expert_hidden']}, "
                 f"E={r['num_experts']}, {r['dtype']} on {r['device']}, {r['threads']} threads, median of {r['reps']}; "
                 "ratio = time / dense FFN of the activated width)")
    return "\n".join(lines)


def format_train(result: dict) -> str:
    r = result
    return (f"training {r['model']} (moe_layers={r['moe_layers']}, E={r['num_experts']}, top-{r['top_k']}) vs "
            f"{r['dense_model']}, batch {r['batch']}, {r['dtype']} on {r['device']} ({r['threads']} threads)\n"
            f"  ViMoE {r['moe_img_s']:.1f} img/s   dense {r['dense_img_s']:.1f} img/s   "
            f"ratio {r['throughput_ratio']:.3f}\n"
            f"  one-image forward latency: ViMoE {r['moe_latency_ms']:.2f} ms   dense {r['dense_latency_ms']:.2f} ms")


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
    m.add_argument("--reps", type=int, default=30)
    m.add_argument("--dtype", choices=["fp32", "bf16"])
    m.add_argument("--device")
    m.add_argument("--threads", type=int)
    m.add_argument("--json", action="store_true")
    m.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench")
    m.set_defaults(func=_cmd_moe)
    t = bsub.add_parser("train", help="training img/s of the tiny ViMoE vs the dense tiny ViT; one-image latency")
    t.add_argument("--model", default="vimoe_tiny_patch4_28")
    t.add_argument("--dense-model", help="timm name of the dense reference (default: the same model, no MoE)")
    t.add_argument("--moe-layers", default="last-3")
    t.add_argument("--num-experts", type=int, default=8)
    t.add_argument("--top-k", type=int, default=1)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--steps", type=int, default=12)
    t.add_argument("--device")
    t.add_argument("--threads", type=int)
    t.add_argument("--compile", action="store_true")
    t.add_argument("--json", action="store_true")
    t.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench")
    t.set_defaults(func=_cmd_train)
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
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(not 1 <= k <= args.num_experts for k in args.top_k):
        raise ValueError(f"--top-k {args.top_k} is invalid: each must be in 1..{args.num_experts}")
    rows = bench_moe(batch=args.batch, tokens=args.tokens, dim=args.dim, expert_hidden=args.expert_hidden,
                     num_experts=args.num_experts, top_ks=args.top_k, dispatches=args.dispatch, shared=args.shared,
                     reps=args.reps, device=args.device, dtype=args.dtype)
    return _emit(args, "moe", rows, format_moe_table(rows))


def _cmd_train(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_train(model=args.model, dense_model=args.dense_model, moe_layers=args.moe_layers,
                         num_experts=args.num_experts, top_k=args.top_k, batch=args.batch, steps=args.steps,
                         device=args.device, compile=args.compile)
    return _emit(args, "train", result, format_train(result))
