"""A notebook's answer, shown first: the pre-registered claims it decides as one HTML table, one row per claim and
one column per study (a protocol, or a confirmation on fresh seeds), each cell the estimate with its 95% interval,
the study's own verdict (Holm within its file) and the project-wide one (Holm across every directional claim of every
recorded study, from :func:`~workbench.studies.claims.project_claims`).  A claim whose study failed a
pre-registered check reads ``void``; a study with fewer runs recorded than planned reads ``incomplete``: its
estimates are shown, but no verdict until every run is in.

    from workbench.studies import answer
    answer.show(["placement"], confirm=[("confirm", "confirm_all")], claim_kinds=["paired"])

:func:`verdict_table` gives the same as a long DataFrame.  Beside it, the small tables that open the notebooks
without claims (the shipped checkpoints, the cost of MoE layers) and the pruning choice's rank among all subsets.

Imports: this package's ``spec``, ``records``, ``claims``, ``report`` and ``workbench.analysis.card``.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from . import report
from .claims import VERDICT_COLORS, evaluate_claims, project_claims
from .records import load_pruning, progress
from .spec import METRICS, ROOT, load_study

_PROJECT: dict = {}


def _project(results=None) -> pd.DataFrame:
    """project_claims, computed once per kernel (it reads every recorded study)."""
    key = str(results)
    if key not in _PROJECT:
        _PROJECT[key] = project_claims(results=results)
    return _PROJECT[key]


def _unit(study: dict, kind: str) -> str:
    metric = METRICS[study["metric"]].removeprefix("test ")
    return {"paired": f"{metric} points", "range": f"{metric} points", "worst": f"{metric} points",
            "pruning": f"{metric} points", "spread": f"{metric} points of seed SD", "excess": "NMI",
            "depth_trend": "NMI per block", "guided": f"{metric} points", "refit": f"{metric} points",
            "experts": f"{metric} points"}.get(kind, "")


def _path(item) -> Path:
    """A study file from 'kind/protocol' (a file under experiments/studies/) or a path."""
    if isinstance(item, str) and "/" in item and not item.endswith(".yaml"):
        kind, protocol = item.split("/")
        return report.study_file(kind, protocol)
    return Path(item)


def _label(item, study: dict) -> str:
    if isinstance(item, str) and "/" in item and not item.endswith(".yaml"):
        return report.label(item.split("/")[1])
    return study["name"]


def columns(kinds, confirm=()) -> list[tuple[str, list[Path]]]:
    """(column label, study files): one column per protocol holding the ``kinds`` (e.g. placement and routing under
    the scratch protocol), then each entry of ``confirm`` (a kind, or a tuple of kinds read as one column) as a
    scratch confirmation column placed after the scratch one."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    out = []
    for protocol in report.PROTOCOLS:
        files = [report.study_file(k, protocol) for k in kinds if report.study_file(k, protocol).exists()]
        if files:
            out.append((report.label(protocol), files))
        if protocol == "scratch":
            for group in confirm:
                files = [report.study_file(k, "scratch") for k in ((group,) if isinstance(group, str) else group)]
                seeds = len(load_study(files[0])["seeds"])
                out.append((f"scratch protocol, confirmation on {seeds} fresh seeds", files))
    return out


