"""Plotly figures for routing and cost, all in the one expert palette (``workbench.palette``).

Every function returns a ``plotly.graph_objects.Figure``; :func:`save_figure` writes HTML always and PNG when a
Chromium is available for kaleido.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from .palette import NULL_COLOR, expert_color, expert_name, expert_rgb, paint

LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=60, b=50))


def _class_tables(stats) -> dict[int, torch.Tensor]:
    if hasattr(stats, "layers"):  # RoutingStats
        return {int(b): s.class_expert.float() for b, s in stats.layers.items()}
    return {int(b): torch.as_tensor(np.asarray(t), dtype=torch.float32) for b, t in stats.items()}


def _nmi(counts: np.ndarray) -> float:
    """Normalised (arithmetic) mutual information between the rows and columns of a count table."""
    p = counts / max(counts.sum(), 1)
    pr, pc = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pr @ pc)[nz])).sum())
    h = [-float((q[q > 0] * np.log(q[q > 0])).sum()) for q in (pr, pc)]
    return mi / max(sum(h) / 2, 1e-12)


def class_expert_heatmap(stats, class_names=None, normalise: str = "class", title: str = "Class x expert routing",
                         start: int | str = "most specialised") -> go.Figure:
    """P(expert | class) per MoE layer, a slider across layers, each cell's value written in it.  The colour range
    runs from 0 to the largest share in any layer (not to 1, which would wash out the shares a top-1 router spreads
    over 8 experts), the same for every layer so layers compare by eye.  ``start``: the block shown first (and in a
    static image), by default the most specialised one (highest class-expert NMI of its counts).  ``stats``: a
    RoutingStats, or recorded (classes, experts) count tables keyed by block."""
    tables = _class_tables(stats)
    blocks = sorted(tables)
    class_names = [str(c) for c in (class_names or range(next(iter(tables.values())).shape[0]))]
    nmi = {b: _nmi(tables[b].numpy().astype(np.float64)) for b in blocks}
    frames = []
    for b in blocks:
        table = tables[b]
        if normalise == "class":
            table = table / table.sum(1, keepdim=True).clamp(min=1)
        frames.append(table.numpy())
    E = frames[0].shape[1]
    zmax = float(np.ceil(max(z.max() for z in frames) * 20) / 20) or 1.0
    active = blocks.index(max(blocks, key=nmi.get) if start == "most specialised" else int(start))
    names = {b: f"{title}, block {b} (class-expert NMI {nmi[b]:.3f})" for b in blocks}
    fig = go.Figure()
    for i, (b, z) in enumerate(zip(blocks, frames)):
        fig.add_trace(go.Heatmap(z=z, x=[f"e{e}" for e in range(z.shape[1])], y=class_names,
                                 zmin=0, zmax=zmax, colorscale="Viridis", visible=i == active, name=f"block {b}",
                                 colorbar=dict(title="P(e|c)"), texttemplate="%{z:.2f}", textfont=dict(size=10),
                                 hovertemplate="class %{y}<br>expert %{x}<br>P=%{z:.3f}<extra>block " + str(b) + "</extra>"))
    steps = [dict(method="update", label=f"block {b}",
                  args=[{"visible": [j == i for j in range(len(blocks))]}, {"title": names[b]}])
             for i, b in enumerate(blocks)]
    fig.update_layout(**{**LAYOUT, "margin": dict(l=110, r=20, t=70, b=50)}, title=names[blocks[active]],
                      height=560, sliders=[dict(active=active, steps=steps, currentvalue=dict(prefix="layer: "),
                                                pad=dict(t=40))],
                      xaxis=dict(title="expert", tickmode="array", tickvals=[f"e{e}" for e in range(E)]),
                      yaxis=dict(title="class", autorange="reversed"))
    for e in range(E):  # colour key on the axis: each expert's tick in its palette colour
        fig.add_shape(type="rect", xref="x", yref="paper", x0=e - 0.5, x1=e + 0.5, y0=1.0, y1=1.03,
                      fillcolor=expert_color(e), line_width=0)
    return fig


def metrics_by_layer(report: pd.DataFrame, metrics=("nmi", "purity", "consistency")) -> go.Figure:
    """Each specialisation metric by block with its label-permutation null as a band (mean +/- 3 std)."""
    r = report.sort_values("block")
    x = [str(b) for b in r["block"]]
    fig = go.Figure()
    palette = ("#0072B2", "#D55E00", "#009E73", "#CC79A7")
    for color, m in zip(palette, metrics):
        lo = r[f"null_{m}"] - 3 * r[f"null_{m}_std"]
        hi = r[f"null_{m}"] + 3 * r[f"null_{m}_std"]
        fig.add_trace(go.Scatter(x=x + x[::-1], y=list(hi) + list(lo)[::-1], fill="toself", fillcolor=NULL_COLOR,
                                 line=dict(width=0), hoverinfo="skip", showlegend=False, legendgroup=m))
        fig.add_trace(go.Scatter(x=x, y=r[f"null_{m}"], mode="lines", line=dict(color=color, dash="dot"),
                                 name=f"{m} (null)", legendgroup=m))
        fig.add_trace(go.Scatter(x=x, y=r[m], mode="lines+markers", line=dict(color=color), name=m,
                                 legendgroup=m))
    fig.update_layout(**LAYOUT, title="Routing specialisation by layer (band: label-permutation null, ±3 std)",
                      xaxis=dict(title="block", type="category"), yaxis=dict(title="metric", range=[0, 1.02]))
    return fig


def specialisation_by_depth(rows: pd.DataFrame, metric: str = "nmi", group: str = "group") -> go.Figure:
    """A metric by block, mean over seeds with a min-max bar, one line per ``group``, beside its
    label-permutation null (dotted) when there is one.  ``rows``: one row per (group, seed, block) with ``metric`` and
    ``null_<metric>`` columns (as ``study.load_routing`` returns)."""
    fig = go.Figure()
    for i, (name, df) in enumerate(rows.groupby(group, sort=False)):
        g = df.groupby("block")
        mean, lo, hi = g[metric].mean(), g[metric].min(), g[metric].max()
        x = [str(b) for b in mean.index]
        color = expert_color(i)
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines+markers", name=f"{name} (n={df['seed'].nunique()})",
                                 line=dict(color=color), legendgroup=name,
                                 error_y=dict(type="data", symmetric=False, array=hi - mean, arrayminus=mean - lo)))
        baseline = f"random_{metric}" if f"random_{metric}" in df else f"null_{metric}"
        if baseline in df:  # the random-router baseline where recorded, else the label-permutation null
            label = "random routers" if baseline.startswith("random") else "permutation null"
            fig.add_trace(go.Scatter(x=x, y=g[baseline].mean(), mode="lines", name=f"{name}, {label}",
                                     legendgroup=name, line=dict(color=color, dash="dot")))
    fig.update_layout(**{**LAYOUT, "margin": dict(l=60, r=20, t=90, b=50)},
                      title=f"Routing specialisation ({metric}) by depth<br><sup>mean over seeds, bars min-max; dotted: "
                            "the same layer inputs routed by random routers</sup>",
                      xaxis=dict(title="block", type="category"), yaxis=dict(title=metric, rangemode="tozero"))
    return fig


def forest_plot(tables: dict, title: str = "Paired difference from the control (95% CI)",
                unit: str = "accuracy points", margin: float | None = None, shared_x: bool = False) -> go.Figure:
    """Forest plot of paired differences: ``tables`` maps a panel name (e.g. a protocol) to a table with
    ``config``, ``delta``, ``low``, ``high`` (as ``study.contrasts`` returns; optional ``gmacs``, ``p_holm``).
    One panel per table, each with its own rows and by default its own scale (protocols differ in effect size by an
    order of magnitude; ``shared_x`` puts every panel on one scale, for panels of the same claims); configs keep the
    study's order, top to bottom; the dashed zero line is the control, and dotted lines at +/- ``margin`` mark the
    claims' pre-registered margin."""
    from plotly.subplots import make_subplots

    tables = {k: t for k, t in tables.items() if len(t)}
    sizes = [len(t) for t in tables.values()]
    many = len(tables) > 1
    height = 140 + 40 * sum(sizes) + 110 * (len(tables) - 1)
    fig = make_subplots(rows=len(tables), cols=1, row_heights=sizes or None, subplot_titles=list(tables) if many else
                        None, vertical_spacing=min(0.3, 105 / (height - 110)) if many else 0.1) if tables else go.Figure()
    for i, (name, t) in enumerate(tables.items()):
        t = t.iloc[::-1]
        labels = [f"{c}" + (f"  ({g:.4f} GMACs)" if "gmacs" in t else "") for c, g in
                  zip(t["config"], t["gmacs"] if "gmacs" in t else [None] * len(t))]
        hover = [f"{c}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (f", Holm p {p:.3g}" if "p_holm" in t else "")
                 for c, d, lo, hi, p in zip(t["config"], t["delta"], t["low"], t["high"],
                                            t["p_holm"] if "p_holm" in t else [None] * len(t))]
        fig.add_trace(go.Scatter(x=t["delta"], y=labels, mode="markers", name=name, hovertext=hover,
                                 hoverinfo="text", showlegend=False, marker=dict(size=9, color=expert_color(0)),
                                 error_x=dict(type="data", symmetric=False, array=t["high"] - t["delta"],
                                              arrayminus=t["delta"] - t["low"])), row=i + 1, col=1)
        fig.add_vline(x=0, line=dict(color="#444", dash="dash"), row=i + 1, col=1)
        for edge in ((-margin, margin) if margin else ()):
            fig.add_vline(x=edge, line=dict(color="#999", dash="dot"), row=i + 1, col=1)
        fig.update_xaxes(title_text=f"difference from the control ({unit})" if i == len(tables) - 1 or many else
                         None, title_font=dict(size=11), row=i + 1, col=1)
    if shared_x and tables:
        ends = [v for t in tables.values() for v in (*t["low"], *t["high"])] + ([-margin, margin] if margin else [0])
        pad = 0.05 * (max(ends) - min(ends) or 1)
        fig.update_xaxes(range=[min(ends) - pad, max(ends) + pad])
    if margin:
        title += f"<br><sup>dotted lines: the +/-{margin:g} margin</sup>"
    fig.update_layout(**LAYOUT, title=title, height=height)
    return fig


