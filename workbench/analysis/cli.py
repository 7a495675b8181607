"""``python -m workbench profile | prune | card``: parameters and activated MACs of a model or checkpoint, per block;
a pruned copy of a checkpoint (MoE layers made dense, or experts pruned or merged), optionally fine-tuned; a
checkpoint's model card (its facts and, per MoE layer, the random-router verdict, cached beside the weights).

Imports: ``workbench.models.args`` at import time; ``.flops``, ``.prune``, ``workbench.data`` and
``workbench.train`` inside the commands.
"""
from __future__ import annotations

from ..models.args import add_moe_args


def register_cli(sub) -> None:
    p = sub.add_parser("profile", help="parameters and activated MACs (per image), dense-equivalent, per block")
    p.add_argument("--model", default="vimoe_tiny_patch4_28",
                   help="a timm model name, built with the MoE switches below (default: vimoe_tiny_patch4_28)")
    p.add_argument("--checkpoint", help="profile a checkpoint's model instead of --model")
    p.add_argument("--json", action="store_true", help="print the profile as JSON (params, GMACs, per-layer rows)")
    add_moe_args(p)
    p.set_defaults(func=_cmd_profile)
    q = sub.add_parser("prune", help="prune a ViMoE checkpoint: MoE layers back to dense, or every MoE layer to M "
                                     "experts (frequency, REAP, M-SMoE merge, HC-SMoE cluster), optionally fine-tuned")
    q.add_argument("--checkpoint", required=True, metavar="PATH", help="a ViMoE model folder or run folder")
    q.add_argument("--method", required=True,
                   choices=("densify", "reinit", "frequency", "reap", "merge", "cluster", "random"),
                   help="densify: --layers back to dense FFNs (experts merged); reinit: --layers replaced by fresh "
                        "dense FFNs (--seed; the control for densify + --finetune-epochs); the others: every MoE "
                        "layer to --keep-experts "
                        "(random: the baseline, experts drawn with --seed)")
    q.add_argument("--seed", type=int, default=0,
                   help="the draw of --method random, the init of reinit, the fine-tune's data order (default: 0)")
    q.add_argument("--layers", metavar="BLOCKS", help="densify / reinit: MoE blocks to make dense, e.g. 4 or 4,5")
    q.add_argument("--keep-experts", type=int, metavar="M", help="expert-level methods: experts left per layer")
    q.add_argument("--calibration", default="val", choices=("val",),
                   help="where experts are chosen: the validation split (never the test set) (default: val)")
    q.add_argument("--calibration-images", type=int, default=2000, metavar="N", help="(default: 2000)")
    q.add_argument("--dataset", help="the data the checkpoint was trained on (default: the dataset and data "
                   "options in its train config, else fashion-mnist); its validation split calibrates and its test "
                   "split scores")
    q.add_argument("--data-root", metavar="DIR")
    q.add_argument("--val-size", type=int, metavar="N",
                   help="images held out of the training set as the validation split (default: the checkpoint's "
                        "own, else 10000, as the studies)")
    q.add_argument("--test-subset", type=int, metavar="N", help="score on a fixed random N test images")
    q.add_argument("--val-subset", type=int, metavar="N",
                   help="report val acc on a fixed random N validation images (default: the whole split; the "
                        "experts are still chosen on --calibration-images)")
    q.add_argument("--finetune-epochs", type=int, default=0, metavar="N",
                   help="fine-tune the pruned model N epochs on the training split (default: 0, none)")
    q.add_argument("--finetune-lr", type=float, default=1e-4, help="peak lr of that fine-tune (default: 1e-4)")
    q.add_argument("--train-subset", type=int, metavar="N", help="fine-tune on a fixed random N training images")
    q.add_argument("--output", required=True, metavar="DIR", help="folder for the pruned model (model.safetensors + "
                   "config.json, loadable by eval, info and the app)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the model already in --output (without it, an --output holding one is refused)")
    q.add_argument("--json", action="store_true", help="print the before/after rows as JSON")
    q.set_defaults(func=_cmd_prune)
    c = sub.add_parser("card", help="a checkpoint's model card: facts and, per MoE layer, whether its routing beats "
                                    "random routers (computed once, cached as model_card.json beside the weights)")
    c.add_argument("--checkpoint", required=True, metavar="PATH", help="a model folder, run folder or weights file")
    c.add_argument("--draws", type=int, default=None, help="random routers per layer (default: 100)")
    c.add_argument("--images", type=int, default=None, metavar="N",
                   help="first N validation images (default: 2,000 for classifiers, 1,000 for segmentation)")
    c.add_argument("--json", action="store_true", help="print the card as JSON")
    c.set_defaults(func=_cmd_card)


