"""A study's verdicts: per-config summary, contrasts against the control, and each pre-registered claim's estimate,
95% interval, Holm-adjusted p and verdict; their one-line formats.

Claim kinds (``kind:`` in a study file): ``paired`` (treatment - control, paired by seed), ``spread`` (seed SD
difference), ``excess`` / ``depth_trend`` (routing against random routers; ``tokens: cls`` for the class token),
``pruning``, ``refit`` (two variants of one arm's densify-then-fine-tune analysis, paired by seed), ``experts``
(two variants of one arm's expert-pruning analysis at ``keep`` experts, e.g. ``compare: [reap, random]``), and over *sets* of configs (the placements of a configuration study, with and without a change):
``range`` (per seed, max - min of accuracy over the treatment placements minus the same over the control
placements: is accuracy less sensitive to where the MoE layers are?) and ``worst`` (per seed, the worst treatment
placement minus the worst control placement).  A claim that reads a config failing one of the study's
pre-registered checks has no verdict: it reads ``void``.

Imports: ``workbench.analysis.stats`` and this package's ``spec``, ``records`` and ``checks``.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .records import (config_values, iter_records, load_pruning, load_refit, load_regions, load_results,
                      load_routing, progress, referenced, source_of)
from .spec import StudyError, as_study


ACCURACY_KINDS = ("paired", "pruning", "range", "worst", "guided", "refit", "experts")  # estimates in points


def summary(study_or_path, results: Path | None = None) -> pd.DataFrame:
    """Per config (in the study's order): seeds, mean and seed SD of test accuracy, params and GMACs beside."""
    study = as_study(study_or_path)
    df = load_results(study, results)
    if df.empty:
        return pd.DataFrame(columns=["config", "n", "acc_mean", "acc_std", "params_M", "gmacs"])
    g = df.groupby("config")
    table = pd.DataFrame({"n": g["seed"].count(), "acc_mean": g["score"].mean(),
                          "acc_std": g["score"].std(ddof=1).fillna(0.0),
                          "params_M": g["params"].first() / 1e6, "gmacs": g["gmacs"].first()})
    order = [c for c in study["configs"] if c in table.index]
    return table.loc[order].reset_index()


def contrasts(study_or_path, results: Path | None = None) -> pd.DataFrame:
    """Every config against the study's control, paired by seed: delta of test accuracy in points with its 95%
    t-interval, two-sided p and Holm-adjusted p across the configs; params and GMACs beside."""
    from ..analysis.stats import holm, paired

    study = as_study(study_or_path)
    control = study["control"]
    base = config_values(study, control, results)
    if base.empty:
        raise StudyError(f"the control {control!r} of {study['name']} has no records yet: run the study first")
    s = summary(study, results).set_index("config")
    rows = []
    for config in study["configs"]:
        if config == control or config not in s.index:
            continue
        values = config_values(study, config, results)
        seeds = sorted(set(values.index) & set(base.index))
        d = paired(values[seeds] * 100, base[seeds] * 100)
        rows.append({"config": config, "n": d.n, "delta": d.mean, "low": d.low, "high": d.high, "p": d.p,
                     "params_M": s.loc[config, "params_M"], "gmacs": s.loc[config, "gmacs"]})
    table = pd.DataFrame(rows, columns=["config", "n", "delta", "low", "high", "p", "params_M", "gmacs"])
    table.insert(6, "p_holm", holm(table["p"]))
    return table


def evaluate_claims(study_or_path, results: Path | None = None) -> pd.DataFrame:
    """Each pre-registered claim: its estimate with a 95% interval, p (Holm-adjusted across the study's
    directional claims that have one; an 'equal' claim is decided by its interval and margin alone), and the
    verdict from :func:`workbench.stats.verdict`."""
    from ..analysis.stats import bootstrap_sd_difference, holm, paired, pitman_morgan, slope_interval, verdict

    study = as_study(study_or_path)
    rows = []
    for claim in study["claims"]:
        kind, expect, margin = claim["kind"], claim["expect"], float(claim.get("margin", 0.0))
        row = {"id": claim["id"], "says": claim["says"], "kind": kind, "expect": expect, "margin": margin}
        if kind in ("paired", "spread"):
            control = claim.get("control", study["control"])
            a = config_values(study, claim["treatment"], results)
            b = (config_values(study, claim["treatment"], results, metric="step0_test_acc") if control == "step0"
                 else config_values(study, control, results))
            seeds = sorted(set(a.index) & set(b.index))
            row["contrast"] = f"{claim['treatment']} vs {control}"
            if kind == "paired":
                d = paired(a[seeds] * 100, b[seeds] * 100)
                row.update(n=d.n, estimate=d.mean, low=d.low, high=d.high, p=d.p)
            else:
                # the interval: a paired bootstrap of the SD difference; the test: Pitman-Morgan (Holm family)
                est, low, high = bootstrap_sd_difference(a[seeds] * 100, b[seeds] * 100)
                row.update(n=len(seeds), estimate=est, low=low, high=high,
                           p=pitman_morgan(a[seeds] * 100, b[seeds] * 100))
        elif kind in ("range", "worst"):
            treat = pd.concat({c: config_values(study, c, results) for c in claim["treatment"]}, axis=1)
            ctrl = pd.concat({c: config_values(study, c, results) for c in claim["control"]}, axis=1)
            seeds = sorted(set(treat.dropna().index) & set(ctrl.dropna().index))
            treat, ctrl = treat.loc[seeds] * 100, ctrl.loc[seeds] * 100
            if kind == "range":
                a, b = treat.max(axis=1) - treat.min(axis=1), ctrl.max(axis=1) - ctrl.min(axis=1)
                row["contrast"] = "range over placements: " + ", ".join(claim["treatment"]) + " vs " + \
                    ", ".join(claim["control"])
            else:
                a, b = treat.min(axis=1), ctrl.min(axis=1)
                row["contrast"] = "worst placement: " + ", ".join(claim["treatment"]) + " vs " + \
                    ", ".join(claim["control"])
            d = paired(a.values, b.values)
            row.update(n=d.n, estimate=d.mean, low=d.low, high=d.high, p=d.p)
        elif kind in ("excess", "depth_trend"):
            source, config = source_of(study, claim["treatment"])
            regions = claim.get("source", "routing") == "regions"
            if regions:
                routing = load_regions(source, [config], results)
            else:
                routing = load_routing(source, [config], results, tokens=claim.get("tokens", "patch"))
            if claim.get("blocks") is not None:
                routing = routing[routing["block"].isin(claim["blocks"])]
            column = claim.get("metric", "excess")
            what = {"excess": "NMI", "bal_excess": "balanced NMI", "position_excess": "position NMI"}[column]
            row["contrast"] = (f"{claim['treatment']}: {what} over random routers" if kind == "excess" else
                               f"{claim['treatment']}: slope of {what} excess over random routers per block")
            if column not in routing:  # records without the fields (a study of another kind): no estimate
                routing = routing.assign(**{column: float("nan")}).iloc[:0]
            if kind == "excess":
                per_seed = routing.groupby("seed")[column].mean()
                d = paired(per_seed.values, [0.0] * len(per_seed))
            else:
                d = slope_interval({s: (g["block"].values, g[column].values) for s, g in routing.groupby("seed")})
            row.update(n=d.n, estimate=d.mean, low=d.low, high=d.high, p=d.p)
        elif kind == "refit":
            source, config = source_of(study, claim["treatment"])
            rf = load_refit(source, [config], results)
            first, second = claim["compare"]
            row["contrast"] = f"{claim['treatment']}: {first} vs {second}"
            d = (paired(rf[f"{first}_test"] * 100, rf[f"{second}_test"] * 100) if not rf.empty
                 else paired([], []))
            row.update(n=d.n, estimate=d.mean, low=d.low, high=d.high, p=d.p)
        elif kind == "experts":
            from .records import expert_pairs

            first, second, keep = *claim["compare"], claim["keep"]
            row["contrast"] = f"{claim['treatment']}: {first} vs {second}, {keep} experts kept per MoE layer"
            d = paired(*expert_pairs(study, claim, results))
            row.update(n=d.n, estimate=d.mean, low=d.low, high=d.high, p=d.p)
        elif kind == "guided":
            a, b, row["contrast"] = _guided(study, claim, results)
            d = paired(a, b)
            row.update(n=d.n, estimate=d.mean, low=d.low, high=d.high, p=d.p)
        else:  # pruning
            source, config = source_of(study, claim["treatment"])
            pr = load_pruning(source, [config], results)
            compare = claim.get("compare", "all_mean")
            column = {"all_mean": "all_mean_test", "random": "random_mean_test", "unpruned": "full_test",
                      "most": "most_test"}[compare]
            row["contrast"] = f"{claim['treatment']}: densify least specialised vs {compare.replace('_', ' ')}"
            d = paired(pr["least_test"] * 100, pr[column] * 100)
            row.update(n=d.n, estimate=d.mean, low=d.low, high=d.high, p=d.p)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["id", "says", "kind", "contrast", "n", "estimate", "low", "high", "p",
                                        "expect", "margin"])
    # the Holm family: the directional claims; an 'equal' claim is decided by its interval against the margin
    directional = table["expect"].isin(["greater", "less"])
    table["p_holm"] = float("nan")
    table.loc[directional, "p_holm"] = holm(table.loc[directional, "p"])
    table["verdict"] = [verdict(r.low, r.high, r.p_holm, r.expect, r.margin) for r in table.itertuples()]
    # a claim whose arms did not learn what it compares has no verdict: its own study's checks, and the checks of
    # the referenced studies whose arms it reads
    others = sorted({n.rpartition("/")[0] for c in study["claims"] for n in claim_names(study, c) if "/" in n})
    sources = [("", study)] + [(f"{other}/", referenced(study, other)) for other in others]
    if any(source.get("checks") for _, source in sources):
        from .checks import evaluate_checks

        failed = {prefix: checks[~checks["passed"]] for prefix, source in sources if source.get("checks")
                  for checks in [evaluate_checks(source, results)]}
        because = {}  # config -> the checks it failed
        for prefix, rows in failed.items():
            for r in rows.itertuples():
                because.setdefault(prefix + r.config, []).append(r.id)
        bad = set(because)
        table["void_because"] = ""
        for i, claim in enumerate(study["claims"]):
            names = [n for n in claim_names(study, claim) if n in bad]
            if names:
                table.loc[i, "verdict"] = "void"
                table.loc[i, "void_because"] = "; ".join(f"{n} failed {', '.join(because[n])}"
                                                         for n in dict.fromkeys(names))
        table.attrs["failed_checks"] = sorted(set(failed[""]["id"])) if "" in failed else []
        table.attrs["failed_configs"] = sorted(bad)
    # which side of zero (or of the margin) the point estimate falls on, whatever the interval: an inconclusive
    # verdict with the estimate on the other side is not the same as one on the paper's side
    table["side"] = [_side(r.estimate, r.expect, r.margin) for r in table.itertuples()]
    # seeds that would make the interval +/- 0.5 points at the observed spread (accuracy claims)
    table["seeds_needed"] = [seeds_for_half_width((r.high - r.low) / 2, int(r.n))
                              if r.kind in ACCURACY_KINDS and r.high == r.high
                              else None
                              for r in table.itertuples()]
    return table