def pruning_subsets(record_pruning: dict, title: str = "Every 2-of-4 densified subset") -> go.Figure:
    """One run's pruning analysis: validation vs test accuracy of every densified subset, the metric's choice
    (least specialised on validation) and the unpruned model marked."""
    subsets = record_pruning["subsets"]
    full, rest = subsets[0], subsets[1:]
    least = tuple(record_pruning["least_specialised"])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[s["val_acc"] for s in rest], y=[s["test_acc"] for s in rest], mode="markers+text",
                             text=[str(s["blocks"]) for s in rest], textposition="top center", name="densified subset",
                             marker=dict(size=10, color=[expert_color(1) if tuple(s["blocks"]) == least
                                                         else expert_color(0) for s in rest])))
    fig.add_trace(go.Scatter(x=[full["val_acc"]], y=[full["test_acc"]], mode="markers", name="unpruned",
                             marker=dict(size=12, symbol="star", color=expert_color(2))))
    fig.update_layout(**LAYOUT, title=title + f" (orange: the least specialised {list(least)})",
                      xaxis=dict(title="validation accuracy"), yaxis=dict(title="test accuracy"))
    return fig


def expert_pruning(table: pd.DataFrame, unpruned: float, title: str = "Experts pruned or merged per MoE layer",
                   unpruned_ft: float | None = None) -> go.Figure:
    """Mean test accuracy (%; a segmentation table's test mIoU) against total parameters for each method over the
    kept-expert counts (one line per
    method; fine-tuned variants, ``_ft``, as open markers), the unpruned model as a dashed line (and, dotted, the
    unpruned model given the same fine-tune).  ``table``: :func:`workbench.studies.pruning.expert_pruning_table`."""
    fig = go.Figure()
    score = "test_miou" if "test_miou" in table.columns else "test_acc"  # a segmentation study's table: test mIoU
    bases = sorted(table["method"].str.removesuffix("_ft").unique().tolist())  # one colour per method, tuned or not
    for method, rows in table.groupby("method", sort=False):
        base = method.removesuffix("_ft")
        colour = "#888888" if base == "random" else expert_color(bases.index(base))
        tuned = method.endswith("_ft")
        fig.add_trace(go.Scatter(x=rows["params"], y=rows[score], name=method, text=rows["keep"].astype(str),
                                 mode="markers" if tuned else "lines+markers+text", textposition="top center",
                                 marker=dict(size=11 if tuned else 8, color=colour,
                                             symbol="circle-open" if tuned else "circle", line=dict(width=2))))
    fig.add_hline(y=unpruned, line_dash="dash", line_color="#444444", annotation_text="unpruned",
                  annotation_position="top left")  # apart from the fine-tuned line's label, which may lie close
    if unpruned_ft is not None:
        fig.add_hline(y=unpruned_ft, line_dash="dot", line_color="#444444", annotation_text="unpruned, fine-tuned",
                      annotation_position="bottom right")
    fig.update_layout(**LAYOUT, title=title + " (labels: experts kept)",
                      xaxis=dict(title="total parameters"),
                      yaxis=dict(title=("test mIoU" if score == "test_miou" else "test accuracy")
                                 + " (%), mean over seeds"))
    return fig


