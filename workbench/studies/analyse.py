"""What a study's ``analysis`` block asks of a trained run, before its weights are deleted: routing specialisation
against random routers, movement from the init, densified subsets (pruning), expert-level pruning and merging,
routing against regions (segmentation), and every test prediction.

Imports: ``workbench.moe``, ``workbench.train`` and ``workbench.analysis``; ``.errors`` for ``StudyError`` and
``.refit`` (densify, then fine-tune).
"""
from __future__ import annotations

import itertools
import random

from .errors import StudyError

EXPERT_PRUNING_KEYS = {"keep", "methods", "random_draws", "configs", "calibration_images", "finetune"}
FINETUNE_KEYS = {"epochs", "lr", "min_lr", "train_images", "keep"}


def predict(model, data) -> str:
    """Every test prediction as one string of class indices (10 classes: one digit each)."""
    import torch

    preds = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for x, _ in data.batches(500, shuffle=False):
            preds.append(model(x.to(device)).argmax(-1).cpu())
    preds = torch.cat(preds).tolist()
    return "".join(map(str, preds)) if max(preds, default=0) < 10 else ",".join(map(str, preds))


def analyse_run(model, cfg, analysis: dict, seed: int, val, test, config: str | None = None,
                model_config: dict | None = None) -> dict:
    """What a study's ``analysis`` block asks of a trained run, before its weights are deleted.  Everything that
    *chooses* (which layers are specialised, which to densify) is measured on the validation split; test
    accuracy is only reported.

    * ``cls_routing: true``: per MoE layer, the class token's routing against random routers
      (:func:`workbench.analysis.specialisation.cls_router_report`): the routing that reaches the prediction under
      token pooling, reported apart from the patch tokens'.
    * ``routing: true``: per MoE layer, the specialisation report (random-router test with ``random_routers``
      draws, default 100, on the first ``max_images`` validation images; label-permutation null beside it) and
      the class x expert / position x expert count tables.
    * ``prune_fraction: f`` (runs with at least ``prune_min_layers`` MoE layers, default 4): densify
      k = round(f x layers) layers: *every* k-subset is densified and scored on validation and test, so the
      specialisation metric's choice (the k least specialised on validation) can be ranked among all subsets and
      against ``random_subsets`` (default 20) seeded random draws.
    * ``expert_pruning: {keep: [m, ...], methods: [...], random_draws: r, configs: [...]}``: every MoE layer of the
      listed configs (default: every MoE arm) reduced to m experts by each method (default: frequency, reap, merge,
      cluster), chosen on the first ``calibration_images`` (default 2000) validation images, and by ``r`` (default
      5) seeded random choices; each scored on validation and test with its parameters and GMACs.  With
      ``finetune: {epochs: n, lr: x, min_lr: y, train_images: N, keep: [m, ...]}`` each method's model and the first
      random draw (at the listed counts; default every one) are also scored after a short fine-tune
      (``<method>_ft``), beside the unpruned model fine-tuned the same way
      (``unpruned_ft``, the control for the extra training).
    * ``densify_finetune: {count: k, epochs: n, lr: x, ...}``: the k least specialised blocks merged, replaced by a
      fresh dense FFN, or (control) the k most specialised merged, each before and after an n-epoch fine-tune beside
      the unpruned model fine-tuned the same way (:mod:`workbench.studies.refit`).
    """
    from ..moe import moe_modules

    blocks = sorted(k for k in moe_modules(model) if isinstance(k, int))
    if not blocks or not (analysis.get("routing") or analysis.get("prune_fraction") or analysis.get("cls_routing")
                          or analysis.get("expert_pruning") or analysis.get("densify_finetune")):
        return {}
    if val is None:
        raise StudyError("the analysis block needs a validation split: set train.val_size (e.g. 10000)")
    from ..analysis.movement import expert_spread, router_at_init
    from ..analysis.routing import collect_routing
    from ..analysis.specialisation import router_inputs, specialisation_report

    stats = collect_routing(model, val, progress=False)
    max_images = analysis.get("max_images", 2000)
    inputs = router_inputs(model, val, max_images=max_images)  # one capture, used twice
    report, _ = specialisation_report(model, val, draws=int(analysis.get("random_routers", 100)),
                                      max_images=max_images, seed=seed, stats=stats, inputs=inputs)
    out = {"expert_spread": expert_spread(model)}
    if analysis.get("routing") and cfg.init_from:
        out["router_init"] = router_at_init(model, cfg, val, max_images, inputs=inputs)
    if analysis.get("cls_routing"):
        from ..analysis.specialisation import cls_router_report

        cls = cls_router_report(model, val, draws=int(analysis.get("random_routers", 100)), max_images=max_images,
                                seed=seed)
        out["routing_cls"] = {str(int(r["block"])): {k: (round(v, 6) if isinstance(v, float) else v)
                                                     for k, v in r.items() if k != "block"}
                              for r in cls.to_dict("records")}
    if analysis.get("routing"):
        tables = {b: {"class_expert": s.class_expert.round().int().tolist(),
                      "position_expert": s.position_expert.round().int().tolist()
                      if s.position_expert is not None else None} for b, s in stats.layers.items()}
        out["routing"] = {str(int(r["block"])): {**{k: (round(v, 6) if isinstance(v, float) else v)
                                                   for k, v in r.items() if k != "block"}, **tables[int(r["block"])]}
                          for r in report.to_dict("records")}
    k = round(analysis.get("prune_fraction", 0) * len(blocks))
    if k and len(blocks) >= analysis.get("prune_min_layers", 4):
        out["pruning"] = prune_subsets(model, stats, report, val, test, k, seed,
                                       int(analysis.get("random_subsets", 20)))
    spec = analysis.get("expert_pruning")
    if spec and model_config and (config is None or config in spec.get("configs", [config])):
        out["expert_pruning"] = prune_experts(model, model_config, spec, seed, val, test, cfg)
    refit = analysis.get("densify_finetune")
    if refit and model_config and (config is None or config in refit.get("configs", [config])):
        from .refit import densify_finetune, ranking

        routing = out["routing_cls" if refit.get("tokens", "cls") == "cls" else "routing"]
        out["densify_finetune"] = densify_finetune(
            model, model_config, cfg, refit, seed, val, test, ranking(out, refit), stats, quiet=cfg.quiet,
            specialised=[int(b) for b, row in routing.items() if row.get("specialised")])
    return out