def _cmd_profile(args) -> int:
    import json

    from ..train.checkpoint import model_from_args
    from .flops import profile

    model, name = model_from_args(args)
    prof = profile(model)
    if args.json:
        print(json.dumps({"model": name, **prof.summary(), "blocks": prof.blocks.to_dict("records")}, indent=2))
        return 0
    s = prof.summary()
    print(f"{name}  (MACs per image, input {tuple(s['input_size'])}; FLOPs = 2 x MACs)")
    print(f"  params        {s['params']:>14,}   dense-equivalent {s['dense_params']:>14,}   x{s['params_x']}")
    print(f"  active/token  {s['active_params']:>14,}")
    print(f"  GMACs         {s['gmacs']:>14.4f}   dense-equivalent {s['dense_gmacs']:>14.4f}   x{s['macs_x']}")
    table = prof.blocks[["block", "kind", "params", "active_params", "attn_macs", "ffn_macs", "router_macs",
                         "shared_macs", "macs"]].copy()
    for col in ("attn_macs", "ffn_macs", "router_macs", "shared_macs", "macs"):
        table[col] = (table[col] / 1e6).round(3)
    print(table.rename(columns=lambda c: c.replace("_macs", " MMACs")).to_string(index=False))
    return 0


def _cmd_card(args) -> int:
    import json
    from pathlib import Path

    from ..models.args import UsageError
    from .card import DRAWS, CardUnavailable, model_card

    if not Path(args.checkpoint).exists():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file or folder (the shipped ones are in "
                         "experiments/checkpoints/)")
    if (args.draws is not None and args.draws < 10) or (args.images is not None and args.images < 100):
        raise UsageError("--draws >= 10 and --images >= 100, please (fewer cannot reach p < 0.05 after Holm)")
    try:
        card = model_card(args.checkpoint, draws=args.draws or DRAWS, max_images=args.images)
    except CardUnavailable as err:
        raise UsageError(str(err)) from None
    if args.json:
        print(json.dumps(card, indent=1))
        return 0
    f = card["facts"]
    print(f"{card['checkpoint']}: {f['model']}, {f['task']}, {f['blocks']} blocks, d={f['embed_dim']}, "
          f"{f['params']:,} params")
    if not f["moe_blocks"]:
        print("dense: no MoE layers, no routing to test")
        return 0
    print(f"MoE blocks {', '.join(map(str, f['moe_blocks']))}: {f['num_experts']} experts, top-{f['top_k']}, "
          f"router {f['router']}, {f['routing']} routing, shared expert {f['shared_expert'] or 'none'}")
    t = card["test"]
    print(f"random-router test: {t['draws']} random routers per layer, {t['images']} images of the {t['split']}, "
          f"Holm across layers (alpha {t['alpha']})" + ("; these images were in its training set" if
                                                        t.get("seen_in_training") else "")
          + (f"; its experts were chosen ({t['pruned_by']}) on the first {t['chosen_on']:,} of them"
             if t.get("chosen_on") else ""))
    for block, v in sorted(card["layers"].items(), key=lambda kv: int(kv[0])):
        verdict = "specialised" if v.get("specialised") else "not distinguishable from random routers"
        print(f"  block {block}: NMI {v['nmi']:.4f} vs random {v['random_nmi']:.4f}, Holm p {v['p_holm']:.3f}: "
              f"{verdict}")
    print("(cached as model_card.json beside the weights; changed weights are tested again)")
    return 0