def _moe_blocks(study: dict, name: str, results) -> frozenset:
    """The MoE blocks of a config's runs (the layers its records report loads for)."""
    source, config = source_of(study, name)
    for r in iter_records(source, results):
        if r["config"] == config:
            return frozenset(int(k) for k in r.get("moe_test") or {} if str(k).isdigit())
    return frozenset()


def guided_picks(study: dict, claim: dict, results=None) -> pd.DataFrame:
    """Per seed of a guided claim's ``guide`` run: the k blocks whose routing (``tokens``) has the largest
    ``rank_by`` (``bal_excess``, the load-balanced NMI excess over random routers, or ``excess``; ties: the lower
    block), the placement with those blocks, and how many of the guide's blocks pass the random-router test after
    Holm (``specialised``; fewer than k: the routing gives no guidance by the project's own test).  The treatment
    must list every k-of-L placement once, all of one size (else the 'others' would change with the list)."""
    from itertools import combinations

    source, guide = source_of(study, claim["guide"])
    routing = load_routing(source, [guide], results, tokens=claim["tokens"])
    places = claim["treatment"]
    blocks = {c: _moe_blocks(study, c, results) for c in places}
    rank_by = claim.get("rank_by", "bal_excess")
    layers = sorted(routing["block"].astype(int).unique())
    known = [b for b in blocks.values() if b]  # the placements with records so far
    sizes = {len(b) for b in known}
    k = sizes.pop() if len(sizes) == 1 else 0
    wanted = {frozenset(c) for c in combinations(layers, k)} if k else set()
    if layers and (any(b not in wanted for b in known) or len(set(known)) < len(known)
                   or (len(known) == len(places) and set(known) != wanted)):
        raise StudyError(f"{study['name']}: claim {claim['id']!r} must list every {k or 'k'}-of-{len(layers)} "
                         f"placement of the guide's MoE blocks {layers} exactly once as treatment")
    rows = []
    for seed, g in routing.groupby("seed"):
        chosen = frozenset(g.sort_values([rank_by, "block"], ascending=[False, True])["block"].astype(int).head(k))
        picked = next((c for c in places if blocks[c] == chosen), None)
        specialised = int(g["specialised"].sum()) if "specialised" in g else None
        rows.append({"seed": seed, "blocks": sorted(chosen), "placement": picked, "specialised_blocks": specialised,
                     "guidance": "yes" if specialised is None or specialised >= k else "no (fewer than k blocks "
                                 "pass the random-router test)"})
    return pd.DataFrame(rows, columns=["seed", "blocks", "placement", "specialised_blocks", "guidance"])


