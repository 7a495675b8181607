"""``python -m workbench bench moe | peers | split | train | step | matmul | app``: the parsers and commands.

Imports: this package's ``layers``, ``matmul``, ``models``, ``split`` and ``timing``.
"""

import argparse
import json

import torch


from .matmul import bench_matmul, format_matmul
from .layers import MOE_PRESETS, PRESET_RUN, bench_moe, bench_peers, format_moe_table, format_peers_table
from .split import bench_split, format_split
from .models import bench_app, bench_step, bench_train, format_step, format_train
from .timing import PEERS_INSTALL, default_threads, load_note, steady_allocator, write_result


def _parser(sub, name: str, help: str):
    """A bench subcommand whose ``--help`` opens with the one line the command list shows."""
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")


def register_cli(sub) -> None:
    p = sub.add_parser("bench", help="speed and memory of MoE layers and ViMoE training vs dense equivalents")
    bsub = p.add_subparsers(dest="bench", required=True)
    m = _parser(bsub, "moe", help="one MoE layer, forward + backward, vs a dense FFN of the activated width")
    m.add_argument("--preset", nargs="+", choices=sorted(MOE_PRESETS),
                   help="ViT-scale shapes: vit-s16 (d=384) and/or vit-b16 (d=768), 256 images x 197 tokens, h=4d, "
                        "E=8 and 16, top-1 and top-2, bf16, the grouped path only; flags given beside it override")
    m.add_argument("--batch", type=int, help="images (default 128)")
    m.add_argument("--tokens", type=int, help="tokens per image (default 50)")
    m.add_argument("--dim", type=int, help="model width d (default 192)")
    m.add_argument("--expert-hidden", type=int, help="expert width h (default 768)")
    m.add_argument("--num-experts", type=int, nargs="+", help="E, one run per value (default 8)")
    m.add_argument("--top-k", type=int, nargs="+", help="default 1 2")
    m.add_argument("--dispatch", nargs="+", choices=["grouped", "loop", "einsum"],
                   help="default: grouped loop einsum")
    m.add_argument("--shared", nargs="+", choices=["none", "add", "gated"], help="default: none add")
    m.add_argument("--routers", nargs="+", choices=["topk", "experts_choose", "soft"],
                   help="routers to time: top-k (each --dispatch path), experts-choose (capacity factor k), Soft MoE "
                        "(about k x tokens / E slots per expert) (default: all three)")
    m.add_argument("--reps", type=int, default=30, help="timed repetitions; the median is reported (default: %(default)s)")
    m.add_argument("--dtype", choices=["fp32", "bf16"], help="fp32 or bf16 (default: fp32 on CPU, bf16 on CUDA)")
    m.add_argument("--device", help="cpu | cuda (default: cuda if available, else cpu)")
    m.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    m.add_argument("--cpu-matmul", choices=["blas", "onednn"], default="blas",
                   help="library for the fp32 matmuls on the CPU, the dense FFN's and the layers' alike "
                        "(default: %(default)s)")
    m.add_argument("--json", action="store_true", help="print the results as JSON")
    m.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench", help="also write the results as JSON under DIR (default when given alone: %(const)s)")
    m.add_argument("--quiet", action="store_true",
                   help="no progress bar (by default one on stderr, with the time the rest is expected to take)")
    m.set_defaults(func=_cmd_moe)
    st = _parser(bsub, "step", help="one training step of a ViT-scale ViMoE (default ViMoE-S/16) vs the same model "
                                      "without MoE (ViT-S/16): img/s and peak memory, synthetic 224x224 inputs")
    st.add_argument("--model", default="vimoe_small_patch16_224", help="the timm model timed (default: %(default)s)")
    st.add_argument("--moe-layers", default="every-2", help="which blocks get experts (default: %(default)s)")
    st.add_argument("--num-experts", type=int, default=8, help="routed experts per MoE layer (default: %(default)s)")
    st.add_argument("--top-k", type=int, default=1, help="experts per token (default: %(default)s)")
    st.add_argument("--batch", type=int, default=128, help="images (or sequences) per step (default: %(default)s)")
    st.add_argument("--steps", type=int, default=20, help="timed steps (default: %(default)s)")
    st.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: %(default)s)")
    st.add_argument("--img-size", type=int, help="input side (default: the model's, 224); smaller for a dry run")
    st.add_argument("--depth", type=int, help="blocks (default: the model's, 12); fewer for a dry run")
    st.add_argument("--device", help="cpu | cuda (default: cuda if available, else cpu)")
    st.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 elsewhere")
    st.add_argument("--json", action="store_true", help="print the results as JSON")
    st.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench", help="also write the results as JSON under DIR (default when given alone: %(const)s)")
    st.set_defaults(func=_cmd_step)
    t = _parser(bsub, "train", help="training img/s of the tiny ViMoE vs the dense tiny ViT; 1- and 8-image latency")
    t.add_argument("--model", default="vimoe_tiny_patch4_28", help="the timm model timed (default: %(default)s)")
    t.add_argument("--dense-model", help="timm name of the dense reference (default: the same model, no MoE)")
    t.add_argument("--moe-layers", default="last-3", help="which blocks get experts (default: %(default)s)")
    t.add_argument("--num-experts", type=int, default=8, help="routed experts per MoE layer (default: %(default)s)")
    t.add_argument("--top-k", type=int, default=1, help="experts per token (default: %(default)s)")
    t.add_argument("--shared-expert", default="none", choices=["none", "add", "gated"], help="an always-on expert beside the routed ones (default: %(default)s)")
    t.add_argument("--batch", type=int, default=128, help="images (or sequences) per step (default: %(default)s)")
    t.add_argument("--steps", type=int, default=12, help="timed steps (default: %(default)s)")
    t.add_argument("--device", help="cpu | cuda (default: cuda if available, else cpu)")
    t.add_argument("--threads", type=_thread_list, default=None,
                   help="comma-separated thread counts, e.g. 1,2 (default: 1 and all cores)")
    t.add_argument("--compile", action="store_true", help="torch.compile both models before timing training")
    t.add_argument("--cpu-matmul", nargs="+", choices=["blas", "onednn"], default=["blas"],
                   help="CPU matmul libraries to time, both models on each in turn (default: %(default)s)")
    t.add_argument("--json", action="store_true", help="print the results as JSON")
    t.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench", help="also write the results as JSON under DIR (default when given alone: %(const)s)")
    t.set_defaults(func=_cmd_train)
    q = _parser(bsub, "peers", help="MoE layers a user would otherwise pick (transformers, st-moe-pytorch, "
                                      f"mixture-of-experts; {PEERS_INSTALL}) vs this project's dispatch paths")
    q.add_argument("--batch", type=int, default=128, help="images (or sequences) per step (default: %(default)s)")
    q.add_argument("--tokens", type=int, default=50, help="tokens per image (default: %(default)s)")
    q.add_argument("--dim", type=int, default=192, help="token width d (default: %(default)s)")
    q.add_argument("--expert-hidden", type=int, default=768, help="hidden width of each expert (default: %(default)s)")
    q.add_argument("--num-experts", type=int, default=8, help="routed experts per MoE layer (default: %(default)s)")
    q.add_argument("--top-k", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="experts per token (default: %(default)s)")
    q.add_argument("--dispatch", nargs="+", default=["grouped", "loop", "einsum"],
                   choices=["grouped", "loop", "einsum"])
    q.add_argument("--threads", type=_thread_list, default=None,
                   help="comma-separated thread counts, e.g. 1,2 (default: 1 and all cores)")
    q.add_argument("--no-peers", action="store_true", help="only this project's dispatch paths")
    q.add_argument("--reps", type=int, default=10, help="timed repetitions; the median is reported (default: %(default)s)")
    q.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    q.add_argument("--json", action="store_true", help="print the results as JSON")
    q.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench", help="also write the results as JSON under DIR (default when given alone: %(const)s)")
    q.set_defaults(func=_cmd_peers)
    sp = _parser(bsub, "split", help="where one MoE layer's fwd+bwd time goes beyond its dense FFN's: the expert "
                                       "matmuls, moving rows, routing")
    sp.add_argument("--batch", type=int, default=128, help="images (default: %(default)s)")
    sp.add_argument("--tokens", type=int, default=50, help="tokens per image (default: %(default)s)")
    sp.add_argument("--dim", type=int, default=192, help="token width d (default: %(default)s)")
    sp.add_argument("--expert-hidden", type=int, default=768, help="hidden width of each expert (default: %(default)s)")
    sp.add_argument("--num-experts", type=int, default=8, help="routed experts (default: %(default)s)")
    sp.add_argument("--top-k", type=int, nargs="+", default=[1], help="experts per token (default: %(default)s)")
    sp.add_argument("--threads", type=_thread_list, default=None,
                    help="comma-separated CPU thread counts (default: 1 and all cores)")
    sp.add_argument("--reps", type=int, default=15, help="timed rounds; the median is reported (default: %(default)s)")
    sp.add_argument("--json", action="store_true", help="print the results as JSON")
    sp.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench", help="also write the results as JSON under DIR (default when given alone: %(const)s)")
    sp.set_defaults(func=_cmd_split)
    mm = _parser(bsub, "matmul", help="one expert's matmul per token row as the rows per expert shrink (what a "
                                        "small batch pays), per CPU matmul library")
    mm.add_argument("--rows", type=_row_list, default=[1, 2, 4, 6, 8, 16, 32, 50],
                    help="comma-separated row counts (default: 1,2,4,6,8,16,32,50)")
    mm.add_argument("--dim", type=int, default=192, help="model width d (default: %(default)s)")
    mm.add_argument("--expert-hidden", type=int, default=768, help="expert width h (default: %(default)s)")
    mm.add_argument("--num-experts", type=int, default=8, help="experts whose weights are cycled (default: %(default)s)")
    mm.add_argument("--cpu-matmul", nargs="+", choices=["blas", "onednn"], default=["blas", "onednn"],
                    help="libraries to time (default: both)")
    mm.add_argument("--reps", type=int, default=200, help="timed rounds; the median is reported (default: %(default)s)")
    mm.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    mm.add_argument("--json", action="store_true", help="print the results as JSON")
    mm.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench", help="also write the results as JSON under DIR (default when given alone: %(const)s)")
    mm.set_defaults(func=_cmd_matmul)
    a = _parser(bsub, "app", help="per-request latency of the routing explorer (preprocess, forward, overlay)")
    a.add_argument("--checkpoint", help="default: the shipped checkpoint")
    a.add_argument("--reps", type=int, default=30, help="timed repetitions; the median is reported (default: %(default)s)")
    a.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    a.add_argument("--json", action="store_true", help="print the results as JSON")
    a.add_argument("--save", metavar="DIR", nargs="?", const="experiments/results/bench", help="also write the results as JSON under DIR (default when given alone: %(const)s)")
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