def _cmd_prune(args) -> int:
    import json
    import sys
    from pathlib import Path

    from ..models.args import UsageError, parse_moe_layers

    layer_level = args.method in ("densify", "reinit")
    if layer_level and args.keep_experts is not None:
        raise UsageError(f"--keep-experts is for the expert-level methods; {args.method} takes --layers")
    if not layer_level and args.layers:
        raise UsageError(f"--layers is for --method densify or reinit; {args.method} prunes every MoE layer to "
                         "--keep-experts")
    if (args.calibration_images < 1 or args.finetune_epochs < 0 or not args.finetune_lr > 0
            or (args.val_subset is not None and args.val_subset < 1)):
        raise UsageError("--calibration-images >= 1, --val-subset >= 1, --finetune-epochs >= 0 and --finetune-lr > 0, "
                         "please")
    layers = parse_moe_layers(args.layers) if args.layers else None
    if args.layers and not isinstance(layers, list):
        raise UsageError(f"--layers {args.layers!r} is invalid: give block indices, e.g. --layers 4,5")
    from ..data.splits import build_eval_splits
    from ..train.checkpoint import load_model, save_model
    from ..train.metrics import evaluate
    from .flops import profile
    from .prune import PruneError, calibrate, check_request, prune

    model, config = load_model(args.checkpoint)
    try:  # the request against the model, before any data is read
        check_request(model, args.method, keep=args.keep_experts, layers=layers)
    except PruneError as err:
        raise UsageError(str(err)) from None
    check_output(args, layers)
    trained = config.get("train_config") or {}
    if args.dataset is None:  # the data it was trained on, with that data's options (a scenes dataset's size)
        args.dataset = trained.get("dataset") or "fashion-mnist"
    options = trained.get("data_options") if args.dataset == trained.get("dataset") else None
    if args.val_size is None:
        args.val_size = trained.get("val_size") or 10000
    check_task(model, args.dataset)
    trained_val = (trained.get("val_size") or 0,
                   ((config.get("pretrain") or {}).get("train_config") or {}).get("val_size"))
    if any(v is not None and v != args.val_size for v in trained_val) or not trained_val[0]:
        print(f"note: {args.checkpoint} was not trained with --val-size {args.val_size} held out (its train config: "
              f"val_size {trained_val[0] or 0}), so its 'val acc' below is on images it trained on and the "
              "experts are chosen on them; the test accuracy is the held-out number", file=sys.stderr)
    _, val, test = build_eval_splits(args.dataset, val_size=args.val_size, root=args.data_root, model=model,
                                     test_subset=args.test_subset, data_options=options)
    if args.method == "densify":  # the merge weighs experts by their use on the validation split
        from .routing import collect_routing

        calib = {"_stats": collect_routing(model, val, progress=False)}
    elif args.method == "reinit":  # nothing is chosen from data
        calib = None
    else:
        calib = calibrate(model, val, max_images=args.calibration_images)
    try:
        pruned, new_config = prune(model, config, args.method, keep=args.keep_experts, layers=layers, calib=calib,
                                   seed=args.seed)
    except PruneError as err:
        raise UsageError(str(err)) from None
    out = Path(args.output)
    # its lineage (the source's training and pretraining configs: the data it saw, the validation split held out),
    # not the source's scores; the pruned model's own scores are added as ``metrics`` once measured below
    base = {k: new_config[k] for k in ("model", "model_kwargs", "upcycle", "train_config", "pretrain") if k in new_config}
    extra = {"pruned": {**new_config["pruned"], "from": str(args.checkpoint), "calibration": args.calibration,
                        "calibration_images": args.calibration_images}}
    rows = [("before", model), ("pruned", pruned)]
    if args.finetune_epochs:  # resumable: a rerun of the same command continues an interrupted fine-tune
        from ..train.config import TrainConfig
        from ..train.finetune import finetune_from, finetune_plan

        plan = finetune_plan({"epochs": args.finetune_epochs, "lr": args.finetune_lr})
        cfg = TrainConfig(dataset=args.dataset, data_root=args.data_root, val_size=args.val_size,
                          train_subset=args.train_subset, test_subset=args.test_subset, data_options=options)
        what = {"checkpoint": str(Path(args.checkpoint).resolve()), "pruned": extra["pruned"], "finetune": plan}
        pruned = finetune_from(pruned, new_config, cfg, out / "finetune", what, plan, seed=args.seed,
                               quiet=args.json)
        rows.append(("fine-tuned", pruned))
        extra["pruned"]["finetune"] = {"epochs": args.finetune_epochs, "lr": args.finetune_lr}
    result, scored_val = [], val.subset(args.val_subset)
    for name, m in rows:
        p = profile(m)
        row = {"model": name, "params": p.params, "gmacs": round(p.macs / 1e9, 6)}
        for split, data in (("val", scored_val), ("test", test)):
            scored = evaluate(m, data, progress=not args.json and f"{name}: {split}")
            row[f"{split}_acc"] = round(scored["acc"], 6)  # a segmentation model's: pixel accuracy, and mIoU
            if "miou" in scored:
                row[f"{split}_miou"] = round(scored["miou"], 6)
        result.append(row)
    final = result[-1]  # the model written: pruned, or pruned and fine-tuned
    extra["metrics"] = {k: final[k] for k in ("test_acc", "val_acc", "test_miou", "val_miou") if k in final}
    if "test_miou" in final:
        extra["metrics"]["test_pixel_acc"] = final["test_acc"]
    extra["metrics"]["test_n"] = len(test)
    save_model(pruned, base, out, extra)
    if args.json:
        print(json.dumps({"output": str(out), "pruned": extra["pruned"], "rows": result}, indent=2))
        return 0
    print(f"{args.checkpoint} -> {out} ({args.method}"
          + (f", {args.keep_experts} experts per MoE layer" if args.keep_experts else f", blocks {layers} dense")
          + {"densify": "; experts merged by their use on the validation split)",
             "reinit": "; nothing chosen from data)"}.get(args.method,
                                                          f"; chosen on {args.calibration_images} validation images)"))
    seg = "test_miou" in result[0]
    print(f"{'':<11} {'params':>11} {'GMACs':>9} {'val acc':>8} {'test acc':>8}"
          + (f" {'val mIoU':>8} {'test mIoU':>9}" if seg else ""))
    for r in result:
        print(f"{r['model']:<11} {r['params']:>11,} {r['gmacs']:>9.5f} {r['val_acc']:>8.4f} {r['test_acc']:>8.4f}"
              + (f" {r['val_miou']:>8.4f} {r['test_miou']:>9.4f}" if seg else ""))
    if seg:
        print("(a segmentation model: acc is pixel accuracy)")
    return 0