def verdict_table(cols, ids=None, claim_kinds=None, results=None) -> pd.DataFrame:
    """One row per (column, claim): ``cols`` is a list of (label, study files) as :func:`columns` gives (or of
    'kind/protocol' strings and paths, each its own column).  Columns: column, study, claim, says, contrast, kind,
    unit, n, estimate, low, high, expect, margin, verdict (the study's Holm), verdict_project (project-wide Holm;
    '-' for a study outside the project family), runs, planned, status ('complete', 'incomplete', 'not recorded')."""
    project = _project(results).set_index(["study", "id"]) if len(_project(results)) else None
    rows = []
    for col in cols:
        label, files = col if isinstance(col, tuple) else (None, [col])
        for f in files:
            study = load_study(_path(f))
            runs, planned = progress(study, results)
            status = "not recorded" if not runs else "complete" if runs >= planned else "incomplete"
            claims = evaluate_claims(study, results) if runs else pd.DataFrame(
                [{"id": c["id"], "says": c["says"], "kind": c["kind"], "expect": c["expect"],
                  "margin": float(c.get("margin", 0.0))} for c in study["claims"]])
            for r in claims.to_dict("records"):
                if (ids is not None and r["id"] not in ids) or (claim_kinds is not None and
                                                                r["kind"] not in claim_kinds):
                    continue
                key = (study["name"], r["id"])
                rows.append({"column": label or _label(f, study),
                             "study": study["name"], "claim": r["id"], "says": r["says"],
                             "contrast": r.get("contrast", ""), "kind": r["kind"], "unit": _unit(study, r["kind"]),
                             "n": r.get("n"), "estimate": r.get("estimate"), "low": r.get("low"),
                             "high": r.get("high"), "expect": r["expect"], "margin": r["margin"],
                             "verdict": ("incomplete" if status == "incomplete" else
                                         r.get("verdict", "not recorded")),
                             "verdict_project": (project.loc[key, "verdict_project"]
                                                 if project is not None and key in project.index else "-"),
                             "runs": runs, "planned": planned, "status": status,
                             "void_because": r.get("void_because") or ""})
    table = pd.DataFrame(rows)
    if len(table):
        clash = table[table.duplicated(["column", "claim"], keep=False)]
        if len(clash):
            raise ValueError(f"claim {clash['claim'].iloc[0]!r} appears twice in column {clash['column'].iloc[0]!r} "
                             f"({', '.join(clash['study'])}): give each study its own column")
    return table


def _ci(r) -> str:
    if r["estimate"] != r["estimate"] or r["estimate"] is None:
        return "no estimate"
    return f"{r['estimate']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"


def _count(n) -> str:
    """A seed count as an integer (a column holding a not-recorded study's NaN turns every count into a float)."""
    return str(int(n)) if n == n else "-"


def verdict_text(table: pd.DataFrame) -> str:
    """The table as plain lines (what a terminal, and nbval, read)."""
    lines = []
    for r in table.to_dict("records"):
        note = f" ({r['status']}: {r['runs']} of {r['planned']} runs)" if r["status"] != "complete" else ""
        lines.append(f"{r['column']} | {r['study']} | {r['claim']}: {_ci(r)} {r['unit']} (n={_count(r['n'])}) -> "
                     f"{r['verdict']}; project-wide {r['verdict_project']}{note}")
    return "\n".join(lines)


def _badge(verdict: str) -> str:
    color = VERDICT_COLORS.get(verdict, "#ffffff")
    return (f'<span style="background:{color};padding:1px 6px;border-radius:3px;font-weight:600">'
            f"{html.escape(verdict)}</span>")


