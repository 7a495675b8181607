"""Densify, then fine-tune (the ``densify_finetune`` analysis): claim 3 judged after training, not by the merge alone.

For a trained MoE run, the ``count`` least specialised MoE blocks on validation (the routing the analysis block
recorded: the CLS token's by default, ranked by its class-NMI excess over random routers, the metric the
random-router test reads) are changed, and each changed model ("start") is scored before and after the same short
fine-tune.  Starts (``starts:``, default every one the protocol allows):

* ``unpruned``: the trained MoE model itself: fine-tuned, the control for the extra training (always run);
* ``merge``: the least specialised blocks' experts merged into one FFN, weighted by their validation usage;
* ``most_merge``: the ``count`` *most* specialised blocks merged instead: does the ranking carry anything?
* ``all_merge``: every MoE block merged (a dense model): is any MoE layer needed after the fine-tune?
* ``restore`` (upcycle protocol): the dense base's own FFN put back in the least specialised blocks: does the merge
  carry more than the copy the experts started from?
* ``remove``: the least specialised blocks' FFNs zeroed (weights and biases: the block adds nothing; in the
  fine-tune only the output bias, a constant, can grow back);
* ``reinit``: a freshly initialised dense FFN there (seeded; its random output perturbs the model at once).

Every fine-tune continues the run's own training config (optimizer, regularisation, batch, data order: the run's
seed) for ``epochs`` more epochs, from ``lr`` without warm-up, cosine to ``min_lr`` (default lr / 10).  Nothing is
chosen on the test split.  A record holds each start and the same with ``_ft`` after its fine-tune, the blocks
chosen, and which blocks passed the random-router test (``specialised``).

Imports: ``workbench.train`` and ``workbench.analysis``; ``.errors`` for ``StudyError``.
"""
from __future__ import annotations

from pathlib import Path

from ..train.finetune import finetune_from, finetune_plan
from .errors import StudyError

REFIT_KEYS = {"count", "epochs", "lr", "min_lr", "tokens", "rank_by", "configs", "starts"}
STARTS = ("unpruned", "merge", "most_merge", "all_merge", "restore", "remove", "reinit")
VARIANTS = tuple(v for s in STARTS for v in (s, s + "_ft"))


def starts_of(spec: dict, protocol: str) -> list[str]:
    """The starts a block asks for (default: every one the protocol allows), ``unpruned`` always first."""
    default = [s for s in STARTS if s != "restore" or protocol == "upcycle"]
    return ["unpruned"] + [s for s in spec.get("starts", default) if s != "unpruned"]


def check_refit(spec, arms: dict, analysis: dict, protocol: str = "upcycle") -> str | None:
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
    if spec.get("rank_by", "excess") not in ("bal_excess", "excess"):
        return f"analysis.densify_finetune.rank_by={spec['rank_by']!r} is invalid: use bal_excess or excess"
    configs = spec.get("configs", list(arms))
    unknown = [c for c in configs if c not in arms] if isinstance(configs, list) else configs
    if unknown:
        return f"analysis.densify_finetune.configs names {unknown!r}, not MoE arms of this study ({list(arms)})"
    starts = spec.get("starts", [])
    if not isinstance(starts, list) or set(starts) - set(STARTS):
        return f"analysis.densify_finetune.starts={starts!r} is invalid: choose from {list(STARTS)}"
    if "restore" in starts and protocol != "upcycle":
        return ("analysis.densify_finetune.starts: restore puts the dense base's FFN back, and a scratch run has no "
                "base: leave it out")
    shared = [c for c in configs if arms[c]]
    if shared:
        return (f"analysis.densify_finetune: arms {shared} have a shared expert, which the merge cannot fold into "
                "one FFN; list arms without one under configs")
    return None


def ranking(analysis_out: dict, spec: dict) -> dict[int, float]:
    """Block -> the specialisation score that ranks it (from the routing the analysis block recorded)."""
    key = {"cls": "routing_cls", "patch": "routing"}[spec.get("tokens", "cls")]
    metric = spec.get("rank_by", "excess")
    return {int(b): float(row[metric]) for b, row in analysis_out[key].items()}


