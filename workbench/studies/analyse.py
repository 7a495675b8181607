"""What a study's ``analysis`` block asks of a trained run, before its weights are deleted: routing specialisation
against random routers, movement from the init, densified subsets (pruning), routing against regions
(segmentation), and every test prediction.

Imports: ``workbench.moe``, ``workbench.train`` and ``workbench.analysis``; ``.spec`` for ``StudyError``.
"""
from __future__ import annotations

import itertools
import random

from .spec import StudyError


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


def analyse_run(model, cfg, analysis: dict, seed: int, val, test) -> dict:
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
    """
    from ..moe import moe_modules

    blocks = sorted(k for k in moe_modules(model) if isinstance(k, int))
    if not blocks or not (analysis.get("routing") or analysis.get("prune_fraction") or analysis.get("cls_routing")):
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
    return out


def analyse_regions(model, analysis: dict, seed: int, val) -> dict:
    """Segmentation runs, ``regions: true``: per MoE layer, routing against ground-truth regions on the first
    ``max_images`` validation images (:func:`workbench.analysis.regions.region_report`, ``random_routers`` draws)."""
    from ..moe import moe_modules

    if not analysis.get("regions") or not moe_modules(model):
        return {}
    if val is None:
        raise StudyError("the regions analysis needs a validation split: set train.val_size (e.g. 2000)")
    from ..analysis.regions import region_report

    table = region_report(model, val, max_images=analysis.get("max_images", 1000),
                          draws=int(analysis.get("random_routers", 50)), seed=seed)
    return {"regions": {str(int(r["block"])): {k: (round(v, 6) if isinstance(v, float) else v)
                                               for k, v in r.items() if k != "block"}
                        for r in table.to_dict("records")}}


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


