"""Pruning over a study's seeds.  Expert level (the ``expert_pruning`` analysis): per kept-expert count m and
method, test accuracy, parameters and activated GMACs, each method paired by seed against the seeded random choice
of experts (the baseline it must beat) and against the unpruned model, with 95% t-intervals.  Layer level, after
a fine-tune (the ``densify_finetune`` analysis): each variant paired against the unpruned model fine-tuned the
same way.

    from workbench.studies import pruning
    pruning.expert_pruning_table(study, "all")
    pruning.compare_expert_claims(study, other)             # the same claims in two studies, side by side
    pruning.expert_class_iou(study, "all", 4)               # segmentation: base and new classes' IoU per variant
    pruning.expert_claims_by(study, "test_acc", control="seg-transfer-regime/dense")  # another metric's view
    pruning.refit_table(study, "all")
    pruning.picks_table(study, "keep-beats-other-placements")  # each seed's pick beside the blocks that pass
    pruning.gain_kept(study, "keep-keeps-all-moe-accuracy", "all", "upcycle-half-regime/dense")  # descriptive

Imports: this package's ``records`` and ``claims`` (the guided picks) and ``workbench.analysis.stats``.
"""
from __future__ import annotations

import pandas as pd

from ..analysis.stats import paired, welch
from .records import (expert_cell, expert_pairs, expert_value, iou_groups, iter_records, load_refit, load_routing,
                      source_of)

METHOD_ORDER = ("frequency", "reap", "merge", "cluster", "random")


def _interval(t) -> str:
    if t.n < 2:
        return f"{t.mean:+.2f} (n={t.n})"
    return f"{t.mean:+.2f} [{t.low:+.2f}, {t.high:+.2f}]"


def expert_pruning_table(study: dict, config: str, results=None) -> pd.DataFrame:
    """One row per (m, method) of ``config``'s records, fine-tuned variants (``_ft``) after their method: seeds,
    the mean of the study's metric (test accuracy, or a segmentation study's ``test_miou``; in %), params, GMACs, and in points paired by seed: ``vs_random`` (method - random choice;
    after a fine-tune, against the fine-tuned random draw) and ``vs_unpruned`` (method - the trained model; after a
    fine-tune, against the trained model fine-tuned the same way)."""
    runs = sorted((r for r in iter_records(study, results) if r["config"] == config and r.get("expert_pruning")),
                  key=lambda r: r["seed"])
    if not runs:
        raise ValueError(f"{study['name']}/{config} has no expert_pruning analysis recorded")
    rows, metric = [], study.get("metric", "test_acc")
    counts = sorted({k for r in runs for k in r["expert_pruning"] if k.isdigit()}, key=int, reverse=True)
    for keep in counts:
        have = [r for r in runs if keep in r["expert_pruning"]]
        names = [m + ft for m in METHOD_ORDER for ft in ("", "_ft") if all(m + ft in r["expert_pruning"][keep]
                                                                          for r in have)]
        for name in names:
            ft = "_ft" if name.endswith("_ft") else ""
            acc = [expert_value(r, keep, name, metric) for r in have]
            cell = have[0]["expert_pruning"][keep][name]
            random = [expert_value(r, keep, "random" + ft, metric) for r in have]
            unpruned = [expert_value(r, keep, "unpruned" + ft, metric) for r in have]
            rows.append({"keep": int(keep), "method": name, "seeds": len(have), metric: sum(acc) / len(acc),
                         "params": cell["params"], "gmacs": cell["gmacs"],
                         "vs_random": ("-" if name.startswith("random") or "random" + ft not in names
                                       else _interval(paired(acc, random))),
                         "vs_unpruned": _interval(paired(acc, unpruned))})
    return pd.DataFrame(rows, columns=["keep", "method", "seeds", metric, "params", "gmacs", "vs_random",
                                       "vs_unpruned"])


def compare_expert_claims(study: dict, other: dict, results=None) -> pd.DataFrame:
    """The ``experts`` claims of ``study`` beside the claims of the same id in ``other``: each study's paired
    estimate [95% CI] in points, and the difference of the two estimates with Welch's interval over the two studies'
    per-seed differences (independent runs), which says whether a verdict that differs between them is a difference
    the data show.  Two studies scored by different metrics (test accuracy against a segmentation study's test
    mIoU) are refused: their differences are in unlike units."""
    if study.get("metric", "test_acc") != other.get("metric", "test_acc"):
        raise ValueError(f"{study['name']} is scored by {study.get('metric', 'test_acc')} and {other['name']} by "
                         f"{other.get('metric', 'test_acc')}: their claims' estimates are in unlike units, so no "
                         "difference is computed; set the two tables beside each other instead")
    def deltas(s: dict, claim: dict) -> list[float]:
        return [a - b for a, b in zip(*expert_pairs(s, claim, results))]

    theirs = {c["id"]: c for c in other["claims"] if c.get("kind") == "experts"}
    rows = []
    for claim in (c for c in study["claims"] if c.get("kind") == "experts" and c["id"] in theirs):
        mine, them = deltas(study, claim), deltas(other, theirs[claim["id"]])
        rows.append({"claim": claim["id"], study["name"]: _interval(paired(mine, [0.0] * len(mine))),
                     other["name"]: _interval(paired(them, [0.0] * len(them))),
                     "difference": _interval(welch(mine, them))})
    return pd.DataFrame(rows, columns=["claim", study["name"], other["name"], "difference"])


