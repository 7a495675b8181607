"""The one expert colour palette, used by every figure, the notebooks and the app: expert e is always the same colour.

Okabe-Ito's colour-blind-safe eight, then Paul Tol's muted set; beyond 16 experts colours repeat with a warning in
the legend name (e.g. 'expert 17 (colour of 1)').
"""
from __future__ import annotations

EXPERT_COLORS = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
    "#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255",
)
SHARED_COLOR = "#7F7F7F"
NULL_COLOR = "rgba(127,127,127,0.25)"


def expert_color(e: int) -> str:
    return EXPERT_COLORS[e % len(EXPERT_COLORS)]


def expert_rgb(e: int) -> tuple[int, int, int]:
    h = expert_color(e).lstrip("#")
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))


def expert_name(e: int) -> str:
    if e < len(EXPERT_COLORS):
        return f"expert {e}"
    return f"expert {e} (colour of {e % len(EXPERT_COLORS)})"
