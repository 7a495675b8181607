"""``python -m workbench <command>``: train, eval, info (and the commands later modules add: bench, profile, study).

Usage errors (a bad flag, a bad value, a config that does not validate) exit with code 2 and one line naming the
value and what is allowed; a failed run (missing data, unreadable checkpoint, non-finite loss) exits with 1.

Building the parser imports nothing heavy: torch, timm and the command modules are imported inside the command that
needs them (and the bench / profile / study parsers only when that command is asked for), so ``--help`` is quick.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import yaml

DEFAULT_MODEL = "vimoe_tiny_patch4_28"
MOE_FLAGS = {  # flag -> (model kwarg, type, choices, help)
    "--moe-layers": ("moe_layers", str, None,
                     "which blocks get experts: none, all, last-L, first-L, every-N, vmoe-last-L, or block indices "
                     "as 1,3 or '1 3' or '[1, 3]' (negative count from the end) (default: last-2)"),
    "--num-experts": ("num_experts", int, None, "routed experts per MoE layer, >= 1 (default: 8)"),
    "--top-k": ("top_k", int, None, "experts per token, 1 <= top_k <= num_experts (default: 1)"),
    "--shared-expert": ("shared_expert", str, ("none", "add", "gated"),
                        "an always-on expert beside the routed ones (default: none)"),
    "--routing": ("routing", str, ("token", "image"), "route each patch, or one choice per image (default: token)"),
    "--router": ("router", str, ("topk", "experts_choose", "soft"),
                 "who chooses: tokens take their top-k experts, experts take their top-C tokens, or Soft MoE's "
                 "token mixtures per slot (default: topk)"),
    "--capacity-factor": ("capacity_factor", float, None,
                          "tokens per expert as a multiple of the even share, > 0 (default: none, dropless; "
                          "experts_choose: 1.0, the mean experts per token)"),
    "--slots-per-expert": ("slots_per_expert", int, None, "Soft MoE slots per expert and image (default: 1)"),
    "--dispatch": ("dispatch", str, ("grouped", "loop", "einsum"),
                   "how tokens reach experts; same numbers, different cost (default: grouped)"),
}
MOE_LAYERS_FORMS = "give block indices as 1,3 or '1 3' or '[1, 3]', or one of none, all, last-L, first-L, " \
                   "every-N, vmoe-last-L"
_INDEX_LIST = re.compile(r"\s*\[?\s*(-?\d+(?:\s*[,\s]\s*-?\d+)*)?\s*,?\s*\]?\s*")


class UsageError(ValueError):
    """Bad command-line input: exit code 2."""


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_model_args(pairs: list[str], flag: str = "--model-arg", example: str = "drop_path_rate=0.1") -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {pair!r} is invalid: use KEY=VALUE, e.g. {flag} {example}")
        out[key.replace("-", "_")] = _parse_value(value)
    return out


def parse_moe_layers(text):
    """``--moe-layers`` text -> a spec: a list of ints for '1,3', '1 3' or '[1, 3]', else the text (a named spec)."""
    if not isinstance(text, str):
        return text
    match = _INDEX_LIST.fullmatch(text)
    bracketed = text.strip().startswith("[") or text.strip().endswith("]")
    if match and (match.group(1) is not None or bracketed):
        if bracketed and not (text.strip().startswith("[") and text.strip().endswith("]")):
            raise UsageError(f"--moe-layers {text!r} is invalid: {MOE_LAYERS_FORMS}")
        return [int(i) for i in re.split(r"[,\s]+", match.group(1) or "") if i]
    if bracketed or re.fullmatch(r"[\s,\d-]+", text):
        raise UsageError(f"--moe-layers {text!r} is invalid: {MOE_LAYERS_FORMS}")
    return text


def _moe_args(parser: argparse.ArgumentParser) -> None:
    for flag, (_, kind, choices, text) in MOE_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, choices=choices, help=text)
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE", default=[],
                        help="any other model keyword (timm ViT or MoE switch), YAML-typed, e.g. depth=4, "
                             "drop_path_rate=0.1, renormalize=true; repeat the flag for several")


def _model_kwargs(args) -> dict:
    kwargs = parse_model_args(args.model_arg)
    for flag, (key, *_) in MOE_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            kwargs[key] = value
    if "moe_layers" in kwargs:
        kwargs["moe_layers"] = parse_moe_layers(kwargs["moe_layers"])
    return kwargs


def _kind_ok(value, annotation) -> str | None:
    """None if ``value`` fits a plain annotation (int, float, bool, str or a Literal), else what is wanted; other
    annotations (unions, tuples, classes) are left to the model."""
    import typing

    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, annotation)
    if typing.get_origin(kind) is typing.Literal:
        options = typing.get_args(kind)
        return None if value in options else f"one of {', '.join(map(repr, options))}"
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if kind is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if kind is str:
        return None if isinstance(value, str) else "a string"
    return None


def check_model_kwargs(name: str | None, kwargs: dict) -> None:
    """One-line UsageError for an unknown model keyword or one of the wrong type (instead of a traceback from deep
    inside timm).  Checked for the ViT family (``vimoe_*`` and timm's ``vit_*``); other timm models pass through."""
    import inspect

    import timm
    from timm.models.vision_transformer import VisionTransformer

    from .moe import MoEMlp
    from .segmentation import SegViMoE
    from .vimoe import ViMoE

    name = name or DEFAULT_MODEL
    if not timm.is_model(name):
        raise UsageError(f"--model {name!r} is not a timm model: use e.g. {DEFAULT_MODEL} "
                         "(python -c \"import timm, workbench; print(timm.list_models('vimoe_*'))\")")
    entry = timm.models.model_entrypoint(name)
    if entry.__module__ not in ("timm.models.vision_transformer", "workbench.vimoe", "workbench.segmentation"):
        return
    params = {}
    extra = (SegViMoE.__init__,) if entry.__module__ == "workbench.segmentation" else ()
    for fn in (VisionTransformer.__init__, ViMoE.__init__, *extra, MoEMlp.__init__):
        for key, p in inspect.signature(fn).parameters.items():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and key != "self":
                params.setdefault(key, (p.default, p.annotation))
    for key in ("in_features", "hidden_features", "out_features", "num_prefix_tokens", "device", "dtype"):
        params.pop(key, None)  # set by the model itself
    for key, value in kwargs.items():
        if key not in params:
            import difflib

            close = difflib.get_close_matches(key, params, n=1)
            raise UsageError(f"unknown model argument {key!r} (--model-arg or the config's model_kwargs)"
                             + (f"; did you mean {close[0]!r}?" if close else "")
                             + f" ({name} takes: {', '.join(sorted(params))})")
        default, annotation = params[key]
        wanted = _kind_ok(value, annotation)
        if wanted:
            example = str(default).lower() if isinstance(default, bool) else default
            raise UsageError(f"model argument {key}={value!r} is invalid: {key} takes {wanted}, "
                             f"e.g. --model-arg {key}={example}")


def _train_defaults() -> dict:
    """TrainConfig's literal field defaults, read from train.py's source so that ``--help`` need not import torch."""
    tree = ast.parse(Path(__file__).with_name("train.py").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainConfig":
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
                    try:
                        out[stmt.target.id] = ast.literal_eval(stmt.value)
                    except ValueError:
                        pass
    return out


def _clip_grad(text: str) -> float:
    """``--clip-grad``: a max gradient norm; 0, none or off turn clipping off (stored as 0.0)."""
    if text.strip().lower() in ("none", "off"):
        return 0.0
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: use a max gradient norm > 0, or 0 / none "
                                         "to turn clipping off") from None


TRAIN_RANGES = {  # flag destination -> (test, what is allowed)
    "min_lr": (lambda v: v >= 0, "a learning rate >= 0"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "warmup_epochs": (lambda v: v >= 0, "a number of epochs >= 0 (fractions allowed)"),
    "label_smoothing": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "clip_grad": (lambda v: v >= 0, "a max gradient norm > 0, or 0 / none to turn clipping off"),
    "expert_noise": (lambda v: v >= 0, "a std >= 0"),
    "train_subset": (lambda v: v >= 1, "an integer >= 1"),
    "test_subset": (lambda v: v >= 1, "an integer >= 1"),
    "save_every": (lambda v: v >= 0, "an integer >= 0 (0: only at the end of each epoch)"),
    "val_size": (lambda v: v >= 0, "an integer >= 0 (0: no validation split)"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
}


def _check_ranges(args, names) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        test, allowed = TRAIN_RANGES[name]
        if not test(value):
            raise UsageError(f"--{name.replace('_', '-')} {value} is invalid: use {allowed}")


def cmd_train(args) -> int:
    _check_ranges(args, TRAIN_RANGES)  # plain-value checks first: no torch import for a typo
    kwargs = _model_kwargs(args)
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
             "batch_size": args.batch_size, "lr": args.lr, "min_lr": args.min_lr, "weight_decay": args.weight_decay,
             "warmup_epochs": args.warmup_epochs, "label_smoothing": args.label_smoothing,
             "train_subset": args.train_subset, "test_subset": args.test_subset, "seed": args.seed,
             "init_from": args.init_from, "output": args.output, "device": args.device, "save_every": args.save_every,
             "shared_init": args.shared_init, "expert_noise": args.expert_noise}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.clip_grad is not None:
        values["clip_grad"] = args.clip_grad or None  # 0 / none: no clipping
    if args.quiet:
        values["quiet"] = True
    if args.compile:
        values["compile"] = True
    if args.no_amp:
        values["amp"] = False
    if args.no_augment:
        values["augment"] = False
    if getattr(args, "val_size", None) is not None:
        values["val_size"] = args.val_size
    if getattr(args, "eval_at_start", False):
        values["eval_at_start"] = True
    if kwargs:
        values["model_kwargs"] = {**(values.get("model_kwargs") or {}), **kwargs}
    if getattr(args, "data_arg", None):
        options = parse_model_args(args.data_arg, "--data-arg", "train_size=5000")
        values["data_options"] = {**(values.get("data_options") or {}), **options}
    if isinstance(values.get("model_kwargs"), dict):
        from .train import DEFAULT_SEG_MODEL, dataset_task

        name = values.get("model")
        if name is None and not values.get("init_from") and values.get("dataset"):
            try:  # the model the trainer will pick for this dataset: check the keywords against that one
                name = DEFAULT_SEG_MODEL if dataset_task(values["dataset"]) == "segmentation" else None
            except ValueError:
                name = None  # an unknown dataset: TrainConfig says so below
        check_model_kwargs(name, values["model_kwargs"])
    try:
        cfg = TrainConfig.from_dict(values)
        cfg.validate()
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err
    result = train(cfg, resume=args.resume)
    last = result["history"][-1] if result["history"] else {}
    score = (f"test mIoU {last['test_miou']:.4f}, pixel accuracy {last['test_pixel_acc']:.4f}" if "test_miou" in last
             else f"test accuracy {last.get('test_acc', float('nan')):.4f}")
    print(f"done: {score} after {last.get('epoch', 0)} epochs; model in {Path(result['output']) / 'model'}")
    return 0


def cmd_eval(args) -> int:
    if args.test_subset is not None and args.test_subset < 1:
        raise UsageError(f"--test-subset {args.test_subset} is invalid: use an integer >= 1, or leave it out to "
                         "evaluate on the whole test set")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} is invalid: use an integer >= 1")
    from .checkpoint import load_model
    from .data import build_datasets
    from .train import evaluate, resolve_device, Dist, dataset_task, model_task

    device = resolve_device(args.device, Dist())
    model, config = load_model(args.checkpoint, device=device)
    task = model_task(model)
    dataset = args.dataset or ("fmnist-scenes" if task == "segmentation" else "fashion-mnist")
    if dataset_task(dataset) != task:
        raise UsageError(f"{args.checkpoint} is a {task} model ({config['model']}) but --dataset {dataset} is a "
                         f"{dataset_task(dataset)} dataset; evaluate it on a {task} dataset (e.g. --dataset "
                         f"{'fmnist-scenes' if task == 'segmentation' else 'fashion-mnist'})")
    if task == "segmentation":
        from .segdata import build_seg_splits

        options = parse_model_args(args.data_arg, "--data-arg", "num_classes=150")
        _, _, test = build_seg_splits(dataset, root=args.data_root, model=model, test_subset=args.test_subset,
                                      augment=False, **options)
        if test.num_classes > model.num_classes:
            raise UsageError(f"{args.checkpoint} predicts {model.num_classes} classes but {dataset} has "
                             f"{test.num_classes}: evaluate it on the data it was trained on (e.g. --dataset ade "
                             f"--data-root DIR --data-arg num_classes={model.num_classes})")
    else:
        _, test = build_datasets(dataset, root=args.data_root, model=model, test_subset=args.test_subset,
                                 augment=False)
    test.to(device)
    result = evaluate(model, test, batch_size=args.batch_size, device=device, progress=not args.quiet)
    result["checkpoint"], result["model_config"] = str(args.checkpoint), config
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.checkpoint}: {config['model']} on {dataset} ({result['n']} images)")
    if task == "segmentation":
        print(f"mIoU {result['miou']:.4f}   pixel accuracy {result['pixel_acc']:.4f}   loss {result['loss']:.4f}   "
              "(mIoU: mean over classes in the target or the prediction)")
        names = getattr(test, "class_names", None) or model.pretrained_cfg.get("label_names") or []
        print(f"{'class':>5}  {'name':<16}  {'IoU':>6}")
        for c, iou in enumerate(result["iou"]):
            name = names[c] if c < len(names) else str(c)
            print(f"{c:>5}  {name:<16}  {'-' if iou is None else format(iou, '.4f'):>6}")
    else:
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

    kwargs = _model_kwargs(args)
    if getattr(args, "checkpoint", None):
        if kwargs:
            flags = ", ".join(sorted(f"--{k.replace('_', '-')}" for k in kwargs))
            raise UsageError(f"{flags} describe a new model, but --checkpoint {args.checkpoint} is built as it was "
                             "saved: drop them, or drop --checkpoint to build --model with them")
        model, config = load_model(args.checkpoint)
        return model, config["model"]
    check_model_kwargs(args.model, kwargs)
    return timm.create_model(args.model, **kwargs), args.model


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
    D = _train_defaults()

    def dflt(name, note=""):
        value = D.get(name)
        return f" (default: {'none' if value is None else value}{note})"

    parser = _Parser(prog="python -m workbench", description="ViMoE Workbench")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train (or upcycle and fine-tune) a model",
                       description="Train a model, or upcycle a dense checkpoint (--init-from) and fine-tune it. "
                                   "Flags override --config; unset flags keep the config's (or TrainConfig's) "
                                   "default shown here.")
    p.add_argument("--config", help="YAML file of TrainConfig fields; flags override it")
    p.add_argument("--model", help=f"timm model name (default: {DEFAULT_MODEL}; vimoe_seg_micro_patch7_56 for a "
                   "segmentation dataset; or the --init-from checkpoint's)")
    p.add_argument("--dataset", help="fashion-mnist | cifar10 | cifar100 | imagefolder | synthetic, or for "
                   "segmentation (with a vimoe_seg_* model) fmnist-scenes | ade" + dflt("dataset"))
    p.add_argument("--data-root", metavar="DIR",
                   help="folder with the dataset's files (default: $WORKBENCH_DATA, then Debian's dataset package)")
    p.add_argument("--data-arg", action="append", metavar="KEY=VALUE", default=[],
                   help="a segmentation dataset option (workbench.segdata.build_seg_splits), YAML-typed, e.g. "
                        "train_size=5000 or num_classes=150; repeat the flag for several")
    p.add_argument("--epochs", type=int, help="epochs, >= 1" + dflt("epochs"))
    p.add_argument("--batch-size", type=int, help="global batch (split across torchrun processes), >= 1"
                   + dflt("batch_size"))
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW), > 0" + dflt("lr"))
    p.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay, >= 0" + dflt("min_lr"))
    p.add_argument("--warmup-epochs", type=float,
                   help="linear warmup to --lr, in epochs (fractions allowed), >= 0" + dflt("warmup_epochs"))
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay, >= 0" + dflt("weight_decay"))
    p.add_argument("--label-smoothing", type=float, help="in [0, 1)" + dflt("label_smoothing"))
    p.add_argument("--clip-grad", type=_clip_grad, metavar="NORM",
                   help="max gradient norm; 0 or none: no clipping" + dflt("clip_grad"))
    p.add_argument("--train-subset", type=int, metavar="N",
                   help="train on a fixed random N images, >= 1 (default: all)")
    p.add_argument("--test-subset", type=int, metavar="N",
                   help="evaluate on a fixed random N images, >= 1 (default: all)")
    if "val_size" in D:
        p.add_argument("--val-size", type=int, metavar="N",
                       help="hold N training images out as a validation split, >= 0" + dflt("val_size"))
    if "eval_at_start" in D:
        p.add_argument("--eval-at-start", action="store_true",
                       help="also evaluate before the first step (the step-0 accuracy of an upcycled model)")
    p.add_argument("--seed", type=int, help="seed of init, data order, augmentation and noise" + dflt("seed"))
    p.add_argument("--init-from", metavar="PATH",
                   help="dense checkpoint to upcycle: a model folder, .safetensors or checkpoint.pt (default: none, "
                        "train from scratch)")
    p.add_argument("--shared-init", metavar="MODE",
                   help="upcycling only: how the shared expert starts: copy | zero | random | split (see "
                        "workbench.upcycle)" + dflt("shared_init"))
    p.add_argument("--expert-noise", type=float, metavar="STD",
                   help="upcycling only: Gaussian noise on the expert copies (relative to each weight's std), >= 0"
                   + dflt("expert_noise"))
    p.add_argument("--output", metavar="DIR",
                   help="run folder (checkpoint.pt, metrics.jsonl, model/)" + dflt("output"))
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its checkpoint (its config wins, except --epochs, "
                        "--device, --quiet)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N" + dflt("device"))
    p.add_argument("--save-every", type=int, metavar="N",
                   help="also checkpoint every N steps; 0: only at the end of each epoch" + dflt("save_every"))
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA (CPU always runs fp32)")
    p.add_argument("--no-augment", action="store_true", help="no random flips / shifts of training images")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    _moe_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy (segmentation: mIoU, pixel accuracy, per-class IoU) and per-layer "
                       "routing statistics of a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a model folder (model.safetensors + config.json), .safetensors or a run's checkpoint.pt")
    p.add_argument("--dataset", help="the test set (default: fashion-mnist, or fmnist-scenes for a segmentation "
                   "checkpoint)")
    p.add_argument("--data-root", metavar="DIR")
    p.add_argument("--data-arg", action="append", metavar="KEY=VALUE", default=[],
                   help="a segmentation dataset option, as for train (e.g. num_classes=150 for ade)")
    p.add_argument("--test-subset", type=int, metavar="N", help="a fixed random N test images, >= 1 (default: all)")
    p.add_argument("--batch-size", type=int, default=500, help="(default: 500)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="architecture summary: which blocks are MoE, parameters")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default: {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", metavar="PATH", help="summarise a checkpoint's model instead of --model")
    p.add_argument("--json", action="store_true")
    _moe_args(p)
    p.set_defaults(func=cmd_info)

    plain = sub._parser_class
    for name, (module, text) in EXTENSIONS.items():
        if importlib.util.find_spec(module) is not None:
            sub._parser_class = lambda module=module, **kw: _DeferredParser(module=module, **kw)
            sub.add_parser(name, help=text)
    sub._parser_class = plain
    return parser


