"""The pre-registered checks that a study's arms learned what its claims compare (``checks:`` in a study file).

A verdict counts only where the compared models moved: upcycled experts apart from their copies, routers away from
their init, predictions further from the control than the control's own seed-to-seed noise; scratch arms trained to
a plateau.  Each check names a metric (``CHECK_METRICS``), the configs it covers (default: every arm but the
control) and a threshold (``at_least`` or ``at_most``) for the median over seeds of each config.  A config failing a
check voids every claim that reads it: those claims are printed with their estimates, and their verdict reads
``void``.

Imports: this package's ``spec`` and ``records``; ``workbench.data`` (test labels, for shares by class group).
"""
from __future__ import annotations

import math
import statistics

import pandas as pd

from .records import iter_records, source_of
from .spec import as_study


def run_metric(record: dict, metric: str) -> float:
    """One run's value of a per-run check metric (NaN when the record lacks what it needs)."""
    if metric == "expert_spread":
        values = list((record.get("expert_spread") or {}).values())
    elif metric == "router_shift":
        values = [v["router_shift"] for v in (record.get("router_init") or {}).values()]
    elif metric == "router_nmi_moved":
        values = [abs(v["trained_nmi"] - v["init_nmi"]) for v in (record.get("router_init") or {}).values()]
    elif metric in ("specialised_blocks", "specialised_blocks_cls", "specialised_blocks_regions",
                    "specialised_blocks_regions_balanced"):
        routing = record.get({"specialised_blocks": "routing", "specialised_blocks_cls": "routing_cls"}.get(metric,
                                                                                                         "regions"))
        flag = "specialised_balanced" if metric.endswith("_balanced") else "specialised"
        return float(sum(bool(v.get(flag)) for v in routing.values())) if routing else math.nan
    elif metric == "late_gain":
        val = [row.get("val_acc") for row in record.get("history", [])]
        if len(val) < 2 or any(v is None for v in val):
            return math.nan
        start = max(1, round(2 * len(val) / 3))  # the epoch that ends the first two thirds
        return round((val[-1] - val[start - 1]) * 100, 6)  # validation counts: exact at 6 decimals
    else:
        raise ValueError(f"{metric!r} is not a per-run check metric")
    return statistics.median(values) if values else math.nan


def _split(predictions: str) -> list[str]:
    """A record's test predictions, one entry per image or pixel (one character each, or comma-separated)."""
    return predictions.split(",") if "," in predictions else list(predictions)


def _differ(a: str, b: str) -> float:
    a, b = _split(a), _split(b)
    return sum(x != y for x, y in zip(a, b)) / max(1, len(a))


def prediction_shares(study: dict, results=None) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    """The share of test images whose predicted class differs from the same seed's control, per config and seed,
    and the control's own seed-to-seed shares (consecutive seeds, keyed by the pair's first): how far each arm moved
    beyond seed noise.  The control may be another study's arm (``other-study/dense``)."""
    control_study, control = source_of(study, study["control"])
    base = {r["seed"]: r["test_predictions"] for r in iter_records(control_study, results)
            if r["config"] == control and isinstance(r.get("test_predictions"), str)}
    seeds = sorted(base)
    noise = {a: _differ(base[a], base[b]) for a, b in zip(seeds, seeds[1:])}
    arms: dict[str, dict[int, float]] = {}
    for r in iter_records(study, results):
        if r["config"] != study["control"] and r["seed"] in base and isinstance(r.get("test_predictions"), str):
            arms.setdefault(r["config"], {})[r["seed"]] = _differ(r["test_predictions"], base[r["seed"]])
    return arms, noise


def prediction_change_by_seed(study: dict, results=None) -> dict[str, dict[int, float]]:
    """Per config and seed: the share of test predictions that differ from the same seed's control, divided by the
    control's own seed-to-seed share (mean over consecutive seeds); NaN without that share."""
    return _ratios(*prediction_shares(study, results))