def _guided(study: dict, claim: dict, results) -> tuple[list, list, str]:
    """The picked placement's test accuracy against the mean of the other placements (or ``control``) on the same
    seed, in points; seeds missing any placement (or the control) are left out, so read ``n``."""
    picks = guided_picks(study, claim, results)
    places = claim["treatment"]
    acc = {c: config_values(study, c, results) for c in places}
    control = claim.get("control", "others")
    ctrl = config_values(study, control, results) if control != "others" else None
    a, b = [], []
    for seed, picked in zip(picks["seed"], picks["placement"]):
        if picked is None or any(seed not in acc[c].index for c in places) or (ctrl is not None and seed not in ctrl.index):
            continue
        others = [acc[c][seed] for c in places if c != picked]
        a.append(acc[picked][seed] * 100)
        b.append((sum(others) / len(others) if ctrl is None else ctrl[seed]) * 100)
    what = "the mean of the other placements" if ctrl is None else control
    return a, b, f"placement picked by {claim['guide']}'s routing vs {what}"


def claim_names(study: dict, claim: dict) -> list[str]:
    """Every config a claim reads: this study's by name, referenced studies' as ``study/config``."""
    names = []
    for key in ("treatment", "control", "guide"):
        value = claim.get(key, study["control"] if key == "control" and claim["kind"] in ("paired", "spread")
                          else None)
        names += value if isinstance(value, list) else [value] if value not in (None, "step0", "others") else []
    return names


