"""Figures of the recorded speed benchmarks: where one MoE layer's forward + backward time goes (``bench split``).

Imports: plotly only.
"""
from __future__ import annotations

import plotly.graph_objects as go

# (legend name, colour, the part of a ``bench split`` row: what it adds over the piece before, as a share of dense)
PARTS = (("expert FFNs alone", "#4C78A8", lambda r: r["experts_ratio"]),
         ("+ moving rows (sort, gather, gates, return)", "#F58518", lambda r: r["dispatch_ratio"] - r["experts_ratio"]),
         ("+ routing (router, balance loss, bookkeeping)", "#E45756", lambda r: r["layer_ratio"] - r["dispatch_ratio"]))


def time_split(records: dict, title: str = "Where one MoE layer's fwd+bwd time goes (dense FFN = 1.0)") -> go.Figure:
    """Stacked bars, one per (run, thread count, top-k): the expert FFNs alone on expert-sorted rows, then what moving
    rows and routing add, each over the dense FFN's time, so each bar ends at the whole layer's ratio (its label).
    ``records``: a label per run -> that run's ``bench split`` result (a dict with ``rows``)."""
    bars = [(f"{label}<br>{r['threads']} thr, top-{r['top_k']}", r) for label, rec in records.items()
            for r in rec["rows"]]
    fig = go.Figure()
    for name, colour, part in PARTS:
        fig.add_bar(x=[x for x, _ in bars], y=[round(part(r), 3) for _, r in bars], name=name, marker_color=colour)
    fig.add_scatter(x=[x for x, _ in bars], y=[r["layer_ratio"] for _, r in bars], mode="text",
                    text=[f"{r['layer_ratio']:.3f}x" for _, r in bars], textposition="top center", showlegend=False)
    fig.add_hline(y=1.0, line_dash="dash", line_color="black", annotation_text="dense FFN",
                  annotation_position="bottom right")
    fig.update_layout(barmode="relative", title=title, yaxis_title="time / dense FFN of the activated width",
                      legend=dict(orientation="h", y=-0.25), height=480, width=900, margin=dict(t=60, b=140))
    fig.update_yaxes(range=[0, max(r["layer_ratio"] for _, r in bars) * 1.12])
    return fig