EXTENSIONS = {  # command -> (module with register_cli, one-line help); the module is imported only when used
    "bench": ("workbench.bench", "speed and memory of MoE layers and ViMoE training vs dense equivalents"),
    "profile": ("workbench.flops", "parameters and activated MACs (per image), dense-equivalent, per block"),
    "study": ("workbench.study", "run a study (configs x seeds, resumable) or print its summary"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block): the problem, and where the allowed values are."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _DeferredParser(_Parser):
    """A subcommand whose module (bench, flops, study: torch, pandas ...) is imported only when the command runs:
    the first parse imports it, lets its ``register_cli`` build the real parser and hands the arguments over."""

    def __init__(self, *a, module: str, **kw):
        super().__init__(*a, add_help=False, **kw)
        self._module, self._real = module, None

    def real(self) -> argparse.ArgumentParser:
        if self._real is None:
            name = self.prog.rsplit(" ", 1)[-1]
            holder = _Parser(prog=self.prog.rsplit(" ", 1)[0])
            importlib.import_module(self._module).register_cli(holder.add_subparsers())
            self._real = holder._subparsers._group_actions[0].choices[name]
        return self._real

    def parse_known_args(self, args=None, namespace=None):
        return self.real().parse_known_args(args, namespace)


def _failures() -> tuple:
    """Exception types of a failed run (exit 1), from the modules that are loaded (none can be raised otherwise)."""
    found = []
    for module, name in (("workbench.checkpoint", "CheckpointError"), ("workbench.data", "DatasetNotFound"),
                         ("workbench.train", "NonFiniteLoss")):
        if module in sys.modules and hasattr(sys.modules[module], name):
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UsageError as err:
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")
    except Exception as err:
        failures = _failures()
        if failures and isinstance(err, failures):
            parser.exit(1, f"{parser.prog} {args.command}: error: {err}\n")
        if isinstance(err, (ValueError, FileExistsError)):
            text = str(err)
            if "moe_layers=" in text:
                text += " (on the command line a list is --moe-layers 1,3 or '1 3' or '[1, 3]')"
            parser.exit(2, f"{parser.prog} {args.command}: error: {text}\n")
        raise


if __name__ == "__main__":
    sys.exit(main())