def check_expert_pruning(spec, arms: dict) -> str | None:
    """What is wrong with an ``analysis.expert_pruning`` block (None when nothing): ``arms`` maps each MoE arm to
    its (num_experts, top_k)."""
    from ..analysis.prune import EXPERT_METHODS

    if not isinstance(spec, dict) or set(spec) - EXPERT_PRUNING_KEYS or "keep" not in spec:
        return (f"analysis.expert_pruning must be a mapping with keep (a list of expert counts) and optionally "
                f"{sorted(EXPERT_PRUNING_KEYS - {'keep'})}, e.g. {{keep: [4, 2]}}")
    keep = spec["keep"]
    if not isinstance(keep, list) or not keep or any(type(m) is not int or m < 1 for m in keep):
        return f"analysis.expert_pruning.keep={keep!r} is invalid: give a list of expert counts, e.g. [4, 2]"
    methods = spec.get("methods", list(EXPERT_METHODS))
    if not isinstance(methods, list) or not methods or set(methods) - set(EXPERT_METHODS):
        return f"analysis.expert_pruning.methods={methods!r} is invalid: choose from {list(EXPERT_METHODS)}"
    draws = spec.get("random_draws", 5)
    if type(draws) is not int or draws < 0:
        return f"analysis.expert_pruning.random_draws={draws!r} is invalid: give an integer >= 0 (e.g. 5)"
    finetune = spec.get("finetune")
    if finetune is not None and (not isinstance(finetune, dict) or set(finetune) - FINETUNE_KEYS
                                 or type(finetune.get("epochs")) is not int or finetune["epochs"] < 1
                                 or not isinstance(finetune.get("lr"), (int, float)) or finetune["lr"] <= 0
                                 or not isinstance(finetune.get("min_lr", 0.0), (int, float))
                                 or not (type(finetune.get("train_images", 1)) is int
                                         and finetune.get("train_images", 1) >= 1)
                                 or not (isinstance(finetune.get("keep", keep), list)
                                         and set(finetune.get("keep", keep)) <= set(keep))):
        return (f"analysis.expert_pruning.finetune={finetune!r} is invalid: give epochs (an integer >= 1), lr (> 0) "
                f"and optionally min_lr, train_images and keep (counts of analysis.expert_pruning.keep), e.g. "
                f"{{epochs: 1, lr: 1.0e-4, train_images: 10000}}")
    configs = spec.get("configs", list(arms))
    unknown = [c for c in configs if c not in arms] if isinstance(configs, list) else configs
    if unknown:
        return (f"analysis.expert_pruning.configs names {unknown!r}, not MoE arms of this study "
                f"(its MoE arms: {list(arms)})")
    for config in configs:
        experts, top_k = arms[config]
        bad = [m for m in keep if not top_k <= m < experts]
        if bad:
            return (f"analysis.expert_pruning.keep {bad} is invalid for arm {config!r} ({experts} experts, top-"
                    f"{top_k}): each m needs top_k <= m < num_experts")
    return None