MOE_DEFAULTS = {"batch": 128, "tokens": 50, "dim": 192, "expert_hidden": 768, "num_experts": [8], "top_k": [1, 2],
                "dtype": None, "dispatch": ["grouped", "loop", "einsum"], "shared": ["none", "add"],
                "routers": ["topk", "experts_choose", "soft"]}


def _cmd_moe(args) -> int:
    steady_allocator()
    load_note()  # warns on stderr when other processes share the CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for preset in args.preset or [None]:
        given = {k: getattr(args, k) for k in MOE_DEFAULTS if getattr(args, k) is not None}
        cfg = {**MOE_DEFAULTS, **(PRESET_RUN if preset else {}), **MOE_PRESETS.get(preset, {}), **given}
        for name in ("batch", "tokens", "dim", "expert_hidden"):
            if cfg[name] < 1:
                raise ValueError(f"--{name.replace('_', '-')} {cfg[name]} is invalid: use an integer >= 1")
        for num_experts in cfg["num_experts"]:
            if num_experts < 1 or any(not 1 <= k <= num_experts for k in cfg["top_k"]):
                raise ValueError(f"--top-k {cfg['top_k']} with --num-experts {num_experts} is invalid: each top-k "
                                 f"must be in 1..{num_experts}")
            block = bench_moe(batch=cfg["batch"], tokens=cfg["tokens"], dim=cfg["dim"],
                              expert_hidden=cfg["expert_hidden"], num_experts=num_experts, top_ks=cfg["top_k"],
                              dispatches=cfg["dispatch"], shared=cfg["shared"], reps=args.reps, device=args.device,
                              dtype=cfg["dtype"], routers=cfg["routers"], progress=not args.quiet,
                              cpu_matmul=args.cpu_matmul)
            for row in block:
                row["preset"] = preset
            rows.append(block)
    text = "\n".join((f"preset {b[0]['preset']}, E={b[0]['num_experts']}:\n" if b[0]["preset"] else "")
                     + format_moe_table(b) for b in rows)
    return _emit(args, "moe", [r for b in rows for r in b], text)