def _ratios(arms: dict[str, dict[int, float]], noise: dict[int, float]) -> dict[str, dict[int, float]]:
    scale = sum(noise.values()) / len(noise) if noise else math.nan
    return {c: {seed: v / scale if scale and scale == scale else math.nan for seed, v in sorted(shares.items())}
            for c, shares in arms.items()}


def prediction_change(study: dict, results=None) -> dict[str, float]:
    """Per config: the median over seeds of :func:`prediction_change_by_seed`: above 1, the arm moved further from
    the control than re-drawing the control's seed does."""
    return {c: statistics.median(v.values()) for c, v in prediction_change_by_seed(study, results).items()}


def judge(check: dict, value: float) -> tuple[str, bool]:
    """(the rule as text, whether ``value`` meets it): a NaN never passes."""
    bound, at_least = (check["at_least"], True) if "at_least" in check else (check["at_most"], False)
    passed = value == value and (value >= bound if at_least else value <= bound)
    return f"{'>=' if at_least else '<='} {bound:g}", bool(passed)


def evaluate_checks(study_or_path, results=None) -> pd.DataFrame:
    """One row per (check, config): the median over seeds, the threshold, and whether it passes; a config with no
    records fails (nothing shows it learned)."""
    study = as_study(study_or_path)
    rows = []
    records = list(iter_records(study, results))
    for check in study.get("checks", []):
        metric = check["metric"]
        changes = prediction_change(study, results) if metric == "prediction_change" else {}
        for config in check["configs"]:
            if metric == "prediction_change":
                n = sum(r["config"] == config for r in records)
                value = changes.get(config, math.nan)
            else:
                values = [run_metric(r, metric) for r in records if r["config"] == config]
                values = [v for v in values if v == v]
                n, value = len(values), statistics.median(values) if values else math.nan
            rule, passed = judge(check, value)
            rows.append({"id": check["id"], "metric": metric, "config": config, "n": n, "value": value,
                         "rule": rule, "passed": passed})
    return pd.DataFrame(rows, columns=["id", "metric", "config", "n", "value", "rule", "passed"])


def check_on(study_or_path, check_id: str, name: str, results=None) -> pd.DataFrame:
    """One per-run check of a study evaluated on the records of ``name`` (``other-study/config``, e.g. the run rule
    of a file that runs only if an arm another study recorded passes it): per seed, the value; ``attrs`` hold the
    median, the rule and whether it passes."""
    study = as_study(study_or_path)
    check = next((c for c in study.get("checks", []) if c["id"] == check_id), None)
    if check is None:
        raise ValueError(f"{study['name']} has no check {check_id!r}")
    source, config = source_of(study, name)
    rows = [{"seed": r["seed"], "value": run_metric(r, check["metric"])} for r in iter_records(source, results)
            if r["config"] == config]
    table = pd.DataFrame(rows, columns=["seed", "value"]).sort_values("seed").reset_index(drop=True)
    values = [v for v in table["value"] if v == v]
    median = statistics.median(values) if values else math.nan
    rule, passed = judge(check, median)
    table.attrs.update(check=check_id, on=name, median=median, rule=rule, passed=passed)
    return table


def study_is_void(study_or_path, results=None) -> tuple[bool, list[str]]:
    """(void, the ids of the failed checks): a study with checks is void when any of them fails."""
    table = evaluate_checks(study_or_path, results)
    failed = sorted(set(table.loc[~table["passed"], "id"])) if len(table) else []
    return bool(failed), failed


def format_checks(table: pd.DataFrame) -> str:
    lines = []
    for r in table.itertuples():
        if r.value != r.value:  # nothing to measure yet: no runs, or (prediction_change) no control to compare with
            lines.append(f"check {r.id} ({r.metric}) {r.config}: not measurable yet ({r.n} run{'s' if r.n != 1 else ''} recorded) {r.rule} "
                         f"-> FAILS until it is")
            continue
        lines.append(f"check {r.id} ({r.metric}) {r.config}: {r.value:.4g} (median of {r.n}) {r.rule} -> "
                     f"{'passes' if r.passed else 'FAILS'}")
    return "\n".join(lines)