def prune_experts(model, model_config: dict, spec: dict, seed: int, val, test, cfg=None) -> dict:
    """Every MoE layer to m experts by each method and by seeded random choices (the baseline), chosen on the
    validation split, scored on validation and test (fractions), with parameters and GMACs; with ``finetune``
    (and the run's ``cfg``) each method and the first random draw again after the fine-tune (``<method>_ft``),
    beside ``unpruned_ft``.  ``model_config``: the trained model's checkpoint config (pruned models are rebuilt)."""
    from pathlib import Path

    from ..analysis.prune import EXPERT_METHODS, calibrate, prune
    from ..train.finetune import finetune_from, finetune_plan
    from .refit import score

    calib = calibrate(model, val, max_images=int(spec.get("calibration_images", 2000)))
    finetune = spec.get("finetune")
    if finetune:
        if cfg is None:
            raise StudyError("analysis.expert_pruning.finetune needs the run's training config")
        finetune = {**finetune_plan(finetune), "keep": list(finetune.get("keep", spec["keep"]))}

    def tuned(m, config, name: str) -> dict:
        what = {"start": name, "finetune": finetune}
        return score(finetune_from(m, config, cfg, Path(cfg.output) / "experts" / name, what, finetune, seed,
                                   quiet=cfg.quiet), val, test)

    out = {"unpruned": score(model, val, test)}
    if finetune:
        out["finetune"] = finetune
        out["unpruned_ft"] = tuned(model, model_config, "unpruned")
    for keep in spec["keep"]:
        row = {}
        for method in spec.get("methods", list(EXPERT_METHODS)):
            pruned, config = prune(model, model_config, method, keep=keep, calib=calib)
            row[method] = score(pruned, val, test)
            if finetune and keep in finetune["keep"]:
                row[method + "_ft"] = tuned(pruned, config, f"{method}-{keep}")
        draws = []
        for d in range(int(spec.get("random_draws", 5))):
            pruned, config = prune(model, model_config, "random", keep=keep, calib=calib, seed=seed * 100 + d)
            draws.append(score(pruned, val, test))
            if finetune and keep in finetune["keep"] and d == 0:  # the first draw, fine-tuned: the baseline after it
                row["random_ft"] = tuned(pruned, config, f"random-{keep}")
        if draws:
            scores = [k for k in ("val_acc", "test_acc", "val_miou", "test_miou") if k in draws[0]]
            row["random"] = {**{k: round(sum(d[k] for d in draws) / len(draws), 6) for k in scores},
                             "params": draws[0]["params"], "gmacs": draws[0]["gmacs"],
                             "draws": [d["test_acc"] for d in draws],
                             **({"draws_miou": [d["test_miou"] for d in draws]} if "test_miou" in scores else {})}
        out[str(keep)] = row
    return out