def _cmd_step(args) -> int:
    note = load_note() if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu" else {}
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--batch {args.batch} / --steps {args.steps} / --warmup {args.warmup} is invalid: use "
                         "batch and steps >= 1, warmup >= 0")
    extra = {k: v for k, v in (("img_size", args.img_size), ("depth", args.depth)) if v is not None}
    result = bench_step(model=args.model, moe_layers=args.moe_layers, num_experts=args.num_experts, top_k=args.top_k,
                        batch=args.batch, steps=args.steps, warmup=args.warmup, device=args.device, dtype=args.dtype,
                        **extra)
    result.update(note)
    return _emit(args, "step", result, format_step(result))


def _positive_ints(what: str, example: str):
    """An argparse type: comma-separated integers >= 1 (``what`` and ``example`` name them in the error)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.replace(" ", ",").split(",") if v]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: use {what} >= 1, comma-separated, e.g. {example}")
        return values
    return parse


_thread_list = _positive_ints("thread counts", "1,2")
_row_list = _positive_ints("row counts", "1,6,50")


def _cmd_train(args) -> int:
    note = {**load_note(), "allocator": steady_allocator()}
    result = bench_train(model=args.model, dense_model=args.dense_model, moe_layers=args.moe_layers,
                         num_experts=args.num_experts, top_k=args.top_k, batch=args.batch, steps=args.steps,
                         device=args.device, threads=args.threads or default_threads(), compile=args.compile,
                         cpu_matmuls=args.cpu_matmul,
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


def _cmd_matmul(args) -> int:
    note = load_note()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("dim", "expert_hidden", "num_experts", "reps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: use an integer >= 1")
    result = bench_matmul(rows=args.rows, dim=args.dim, hidden=args.expert_hidden, num_experts=args.num_experts,
                          backends=args.cpu_matmul, reps=args.reps)
    result.update(note)
    return _emit(args, "matmul", result, format_matmul(result))



def _cmd_split(args) -> int:
    note = {**load_note(), "allocator": steady_allocator()}
    for name in ("batch", "tokens", "dim", "expert_hidden", "num_experts", "reps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: use an integer >= 1")
    if any(not 1 <= k <= args.num_experts for k in args.top_k):
        raise ValueError(f"--top-k {args.top_k} with --num-experts {args.num_experts} is invalid: each top-k must be "
                         f"in 1..{args.num_experts}")
    result = bench_split(batch=args.batch, tokens=args.tokens, dim=args.dim, expert_hidden=args.expert_hidden,
                         num_experts=args.num_experts, top_ks=args.top_k, threads=args.threads, reps=args.reps)
    result.update(note)
    return _emit(args, "split", result, format_split(result))
