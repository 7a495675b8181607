"""The regime studies (``experiments/studies/regime/``) as the notebooks show them: did the arms learn (training
curves, the pre-registered checks), and the placement x shared-expert grid that claim 2 is read from.

    from workbench.studies import regime
    s = regime.load("upcycle4")
    regime.status(s)              # "7 of 56 planned runs recorded ..." or "complete"
    regime.curves(s)              # validation / test accuracy by epoch, one row per (config, seed, epoch)
    regime.checks_table(s)        # each check per config: median over seeds, rule, passes
    regime.learned(s, groups)     # status, checks, accuracy and changed predictions by class group, as shown
    regime.placement_grid(s)      # the score per (placement, shared expert or not, seed)
    regime.placement_ranges(...)  # per seed: range across placements and the worst one, with and without shared
    regime.regions_by_block(s)    # segmentation: routing against ground-truth regions, per config and block
    regime.regions_premise(s)     # ... and claim 3's premise from it: blocks flagged per seed, the run rule
    regime.schedule_rule(regime.load("pilots/upcycle4_finetune8"))  # a schedule pilot's rule (1): adopt or not
    regime.joint_claims(regime.load("upcycle_half_claim1"), regime.load("upcycle_half"))  # a replication's table

Imports: this package's ``spec``, ``records``, ``checks`` and ``claims``; inside functions ``.analyse``, ``workbench.data`` and
``workbench.models`` (the pixels a segmentation record keeps).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .checks import evaluate_checks, shares_by_classes
from .claims import evaluate_claims
from .records import cached_base, iou_groups, iter_records, load_regions, progress
from .spec import RESULTS, ROOT, StudyError, arm_model_kwargs, load_study

REGIME = ROOT / "experiments" / "studies" / "regime"

# The upcycle schedule pilots' rule (1) (pilots/upcycle4_finetune8.yaml, pilots/upcycle4_lr2e3.yaml; fixed before
# their runs): per check metric, (adopt at or above, fail outright below); between the two is borderline, which asks
# for two more seeds.  The dense control's mean test accuracy must reach the base's test accuracy (as the records
# measured it) less DENSE_MARGIN: 89.68% for the 4x4 CLS-pooled base (90.18%).
SCHEDULE_RULE = {"expert_spread": (0.10, 0.10), "prediction_change": (0.9, 0.7), "router_nmi_moved": (0.015, 0.005)}
DENSE_MARGIN = 0.005


def load(name: str) -> dict:
    """A regime study by its file's stem (``upcycle4``), or a pilot as ``pilots/<stem>``."""
    folder, stem = (REGIME.parent / "pilots", name.split("/", 1)[1]) if name.startswith("pilots/") else (REGIME, name)
    path = folder / f"{stem}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise FileNotFoundError(f"no study {name!r} in {folder.name}/ (known: {known})")
    return load_study(path)


def schedule_rule(study: dict, results=None) -> tuple[pd.DataFrame, str]:
    """A schedule pilot's rule (1) on its records: one row per (check, config) with the unrounded median, its band
    (``adopt``, ``borderline``, ``fails``) and the outcome in one line.  On two seeds the SCHEDULE_RULE bands apply;
    on more (the seeds a borderline result added) the checks' own thresholds decide, with no borderline left.
    Nothing is judged before every planned run is recorded (a missing record would count as a failure): the table
    is then empty and the line says how many."""
    done, planned = progress(study, results)
    columns = ["check", "config", "seeds", "value", "adopt at", "fails below", "band"]
    if done < planned:
        return (pd.DataFrame(columns=columns),
                f"{study['name']}: {done} of {planned} runs recorded; rule (1) is judged once all are in")
    final = len(study["seeds"]) > 2
    own = {c["id"]: c.get("at_least", c.get("at_most")) for c in study.get("checks", [])}
    rows = []
    for _, row in evaluate_checks(study, results).iterrows():
        value = row["value"]
        if final:
            adopt = floor = own[row["id"]]
            band = "adopt" if row["passed"] else "fails"
        else:
            adopt, floor = SCHEDULE_RULE[row["metric"]]
            band = "adopt" if value >= adopt else "borderline" if value >= floor else "fails"  # NaN fails
        rows.append({"check": row["id"], "config": row["config"], "seeds": row["n"], "value": value,
                     "adopt at": adopt, "fails below": floor, "band": band})
    table = pd.DataFrame(rows, columns=columns)
    dense = control_mean(study, results=results)
    bases = {r.get("base_test_acc") for r in iter_records(study, results)} - {None}
    if len(bases) != 1:
        raise ValueError(f"{study['name']}: its records carry {len(bases)} base accuracies, a schedule pilot one")
    dense_floor = round(bases.pop() - DENSE_MARGIN, 6)
    outcome = _outcome(table, dense, round(100 * dense_floor, 4))
    return table, f"{study['name']}: dense mean {dense:.2f}% (floor {100 * dense_floor:.2f}%); rule (1) {outcome}"


