"""``python -m workbench bench moe | peers | train | app``: the parsers and commands.

Imports: this package's ``layers``, ``models`` and ``timing``.
"""

import argparse
import json

import torch


from .layers import bench_moe, bench_peers, format_moe_table, format_peers_table
from .models import bench_app, bench_train, format_train
from .timing import PEERS_INSTALL, default_threads, load_note, steady_allocator, write_result


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
    m.add_argument("--quiet", action="store_true",
                   help="no progress bar (by default one on stderr, with the time the rest is expected to take)")
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
                     reps=args.reps, device=args.device, dtype=args.dtype, routers=args.routers,
                     progress=not args.quiet)
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