def claim_configs(study: dict, claim: dict) -> set[str]:
    """The configs of this study whose runs a claim reads (configs of referenced studies left out)."""
    return {n for n in claim_names(study, claim) if "/" not in n}


def seeds_for_half_width(half_width: float, n: int, target: float = 0.5, limit: int = 10_000) -> int | None:
    """The smallest number of seeds whose 95% t-interval is at most +/- ``target`` at the spread that gave
    ``half_width`` with ``n`` seeds (SD = half_width * sqrt(n) / t(n-1)); the t quantile is the new n's, not the
    observed one's.  A point estimate of the spread: with few seeds the SD itself is uncertain."""
    from scipy import stats as sps

    if n < 2 or half_width != half_width:
        return None
    sd = half_width * math.sqrt(n) / sps.t.ppf(0.975, n - 1)
    for m in range(2, limit + 1):
        if sps.t.ppf(0.975, m - 1) * sd / math.sqrt(m) <= target:
            return m
    return None


def _side(estimate: float, expect: str, margin: float) -> str:
    if estimate != estimate:
        return "-"
    if expect in ("greater", "less") and abs(estimate) < 5e-4:  # prints as 0.000: on neither side
        return "zero"
    claimed = {"greater": estimate > 0, "less": estimate < 0, "equal": abs(estimate) <= margin,
               "no_less": estimate > -margin, "no_greater": estimate < margin}[expect]
    return "claimed side" if claimed else "other side"