def progress_line(study: dict, results=None) -> str | None:
    """'k of n planned runs recorded' when a study is incomplete (its checks and claims are then provisional)."""
    from .records import progress

    k, planned = progress(study, results)
    if k >= planned:
        return None
    return (f"{study['name']}: {k} of {planned} planned runs recorded; the study is incomplete, so its checks and "
            f"claims below are provisional (python -m workbench study run {study['_path']} continues it)")


def checks_by_seed(study_or_path, results=None) -> pd.DataFrame:
    """The values behind each check's median: one row per (check, config, seed).  For predictions-moved also the raw
    share of test predictions that differ from the same seed's control (``share``), and one row per consecutive
    pair of control seeds (config ``<control> seed-to-seed``, seed: the pair's first) with that pair's share: the
    denominator."""
    study = as_study(study_or_path)
    records = list(iter_records(study, results))
    rows = []
    for check in study.get("checks", []):
        metric = check["metric"]
        if metric == "prediction_change":
            shares, noise = prediction_shares(study, results)
            ratios = _ratios(shares, noise)
            for config in check["configs"]:
                for seed, share in sorted(shares.get(config, {}).items()):
                    rows.append({"id": check["id"], "config": config, "seed": seed, "value": ratios[config][seed],
                                 "share": share})
            for seed, share in noise.items():
                rows.append({"id": check["id"], "config": f"{study['control']} seed-to-seed", "seed": seed,
                             "value": math.nan, "share": share})
            continue
        for config in check["configs"]:
            for r in sorted((r for r in records if r["config"] == config), key=lambda r: r["seed"]):
                rows.append({"id": check["id"], "config": config, "seed": r["seed"], "value": run_metric(r, metric),
                             "share": math.nan})
    return pd.DataFrame(rows, columns=["id", "config", "seed", "value", "share"])


def shares_by_classes(study_or_path, groups: dict[str, list[int]], labels=None, results=None) -> pd.DataFrame:
    """:func:`checks_by_seed`'s predictions-moved shares, each split by the true class of the test images: per
    (config, seed, group) the share of that group's test images whose predicted class differs from the same seed's
    control, and the control's consecutive seed pairs (config ``<control> seed-to-seed``).  ``labels``: the test
    labels in record order (default: the study's dataset's test split, which the records score in full)."""
    study = as_study(study_or_path)
    if labels is None:
        from ..data.classification import build_datasets

        if study["train"].get("test_subset"):
            raise ValueError("shares_by_classes needs the full test split; this study scores a test_subset")
        labels = build_datasets(study["train"].get("dataset", "fashion-mnist"), augment=False)[1].labels
    labels = [int(v) for v in labels]
    control_study, control = source_of(study, study["control"])
    base = {r["seed"]: _split(r["test_predictions"]) for r in iter_records(control_study, results)
            if r["config"] == control and isinstance(r.get("test_predictions"), str)}

    members = {g: set(m) for g, m in groups.items()}
    where = {g: [i for i, y in enumerate(labels) if y in members[g]] for g in groups}  # once per group

    def differ(a, b, group):
        return sum(a[i] != b[i] for i in where[group]) / max(1, len(where[group]))

    rows = []
    for r in sorted(iter_records(study, results), key=lambda r: (r["config"], r["seed"])):
        if r["config"] == study["control"] or r["seed"] not in base or not isinstance(r.get("test_predictions"), str):
            continue
        mine = _split(r["test_predictions"])
        if len(mine) != len(labels):
            raise ValueError(f"{r['config']} seed {r['seed']}: {len(mine)} predictions for {len(labels)} test labels")
        rows += [{"config": r["config"], "seed": r["seed"], "group": g, "share": differ(mine, base[r["seed"]], g)}
                 for g in groups]
    seeds = sorted(base)
    rows += [{"config": f"{study['control']} seed-to-seed", "seed": a, "group": g,
              "share": differ(base[a], base[b], g)} for a, b in zip(seeds, seeds[1:]) for g in groups]
    return pd.DataFrame(rows, columns=["config", "seed", "group", "share"])
