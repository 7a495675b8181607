"""The one class palette of segmentation masks, kept apart from the expert palette (:mod:`workbench.palette`): a mask
panel colours *classes*, an overlay colours *experts*, and the two never share a legend.

Class 0 (background) is black; classes 1..10 (the Fashion-MNIST classes of the scenes) have ten colours that stand
apart from black (CIELAB lightness >= 40), from each other (CIELAB distance >= 35) and from every expert colour
(distance >= 15), so that a class is never read as an expert.  Beyond 11 classes the ten colours repeat (the legend
says which), and pixels outside every class (an ignore index such as 255) are white.
"""
from __future__ import annotations

import numpy as np

from .palette import hex_rgb

CLASS_COLORS = (
    "#000000",  # background
    "#FB9A99", "#FEE090", "#FF7F00", "#B15928", "#C51B7D", "#F3C300", "#33A02C", "#875692", "#CAB2D6", "#80CDC1",
)
IGNORE_COLOR = "#FFFFFF"


def class_color(c: int) -> str:
    """The colour of class ``c``: its own for c < len(CLASS_COLORS), else that of class 1 + (c - 1) % 10."""
    return CLASS_COLORS[c] if c < len(CLASS_COLORS) else CLASS_COLORS[1 + (c - 1) % (len(CLASS_COLORS) - 1)]


def class_label(c: int, name: str) -> str:
    """The legend entry of class ``c``: its name, with the class it shares a colour with once colours repeat."""
    if c < len(CLASS_COLORS):
        return name
    return f"{name} (colour of class {1 + (c - 1) % (len(CLASS_COLORS) - 1)})"


def class_rgb_array(mask, num_classes: int | None = None) -> np.ndarray:
    """uint8 (..., 3) colours of an integer class mask; values < 0 or >= ``num_classes`` (when given) are white."""
    mask = np.asarray(mask, dtype=np.int64)
    top = int(mask.max(initial=0)) + 1
    table = np.array([hex_rgb(class_color(c)) for c in range(top)] + [hex_rgb(IGNORE_COLOR)], dtype=np.uint8)
    outside = (mask < 0) | (mask >= (num_classes if num_classes is not None else top))
    return table[np.where(outside, top, mask)]
