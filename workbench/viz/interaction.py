"""Claim 2's figure: test accuracy per MoE placement, without and with a shared expert, each seed's line beside
the mean and its 95% t-interval.  "Stable across configurations" reads as the flatter of the two profiles.  And
claim 3's, tested by training: every k-of-L placement per seed, with the one the routing picked.

Imports: plotly, pandas, scipy; this package's ``palette`` and ``figures`` (the one layout).
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from scipy import stats

from .figures import LAYOUT
from .palette import SHARED_COLOR, expert_color


def placement_interaction(grid: pd.DataFrame, reference: float | None = None, reference_name: str = "dense control",
                          names: tuple[str, str] = ("without shared expert", "with shared expert"),
                          title: str = "Test accuracy per placement, without and with a shared expert",
                          score: str = "test accuracy (%)") -> go.Figure:
    """``grid``: one row per (placement, shared, seed) with its ``score`` x100 (``regime.placement_grid``: test
    accuracy in percent, or the study's metric, e.g. test mIoU in points; ``score`` names it on the y axis).
    Thin lines: one seed; thick: the mean over seeds, error bars its 95% t-interval (from three seeds on); the two
    halves side by side at each placement; a dashed line at ``reference`` (e.g. the dense control's mean)."""
    order = list(dict.fromkeys(grid["placement"]))
    fig = go.Figure()
    for shift, (shared, color) in zip((-0.06, 0.06), ((False, expert_color(0)), (True, SHARED_COLOR))):
        half = grid[grid["shared"] == shared]
        if half.empty:
            continue
        x = [i + shift for i in range(len(order))]  # the two halves side by side at each placement
        name = names[1] if shared else names[0]
        for seed, g in half.groupby("seed"):
            g = g.set_index("placement").reindex(order)
            fig.add_trace(go.Scatter(x=x, y=g["score"], mode="lines+markers", line=dict(color=color, width=1),
                                     marker=dict(size=4), opacity=0.4, legendgroup=name, showlegend=False,
                                     hovertemplate=f"seed {seed}: %{{y:.2f}}<extra>{name}</extra>"))
        means, errors = [], []
        for p in order:
            values = half.loc[half["placement"] == p, "score"]
            means.append(values.mean() if len(values) else None)
            n = len(values)
            errors.append(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / n ** 0.5 if n > 1 else 0.0)
        n_seeds = half["seed"].nunique()
        interval = n_seeds >= 3  # with two seeds the t-interval (t = 12.7) says only that n is too small
        label = f"{name} (n={n_seeds}" + (", mean and 95% t-interval)" if interval else ", mean)")
        fig.add_trace(go.Scatter(x=x, y=means, mode="lines+markers", name=label,
                                 legendgroup=name, line=dict(color=color, width=3), marker=dict(size=9),
                                 error_y=dict(type="data", array=errors, visible=interval)))
    if reference is not None:
        fig.add_hline(y=reference, line=dict(color="black", dash="dash", width=1),
                      annotation_text=reference_name, annotation_position="top left")
    fig.update_layout(**LAYOUT, title=title, xaxis=dict(title="MoE placement", tickmode="array", tickvals=list(range(len(order))),
                                                ticktext=order),
                      yaxis=dict(title=score), legend=dict(orientation="h", y=-0.2))
    return fig


def guided_placements(ranks: pd.DataFrame, reference: float | None = None, reference_name: str = "all-MoE",
                      title: str = "Every 2-of-4 placement, and the one routing picked") -> go.Figure:
    """Claim 3 tested by training: ``ranks`` from ``studies.pruning.placement_ranking`` (one row per seed, a column
    per placement in percent, ``guided`` the routing's pick).  Thin lines: one seed across the placements; a ring:
    the placement that seed's routing picked; thick: the mean over seeds; a dashed line at ``reference``."""
    order = [c for c in ranks.columns if c not in ("seed", "guided", "guided_rank", "specialised_blocks")]
    fig = go.Figure()
    for _, row in ranks.iterrows():
        fig.add_trace(go.Scatter(x=order, y=[row[c] for c in order], mode="lines", opacity=0.35, showlegend=False,
                                 line=dict(color=expert_color(0), width=1),
                                 hovertemplate=f"seed {row['seed']}: %{{y:.2f}}%<extra></extra>"))
    fig.add_trace(go.Scatter(x=list(ranks["guided"]), y=[row[row["guided"]] for _, row in ranks.iterrows()],
                             mode="markers", name="routing's pick (one seed each)",
                             marker=dict(size=13, symbol="circle-open", color=SHARED_COLOR, line=dict(width=2))))
    fig.add_trace(go.Scatter(x=order, y=[ranks[c].mean() for c in order], mode="lines+markers",
                             name=f"mean of {len(ranks)} seeds", line=dict(color=expert_color(0), width=3)))
    if reference is not None:
        fig.add_hline(y=reference, line=dict(color="black", dash="dash", width=1),
                      annotation_text=reference_name, annotation_position="top left")
    fig.update_layout(**LAYOUT, title=title, xaxis=dict(title="MoE placement (blocks)"),
                      yaxis=dict(title="test accuracy (%)"), legend=dict(orientation="h", y=-0.2))
    return fig