def choose(scores: dict[int, float], count: int) -> tuple[list[int], list[int]]:
    """(least, most) specialised ``count`` blocks: the two ends of one order by score, ties broken by depth (the
    lower block counts as less specialised), so that the two never overlap while 2 x count <= the blocks."""
    if not 1 <= count < len(scores):
        raise StudyError(f"analysis.densify_finetune.count={count} needs fewer blocks than the run's "
                         f"{len(scores)} MoE blocks: lower it")
    order = sorted(scores, key=lambda b: (scores[b], b))
    return sorted(order[:count]), sorted(order[-count:])


def _dense_in(model, config: dict, blocks: list[int], fill: str, seed: int, base=None):
    """(model, config): ``blocks`` made dense FFNs filled from the base (``restore``), with zeros (``remove``) or
    fresh (``reinit``); every other weight as trained."""
    import torch

    from ..analysis.prune import prune
    from ..train.checkpoint import load_model

    dense, new_config = prune(model, config, "reinit", layers=blocks, seed=seed)
    if fill == "reinit":
        return dense, new_config
    state = dense.state_dict()
    prefixes = tuple(f"blocks.{i}.mlp." for i in blocks)
    source = load_model(base)[0].state_dict() if fill == "restore" else None
    for key in [k for k in state if k.startswith(prefixes)]:
        state[key] = source[key].clone() if source is not None else torch.zeros_like(state[key])
    dense.load_state_dict(state)
    new_config["pruned"] = {"method": fill, "layers": sorted(blocks)}
    return dense.eval(), new_config


def densify_finetune(model, model_config: dict, cfg, spec: dict, seed: int, val, test, scores: dict, stats,
                     quiet: bool = True, specialised: list[int] | None = None) -> dict:
    """Each start (module docstring) before and after the fine-tune, on validation and test, with parameters and
    GMACs.  Fine-tunes run in ``<run folder>/refit/<start>`` and resume from there, unless that folder was started
    for other blocks or another fine-tune (then it starts again)."""
    from ..analysis.prune import prune

    least, most = choose(scores, int(spec["count"]))
    finetune = finetune_plan(spec)
    blocks = {"unpruned": [], "merge": least, "most_merge": most, "all_merge": sorted(scores), "restore": least,
              "remove": least, "reinit": least}
    work = Path(cfg.output) / "refit"

    def build(name):
        if name == "unpruned":
            return model, model_config
        if name.endswith("merge"):
            return prune(model, model_config, "densify", layers=blocks[name], calib={"_stats": stats})
        return _dense_in(model, model_config, blocks[name], name, seed, base=cfg.init_from)

    out = {"count": len(least), "least": least, "most": most, "tokens": spec.get("tokens", "cls"),
           "rank_by": spec.get("rank_by", "excess"), "scores": {str(b): round(v, 6) for b, v in scores.items()},
           "specialised": sorted(specialised or []), "finetune": finetune, "variants": {}}
    for name in starts_of(spec, "upcycle" if cfg.init_from else "scratch"):
        start, config = build(name)
        out["variants"][name] = score(start, val, test)
        what = {"start": name, "blocks": blocks[name], "finetune": finetune}
        out["variants"][name + "_ft"] = score(finetune_from(start, config, cfg, work / name, what, finetune, seed,
                                                            quiet=quiet), val, test)
    return out


def score(model, val, test) -> dict:
    """A changed model's validation and test accuracy (fractions, 6 decimals; a segmentation model's pixel accuracy,
    its mean IoU as ``val_miou`` / ``test_miou`` and the test IoU per class as ``test_iou``), total parameters and
    GMACs."""
    from ..analysis.flops import profile
    from ..train.metrics import evaluate

    p = profile(model)
    out = {}
    for split, data in (("val", val), ("test", test)):
        scored = evaluate(model, data)
        out[f"{split}_acc"] = round(scored["acc"], 6)
        if "miou" in scored:  # a segmentation model: pixel accuracy above, mean IoU (and the test IoU per class)
            out[f"{split}_miou"] = round(scored["miou"], 6)
            if split == "test":
                out["test_iou"] = [None if v is None else round(float(v), 6) for v in scored["iou"]]
    return {**out, "params": p.params, "gmacs": round(p.macs / 1e9, 6)}
