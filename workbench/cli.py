"""``python -m workbench <command>``: train, eval, info (and the commands later modules add: bench, profile, study).

Usage errors (a bad flag, a bad value, a config that does not validate) exit with code 2 and one line naming the
value and what is allowed; a failed run (missing data, unreadable checkpoint, non-finite loss) exits with 1.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

MOE_FLAGS = {  # flag -> (model kwarg, type)
    "--moe-layers": ("moe_layers", str), "--num-experts": ("num_experts", int), "--top-k": ("top_k", int),
    "--shared-expert": ("shared_expert", str), "--routing": ("routing", str),
    "--capacity-factor": ("capacity_factor", float), "--dispatch": ("dispatch", str),
}


class UsageError(ValueError):
    """Bad command-line input: exit code 2."""


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_model_args(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-arg {pair!r} is invalid: use KEY=VALUE, e.g. --model-arg drop_path_rate=0.1")
        out[key.replace("-", "_")] = _parse_value(value)
    return out


def _moe_args(parser: argparse.ArgumentParser) -> None:
    for flag, (_, kind) in MOE_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None)
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE", default=[],
                        help="any other model keyword (timm ViT or MoE switch), YAML-typed")


def _model_kwargs(args) -> dict:
    kwargs = parse_model_args(args.model_arg)
    for flag, (key, _) in MOE_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            kwargs[key] = value
    layers = kwargs.get("moe_layers")
    if isinstance(layers, str) and re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*", layers):  # "1" or "0,3,-1"
        kwargs["moe_layers"] = [int(i) for i in layers.split(",")]
    return kwargs


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise UsageError(f"--config {path} must hold a mapping of TrainConfig fields")
    flags = {"model": args.model, "dataset": args.dataset, "data_root": args.data_root, "epochs": args.epochs,
             "batch_size": args.batch_size, "lr": args.lr, "train_subset": args.train_subset,
             "test_subset": args.test_subset, "seed": args.seed, "init_from": args.init_from, "output": args.output,
             "device": args.device, "save_every": args.save_every, "shared_init": args.shared_init}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.quiet:
        values["quiet"] = True
    if args.compile:
        values["compile"] = True
    if args.no_amp:
        values["amp"] = False
    kwargs = _model_kwargs(args)
    if kwargs:
        values["model_kwargs"] = {**values.get("model_kwargs", {}), **kwargs}
    try:
        cfg = TrainConfig.from_dict(values)
        cfg.validate()
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err
    result = train(cfg, resume=args.resume)
    last = result["history"][-1] if result["history"] else {}
    print(f"done: test accuracy {last.get('test_acc', float('nan')):.4f} after {last.get('epoch', 0)} epochs; "
          f"model in {Path(result['output']) / 'model'}")
    return 0


def cmd_eval(args) -> int:
    from .checkpoint import load_model
    from .data import build_datasets
    from .train import evaluate, resolve_device, Dist

    device = resolve_device(args.device, Dist())
    model, config = load_model(args.checkpoint, device=device)
    _, test = build_datasets(args.dataset, root=args.data_root, model=model, test_subset=args.test_subset,
                             augment=False)
    test.to(device)
    result = evaluate(model, test, batch_size=args.batch_size, device=device)
    result["checkpoint"], result["model_config"] = str(args.checkpoint), config
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.checkpoint}: {config['model']} on {args.dataset} ({result['n']} images)")
    print(f"accuracy {result['acc']:.4f}   loss {result['loss']:.4f}")
    if result["moe"]:
        print(f"{'block':>5}  {'load CV':>8}  {'drop':>6}  expert load shares")
        for block, stats in result["moe"].items():
            shares = " ".join(f"{s:.3f}" for s in stats["load"])
            print(f"{block:>5}  {stats['load_cv']:>8.3f}  {stats['drop_rate']:>6.3f}  {shares}")
    return 0


def model_from_args(args):
    """(model, name): the model of ``--checkpoint`` if given, else ``--model`` built with the MoE flags."""
    import timm

    import workbench  # noqa: F401
    from .checkpoint import load_model

    if getattr(args, "checkpoint", None):
        model, config = load_model(args.checkpoint)
        return model, config["model"]
    return timm.create_model(args.model, **_model_kwargs(args)), args.model


def cmd_info(args) -> int:
    from .checkpoint import architecture_summary

    model, name = model_from_args(args)
    rows = architecture_summary(model)
    total = sum(p.numel() for p in model.parameters())
    if args.json:
        print(json.dumps({"model": name, "params": total, "blocks": rows}, indent=2))
        return 0
    print(f"{name}: {total:,} parameters; MoE blocks {[r['block'] for r in rows if r['ffn'] == 'moe']}")
    print(f"{'block':>5}  {'ffn':<5}  {'experts':>7}  {'top_k':>5}  {'shared':<6}  {'params':>10}")
    for r in rows:
        print(f"{r['block']:>5}  {r['ffn']:<5}  {r['experts']!s:>7}  {r['top_k']!s:>5}  {r['shared']:<6}  "
              f"{r['params']:>10,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="ViMoE Workbench")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or upcycle and fine-tune) a model")
    p.add_argument("--config", help="YAML file of TrainConfig fields; flags override it")
    p.add_argument("--model", help="timm model name (default vimoe_tiny_patch4_28)")
    p.add_argument("--dataset", help="fashion-mnist | cifar10 | cifar100 | imagefolder | synthetic")
    p.add_argument("--data-root")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--train-subset", type=int)
    p.add_argument("--test-subset", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--init-from", help="dense checkpoint to upcycle (folder, .safetensors or .pt)")
    p.add_argument("--shared-init", choices=["copy", "zero", "random"])
    p.add_argument("--output", help="run folder (checkpoint.pt, metrics.jsonl, model/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--save-every", type=int, help="also checkpoint every N steps")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--quiet", action="store_true")
    _moe_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy and per-layer routing statistics of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root")
    p.add_argument("--test-subset", type=int)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="architecture summary: which blocks are MoE, parameters")
    p.add_argument("--model", default="vimoe_tiny_patch4_28")
    p.add_argument("--checkpoint")
    p.add_argument("--json", action="store_true")
    _moe_args(p)
    p.set_defaults(func=cmd_info)

    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Commands defined next to the code they run (bench, profile, study), when present."""
    found = []
    for module in ("workbench.bench", "workbench.flops", "workbench.study"):
        try:
            mod = __import__(module, fromlist=["register_cli"])
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        found.append(mod.register_cli)
    return found


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DatasetNotFound
    from .train import NonFiniteLoss

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")
    except (ValueError, FileExistsError) as err:
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")
    except (DatasetNotFound, CheckpointError, NonFiniteLoss) as err:
        parser.exit(1, f"{parser.prog} {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
