"""The one expert colour palette, used by every figure, the notebooks and the app: expert e is always the same colour.

Okabe-Ito's colour-blind-safe set without its black, then nine colours chosen so that every colour stands apart from
black (the Fashion-MNIST background: CIELAB lightness >= 45), from grey (the shared expert: chroma >= 25) and from
every other colour (CIELAB distance >= 25); beyond 16 experts colours repeat with a warning in the legend name (e.g.
'expert 17 (colour of 1)').  :func:`paint` draws the colours over an image so that they read as the legend shows them.
"""
from __future__ import annotations

import numpy as np

EXPERT_COLORS = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#8C6BE0",
    "#DEB887", "#98FB98", "#6B8E23", "#ADFF2F", "#EE3377", "#FB8072", "#00CED1", "#D62728",
)
SHARED_COLOR = "#7F7F7F"
NULL_COLOR = "rgba(127,127,127,0.25)"


def expert_color(e: int) -> str:
    return EXPERT_COLORS[e % len(EXPERT_COLORS)]


def expert_rgb(e: int) -> tuple[int, int, int]:
    return hex_rgb(expert_color(e))


def expert_name(e: int) -> str:
    if e < len(EXPERT_COLORS):
        return f"expert {e}"
    return f"expert {e} (colour of {e % len(EXPERT_COLORS)})"


def expert_rgb_array(experts) -> np.ndarray:
    """The palette colours of an integer array of experts, as floats in [0, 1] with a trailing axis of 3; -1 (no
    expert took the token: experts-choose routing) is drawn grey, as only the shared path and residual carry it."""
    table = np.array([expert_rgb(e) for e in range(len(EXPERT_COLORS))] + [hex_rgb(SHARED_COLOR)],
                     dtype=np.float32) / 255
    experts = np.asarray(experts, dtype=np.int64)
    return table[np.where(experts < 0, len(EXPERT_COLORS), experts % len(EXPERT_COLORS))]


def hex_rgb(color: str) -> tuple[int, int, int]:
    """'#RRGGBB' -> (r, g, b), 0-255: for the expert palette and the class palette alike."""
    h = color.lstrip("#")
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))


def paint(image, color, strength=1.0, veil: float = 0.5) -> np.ndarray:
    """``color`` drawn over ``image`` (both (..., 3) floats in [0, 1]) so that it reads as the legend colour.

    At full ``strength`` the colour is exact wherever the image is black, and the image's light parts show through
    as a pale veil (weight ``veil`` x the image's lightness); a lower strength fades the colour towards white, a
    lighter tint of the same hue (as the legend chip would look at that opacity on the page), never towards black,
    where yellow would turn olive and orange brown."""
    image = np.asarray(image, dtype=np.float32)
    color = np.asarray(color, dtype=np.float32)
    s = np.asarray(strength, dtype=np.float32)
    s = s[..., None] if s.ndim else s
    tint = 1.0 - s * (1.0 - color)
    w = veil * image.mean(axis=-1, keepdims=True)
    return tint * (1.0 - w) + image * w
