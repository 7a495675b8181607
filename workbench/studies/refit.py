"""Densify, then fine-tune (the ``densify_finetune`` analysis): claim 3 judged after training, not by the merge alone.

For a trained MoE run, the ``count`` least specialised MoE blocks on validation (the routing the analysis block
recorded: the CLS token's by default, ranked by the load-balanced NMI excess over random routers) are made dense in
three ways, and each start is scored before and after the same short fine-tune:

* ``merge``: the experts merged into one FFN, weighted by their use on the validation split;
* ``reinit``: a freshly initialised dense FFN in their place (seeded): does the merge carry anything?
* ``most_merge``: the ``count`` *most* specialised blocks merged instead: does the ranking carry anything?
* ``unpruned``: the trained MoE model itself, fine-tuned the same way: the control for the extra training.

Every fine-tune continues the run's own training config (optimizer, regularisation, batch, data order: the run's
seed) for ``epochs`` more epochs, from ``lr`` without warm-up, cosine to ``min_lr`` (default lr / 10).  Nothing is
chosen on the test split.  Variants in a record: each of the four, and each with ``_ft`` after its fine-tune.

Imports: ``workbench.train`` and ``workbench.analysis``; ``.errors`` for ``StudyError``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import StudyError

REFIT_KEYS = {"count", "epochs", "lr", "min_lr", "tokens", "rank_by", "configs"}
STARTS = ("unpruned", "merge", "reinit", "most_merge")
VARIANTS = tuple(v for s in STARTS for v in (s, s + "_ft"))


def check_refit(spec, arms: dict, analysis: dict) -> str | None:
    """What is wrong with an ``analysis.densify_finetune`` block (None when nothing).  ``arms`` maps each MoE arm to
    whether it has a shared expert (densifying one is refused by the merge)."""
    if not isinstance(spec, dict) or set(spec) - REFIT_KEYS or not {"count", "epochs", "lr"} <= set(spec):
        return ("analysis.densify_finetune must be a mapping with count (MoE blocks made dense), epochs and lr (the "
                f"fine-tune) and optionally {sorted(REFIT_KEYS - {'count', 'epochs', 'lr'})}, e.g. "
                "{count: 2, epochs: 1, lr: 1.0e-4}")
    if type(spec["count"]) is not int or spec["count"] < 1:
        return f"analysis.densify_finetune.count={spec['count']!r} is invalid: give the number of blocks, e.g. 2"
    if type(spec["epochs"]) is not int or spec["epochs"] < 1:
        return f"analysis.densify_finetune.epochs={spec['epochs']!r} is invalid: give an integer >= 1"
    lr, min_lr = spec["lr"], spec.get("min_lr", None)
    if not isinstance(lr, (int, float)) or not lr > 0 or (
            min_lr is not None and (not isinstance(min_lr, (int, float)) or not 0 <= min_lr <= lr)):
        return (f"analysis.densify_finetune lr={lr!r}, min_lr={min_lr!r} is invalid: give lr > 0 and "
                "0 <= min_lr <= lr")
    tokens = spec.get("tokens", "cls")
    needs = {"cls": "cls_routing", "patch": "routing"}.get(tokens)
    if needs is None:
        return f"analysis.densify_finetune.tokens={tokens!r} is invalid: use cls or patch"
    if not analysis.get(needs):
        return (f"analysis.densify_finetune ranks blocks by the {tokens} routing: set analysis.{needs}: true so "
                "that it is measured")
    if spec.get("rank_by", "bal_excess") not in ("bal_excess", "excess"):
        return f"analysis.densify_finetune.rank_by={spec['rank_by']!r} is invalid: use bal_excess or excess"
    configs = spec.get("configs", list(arms))
    unknown = [c for c in configs if c not in arms] if isinstance(configs, list) else configs
    if unknown:
        return f"analysis.densify_finetune.configs names {unknown!r}, not MoE arms of this study ({list(arms)})"
    shared = [c for c in configs if arms[c]]
    if shared:
        return (f"analysis.densify_finetune: arms {shared} have a shared expert, which the merge cannot fold into "
                "one FFN; list arms without one under configs")
    return None


def ranking(analysis_out: dict, spec: dict) -> dict[int, float]:
    """Block -> the specialisation score that ranks it (from the routing the analysis block recorded)."""
    key = {"cls": "routing_cls", "patch": "routing"}[spec.get("tokens", "cls")]
    metric = spec.get("rank_by", "bal_excess")
    return {int(b): float(row[metric]) for b, row in analysis_out[key].items()}


def choose(scores: dict[int, float], count: int) -> tuple[list[int], list[int]]:
    """(least, most) specialised ``count`` blocks: the two ends of one order by score, ties broken by depth (the
    lower block counts as less specialised), so that the two never overlap while 2 x count <= the blocks."""
    if not 1 <= count < len(scores):
        raise StudyError(f"analysis.densify_finetune.count={count} needs fewer blocks than the run's "
                         f"{len(scores)} MoE blocks: lower it")
    order = sorted(scores, key=lambda b: (scores[b], b))
    return sorted(order[:count]), sorted(order[-count:])


def densify_finetune(model, model_config: dict, cfg, spec: dict, seed: int, val, test, scores: dict, stats,
                     quiet: bool = True) -> dict:
    """The four starts (module docstring) before and after the fine-tune, on validation and test, with parameters
    and GMACs.  Fine-tunes run in ``<run folder>/refit/<start>`` and resume from there."""
    from ..analysis.flops import profile
    from ..analysis.prune import prune
    from ..train.checkpoint import load_model, save_model
    from ..train.metrics import evaluate
    from ..train.trainer import train

    least, most = choose(scores, int(spec["count"]))
    starts = {"unpruned": (model, model_config),
              "merge": prune(model, model_config, "densify", layers=least, calib={"_stats": stats}),
              "reinit": prune(model, model_config, "reinit", layers=least, seed=seed),
              "most_merge": prune(model, model_config, "densify", layers=most, calib={"_stats": stats})}
    lr = float(spec["lr"])
    min_lr = float(spec.get("min_lr", lr / 10))
    work = Path(cfg.output) / "refit"

    def score(m) -> dict:
        p = profile(m)
        return {"val_acc": round(evaluate(m, val)["acc"], 6), "test_acc": round(evaluate(m, test)["acc"], 6),
                "params": p.params, "gmacs": round(p.macs / 1e9, 6)}

    out = {"count": len(least), "least": least, "most": most, "tokens": spec.get("tokens", "cls"),
           "rank_by": spec.get("rank_by", "bal_excess"), "scores": {str(b): round(v, 6) for b, v in scores.items()},
           "finetune": {"epochs": int(spec["epochs"]), "lr": lr, "min_lr": min_lr}, "variants": {}}
    for name, (start, config) in starts.items():
        out["variants"][name] = score(start)
        folder = work / name
        base = {k: config[k] for k in ("model", "model_kwargs", "upcycle") if k in config}
        if not (folder / "ft" / "checkpoint.pt").exists():
            save_model(start, base, folder / "start", {"pruned": config.get("pruned")} if "pruned" in config else None)
        ft = dataclasses.replace(cfg, model=None, model_kwargs={}, init_from=None, weights_from=str(folder / "start"),
                                 epochs=int(spec["epochs"]), lr=lr, min_lr=min_lr, warmup_epochs=0.0,
                                 eval_at_start=False, output=str(folder / "ft"), quiet=quiet, tensorboard=False,
                                 tensorboard_dir=None, seed=seed)
        train(ft, resume=(folder / "ft" / "checkpoint.pt").exists())
        tuned, _ = load_model(folder / "ft" / "model")
        out["variants"][name + "_ft"] = score(tuned.eval())
    return out