def _outcome(table: pd.DataFrame, dense: float | None, floor_pct: float, also: tuple[str, ...] = ()) -> str:
    """Rule (1)'s outcome from the bands and the dense mean against its floor (both in percent); ``also``: further
    reasons, each an outright failure (a rule's own extra floor)."""
    dense_ok = dense is not None and dense >= floor_pct
    failed = table.loc[table["band"] == "fails", "config"].unique().tolist()
    if failed or not dense_ok or also:
        why = [f"{', '.join(failed)} below a floor"] if failed else []
        why += [] if dense_ok else [f"dense mean below {floor_pct:.2f}%"]
        why += list(also)
        return "fails outright (" + "; ".join(why) + "): the schedule is not adopted"
    if (table["band"] == "borderline").any():
        return "borderline: two more seeds for every arm before deciding (the pilot file names them)"
    return "adopted"


def floor_rule(study: dict, dense_floor: float, results=None) -> tuple[pd.DataFrame, str]:
    """A pilot whose rule (1) sets its own dense floor (``dense_floor``, percent; pilots/upcycle_half.yaml: 80.00, the
    fine-tune must learn the classes its base never saw): :func:`schedule_rule`'s check bands, with the dense floor
    read as :func:`control_mean` (unrounded) >= ``dense_floor`` in place of the base's accuracy less the margin."""
    table, line = schedule_rule(study, results)
    if not len(table):
        return table, line
    dense = control_mean(study, results=results)
    outcome = _outcome(table, dense, dense_floor)
    seeds = f"{len(study['seeds'])} seeds"
    return table, f"{study['name']} ({seeds}): dense mean {dense:.3f}% (floor {dense_floor:.2f}%); rule (1) {outcome}"


def base_miou(study: dict, results=None) -> float:
    """The base's test mIoU that a segmentation study measured before its first run (:func:`records.cached_base`,
    read only); a missing file or score is a one-line StudyError."""
    path = Path(results or RESULTS) / study["name"] / "_base.json"
    base = cached_base(study, results)
    if base is None:
        raise StudyError(f"{path} is missing: the base is scored when the study's first run starts (python -m "
                         f"workbench study run <its file>)")
    if "test_miou" not in base:
        raise StudyError(f"{path} has no test_miou (it was written before segmentation bases were scored by mIoU); "
                         "delete it and the next study run scores the base again")
    return base["test_miou"]