def position_maps(tables: dict, grid: tuple[int, int], title: str = "Dominant expert per patch position"
                  ) -> go.Figure:
    """For each block (token routing), each patch position tinted by the expert most of its patches go to over a
    dataset, opacity by that expert's share.  ``tables``: (positions, experts) counts keyed by block."""
    from plotly.subplots import make_subplots

    blocks = sorted(tables, key=int)
    fig = make_subplots(rows=1, cols=len(blocks), subplot_titles=[f"block {b}" for b in blocks],
                        horizontal_spacing=0.02)
    used = set()
    for j, b in enumerate(blocks, 1):
        counts = np.asarray(tables[b], dtype=np.float64)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        top = share.argmax(1)
        used.update(int(e) for e in top)
        rgb = overlay_rgb(np.zeros(grid, np.float32), top.reshape(grid), share.max(1).reshape(grid), alpha=1.0)
        fig.add_trace(go.Image(z=rgb, hoverinfo="skip"), row=1, col=j)
    for e in sorted(used):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=expert_name(e),
                                 marker=dict(size=12, color=expert_color(e), symbol="square")))
    fig.update_layout(**LAYOUT, title=title, legend=dict(itemclick=False))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def overlay_rgb(image: np.ndarray, experts: np.ndarray, gates: np.ndarray | None = None, *, scale: int = 8,
                alpha: float = 0.6) -> np.ndarray:
    """An RGB uint8 picture: the image (H, W) or (H, W, 3) in [0, 1] with each patch tinted by its expert's colour,
    opacity proportional to its gate (when given).  ``experts`` (gh, gw) is the patch grid.  Shared by the figure
    and the app."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    gh, gw = experts.shape
    h, w = img.shape[:2]
    # resample the image to a whole number of pixels per patch, at least `scale`
    ph = max(scale, int(np.ceil(h / gh)))
    pw = max(scale, int(np.ceil(w / gw)))
    ys = (np.arange(gh * ph) * h / (gh * ph)).astype(int)
    xs = (np.arange(gw * pw) * w / (gw * pw)).astype(int)
    base = img[ys][:, xs]
    colors = np.array([expert_rgb(int(e)) for e in experts.reshape(-1)], dtype=np.float32).reshape(gh, gw, 3) / 255
    a = np.full((gh, gw), alpha, dtype=np.float32)
    if gates is not None:
        g = np.asarray(gates, dtype=np.float32)
        a = alpha * (0.25 + 0.75 * g / max(float(g.max()), 1e-6))
    tint = np.repeat(np.repeat(colors, ph, 0), pw, 1)
    amap = np.repeat(np.repeat(a, ph, 0), pw, 1)
    rgb = paint(base, tint, np.minimum(1.0, amap / max(alpha, 1e-6)))  # reads as the legend colour, as in the app
    rgb[::ph, :, :] *= 0.7  # faint patch grid
    rgb[:, ::pw, :] *= 0.7
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def patch_overlay(image, layer_routing, index: int = 0, *, use_gates: bool = True, title: str | None = None,
                  num_experts: int | None = None) -> go.Figure:
    """Per-patch expert overlay of one image from a :class:`~workbench.routing.LayerRouting` (token routing), with
    a legend of the experts present; image routing shows the image tinted by its one expert."""
    img = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img.transpose(1, 2, 0)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    if layer_routing.routing == "image":
        e = int(layer_routing.experts[index, 0])
        experts = np.full((1, 1), e)
        gates = None
    else:
        experts = layer_routing.top1()[index].cpu().numpy()
        gates = layer_routing.gates[index, ..., 0].cpu().numpy() if use_gates else None
    rgb = overlay_rgb(img, experts, gates)
    fig = go.Figure(go.Image(z=rgb, hoverinfo="skip"))
    E = num_experts or layer_routing.num_experts
    present = sorted(set(int(e) for e in experts.reshape(-1)))
    for e in range(E):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker=dict(size=12, color=expert_color(e),
                                                                                 symbol="square"),
                                 name=expert_name(e) + ("" if e in present else " (unused)")))
    fig.update_layout(**LAYOUT, title=title or "Expert per patch", xaxis=dict(visible=False),
                      yaxis=dict(visible=False, scaleanchor="x"), legend=dict(itemclick=False))
    return fig


def load_over_training(metrics_path, split: str = "moe_train") -> go.Figure:
    """Expert load share per MoE layer over epochs, from a run's ``metrics.jsonl`` (one panel row per layer)."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows or not rows[0].get(split):
        raise ValueError(f"{metrics_path} has no per-layer MoE load ({split}); was this a dense run?")
    from plotly.subplots import make_subplots

    blocks = list(rows[0][split])
    fig = make_subplots(rows=len(blocks), cols=1, shared_xaxes=True, subplot_titles=[f"block {b}" for b in blocks])
    epochs = [r["epoch"] for r in rows]
    for i, b in enumerate(blocks, start=1):
        E = len(rows[0][split][b]["load"])
        for e in range(E):
            fig.add_trace(go.Scatter(x=epochs, y=[r[split][b]["load"][e] for r in rows], mode="lines+markers",
                                     line=dict(color=expert_color(e)), name=expert_name(e), legendgroup=str(e),
                                     showlegend=i == 1), row=i, col=1)
        fig.add_hline(y=1 / E, line=dict(color="grey", dash="dot"), row=i, col=1)
    fig.update_layout(**LAYOUT, title="Expert load share over training (dotted: uniform)",
                      height=220 * len(blocks) + 100)
    fig.update_xaxes(title_text="epoch", row=len(blocks), col=1)
    return fig