def format_claims(table: pd.DataFrame, units: dict | None = None) -> str:
    """One line per claim: estimate [95% CI], p (Holm), verdict."""
    lines = []
    for r in table.itertuples():
        p = f", p_holm {r.p_holm:.3g}" if r.p_holm == r.p_holm else ""
        unit = " pts" if r.kind in ACCURACY_KINDS + ("spread",) else ""
        need = getattr(r, "seeds_needed", None)
        extra = ("; estimate at 0.000" if r.side == "zero" else f"; estimate on the {r.side}")
        extra += f"; ~{int(need)} seeds for +/-0.5" if need == need and need else ""
        ci = f"[{r.low:+.3f}, {r.high:+.3f}]" if r.low == r.low else "[no interval with fewer than 2 seeds]"
        lines.append(f"{r.id}: {r.contrast}: {r.estimate:+.3f}{unit} {ci} (n={r.n}{p}) "
                     f"expect {r.expect}{f' (margin {r.margin:g})' if r.margin else ''} -> {r.verdict}{extra}")
    return "\n".join(lines)


def format_summary(table: pd.DataFrame, metric: str = "test_acc") -> str:
    name = {"test_acc": "acc", "test_miou": "mIoU", "test_pixel_acc": "pix acc"}[metric]
    name_w = max([16, *(len(str(c)) for c in table["config"])])
    lines = [f"{'config':<{name_w}} {'n':>2} {name + ' mean':>9} {name + ' std':>8} {'params M':>9} {'GMACs':>7}"]
    for r in table.itertuples():
        lines.append(f"{r.config:<{name_w}} {r.n:>2} {r.acc_mean:>9.4f} {r.acc_std:>8.4f} {r.params_M:>9.3f} "
                     f"{r.gmacs:>7.4f}")
    return "\n".join(lines)


def format_contrasts(table: pd.DataFrame) -> str:
    """One line per config; every column keeps its spacing whatever the widths (long config names, wide
    intervals of few seeds)."""
    cis = [f"[{r.low:+.3f}, {r.high:+.3f}]" for r in table.itertuples()]
    name_w = max([16, *(len(str(c)) for c in table["config"])])
    ci_w = max([17, *map(len, cis)])
    lines = [f"{'config':<{name_w}} {'n':>2} {'delta pts':>9} {'95% CI':>{ci_w}} {'p_holm':>8} {'params M':>9} "
             f"{'GMACs':>7}"]
    for r, ci in zip(table.itertuples(), cis):
        lines.append(f"{r.config:<{name_w}} {r.n:>2} {r.delta:>+9.3f} {ci:>{ci_w}} {r.p_holm:>8.3g} "
                     f"{r.params_M:>9.3f} {r.gmacs:>7.4f}")
    return "\n".join(lines)


def project_claims(paths=None, results: Path | None = None) -> pd.DataFrame:
    """Every claim of every recorded study file (default: ``experiments/studies/*/*.yaml`` but the pilots), with its
    own study's verdict (Holm within the file) beside a project-wide one: Holm, and Benjamini-Hochberg, across
    every directional claim of every file that has a p-value.  Intervals stay per-claim 95% intervals; only the
    p-values change family.  A void study's claims stay void in both; an incomplete study's (fewer runs recorded
    than planned) read ``incomplete`` and stay out of the family, so a study in progress moves no other verdict."""
    from scipy.stats import false_discovery_control

    from ..analysis.stats import holm, verdict
    from .spec import ROOT, load_study

    if paths is None:
        paths = [p for p in sorted((ROOT / "experiments" / "studies").glob("*/*.yaml")) if p.parent.name != "pilots"]
    tables = []
    for path in paths:
        study = load_study(path)
        if not study["claims"] or study["profile"] == "gpu" or load_results(study, results).empty:
            continue
        table = evaluate_claims(study, results)
        table.insert(0, "study", study["name"])
        recorded, planned = progress(study, results)
        table["complete"] = recorded >= planned
        tables.append(table)
    if not tables:
        return pd.DataFrame(columns=["study", "id", "estimate", "low", "high", "p", "p_holm", "verdict", "complete",
                                     "p_project_holm", "verdict_project", "p_project_bh", "verdict_project_bh"])
    table = pd.concat(tables, ignore_index=True)
    family = table["expect"].isin(["greater", "less"]) & table["p"].notna() & table["complete"]
    table["p_project_holm"] = float("nan")
    table["p_project_bh"] = float("nan")
    table.loc[family, "p_project_holm"] = holm(table.loc[family, "p"])
    if family.any():
        table.loc[family, "p_project_bh"] = false_discovery_control(table.loc[family, "p"].to_numpy(), method="bh")
    for column, p in (("verdict_project", "p_project_holm"), ("verdict_project_bh", "p_project_bh")):
        table[column] = ["incomplete" if not r.complete else "void" if r.verdict == "void" else
                         verdict(r.low, r.high, getattr(r, p), r.expect, r.margin) for r in table.itertuples()]
    return table


