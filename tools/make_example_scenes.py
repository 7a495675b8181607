"""Writes the routing explorer's example segmentation scenes: the first test scenes of ``workbench.segdata`` as
greyscale PNGs with their ground truth beside them (class index per pixel, 0 = background).

    python tools/make_example_scenes.py         # experiments/examples/scenes/scene_00.png, scene_00.mask.png, ...
    python tools/make_example_scenes.py 8       # the first 8 scenes instead of 6

The scenes are a fixed function of Fashion-MNIST's test images, so running it again writes the same files.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.explorer import SCENES  # noqa: E402
from workbench.data.scenes import example_scenes  # noqa: E402


def write_scenes(n: int = 6, folder: Path = SCENES) -> list[Path]:
    """``scene_NN.png`` (mode L) and ``scene_NN.mask.png`` (mode L, class per pixel) for the first ``n`` scenes."""
    images, masks = example_scenes(n)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (image, mask) in enumerate(zip(images.numpy(), masks.numpy())):
        stem = folder / f"scene_{i:02d}"
        Image.fromarray(np.ascontiguousarray(image[0])).save(stem.with_suffix(".png"), optimize=True)
        Image.fromarray(np.ascontiguousarray(mask)).save(stem.with_suffix(".mask.png"), optimize=True)
        written += [stem.with_suffix(".png"), stem.with_suffix(".mask.png")]
    return written


if __name__ == "__main__":
    for path in write_scenes(int(sys.argv[1]) if len(sys.argv) > 1 else 6):
        print(path.relative_to(ROOT))