def seg_transfer_rule(study: dict, points: float = 5.0, ratio: float = 0.5, results=None) -> tuple[pd.DataFrame, str]:
    """pilots/seg_transfer.yaml's rule (1): :func:`floor_rule`'s check bands, the dense control's mean test mIoU at
    least ``points`` above the base's test mIoU on the same test scenes (:func:`base_miou`), and the
    dense control's new-class mean IoU at least ``ratio`` x its base-class mean IoU (:func:`class_iou`): it must
    have learned the classes its base never saw, not only re-labelled them as background."""
    done, planned = progress(study, results)
    if done < planned:
        return schedule_rule(study, results)  # nothing judged yet: an empty table and how many runs are in
    floor = round(100 * base_miou(study, results) + points, 6)
    table, _ = floor_rule(study, floor, results)
    iou = class_iou(study, results).set_index("config").loc[study["control"]]
    also = () if iou["new_over_base"] >= ratio else (f"dense new/base class IoU {iou['new_over_base']:.3f} below "
                                                       f"{ratio}",)
    dense = control_mean(study, results=results)
    outcome = _outcome(table, dense, floor, also)
    return table, (f"{study['name']} ({len(study['seeds'])} seeds): dense mean test mIoU {dense:.3f} points "
                   f"(floor {floor:.2f}: the base's + {points:g}); "
                   f"dense new-class IoU {iou['new_iou']:.4f} = {iou['new_over_base']:.3f} x base-class "
                   f"{iou['base_iou']:.4f} (floor {ratio:g}x); rule (1) {outcome}")


def status(study: dict, results=None) -> str:
    done, planned = progress(study, results)
    if done >= planned:
        return f"{study['name']}: all {planned} planned runs recorded"
    seeds = sorted({r["seed"] for r in iter_records(study, results)})
    which = f" (seeds {', '.join(map(str, seeds))})" if seeds else ""
    return (f"{study['name']}: {done} of {planned} planned runs recorded{which}; "
            "the study is incomplete, so what follows is provisional: no claim has a verdict until every run is in")


def curves(study: dict, mean: bool = False, results=None) -> pd.DataFrame:
    """Validation and test accuracy (fractions) by epoch: one row per (config, seed, epoch), or with ``mean`` one
    per (config, epoch), averaged over the seeds recorded (``seeds`` counts them)."""
    rows = [{"config": r["config"], "seed": r["seed"], "epoch": h["epoch"], "val_acc": h.get("val_acc"),
             "test_acc": h.get("test_acc")}
            for r in iter_records(study, results) for h in r["history"]]
    table = pd.DataFrame(rows, columns=["config", "seed", "epoch", "val_acc", "test_acc"])
    if not mean:
        return table
    order = list(study["configs"])
    out = table.groupby(["config", "epoch"], sort=False).agg(val_acc=("val_acc", "mean"),
                                                              test_acc=("test_acc", "mean"),
                                                              seeds=("seed", "nunique")).reset_index()
    return out.sort_values(["config", "epoch"], key=lambda c: c.map(order.index) if c.name == "config" else c)


def checks_table(study: dict, results=None) -> pd.DataFrame:
    """The pre-registered checks, one row per (check, config), with the value rounded for reading."""
    table = evaluate_checks(study, results)
    table["value"] = table["value"].round(4)
    return table.rename(columns={"id": "check", "n": "seeds", "value": "median over seeds"})


def learned(study: dict, groups: dict | None = None, results=None) -> tuple[str, list[pd.DataFrame]]:
    """Did the arms learn, as a notebook shows it: the status line, then the checks table, each run's test accuracy
    and, with ``groups`` (name -> class labels), each config's shares of test predictions that differ from the same
    seed's control per class group (mean, min and max over seeds)."""
    tables = [checks_table(study, results), accuracy_table(study, results)]
    if groups:
        shares = shares_by_classes(study, groups, results=results)
        tables.append(shares.groupby(["config", "group"])["share"].agg(["mean", "min", "max"]).round(4).reset_index())
    return status(study, results), tables


def placement_grid(study: dict, results=None) -> pd.DataFrame:
    """The study's score (``metric``: test accuracy by default, or e.g. test mIoU; x100, so % or points) of every MoE
    arm as ``score``: one row per (config, placement, shared, seed); the control is left out."""
    metric = study.get("metric", "test_acc")
    rows = []
    for r in iter_records(study, results):
        config = r["config"]
        if config == study["control"]:
            continue
        kwargs, _ = arm_model_kwargs(study, config)  # the study's common switches overlaid with the arm's
        rows.append({"config": config, "placement": kwargs.get("moe_layers"),
                     "shared": kwargs.get("shared_expert", "none") not in (None, "none"), "seed": r["seed"],
                     "score": 100 * r[metric]})
    order = list(study["configs"])
    rows.sort(key=lambda row: (order.index(row["config"]), row["seed"]))
    return pd.DataFrame(rows, columns=["config", "placement", "shared", "seed", "score"])