def analyse_regions(model, analysis: dict, seed: int, val, cfg=None) -> dict:
    """Segmentation runs, ``regions: true``: per MoE layer, routing against ground-truth regions on the first
    ``max_images`` validation images (:func:`workbench.analysis.regions.region_report`, ``random_routers`` draws).
    An upcycled run (``cfg.init_from``) also records what the upcycle checks read, as classifiers do: each block's
    ``expert_spread`` and ``router_init`` (the routers' shift and patch-class NMI against the upcycling init, on the
    same validation patches)."""
    from ..moe import moe_modules

    if not analysis.get("regions") or not moe_modules(model):
        return {}
    if val is None:
        raise StudyError("the regions analysis needs a validation split: set train.val_size (e.g. 2000)")
    from ..analysis.regions import region_inputs, region_report

    max_images = analysis.get("max_images", 1000)
    captured = region_inputs(model, val, max_images=max_images)
    table = region_report(model, val, max_images=max_images, draws=int(analysis.get("random_routers", 50)),
                          seed=seed, inputs=captured)
    out = {"regions": {str(int(r["block"])): {k: (round(v, 6) if isinstance(v, float) else v)
                                              for k, v in r.items() if k != "block"}
                       for r in table.to_dict("records")}}
    if cfg is not None and cfg.init_from:
        from ..analysis.movement import expert_spread, router_at_init

        out["expert_spread"] = expert_spread(model)
        out["router_init"] = router_at_init(model, cfg, val, max_images,
                                            inputs={b: inputs for b, (inputs, _) in captured.items()})
    return out


PIXEL_SCENES = 1000  # test scenes whose predictions a segmentation record keeps (one pixel per patch)
CLASS_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"


def patch_centres(size, grid):
    """(rows, cols): the centre pixel of every patch of a ``grid`` (gh, gw) over an image of ``size`` (h, w)."""
    import torch

    (h, w), (gh, gw) = size, grid
    return torch.arange(gh) * (h // gh) + h // gh // 2, torch.arange(gw) * (w // gw) + w // gw // 2


def predict_pixels(model, data, scenes: int = PIXEL_SCENES) -> str:
    """A segmentation run's test predictions in :func:`predict`'s form, for the predictions-moved check: the class
    predicted at the centre pixel of every patch of the first ``scenes`` test scenes (scene by scene, row-major),
    one character per pixel (0-9, then a-z, for a model of up to 36 classes; comma-separated beyond).  64,000 pixels
    for 1,000 scenes on an 8 x 8 grid: a record stays small while the share of changed pixels is measured to about
    0.1%."""
    import torch

    device = next(model.parameters()).device
    preds, seen = [], 0
    with torch.no_grad():
        for x, _ in data.batches(250, shuffle=False):
            if seen >= scenes:
                break
            rows, cols = patch_centres(x.shape[-2:], model.patch_embed.grid_size)
            preds.append(model(x.to(device)).argmax(1)[:, rows][:, :, cols].cpu())
            seen += len(x)
    values = torch.cat(preds)[:scenes].flatten().tolist()
    if model.num_classes <= len(CLASS_CHARS):  # by the model, not the values seen: every run of a study alike
        return "".join(CLASS_CHARS[v] for v in values)
    return ",".join(map(str, values))


def prune_subsets(model, stats, report, val, test, count: int, seed: int, random_draws: int = 20) -> dict:
    """Densify every ``count``-subset of the MoE layers (usage-weighted merge, no fine-tuning after); score each on
    validation and test.  The metric's choice is the ``count`` least specialised layers on validation."""
    from ..analysis.densify import densify
    from ..analysis.flops import profile
    from ..analysis.specialisation import layers_to_densify
    from ..train.metrics import evaluate

    blocks = sorted(stats.layers)
    full = profile(model)
    rows = [{"blocks": [], "val_acc": evaluate(model, val)["acc"], "test_acc": evaluate(model, test)["acc"],
             "params": full.params, "gmacs": round(full.macs / 1e9, 6)}]
    for subset in itertools.combinations(blocks, count):
        m = densify(model, list(subset), "merge", stats=stats)
        p = profile(m)
        rows.append({"blocks": list(subset), "val_acc": evaluate(m, val)["acc"], "test_acc": evaluate(m, test)["acc"],
                     "params": p.params, "gmacs": round(p.macs / 1e9, 6)})
    least = layers_to_densify(report, count=count)
    most = sorted(report.sort_values("excess", ascending=False)["block"].tolist()[:count])
    rng = random.Random(seed)
    subsets = [r["blocks"] for r in rows[1:]]
    draws = [subsets[rng.randrange(len(subsets))] for _ in range(random_draws)]
    return {"count": count, "subsets": rows, "least_specialised": least, "most_specialised": most,
            "random_draws": draws}


