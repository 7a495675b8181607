"""Claim 2's figure: test accuracy per MoE placement, without and with a shared expert, each seed's line beside
the mean and its 95% t-interval.  "Stable across configurations" reads as the flatter of the two profiles.

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
                          title: str = "Test accuracy per placement, without and with a shared expert") -> go.Figure:
    """``grid``: one row per (placement, shared, seed) with ``test_acc`` in percent (``regime.placement_grid``).
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
            fig.add_trace(go.Scatter(x=x, y=g["test_acc"], mode="lines+markers", line=dict(color=color, width=1),
                                     marker=dict(size=4), opacity=0.4, legendgroup=name, showlegend=False,
                                     hovertemplate=f"seed {seed}: %{{y:.2f}}%<extra>{name}</extra>"))
        means, errors = [], []
        for p in order:
            values = half.loc[half["placement"] == p, "test_acc"]
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
                      yaxis=dict(title="test accuracy (%)"), legend=dict(orientation="h", y=-0.2))
    return fig