def repeated_runs(study: dict, reference: dict, config: str, results=None) -> dict:
    """``config``'s runs of ``study`` set beside ``reference``'s runs of the same config and seeds (a study that
    trains another study's arm again): the runs in seed order, the seeds whose test predictions are identical, and
    the CPUs (provenance devices) each side ran on."""
    runs = sorted((r for r in iter_records(study, results) if r["config"] == config), key=lambda r: r["seed"])
    before = {r["seed"]: r for r in iter_records(reference, results) if r["config"] == config}
    return {"runs": runs,
            "same": [r["seed"] for r in runs if r["test_predictions"] == before[r["seed"]]["test_predictions"]],
            "devices": sorted({r["provenance"]["device"] for r in runs}),
            "reference_devices": sorted({before[r["seed"]]["provenance"]["device"] for r in runs})}


REFIT_LABELS = {"unpruned": "MoE as trained", "unpruned_ft": "MoE, fine-tuned (control)",
                "merge": "least specialised merged", "merge_ft": "least specialised merged, fine-tuned",
                "most_merge": "most specialised merged", "most_merge_ft": "most specialised merged, fine-tuned",
                "all_merge": "every block merged (dense)", "all_merge_ft": "every block merged, fine-tuned",
                "restore": "base FFN restored (least)", "restore_ft": "base FFN restored (least), fine-tuned",
                "remove": "least specialised removed", "remove_ft": "least specialised removed, fine-tuned",
                "reinit": "fresh FFN (least)", "reinit_ft": "fresh FFN (least), fine-tuned"}


def refit_table(study: dict, config: str, results=None) -> pd.DataFrame:
    """One row per densify-then-fine-tune variant of ``config``: seeds, mean test accuracy (%), params, GMACs, and
    ``vs_control``: points against the unpruned model fine-tuned the same way, paired by seed (95% t-interval)."""
    df = load_refit(study, [config], results).sort_values("seed")
    if df.empty:
        raise ValueError(f"{study['name']}/{config} has no densify_finetune analysis recorded")
    control = 100 * df["unpruned_ft_test"]
    rows = []
    for variant, label in REFIT_LABELS.items():
        if f"{variant}_test" not in df:
            continue
        acc = 100 * df[f"{variant}_test"]
        rows.append({"variant": variant, "what": label, "seeds": len(df), "test_acc": acc.mean(),
                     "params": int(df[f"{variant}_params"].iloc[0]), "gmacs": df[f"{variant}_gmacs"].iloc[0],
                     "vs_control": "-" if variant == "unpruned_ft" else _interval(paired(acc, control))})
    return pd.DataFrame(rows, columns=["variant", "what", "seeds", "test_acc", "params", "gmacs", "vs_control"])


def _guided_claim(study: dict, claim_id: str) -> dict:
    claim = next((c for c in study["claims"] if c["id"] == claim_id and c.get("kind") == "guided"), None)
    if claim is None:
        raise ValueError(f"{study['name']} has no guided claim {claim_id!r}")
    return claim


def picks_table(study: dict, claim_id: str, results=None) -> pd.DataFrame:
    """A guided claim's per-seed picks (``claims.guided_picks``) with, beside each, the guide's blocks that pass the
    random-router test after Holm (``specialised``), whether the picked blocks are all among them, and the pick the
    unbalanced excess would make (``excess_pick``: printed beside, never claimed)."""
    from .claims import guided_picks

    claim = _guided_claim(study, claim_id)
    picks = guided_picks(study, claim, results)
    source, guide = source_of(study, claim["guide"])
    routing = load_routing(source, [guide], results, tokens=claim["tokens"])
    passing = {seed: sorted(g.loc[g["specialised"].astype(bool), "block"].astype(int))
               for seed, g in routing.groupby("seed")}
    picks["specialised"] = [passing[seed] for seed in picks["seed"]]
    picks["pick_is_specialised"] = [set(b) <= set(s) for b, s in zip(picks["blocks"], picks["specialised"])]
    picks["excess_pick"] = list(guided_picks(study, {**claim, "rank_by": "excess"}, results)["blocks"])
    return picks