def flops_breakdown(prof) -> go.Figure:
    """Activated MACs per block, stacked by part (attention, FFN / experts, router, shared expert)."""
    b = prof.blocks
    x = [f"{r.block} ({r.kind})" for r in b.itertuples()]
    fig = go.Figure()
    for col, name, color in (("attn_macs", "attention", "#56B4E9"), ("ffn_macs", "FFN / routed experts", "#0072B2"),
                             ("router_macs", "router", "#D55E00"), ("shared_macs", "shared expert", "#7F7F7F")):
        fig.add_trace(go.Bar(x=x, y=b[col] / 1e6, name=name, marker_color=color))
    fig.add_trace(go.Scatter(x=x, y=b["dense_macs"] / 1e6, mode="markers", name="dense-equivalent block",
                             marker=dict(symbol="line-ew-open", size=24, color="black")))
    fig.update_layout(**LAYOUT, barmode="stack", title="Activated MMACs per image, by block",
                      yaxis=dict(title="MMACs"), xaxis=dict(title="block"))
    return fig


def save_figure(fig: go.Figure, path, png: bool | None = None) -> list[Path]:
    """Write ``path`` as .html (always, self-contained, no CDN) and .png when Chromium is present."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    html = path.with_suffix(".html")
    fig.write_html(str(html), include_plotlyjs=True)
    written = [html]
    if png is None:
        png = shutil.which("chromium") is not None or shutil.which("chromium-browser") is not None
    if png:
        target = path.with_suffix(".png")
        fig.write_image(str(target))
        written.append(target)
    return written


# -- segmentation -----------------------------------------------------------------------------------------------
def _gray(image) -> np.ndarray:
    img = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    img = img.reshape(img.shape[-2:]) if img.ndim == 3 and img.shape[0] == 1 else img
    return (img - img.min()) / max(float(img.max() - img.min()), 1e-6)


def _class_legend(fig: go.Figure, class_names, present) -> None:
    from .class_palette import class_color

    for c, name in enumerate(class_names):
        if c in present:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, legendgroup="classes",
                                     legendgrouptitle_text="classes (masks)" if c == min(present) else None,
                                     marker=dict(size=12, color=class_color(c),
                                                 symbol="square", line=dict(width=1, color="#444"))))


def segmentation_panels(rows: list[dict], class_names, title: str = "Scenes") -> go.Figure:
    """One row per scene, one panel per entry: ``{"image": (H, W), "ground truth": mask, "prediction": mask,
    "block 3": experts (gh, gw), ...}``; masks in the class colours (legend), expert maps in the expert palette over
    the image."""
    from plotly.subplots import make_subplots

    from .class_palette import class_rgb_array

    cols = list(rows[0])
    fig = make_subplots(rows=len(rows), cols=len(cols), column_titles=cols, horizontal_spacing=0.01,
                        vertical_spacing=0.02)
    present, experts = set(), set()
    for r, row in enumerate(rows, 1):
        image = _gray(row["image"]) if "image" in row else None
        for c, key in enumerate(cols, 1):
            value = np.asarray(row[key])
            if key == "image":
                rgb = np.round(np.repeat(image[..., None], 3, 2) * 255).astype(np.uint8)
            elif key.startswith("block"):
                experts |= {int(e) for e in np.unique(value) if e >= 0}
                rgb = overlay_rgb(image, value, scale=7)
            else:
                present |= set(np.unique(value).tolist())
                rgb = class_rgb_array(value)
            fig.add_trace(go.Image(z=rgb, hoverinfo="skip"), row=r, col=c)
    _class_legend(fig, class_names, present)
    for e in sorted(experts):  # the expert maps' key, in the one expert palette
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=expert_name(e), legendgroup="experts",
                                 legendgrouptitle_text="experts (block maps)" if e == min(experts) else None,
                                 marker=dict(size=12, color=expert_color(e), symbol="square")))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(**{**LAYOUT, "height": 150 * len(rows) + 80}, title=title)
    return fig


def regions_by_depth(table: pd.DataFrame, config: str | None = None,
                     title: str = "Routing vs ground-truth regions, by depth") -> go.Figure:
    """Per MoE block: the trained routers' NMI with the patch class and with the patch position, each beside the
    random routers' mean (dashed), averaged over seeds (bars: seed SD)."""
    t = table if config is None else table[table["config"] == config]
    g = t.groupby("block")
    fig = go.Figure()
    for metric, name, color in (("nmi", "patch class", "#0072B2"), ("object_nmi", "object vs background", "#009E73"),
                                ("position_nmi", "patch position", "#D55E00")):
        mean, sd = g[metric].mean(), g[metric].std().fillna(0)
        fig.add_trace(go.Scatter(x=mean.index, y=mean.values, error_y=dict(array=sd.values), name=f"{name}: trained",
                                 mode="lines+markers", line=dict(color=color)))
        fig.add_trace(go.Scatter(x=mean.index, y=g[f"random_{metric}"].mean().values, name=f"{name}: random routers",
                                 mode="lines", line=dict(color=color, dash="dash")))
    fig.update_layout(**LAYOUT, title=title, xaxis=dict(title="block", dtick=1), yaxis=dict(title="NMI"))
    return fig