def check_output(args, layers) -> None:
    """A one-line refusal of an ``--output`` that is the checkpoint itself, or that already holds a model another
    request wrote (unless ``--overwrite``).  The same command again (same checkpoint, method, count or blocks and
    fine-tune) may write over its own result, as may a rerun that continues an interrupted fine-tune."""
    import json
    from pathlib import Path

    from ..models.args import UsageError

    checkpoint, output = Path(args.checkpoint), Path(args.output)
    source = checkpoint.parent if checkpoint.suffix in (".safetensors", ".pt") else checkpoint
    if output.resolve() in (source.resolve(), (source / "model").resolve()):
        raise UsageError(f"--output {output} is the checkpoint being pruned: give another folder")
    if args.overwrite or not any((output / name).exists() for name in ("model.safetensors", "config.json")):
        return
    try:
        held = json.loads((output / "config.json").read_text()).get("pruned") or {}
    except (OSError, ValueError):
        held = {}
    tuned = held.get("finetune") or {}
    same = (held.get("method") == args.method and held.get("from") == str(args.checkpoint)
            and held.get("keep_experts") == args.keep_experts
            and (args.keep_experts is not None or held.get("layers") == (sorted(layers) if layers else None))
            and tuned.get("epochs", 0) == args.finetune_epochs
            and (not args.finetune_epochs or tuned.get("lr") == args.finetune_lr))
    if not same:
        raise UsageError(f"--output {output} already holds a model that another request wrote: give another folder, "
                         "or pass --overwrite to replace it")


def check_task(model, dataset: str) -> None:
    """A clear one-line error when a checkpoint and ``--dataset`` are of different tasks."""
    from ..data.scenes import SEG_DATASETS
    from ..models.args import UsageError

    seg_model, seg_data = getattr(model, "task", None) == "segmentation", dataset in SEG_DATASETS
    if seg_model and not seg_data:
        raise UsageError(f"the checkpoint is a segmentation model and --dataset {dataset} is a classification "
                         f"dataset: give a segmentation dataset ({', '.join(SEG_DATASETS)}), or leave --dataset out "
                         "to use the one it was trained on")
    if seg_data and not seg_model:
        raise UsageError(f"--dataset {dataset} is a segmentation dataset and the checkpoint is a classifier: give "
                         "the classification data it was trained on, e.g. --dataset fashion-mnist")