def verdict_html(table: pd.DataFrame, caption: str | None = None) -> str:
    """Claims as rows, columns as the table's ``column`` values (in order): estimate [95% CI] and n, the study's
    verdict as a coloured label, the project-wide verdict beneath; incomplete and unrecorded studies say so in
    their header.  No cell wraps a number."""
    if not len(table):
        return "<p>no claims</p>"
    cols = list(dict.fromkeys(table["column"]))
    claims = list(dict.fromkeys(table["claim"]))
    small = 'style="font-size:85%;color:#555;font-weight:normal"'
    head = ['<th style="padding:4px 10px;vertical-align:bottom;border-bottom:2px solid #999;text-align:left">claim</th>']
    for c in cols:
        part = table[table["column"] == c]
        studies = part.drop_duplicates("study")
        notes = [f"{html.escape(s.study)}" + (f": {s.status}, {s.runs} of {s.planned} runs" if s.status != "complete"
                                              else "") for s in studies.itertuples()]
        head.append(f'<th style="padding:4px 10px;vertical-align:bottom;border-bottom:2px solid #999;text-align:left">{html.escape(c)}<br><span {small}>{"<br>".join(notes)}</span></th>')
    body = []
    for claim in claims:
        rows = table[table["claim"] == claim]
        first = rows.iloc[0]
        cells = [f'<td style="padding:4px 10px;vertical-align:top;border-bottom:1px solid #ddd;text-align:left;max-width:26em"><b>{html.escape(claim)}</b><br><span {small}>'
                 f'{html.escape(str(first["contrast"] or first["says"]))} ({html.escape(first["unit"])}); '
                 f'expect {html.escape(first["expect"])}</span></td>']
        for c in cols:
            hit = rows[rows["column"] == c]
            if not len(hit):
                cells.append('<td style="padding:4px 10px;vertical-align:top;border-bottom:1px solid #ddd;text-align:left;color:#999">&ndash;</td>')
                continue
            r = hit.iloc[0]
            if r["status"] == "not recorded":
                cells.append(f'<td style="padding:4px 10px;vertical-align:top;border-bottom:1px solid #ddd;text-align:left">{_badge("not recorded")}</td>')
                continue
            margin = f", margin {r['margin']:g}" if r["margin"] else ""
            provisional = f'<br><span {small}>no verdict until every run is in</span>' if r["status"] == "incomplete" \
                else ""
            cells.append(f'<td style="padding:4px 10px;vertical-align:top;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap">{_ci(r)}<br><span {small}>n = {r["n"]}'
                         f'{margin}</span><br>{_badge(r["verdict"])}<br><span {small}>project-wide: '
                         f'{html.escape(str(r["verdict_project"]))}</span>{provisional}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    if caption is None:
        project = _project()
        caption = (f"Estimate and 95% interval per claim, in the unit beside its name; the label is the study's own "
                   f"verdict (Holm across the directional claims of its file), beneath it the project-wide one (Holm "
                   f"across all {int(project['p_project_holm'].notna().sum())} directional claims of the "
                   f"{project['study'].nunique()} recorded studies). <i>void</i>: an arm the claim reads failed a "
                   f"pre-registered check.")
    return ('<table style="border-collapse:collapse;font-size:90%">'
            f'<caption style="caption-side:bottom;text-align:left;font-size:85%;color:#555;max-width:60em">{caption}'
            f"</caption><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(body)}</tbody></table>")


VERBS = {"agrees": "holds", "disagrees": "does not hold", "inconclusive": "is not decided",
         "void": "is void: an arm it reads failed a pre-registered check that it learned",
         "not recorded": "has no runs recorded yet"}


def _signed(x: float) -> str:
    text = f"{x:+.3f}"
    return "+0.000" if text == "-0.000" else text


def _contrast_words(r) -> str:
    contrast = str(r["contrast"] or "").strip().replace(" vs ", " minus ")
    if ": " in contrast:  # 'all: NMI over random routers' -> 'in all, NMI over random routers'
        arm, what = contrast.split(": ", 1)
        contrast = f"in {arm}, {what}"
    return contrast or r["claim"]


def finding_sentence(r) -> str:
    """One claim's result as a sentence a reader can quote: where it was tested, what the paper says, whether it
    holds, the estimate with its 95% interval and n, and the project-wide verdict where it differs.  Every word
    comes from the study file and its records."""
    where = f"{r['column']}: " if r.get("column") else ""
    says = str(r["says"]).rstrip(".")
    if r["status"] == "not recorded":
        return f"{where}the claim that {says} {VERBS['not recorded']}."
    estimate = ("" if r["estimate"] is None or r["estimate"] != r["estimate"] else
                f"{_contrast_words(r)} is {_signed(r['estimate'])} {r['unit']} (95% interval {_signed(r['low'])} "
                f"to {_signed(r['high'])}, n = {r['n']})")
    if r["status"] == "incomplete":
        return (f"{where}the claim that {says} is not decided yet ({r['runs']} of {r['planned']} runs recorded)"
                + (f"; so far {estimate}." if estimate else "."))
    project = str(r.get("verdict_project", "-"))
    also = (f" Across every recorded study (project-wide Holm) it reads {project}."
            if project not in ("-", r["verdict"]) else "")
    margin = float(r.get("margin") or 0.0)
    word = "point" if "points" in r["unit"] else r["unit"]
    inside = (f" The whole interval lies within the {margin:g}-{word} margin fixed before the runs: "
              f"no effect of the size that matters." if r["verdict"] == "disagrees" and margin and estimate
              and abs(r["low"]) < margin and abs(r["high"]) < margin else "")
    verb = VERBS.get(r["verdict"], r["verdict"])
    if r["verdict"] == "void" and r.get("void_because"):  # which arm failed which check, from the records
        verb = f"is void ({r['void_because']}: the study file's checks that the arms learned)"
    return f"{where}the claim that {says} {verb}" + (
        f": {estimate}." if estimate else ".") + inside + also


class Findings:
    """The verdict table in words, one sentence per claim and study (Markdown in a notebook, plain text to nbval)."""

    def __init__(self, table: pd.DataFrame):
        self.sentences = [finding_sentence(r) for r in table.to_dict("records")]

    def _repr_markdown_(self) -> str:
        return "\n".join(f"- {s[0].upper()}{s[1:]}" for s in self.sentences)

    def __repr__(self) -> str:
        return "\n".join(self.sentences)


class Answer:
    """A verdict table that a notebook displays as HTML (and a terminal or nbval reads as text lines)."""

    def __init__(self, table: pd.DataFrame, caption: str | None = None):
        self.table, self.caption = table, caption

    def _repr_html_(self) -> str:
        return verdict_html(self.table, self.caption)

    def __repr__(self) -> str:
        return verdict_text(self.table)

    def findings(self, columns=None) -> Findings:
        """The same claims as sentences (only the columns named in ``columns``, if given)."""
        table = self.table if columns is None else self.table[self.table["column"].isin(columns)]
        return Findings(table)


def show(kinds, confirm=(), ids=None, claim_kinds=None, regime=()) -> Answer:
    """The answer table of the studies of ``kinds`` (one column per protocol) and their scratch confirmations;
    ``regime``: (label, study file) columns placed first (the regime studies, e.g. ``experiments/studies/regime/
    upcycle4.yaml``), their claims on the rows of the same ids."""
    cols = [(label, [Path(path) if Path(path).is_absolute() else ROOT / path]) for label, path in regime]
    return Answer(verdict_table(cols + columns(kinds, confirm), ids=ids, claim_kinds=claim_kinds))


class Table:
    """A small DataFrame shown as HTML without its index (and as text to nbval)."""

    def __init__(self, df: pd.DataFrame, caption: str = "", formats: dict | None = None):
        self.df, self.caption, self.formats = df, caption, formats or {}

    def _repr_html_(self) -> str:
        styler = self.df.style.hide(axis="index").format(precision=4, na_rep="-")
        if self.formats:
            styler = styler.format(self.formats, subset=list(self.formats), na_rep="-")
        if self.caption:
            styler = styler.set_caption(self.caption).set_table_styles(
                [{"selector": "caption", "props": "caption-side:bottom;text-align:left;font-size:85%;color:#555"}])
        return styler.set_table_styles([{"selector": "td, th", "props": "white-space:nowrap;text-align:right"}],
                                        overwrite=False).to_html()

    def __repr__(self) -> str:
        return self.df.to_string(index=False) + (f"\n{self.caption}" if self.caption else "")


def pruning_ranks(kind: str = "placement", config: str = "all") -> Table:
    """Per protocol: where the specialisation metric's choice of layers to densify ranks among every subset (by
    validation accuracy, 1 = best), beside the rank a random choice averages."""
    rows = []
    for protocol in report.protocols(kind):
        pr = load_pruning(report.study_file(kind, protocol), [config])
        if pr.empty:
            continue
        subsets = int(pr["subsets"].iloc[0])
        rows.append({"protocol": report.label(protocol), "seeds": len(pr), "subsets": subsets,
                     "mean rank of the metric's choice": pr["least_rank"].mean(),
                     "ranks per seed": ", ".join(str(int(x)) for x in pr.sort_values("seed")["least_rank"]),
                     "a random choice averages": (subsets + 1) / 2})
    return Table(pd.DataFrame(rows), "1 = the best subset by validation accuracy",
                 {"mean rank of the metric's choice": "{:.1f}", "a random choice averages": "{:.1f}"})


def checkpoints(names=("vimoe_tiny_fmnist_dense", "vimoe_tiny_fmnist")) -> Table:
    """The shipped checkpoints' facts from their config.json (no weights read) and their recorded test scores."""
    from ..analysis.card import config_summary

    rows = []
    for name in names:
        config = json.loads((ROOT / "experiments" / "checkpoints" / name / "config.json").read_text())
        s, shipped = config_summary(config), config.get("shipped_test") or {}
        kwargs = {**(config.get("model_kwargs") or {}), **(config.get("upcycle") or {})}
        rows.append({"checkpoint": name, "model": s["model"],
                     "MoE": (f"{kwargs.get('moe_layers', 'last-2')}, {s['num_experts']} experts, "
                             f"top-{kwargs.get('top_k', 1)}" + (", shared expert" if kwargs.get("shared_expert")
                                                                  not in (None, "none") else "")) if s["moe"]
                     else "none (dense)",
                     "test accuracy (recorded)": shipped.get("acc", (config.get("metrics") or {}).get("test_acc")),
                     "test images": shipped.get("n")})
    return Table(pd.DataFrame(rows), "as recorded in each checkpoint's config.json",
                 {"test accuracy (recorded)": "{:.4f}"})


BENCH_DIR = ROOT / "experiments" / "results" / "bench"


def read_bench(name: str) -> dict:
    """One recorded benchmark, ``experiments/results/bench/<name>`` (named, so that a later ``bench ... --save``
    adds a file and changes nothing that reads this one)."""
    path = BENCH_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"no recorded benchmark {path}: pick one of {sorted(p.name for p in BENCH_DIR.glob('*.json'))}")
    return json.loads(path.read_text())