def control_mean(study: dict, seeds=None, results=None) -> float | None:
    """The control's mean score (%: test accuracy, or the study's ``metric``, e.g. test mIoU) over its recorded seeds,
    or over ``seeds`` only (the seeds the arms it is drawn beside have); None when none is recorded."""
    metric = study.get("metric", "test_acc")
    values = [100 * r[metric] for r in iter_records(study, results)
              if r["config"] == study["control"] and (seeds is None or r["seed"] in set(seeds))]
    return sum(values) / len(values) if values else None


def placement_ranges(grid: pd.DataFrame) -> pd.DataFrame:
    """Per seed, with and without a shared expert: the range of the score across placements (max - min, points)
    and the worst placement's score; only seeds where every placement of that half is recorded."""
    placements = grid["placement"].nunique()
    rows = []
    for (seed, shared), g in grid.groupby(["seed", "shared"]):
        if g["placement"].nunique() == placements:
            rows.append({"seed": seed, "shared": shared, "range": g["score"].max() - g["score"].min(),
                         "worst": g["score"].min()})
    return pd.DataFrame(rows, columns=["seed", "shared", "range", "worst"])


def accuracy_table(study: dict, results=None) -> pd.DataFrame:
    """The study's score (``metric``, x100: test accuracy in %, or e.g. test mIoU in points) of every recorded run:
    one row per config (the study file's order), one column per seed, then the mean over the seeds recorded."""
    metric = study.get("metric", "test_acc")
    rows = {}
    for r in iter_records(study, results):
        rows.setdefault(r["config"], {})[r["seed"]] = round(100 * r[metric], 2)
    order = [c for c in study["configs"] if c in rows]
    table = pd.DataFrame([rows[c] for c in order], index=order).sort_index(axis=1)
    table.columns = [f"seed {s}" for s in table.columns]
    table["mean"] = table.mean(axis=1).round(3)
    return table.rename_axis("config").reset_index()


def routing_by_block(study: dict, config: str, results=None) -> pd.DataFrame:
    """Per MoE block of ``config``, means over the recorded seeds: the patch tokens' and the CLS token's class-NMI
    excess over random routers (unbalanced and load-balanced), and in how many seeds the block's routing passes the
    random-router test after Holm (patch, CLS)."""
    from .records import load_routing

    out = None
    for tokens in ("patch", "cls"):
        df = load_routing(study, [config], results, tokens=tokens)
        if df.empty:
            continue
        g = df.groupby("block").agg(excess=("excess", "mean"), bal_excess=("bal_excess", "mean"),
                                    specialised=("specialised", "sum"), seeds=("seed", "nunique"))
        g = g.rename(columns={c: f"{tokens}_{c}" for c in g.columns if c != "seeds"})
        out = g if out is None else out.join(g.drop(columns="seeds"), how="outer")
    if out is None:
        return pd.DataFrame(columns=["block"])
    return out.round(4).reset_index()


# Segmentation transfer studies (pilots/seg_transfer.yaml, regime/seg_transfer.yaml): mask label 0 is background,
# 1-5 the base's Fashion-MNIST labels 0-4, 6-10 the new labels 5-9.
SCENE_GROUPS = {"background": [0], "base classes": [1, 2, 3, 4, 5], "new classes": [6, 7, 8, 9, 10]}