def format_project_claims(table: pd.DataFrame) -> str:
    """One line per claim: study, id, estimate [CI], the study's verdict and the project-wide ones; the claims whose
    verdict changes with the family are marked."""
    lines = [f"{len(table)} claims in {table['study'].nunique()} recorded studies; project-wide family: "
             f"{int(table['p_project_holm'].notna().sum())} directional claims with a p-value from complete "
             f"studies (a study still being recorded reads 'incomplete' and stays out of the family)"]
    for r in table.itertuples():
        changed = " *" if r.verdict_project != "incomplete" and (
            r.verdict != r.verdict_project or r.verdict != r.verdict_project_bh) else ""
        ci = f"[{r.low:+.3f}, {r.high:+.3f}]" if r.low == r.low else "[no interval]"
        lines.append(f"{r.study}/{r.id}: {r.estimate:+.3f} {ci} (n={r.n}) expect {r.expect}"
                     f"{f' (margin {r.margin:g})' if r.margin else ''}; study: {r.verdict}"
                     f"{' (provisional: the study is incomplete)' if not r.complete else ''}; "
                     f"project Holm: {r.verdict_project}; project BH: {r.verdict_project_bh}{changed}")
    if any(line.endswith(" *") for line in lines):
        lines.append("* the verdict depends on the family it is read in")
    return "\n".join(lines)


VERDICT_COLORS = {"agrees": "#d4edda", "disagrees": "#f8d7da", "inconclusive": "#e9ecef", "void": "#fff3cd",
                  "incomplete": "#ffffff", "not recorded": "#ffffff"}  # the notebooks' one verdict palette


class ClaimLines:
    """Claims shown as an HTML table in a notebook (numbers never wrap) and as :func:`format_claims`'s lines to a
    terminal and to nbval, which compares the text."""

    def __init__(self, table: pd.DataFrame):
        self.table = table

    def __repr__(self) -> str:
        return format_claims(self.table)

    def _repr_html_(self) -> str:
        import html

        cell = 'style="padding:2px 8px;border-bottom:1px solid #ddd;text-align:{};vertical-align:top;{}"'
        head = "".join(f"<th {cell.format(a, 'border-bottom:2px solid #999')}>{h}</th>" for h, a in (
            ("claim", "left"), ("contrast", "left"), ("estimate [95% CI]", "right"), ("n", "right"),
            ("p (Holm)", "right"), ("expect", "left"), ("verdict", "left"), ("seeds for +/-0.5", "right")))
        rows = []
        for r in self.table.itertuples():
            ci = (f"{r.estimate:+.3f} [{r.low:+.3f}, {r.high:+.3f}]" if r.low == r.low else
                  f"{r.estimate:+.3f} [no interval]")
            p = f"{r.p_holm:.3g}" if r.p_holm == r.p_holm else "-"
            expect = f"{r.expect}" + (f" (margin {r.margin:g})" if r.margin else "")
            color = VERDICT_COLORS.get(r.verdict, "#ffffff")
            rows.append("<tr>" + "".join([
                f"<td {cell.format('left', 'font-weight:600')}>{html.escape(str(r.id))}</td>",
                f"<td {cell.format('left', 'max-width:24em')}>{html.escape(str(r.contrast))}</td>",
                f"<td {cell.format('right', 'white-space:nowrap')}>{ci}</td>",
                f"<td {cell.format('right', '')}>{r.n}</td>",
                f"<td {cell.format('right', '')}>{p}</td>",
                f"<td {cell.format('left', 'white-space:nowrap')}>{html.escape(expect)}</td>",
                f"<td {cell.format('left', f'background:{color};white-space:nowrap')}>{html.escape(r.verdict)}</td>",
                f"<td {cell.format('right', '')}>{_seeds(getattr(r, 'seeds_needed', None))}</td>"]) + "</tr>")
        return (f'<table style="border-collapse:collapse;font-size:88%"><thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(rows)}</tbody></table>")


def _seeds(need) -> str:
    return f"~{int(need)}" if need is not None and need == need and need else "-"