def _moe_setting(model) -> tuple[int, bool] | None:
    """(top_k, has a shared expert) of a model's MoE layers; None for a dense model."""
    from ..moe import moe_modules

    layer = next(iter(moe_modules(model).values()), None)
    return None if layer is None else (layer.top_k, layer.shared is not None)


def costs(models: dict, bench: dict, base: str = "dense") -> Table:
    """What MoE layers cost against ``base``: per model (name -> timm model), parameters and activated MACs as
    multiples of the dense model's, beside the grouped-dispatch time ratio that ``bench`` (a recorded ``bench moe``,
    :func:`read_bench`) measured for the model's own layer form (top-k, with or without a shared expert): forward +
    backward over a dense FFN of the same activated width."""
    from ..analysis.flops import profile

    prof = {name: profile(m) for name, m in models.items()}
    rows = [{"model": name, "params (M)": p.params / 1e6, "params x dense": p.params / prof[base].params,
             "MACs x dense": p.macs / prof[base].macs} for name, p in prof.items()]
    grouped = pd.DataFrame(bench["results"]).query("dispatch == 'grouped'")
    times = {(int(r.top_k), r.shared != "none"): f"{r.ratio:.2f}x" for r in grouped.itertuples()}
    table = pd.DataFrame(rows)
    table["time x dense FFN (recorded)"] = [times.get(_moe_setting(models[name]), "-") for name in table["model"]]
    device = bench["provenance"]["device"]
    return Table(table, f"params and MACs profiled here; time: the recorded benchmark ({device}), grouped dispatch, per "
                        "MoE layer of the model's form against a dense FFN of the same activated width",
                 {"params (M)": "{:.3f}", "params x dense": "{:.2f}", "MACs x dense": "{:.3f}"})