def class_iou(study: dict, results=None) -> pd.DataFrame:
    """Per config: the mean over its seeds of mean(test_iou[6:11]) (``new``: the classes a transfer base never saw)
    and of mean(test_iou[1:6]) (``base``: its own; background excluded), their ratio, the mean test mIoU (points)
    and the seeds counted.  A class absent from both the test masks and the predictions (IoU None) is left out of
    its mean."""
    per = {}
    for r in iter_records(study, results):
        _, base, new = iou_groups(r.get("test_iou") or [])
        per.setdefault(r["config"], []).append((new, base, 100 * r["test_miou"]))
    rows = []
    for config in [c for c in study["configs"] if c in per]:
        new, base, miou = (sum(v) / len(v) for v in zip(*per[config]))
        rows.append({"config": config, "seeds": len(per[config]), "new_iou": new, "base_iou": base,
                     "new_over_base": new / base if base else float("nan"), "test_miou": miou})
    return pd.DataFrame(rows, columns=["config", "seeds", "new_iou", "base_iou", "new_over_base", "test_miou"])


def regions_by_block(study: dict, results=None) -> pd.DataFrame:
    """A segmentation study's routing against regions (``analysis.regions``), per config and MoE block, means over
    the recorded seeds: the routers' patch-class NMI beside the random routers' and its excess over them, the same
    at equal loads (``bal_``), the position NMI beside the random routers', and in how many seeds the class NMI
    passes the random-router test after Holm (``specialised``, of ``seeds``)."""
    r = load_regions(study, results=results)
    if r.empty:
        return pd.DataFrame(columns=["config", "block"])
    r = r.assign(excess=r["nmi"] - r["random_nmi"])  # bal_excess: load_regions derives it
    cols = ["nmi", "random_nmi", "excess", "bal_nmi", "bal_random_nmi", "bal_excess", "position_nmi",
            "random_position_nmi"]
    out = r.groupby(["config", "block"], sort=False).agg(seeds=("seed", "nunique"), **{c: (c, "mean") for c in cols},
                                                          specialised=("specialised", "sum")).reset_index()
    order = list(study["configs"])
    return out.sort_values(["config", "block"], key=lambda c: c.map(order.index) if c.name == "config" else c,
                           ignore_index=True).round(4)