def accuracy_by_epoch(rows: pd.DataFrame, group=("pilot", "config"), metric: str = "val_acc",
                      title: str = "Validation accuracy by epoch", shade: bool = True) -> go.Figure:
    """One line per run (``group`` columns name it) of ``metric`` by ``epoch``, with (``shade``) the last third of
    each run's epochs shaded: the plateau rule reads the gain there."""
    fig = go.Figure()
    for i, (name, df) in enumerate(rows.groupby(list(group), sort=False)):
        label = " / ".join(map(str, name if isinstance(name, tuple) else (name,)))
        fig.add_trace(go.Scatter(x=df["epoch"], y=df[metric] * 100, mode="lines+markers", name=label,
                                 line=dict(color=expert_color(i))))
        last = int(df["epoch"].max())
        start = max(1, round(2 * last / 3))
        if shade:
            fig.add_vrect(x0=start, x1=last, fillcolor=expert_color(i), opacity=0.07, line_width=0)
    ticks = 1 if rows["epoch"].max() <= 20 else None  # one label per epoch only while they fit
    fig.update_layout(**LAYOUT, title=title, xaxis=dict(title="epoch", dtick=ticks),
                      yaxis=dict(title=f"{metric.replace('_acc', '')} accuracy (%)"))
    return fig
