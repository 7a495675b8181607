"""``python -m workbench train | eval | info``: their parsers and commands.

Imports at import time: the standard library, yaml and ``workbench.models.args`` (no torch, so ``--help`` is
quick); the trainer, checkpoints and data inside the commands.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
from pathlib import Path

import yaml

from ..models.args import (DEFAULT_MODEL, UsageError, add_moe_args, check_model_kwargs, model_kwargs_from_args,
                           parse_model_args)


def _train_defaults() -> dict:
    """TrainConfig's literal field defaults, read from config.py's source so that ``--help`` need not import torch."""
    tree = ast.parse(Path(__file__).with_name("config.py").read_text())
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
    "test_every": (lambda v: v >= 1, "an integer >= 1 (1: every epoch)"),
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
    kwargs = model_kwargs_from_args(args)
    from .config import TrainConfig
    from .trainer import train

    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise UsageError(f"--config {path} is not valid YAML ({problem}{at}): fix the file, a mapping of "
                             "TrainConfig fields such as 'epochs: 10'") from None
        if not isinstance(values, dict):
            raise UsageError(f"--config {path} must hold a mapping of TrainConfig fields (e.g. 'epochs: 10'), not "
                             f"{type(values).__name__}")
    flags = {"model": args.model, "dataset": args.dataset, "data_root": args.data_root, "epochs": args.epochs,
             "batch_size": args.batch_size, "lr": args.lr, "min_lr": args.min_lr, "weight_decay": args.weight_decay,
             "warmup_epochs": args.warmup_epochs, "label_smoothing": args.label_smoothing,
             "train_subset": args.train_subset, "test_subset": args.test_subset, "seed": args.seed,
             "init_from": args.init_from, "output": args.output, "device": args.device, "save_every": args.save_every,
             "test_every": args.test_every, "shared_init": args.shared_init, "expert_noise": args.expert_noise}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.clip_grad is not None:
        values["clip_grad"] = args.clip_grad or None  # 0 / none: no clipping
    if args.quiet:
        values["quiet"] = True
    if args.no_tensorboard:
        values["tensorboard"] = False
    if args.tensorboard_dir:
        values["tensorboard_dir"] = args.tensorboard_dir
    if args.compile:
        values["compile"] = True
    if args.cpu_matmul:
        values["cpu_matmul"] = args.cpu_matmul
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
    if values.get("model") is not None and not isinstance(values.get("model_kwargs"), dict):
        check_model_kwargs(values["model"], {})  # a model timm does not know: one line naming --model
    if isinstance(values.get("model_kwargs"), dict):
        from .config import DEFAULT_SEG_MODEL, dataset_task

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
    if args.resume and not (Path(cfg.output) / "checkpoint.pt").is_file():
        raise UsageError(f"--resume: {cfg.output} holds no checkpoint.pt to continue (a typo in --output?); drop "
                         "--resume to start a new run there")
    result = train(cfg, resume=args.resume, given=set(values))
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun the main process speaks for the run
    last = result["history"][-1] if result["history"] else {}
    score = (f"test mIoU {last['test_miou']:.4f}, pixel accuracy {last['test_pixel_acc']:.4f}" if "test_miou" in last
             else f"test accuracy {last.get('test_acc', float('nan')):.4f}")
    epochs = last.get('epoch', 0)
    print(f"done: {score} after {epochs} epoch{'' if epochs == 1 else 's'}; model in {Path(result['output']) / 'model'}")
    return 0


def cmd_eval(args) -> int:
    if args.test_subset is not None and args.test_subset < 1:
        raise UsageError(f"--test-subset {args.test_subset} is invalid: use an integer >= 1, or leave it out to "
                         "evaluate on the whole test set")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} is invalid: use an integer >= 1")
    if args.device not in ("auto", "cpu", "cuda") and not str(args.device).startswith("cuda:"):
        raise UsageError(f"--device {args.device!r} is invalid: use auto, cpu, cuda or cuda:N")
    from ..data.classification import build_datasets
    from .checkpoint import load_model
    from .config import dataset_task, model_task
    from .distributed import Dist, resolve_device
    from .metrics import evaluate

    device = resolve_device(args.device, Dist())
    model, config = load_model(args.checkpoint, device=device)
    task = model_task(model)
    dataset = args.dataset or ("fmnist-scenes" if task == "segmentation" else "fashion-mnist")
    if dataset_task(dataset) != task:
        raise UsageError(f"{args.checkpoint} is a {task} model ({config['model']}) but --dataset {dataset} is a "
                         f"{dataset_task(dataset)} dataset; evaluate it on a {task} dataset (e.g. --dataset "
                         f"{'fmnist-scenes' if task == 'segmentation' else 'fashion-mnist'})")
    if task == "segmentation":
        from ..data.scenes import build_seg_splits

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


def cmd_info(args) -> int:
    from .checkpoint import architecture_summary

    from .checkpoint import model_from_args, pruned_line

    model, name, config = model_from_args(args, with_config=True)
    rows = architecture_summary(model)
    total = sum(p.numel() for p in model.parameters())
    pruned = (config or {}).get("pruned")
    if args.json:
        print(json.dumps({"model": name, "params": total, "blocks": rows, **({"pruned": pruned} if pruned else {})},
                         indent=2))
        return 0
    print(f"{name}: {total:,} parameters; MoE blocks {[r['block'] for r in rows if r['ffn'] == 'moe']}")
    if pruned:
        print(pruned_line(pruned))
    print(f"{'block':>5}  {'ffn':<5}  {'experts':>7}  {'top_k':>5}  {'shared':<6}  {'params':>10}")
    for r in rows:
        print(f"{r['block']:>5}  {r['ffn']:<5}  {r['experts']!s:>7}  {r['top_k']!s:>5}  {r['shared']:<6}  "
              f"{r['params']:>10,}")
    source = f"--checkpoint {args.checkpoint}" if args.checkpoint else f"--model {name} (and the same MoE flags)"
    print(f"(activated parameters and MACs per image, per block: python -m workbench profile {source})")
    return 0


def register_cli(sub) -> None:
    """Adds ``train``, ``eval`` and ``info`` to the top-level subparsers ``sub``."""
    D = _train_defaults()

    def dflt(name, note=""):
        value = D.get(name)
        return f" (default: {'none' if value is None else value}{note})"

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
                   help="a segmentation dataset option (workbench.data.scenes.build_seg_splits), YAML-typed, e.g. "
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
                   help="continue the run in --output from its checkpoint, as it was planned: its saved config "
                        "wins, and only flags given now change it (each change is printed). A run in progress may "
                        "change --epochs (e.g. to extend it), --lr, --min-lr, --warmup-epochs, --weight-decay, "
                        "--label-smoothing, --clip-grad, --device, --no-amp, --compile, --cpu-matmul, --save-every, "
                        "--test-every, --data-root; "
                        "a change of the model, the data (dataset, subsets, split, augmentation), --batch-size, "
                        "--seed or --init-from is refused. Ctrl-C or SIGTERM saves a checkpoint at the current "
                        "step and prints this command; a second Ctrl-C stops at once")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N" + dflt("device"))
    p.add_argument("--save-every", type=int, metavar="N",
                   help="also checkpoint every N steps; 0: only at the end of each epoch" + dflt("save_every"))
    p.add_argument("--test-every", type=int, metavar="N",
                   help="score the test split after every N-th epoch and after the last (the validation split, "
                        "when there is one, every epoch; training is the same either way)" + dflt("test_every"))
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cpu-matmul", choices=["blas", "onednn"],
                   help="library for the CPU's fp32 matmuls: blas (torch's MKL; the default, which the recorded "
                        "runs used) or onednn (1.5-1.6x faster training on one thread of an AMD EPYC whose AVX-512 "
                        "MKL does not use; agrees to fp32 rounding, not bit for bit)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA (CPU always runs fp32)")
    p.add_argument("--no-augment", action="store_true", help="no random flips / shifts of training images")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="no TensorBoard event files (default: written beside metrics.jsonl, for tensorboard --logdir)")
    p.add_argument("--tensorboard-dir", metavar="DIR", help="write the TensorBoard event files here instead")
    add_moe_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy (segmentation: mIoU, pixel accuracy, per-class IoU) and per-layer "
                       "routing statistics of a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a model folder (model.safetensors + config.json), .safetensors, a run's checkpoint.pt "
                        "or a run folder (its model/)")
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
    add_moe_args(p)
    p.set_defaults(func=cmd_info)
