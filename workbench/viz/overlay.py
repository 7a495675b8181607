"""Pictures of routing: the expert of every patch drawn over the image (one palette colour per expert, strength by
gate, the patch grid, a picked patch framed) and class masks in the class palette (striped, so that a class region
never reads as an expert's solid patch).  What the app and the notebooks draw.

Imports: numpy and this package's palettes.
"""
from __future__ import annotations

import numpy as np

from .class_palette import class_rgb_array
from .palette import expert_rgb_array, paint

GATE_FLOOR = 0.3  # in gate mode, the weakest gate of an image still shows its colour at this strength


def render_overlay(image: np.ndarray, experts: np.ndarray, gates: np.ndarray | None = None, *, scale: int = 32,
                   picked: tuple[int, int] | None = None) -> np.ndarray:
    """An RGB uint8 picture of the patch grid ``experts`` (gh, gw) over ``image`` ((H, W) or (H, W, 3) in [0, 1]),
    each patch in its expert's palette colour drawn with :func:`~workbench.palette.paint`: opaque (the legend colour
    exactly, over black) without ``gates``, else with strength from the patch's gate relative to the image's largest.
    Thin dark lines mark the patch grid; ``picked`` (row, col) gets a black-and-white frame."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    gh, gw = experts.shape
    h, w = img.shape[:2]
    ph, pw = max(scale, int(np.ceil(h / gh))), max(scale, int(np.ceil(w / gw)))  # whole pixels per patch
    base = img[(np.arange(gh * ph) * h // (gh * ph))][:, (np.arange(gw * pw) * w // (gw * pw))]
    strength = np.ones((gh, gw), dtype=np.float32)
    if gates is not None:
        g = np.asarray(gates, dtype=np.float32)
        strength = GATE_FLOOR + (1 - GATE_FLOOR) * g / max(float(g.max()), 1e-6)
    color = np.repeat(np.repeat(expert_rgb_array(experts), ph, 0), pw, 1)
    rgb = paint(base, color, np.repeat(np.repeat(strength, ph, 0), pw, 1))
    rgb[::ph] = rgb[::ph] * 0.6 + 0.05  # faint patch grid, dark over any colour
    rgb[:, ::pw] = rgb[:, ::pw] * 0.6 + 0.05
    if picked is not None:
        r, c = picked
        t = max(2, min(ph, pw) // 12)
        y0, y1, x0, x1 = r * ph, (r + 1) * ph, c * pw, (c + 1) * pw
        rgb[y0:y1, x0:x1][:t] = rgb[y0:y1, x0:x1][-t:] = 0.0
        rgb[y0:y1, x0:x1][:, :t] = rgb[y0:y1, x0:x1][:, -t:] = 0.0
        inner = rgb[y0 + t:y1 - t, x0 + t:x1 - t]
        inner[:t] = inner[-t:] = 1.0
        inner[:, :t] = inner[:, -t:] = 1.0
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


HATCH_PERIOD = 8  # pixels between the diagonal stripes that mark class regions (experts are drawn solid)


def render_mask(mask: np.ndarray, scale: int = 1, num_classes: int | None = None, hatch: bool = False) -> np.ndarray:
    """An RGB uint8 picture of a class mask (H, W), each pixel ``scale`` x ``scale`` in its class colour
    (:mod:`workbench.class_palette`: background black); classes outside ``num_classes`` are white.  ``hatch``:
    thin dark diagonal stripes over every class but the background, so that a class region never reads as an
    expert's solid patch beside it (the legend's class chips are striped the same way)."""
    rgb = np.repeat(np.repeat(class_rgb_array(mask, num_classes), scale, 0), scale, 1)
    if hatch:
        h, w = rgb.shape[:2]
        stripe = (np.add.outer(np.arange(h), np.arange(w)) % HATCH_PERIOD) < 2
        objects = np.repeat(np.repeat(np.asarray(mask) > 0, scale, 0), scale, 1)
        rgb[stripe & objects] = (rgb[stripe & objects] * 0.55).astype(np.uint8)
    return rgb