def placement_ranking(study: dict, claim_id: str, results=None) -> pd.DataFrame:
    """A guided claim's placements side by side: one row per seed with every placement's test accuracy (%), the
    placement the guide's routing picked (chosen on validation), its rank among them by test accuracy (1 = best;
    reported, never used to choose) and how many of the guide's blocks passed the random-router test.  Seeds that
    lack a placement are left out, as the claim leaves them out."""
    from .claims import guided_picks
    from .records import config_values

    claim = _guided_claim(study, claim_id)
    places = claim["treatment"]
    acc = {c: config_values(study, c, results) for c in places}
    rows = []
    for _, pick in guided_picks(study, claim, results).iterrows():
        seed = pick["seed"]
        if pick["placement"] is None or any(seed not in acc[c].index for c in places):
            continue
        row = {"seed": seed, **{c.rpartition("/")[2]: 100 * acc[c][seed] for c in places}}
        picked = pick["placement"].rpartition("/")[2]
        order = sorted((row[c.rpartition("/")[2]] for c in places), reverse=True)
        rows.append({**row, "guided": picked, "guided_rank": order.index(row[picked]) + 1,
                     "specialised_blocks": pick["specialised_blocks"]})
    return pd.DataFrame(rows)


def gain_kept(study: dict, claim_id: str, full: str, none: str, results=None) -> pd.DataFrame:
    """Descriptive, per seed of a guided claim: the routing-picked placement's test accuracy beside ``full`` (MoE
    everywhere) and ``none`` (the dense control), in %, and the share of that seed's (full - none) gain the pick
    keeps: 1 keeps all of it, 0 none, below 0 worse than dense (undefined where full does not beat none).  A
    reading aid beside a no_less claim's margin, never a test."""
    from .records import config_values

    ranks = placement_ranking(study, claim_id, results)
    acc = {name: config_values(study, name, results) for name in (full, none)}
    rows = []
    for _, r in ranks.iterrows():
        if r["seed"] not in acc[full].index or r["seed"] not in acc[none].index:
            continue
        picked = r[r["guided"]]
        top, bottom = 100 * acc[full][r["seed"]], 100 * acc[none][r["seed"]]
        gain = top - bottom
        rows.append({"seed": r["seed"], "guided": r["guided"], "guided_acc": picked, full.rpartition("/")[2]: top,
                     none.rpartition("/")[2]: bottom, "full_gain": gain,
                     "share_kept": (picked - bottom) / gain if gain > 0 else float("nan")})
    return pd.DataFrame(rows)


def expert_class_iou(study: dict, config: str, keep: int, results=None) -> pd.DataFrame:
    """A segmentation study's expert-level variants at ``keep``, means over seeds (descriptive): test mIoU, the
    background's test IoU (class 0) and the test IoU of the classes a transfer base was pretrained on (``base_iou``: classes 1-5, background left out) and
    of those it never saw (``new_iou``: 6-10), in points; a class absent from a split (IoU None) is left out of its
    mean.  The random choice is its first draw only where fine-tuned (``random_ft``); untuned ``random`` rows hold
    no per-class IoU (its draws are averaged) and are left out."""
    runs = [r for r in iter_records(study, results) if r["config"] == config and r.get("expert_pruning")]
    names = ["unpruned", "unpruned_ft"] + [m + ft for m in METHOD_ORDER for ft in ("", "_ft")]
    rows = []
    for name in names:
        cells = [c for c in (expert_cell(r, keep, name) for r in runs) if c and c.get("test_iou")]
        if cells and len(cells) == len(runs):
            groups = [iou_groups(c["test_iou"]) for c in cells]
            background, base, new = (100 * sum(g) / len(g) for g in zip(*groups))
            rows.append({"variant": name, "seeds": len(cells),
                         "test_miou": 100 * sum(c["test_miou"] for c in cells) / len(cells),
                         "background_iou": background, "base_iou": base, "new_iou": new})
    return pd.DataFrame(rows, columns=["variant", "seeds", "test_miou", "background_iou", "base_iou", "new_iou"])


def expert_claims_by(study: dict, metric: str, control: str | None = None, results=None) -> pd.DataFrame:
    """Each ``experts`` claim's pair read by another ``metric`` (e.g. pixel accuracy, ``test_acc``, for a study
    scored by mIoU), in points paired by seed with a 95% interval: descriptive, no verdict.  With ``control``
    (``study/config`` of a dense control run on the same seeds), also each claim's first variant against it
    (column ``first - <config>``)."""
    rows = []
    for claim in (c for c in study["claims"] if c.get("kind") == "experts"):
        source, config = source_of(study, claim["treatment"])
        runs = sorted((r for r in iter_records(source, results) if r["config"] == config), key=lambda r: r["seed"])
        first, second = claim["compare"]
        a = [expert_value(r, claim["keep"], first, metric) for r in runs]
        b = [expert_value(r, claim["keep"], second, metric) for r in runs]
        row = {"claim": claim["id"], "contrast": f"{first} - {second}", metric: _interval(paired(a, b))}
        if control:
            other, name = source_of(study, control)
            dense = {r["seed"]: 100 * r[metric] for r in iter_records(other, results) if r["config"] == name}
            have = [(x, dense[r["seed"]]) for x, r in zip(a, runs) if r["seed"] in dense]
            row[f"first - {name}"] = _interval(paired(*zip(*have))) if have else "-"
        rows.append(row)
    return pd.DataFrame(rows)