def regions_premise(study: dict, config: str = "all", results=None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Claim 3's premise on a segmentation study's routing against regions (``regime/seg_transfer_routing.yaml``):
    per MoE block, means over seeds of each excess over the random routers (class, balanced, class among object
    patches only, position), how many seeds each Holm test flags, and the router's class NMI at its upcycling init
    against trained; per seed, the blocks each test flags; and the run rule's reading (the median over seeds of the
    blocks the balanced test flags, at least 2 for a guided-placement file to be written)."""
    import statistics

    r = load_regions(study, [config], results)
    if r.empty:
        return pd.DataFrame(columns=["block"]), pd.DataFrame(columns=["seed"]), f"{config}: nothing recorded"
    balanced = "specialised_balanced" in r  # records from before the balanced test have no such flag
    for column, empty in (("bal_excess", float("nan")), ("position_excess", float("nan")), ("specialised", False),
                          ("specialised_balanced", False), ("object_only_nmi", float("nan")),
                          ("random_object_only_nmi", float("nan"))):
        if column not in r:
            r[column] = empty
    r = r.assign(excess=r["nmi"] - r["random_nmi"],
                 object_only_excess=r["object_only_nmi"] - r["random_object_only_nmi"])
    init = pd.DataFrame([{"seed": rec["seed"], "block": int(b), "init_nmi": v["init_nmi"],
                          "trained_nmi": v["trained_nmi"]}
                         for rec in iter_records(study, results) if rec["config"] == config
                         for b, v in (rec.get("router_init") or {}).items()], columns=["seed", "block", "init_nmi",
                                                                                       "trained_nmi"])
    r = r.merge(init, on=["seed", "block"], how="left")
    means = ["excess", "bal_excess", "object_only_excess", "position_excess", "init_nmi", "trained_nmi"]
    blocks = r.groupby("block").agg(seeds=("seed", "nunique"), **{c: (c, "mean") for c in means},
                                    specialised=("specialised", "sum"),
                                    specialised_balanced=("specialised_balanced", "sum")).round(4).reset_index()
    flagged = lambda g, flag: [int(b) for b in g.loc[g[flag].astype(bool), "block"]]  # noqa: E731
    seeds = pd.DataFrame([{"seed": seed, "balanced": flagged(g, "specialised_balanced"),
                           "unbalanced": flagged(g, "specialised")} for seed, g in r.groupby("seed")])
    if not balanced:
        counts = [len(b) for b in seeds["unbalanced"]]
        return blocks, seeds, (f"these records have no balanced random-router test (recorded before it), so the run "
                               f"rule is not read; the unbalanced test flags a median of "
                               f"{statistics.median(counts):g} block(s) per seed ({', '.join(map(str, counts))})")
    counts = [len(b) for b in seeds["balanced"]]
    median = statistics.median(counts)
    rule = (f"premise (balanced test): median {median:g} block(s) per seed over {len(counts)} seeds "
            f"({', '.join(map(str, counts))}); "
            + ("at least 2: a segmentation guided-placement file is written next" if median >= 2 else
               "fewer than 2: claim 3's premise is not shown in segmentation (a failure to show, not evidence of "
               "absence)"))
    return blocks, seeds, rule


def pixel_labels(study: dict) -> list[int]:
    """The true label at every pixel whose prediction a segmentation record keeps (the patch centres of its first
    ``analyse.PIXEL_SCENES`` test scenes, in record order): for ``checks.shares_by_classes(study, SCENE_GROUPS,
    labels=...)``."""
    import timm

    from ..data.scenes import build_seg_splits
    from ..models import register
    from .analyse import PIXEL_SCENES, patch_centres

    register()
    train = study["train"]
    if train.get("test_subset"):
        raise ValueError("pixel_labels needs the full test split; this study scores a test_subset, drawn per seed")
    name = study.get("model") or json.loads((ROOT / study["base"] / "config.json").read_text())["model"]
    model = timm.create_model(name, moe_layers="none")
    options = dict(train.get("data_options", {}))
    if train["dataset"] == "fmnist-scenes":
        options["train_size"] = 1  # the test scenes do not depend on the training scenes: build as few as possible
    _, _, test = build_seg_splits(train["dataset"], val_size=train.get("val_size", 0), root=train.get("data_root"),
                                  model=model, augment=False, **options)
    rows, cols = patch_centres(test.masks.shape[-2:], model.patch_embed.grid_size)
    return test.masks[:PIXEL_SCENES][:, rows][:, :, cols].flatten().tolist()


def joint_claims(study: dict, earlier: dict, results=None) -> pd.DataFrame:
    """A replication's claims beside the study that prompted it (``regime/upcycle_half_claim1.yaml``'s reading rule
    (c)): one row per (claim, study) for the claims both files share, with n, estimate, 95% interval, Holm p (each
    within its own file) and verdict; the replication's rows say whether its estimate lies inside the earlier
    file's interval.  Nothing is pooled.  The decision is the replication's verdict; the earlier one is shown as
    recorded."""
    later = evaluate_claims(study, results=results).set_index("id")
    before = evaluate_claims(earlier, results=results).set_index("id")
    rows = []
    for claim in [i for i in later.index if i in before.index]:
        old = before.loc[claim]
        for replication, name, table in ((True, study["name"], later), (False, earlier["name"], before)):
            r = table.loc[claim]
            inside = (bool(old["low"] <= r["estimate"] <= old["high"]) if replication and pd.notna(r["estimate"])
                      else None)
            rows.append({"claim": claim, "study": name, "n": r["n"], "estimate": r["estimate"], "low": r["low"],
                         "high": r["high"], "p_holm": r["p_holm"], "verdict": r["verdict"],
                         "inside earlier interval": {True: "yes", False: "no", None: ""}[inside]})
    return pd.DataFrame(rows, columns=["claim", "study", "n", "estimate", "low", "high", "p_holm", "verdict",
                                       "inside earlier interval"])
