"""Semantic segmentation data: Fashion-MNIST scenes generated from a seed, and folders in the ADE20K layout.

A scene is a greyscale canvas (56x56 by default) holding 1-4 Fashion-MNIST items at random positions and sizes
(20-36 px on 56x56, in proportion on other canvases; bilinear, possibly cut by the border; later items occlude
earlier ones) on a plain, noisy or striped
background that stays darker than any item.  Its mask holds, per pixel, 0 for background or the class + 1 of the
item on top, taken from the item's own pixels (brighter than a tenth of the item's peak and than the background).
Train and validation scenes draw items from the Fashion-MNIST training images, split by the same fixed draw as
:func:`workbench.data.build_splits` (the first ``val_size`` images of the ``VAL_SEED`` permutation go to validation),
test scenes from its test images; each split has a fixed seed, so every run sees the same scenes.

A folder dataset follows the ADE20K / mmsegmentation layout, ``root/images/{training,validation}/<name>.jpg|png``
and ``root/annotations/{training,validation}/<name>.png`` (class index per pixel, mode L or P); ``validation`` is
the test split and a validation split is carved out of ``training``.  Both become a :class:`SegTensorData`: uint8
images and masks in memory, normalised and flipped in batches, with exactly resumable epochs like ``TensorData``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .classification import VAL_SEED, DatasetNotFound, _num_batches, epoch_batches, find_fashion_mnist, load_fashion_mnist, \
    normalise

SEG_DATASETS = ("fmnist-scenes", "ade")
SCENE_SIZE = 56
ITEM_SIZES = (20, 36)  # smallest and largest item side on a SCENE_SIZE canvas, px
BACKGROUND_MAX = 20  # brightest background pixel; item pixels are brighter than this
SCENE_SEEDS = {"train": 5601, "val": 5602, "test": 5603}  # fixed: scenes are the same for every run seed
SCENE_COUNTS = {"train": 20_000, "test": 2_000}
FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot")
SCENE_CLASSES = ("background",) + FASHION_MNIST_LABELS
IGNORE_INDEX = 255
FMNIST_STATS = ((0.2860,), (0.3530,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CHUNK = 2048  # scenes rendered at a time (bounds memory; the draws are made up front, so results do not depend on it)


class SceneLayout(NamedTuple):
    """Where each scene's items came from and went, (n, max_items) each; unused slots have source -1."""

    sources: torch.Tensor  # index into the images given to make_scenes
    tops: torch.Tensor
    lefts: torch.Tensor
    sizes: torch.Tensor


def _resize_items(items: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resize (half-pixel centres, as torch's align_corners=False) of uint8 (k, h, w) items to (side, side),
    with each item's own pixels: brighter than a tenth of its peak and than any background.  Element-wise float32
    arithmetic only, so the result is bit-identical on every machine."""
    def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(side, dtype=np.float32) + 0.5) * np.float32(n_in / side) - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(np.int64)
        return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)

    (y0, y1, wy), (x0, x1, wx) = taps(items.shape[1]), taps(items.shape[2])
    a = items.astype(np.float32)
    rows = a[:, y0] * (1 - wy)[:, None] + a[:, y1] * wy[:, None]
    pixels = np.rint(rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx).astype(np.uint8)
    floor = np.maximum(pixels.max(axis=(1, 2)) // 10, BACKGROUND_MAX)
    return pixels, pixels > floor[:, None, None]


def _backgrounds(kind: np.ndarray, base: np.ndarray, amp: np.ndarray, direction: np.ndarray, period: np.ndarray,
                 phase: np.ndarray, noise: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, size, size): plain (kind 0), blotchy noise (1) or triangle-wave stripes (2) in one of four
    directions, all within [0, BACKGROUND_MAX] and computed in integers."""
    col = lambda v: v[:, None, None].astype(np.int16)  # noqa: E731
    y, x = np.mgrid[:size, :size].astype(np.int16)
    u = np.stack([x, y, x + y, x - y + size])[direction]  # coordinate across the stripes, >= 0
    t = (u + col(phase)) % col(period)
    stripes = col(amp) * np.abs(2 * t - col(period)) // col(period)
    blotches = np.repeat(np.repeat(noise.astype(np.int16), 4, axis=1), 4, axis=2)[:, :size, :size] * col(amp) // 255
    texture = np.where(col(kind) == 1, blotches, np.where(col(kind) == 2, stripes, 0))
    return (col(base) + texture).astype(np.uint8)


def make_scenes(images, labels, n: int, seed: int, size: int = SCENE_SIZE, max_items: int = 4,
                return_layout: bool = False):
    """``n`` scenes of 1..``max_items`` items drawn (with replacement) from ``images`` (uint8 (N, 1, h, w) or
    (N, h, w)) with class ``labels`` (N,): (images uint8 (n, 1, size, size), masks uint8 (n, size, size)), plus a
    :class:`SceneLayout` with ``return_layout``.  The same arguments give bit-identical scenes on any machine."""
    items = np.asarray(images, dtype=np.uint8)
    items = items.reshape(len(items), *items.shape[-2:])
    classes = np.asarray(labels, dtype=np.int64)
    if n < 0 or max_items < 1 or len(items) == 0:
        raise ValueError(f"make_scenes needs n >= 0 (got {n}), max_items >= 1 (got {max_items}) and at least one "
                         f"item image (got {len(items)})")
    rng = np.random.default_rng(seed)
    count = rng.integers(1, max_items + 1, n)
    source = rng.integers(0, len(items), (n, max_items))
    smallest, largest = (max(1, round(s * size / SCENE_SIZE)) for s in ITEM_SIZES)
    side = rng.integers(smallest, largest + 1, (n, max_items))
    top, left = rng.integers(0, size, (2, n, max_items)) - side // 2  # every item's centre lies on the canvas
    kind, base, amp = rng.integers(0, 3, n), rng.integers(0, 9, n), rng.integers(4, BACKGROUND_MAX - 8 + 1, n)
    direction, period, phase = rng.integers(0, 4, n), rng.integers(4, 13, n), rng.integers(0, 12, n)
    noise = rng.integers(0, 256, (n, -(-size // 4), -(-size // 4)), dtype=np.uint8)

    canvas = np.empty((n, size, size), np.uint8)
    mask = np.zeros((n, size, size), np.uint8)
    ramp = np.arange(largest)
    for start in range(0, n, _CHUNK):
        part = slice(start, min(start + _CHUNK, n))
        canvas[part] = _backgrounds(kind[part], base[part], amp[part], direction[part], period[part], phase[part],
                                    noise[part], size)
    for slot in range(max_items):  # bottom to top: later items overwrite earlier ones
        for s in np.unique(side[:, slot]):
            scene = np.flatnonzero((count > slot) & (side[:, slot] == s))
            if not len(scene):
                continue
            pixels, own = _resize_items(items[source[scene, slot]], int(s))
            rows = top[scene, slot, None] + ramp[:s]  # (k, s)
            cols = left[scene, slot, None] + ramp[:s]
            keep = own & ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
            where = (np.broadcast_to(scene[:, None, None], keep.shape)[keep],
                     np.broadcast_to(rows[:, :, None], keep.shape)[keep],
                     np.broadcast_to(cols[:, None, :], keep.shape)[keep])
            canvas[where] = pixels[keep]
            mask[where] = np.broadcast_to(classes[source[scene, slot], None, None] + 1, keep.shape)[keep]
    out = torch.from_numpy(canvas).unsqueeze(1), torch.from_numpy(mask)
    if not return_layout:
        return out
    used = np.arange(max_items) < count[:, None]
    layout = SceneLayout(*(torch.from_numpy(a) for a in (np.where(used, source, -1), top, left, side)))
    return (*out, layout)


def fmnist_scenes(split: str, n: int, *, val_size: int = 0, size: int = SCENE_SIZE, max_items: int = 4,
                  root=None, classes=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, masks, sources) for ``split`` in 'train', 'val', 'test' (cached: treat the tensors as read-only).
    ``sources`` (n, max_items) index the Fashion-MNIST training images for train and val scenes, its test images
    for test scenes (-1: no item).  Val scenes draw from the ``val_size`` images that ``data.build_splits`` holds
    out, train scenes from the rest.  ``classes`` (Fashion-MNIST labels): items come only from images of those
    classes, kept after the validation draw (a transfer base that never sees the other classes); the masks keep
    the full label set."""
    if split not in SCENE_SEEDS:
        raise ValueError(f"split={split!r} is invalid: use 'train', 'val' or 'test'")
    if classes is not None:
        labels = range(len(FASHION_MNIST_LABELS))
        if (not isinstance(classes, (list, tuple)) or not classes
                or any(isinstance(c, bool) or not isinstance(c, int) or c not in labels for c in classes)):
            raise ValueError(f"classes={classes!r} must be a non-empty list of Fashion-MNIST labels (0 to "
                             f"{len(FASHION_MNIST_LABELS) - 1}), e.g. [0, 1, 2, 3, 4]")
        classes = tuple(sorted(set(classes)))
    return _scenes(split, n, val_size if split != "test" else 0, size, max_items, find_fashion_mnist(root), classes)


@functools.lru_cache(maxsize=6)
def _scenes(split: str, n: int, val_size: int, size: int, max_items: int, folder: Path, classes=None):
    images, labels = load_fashion_mnist("test" if split == "test" else "train", folder)
    pool = torch.arange(len(images))
    if split != "test":
        if not 0 <= val_size < len(images) or (split == "val" and not val_size):
            raise ValueError(f"val_size={val_size} must be between 1 and {len(images) - 1} (the training images "
                             "held out for validation scenes)")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(VAL_SEED))
        pool = order[:val_size] if split == "val" else order[val_size:]
    if classes is not None:
        pool = pool[torch.isin(labels[pool], torch.tensor(classes))]
    x, y, layout = make_scenes(images[pool], labels[pool], n, SCENE_SEEDS[split], size, max_items,
                               return_layout=True)
    return x, y, torch.where(layout.sources >= 0, pool[layout.sources.clamp(min=0)], -1)


def example_scenes(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test scenes: (images uint8 (n, 1, 56, 56), masks uint8 (n, 56, 56)); names: SCENE_CLASSES."""
    x, y, _ = fmnist_scenes("test", SCENE_COUNTS["test"])
    return x[:n].clone(), y[:n].clone()


@dataclass
class SegTensorData:
    """Images uint8 (N, C, H, W) and masks uint8 (N, H, W) (class per pixel, ``ignore_index`` where unlabelled),
    normalised and (with ``augment``) flipped in batches; batches yield (x float (B, C, H, W), y long (B, H, W))."""

    images: torch.Tensor
    masks: torch.Tensor
    mean: tuple
    std: tuple
    num_classes: int
    class_names: tuple
    ignore_index: int = IGNORE_INDEX
    augment: bool = False
    flip: bool = True

    def __len__(self) -> int:
        return len(self.masks)

    def to(self, device) -> "SegTensorData":
        self.images, self.masks = self.images.to(device), self.masks.to(device)
        return self

    def subset(self, n: int | None, seed: int = 0) -> "SegTensorData":
        """A fixed random subset (the same for every run with this seed)."""
        if n is None or n >= len(self):
            return self
        return self._pick(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n], self.augment)

    def _pick(self, idx: torch.Tensor, augment: bool) -> "SegTensorData":
        idx = idx.to(self.masks.device)
        return replace(self, images=self.images[idx], masks=self.masks[idx], augment=augment)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(images, self.mean, self.std)

    def batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, start: int = 0,
                rank: int = 0, world: int = 1, drop_last: bool = False):
        """Yield (images float, masks long) for one epoch (see :func:`~workbench.data.epoch_batches`: exact resume,
        DDP shares); a flip moves image and mask together."""
        for idx, aug_seed in epoch_batches(len(self), batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                                           start=start, rank=rank, world=world, drop_last=drop_last,
                                           augment=self.augment):
            idx = idx.to(self.masks.device)
            x, y = self.normalise(self.images[idx]), self.masks[idx].long()
            if self.augment and self.flip:
                flip = (torch.rand(len(idx), generator=torch.Generator().manual_seed(aug_seed)) < 0.5).to(x.device)
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
                y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
            yield x, y

    def num_batches(self, batch_size: int, world: int = 1, drop_last: bool = False) -> int:
        return _num_batches(len(self), batch_size, world, drop_last)


def _open_image(path: Path, mode: str | None = None):
    """A loaded PIL image (converted to ``mode`` if given); a one-line ValueError if it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode) if mode else im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{path} is not a readable image ({reason}); replace or remove it") from err


def _listing(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetNotFound(f"{folder} not found: a segmentation folder needs root/images/{{training,validation}}/"
                              "<name>.jpg|png and root/annotations/{training,validation}/<name>.png; pass --data-root")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in suffixes and not path.name.startswith("."):
            if path.stem in found:
                raise ValueError(f"{path} and {found[path.stem]} have the same name; rename or remove one of them")
            found[path.stem] = path
    return found


def load_seg_folder(root, split: str, *, reduce_zero_label: bool = True, img_size=None,
                    in_chans: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """(images uint8 (N, in_chans, H, W), masks uint8 (N, H, W), image paths) for ``split`` ('training' or
    'validation') of an ADE-layout folder.  ``reduce_zero_label``: label 0 means 'unlabelled' (-> 255) and the
    others shift down by one, as in ADE20K; otherwise labels are kept and 255 alone is ignored.  ``img_size`` (int
    or (h, w)) resizes images bilinearly and masks by nearest neighbour; without it all images must share a size."""
    root = Path(root)
    images = _listing(root / "images" / split, IMAGE_SUFFIXES)
    annotations = _listing(root / "annotations" / split, (".png",))
    unpaired = sorted(images.keys() ^ annotations.keys())
    if unpaired and unpaired[0] in images:
        raise ValueError(f"{images[unpaired[0]]} has no annotation; add {root / 'annotations' / split / unpaired[0]}"
                         ".png or remove the image")
    if unpaired:
        raise ValueError(f"{annotations[unpaired[0]]} has no image; add {root / 'images' / split / unpaired[0]}.jpg "
                         "or remove the annotation")
    if not images:
        raise DatasetNotFound(f"{root / 'images' / split} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                              "add image/annotation pairs or pass another --data-root")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans={in_chans} is not supported: images load as greyscale (1) or RGB (3)")
    target = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size) if img_size else None
    xs, ys, first = [], [], None
    for stem in sorted(images):
        img, ann = _open_image(images[stem], "L" if in_chans == 1 else "RGB"), _open_image(annotations[stem])
        if ann.mode not in ("L", "P"):
            raise ValueError(f"{annotations[stem]} is a mode-{ann.mode} image; save annotations as single-channel "
                             "PNGs of class indices (mode L or P)")
        if ann.size != img.size:
            raise ValueError(f"{annotations[stem]} is {ann.width}x{ann.height} but its image {images[stem]} is "
                             f"{img.width}x{img.height}; an annotation must match its image pixel for pixel")
        if target:
            img, ann = img.resize(target[::-1], Image.BILINEAR), ann.resize(target[::-1], Image.NEAREST)
        elif first is None:
            first = images[stem], img.size
        elif img.size != first[1]:
            raise ValueError(f"{images[stem]} is {img.width}x{img.height} but {first[0]} is "
                             f"{first[1][0]}x{first[1][1]}; pass img_size to resize every image to one size")
        xs.append(np.asarray(img))
        ys.append(np.asarray(ann))
    x = torch.from_numpy(np.stack(xs))
    x = x.unsqueeze(1) if in_chans == 1 else x.permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.stack(ys))
    if reduce_zero_label:
        y = torch.where((y == 0) | (y == IGNORE_INDEX), IGNORE_INDEX, y - 1).to(torch.uint8)
    return x, y, [images[stem] for stem in sorted(images)]


def _check_labels(masks: torch.Tensor, paths: list[Path], num_classes: int, reduce_zero_label: bool) -> None:
    bad = ((masks >= num_classes) & (masks != IGNORE_INDEX)).flatten(1).any(1)
    if bad.any():
        i = int(bad.nonzero()[0])
        label = int(masks[i][(masks[i] >= num_classes) & (masks[i] != IGNORE_INDEX)].max())
        shown = f"{label + 1} (read as {label} with reduce_zero_label)" if reduce_zero_label else str(label)
        raise ValueError(f"the annotation of {paths[i]} holds label {shown}, outside [0, {num_classes}); "
                         f"pass num_classes={label + 1} or fix the annotation (255 means ignore)")


def _model_channels(model) -> int | None:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return (cfg.get("input_size") or (None,))[0] or getattr(model, "in_chans", None)


SEG_OPTIONS = {"fmnist-scenes": ("train_size", "size", "max_items", "in_chans", "classes"),
               "ade": ("reduce_zero_label", "num_classes", "img_size", "in_chans", "class_names")}


def check_data_options(name: str, options: dict) -> None:
    """A one-line ValueError for options a dataset does not take (classification datasets take none)."""
    if name not in SEG_DATASETS:
        if options:
            raise ValueError(f"data_options {sorted(options)} are options of the segmentation datasets; {name} takes "
                             "none, leave them out")
        return
    unknown = sorted(set(options) - set(SEG_OPTIONS[name]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {name}: use {', '.join(SEG_OPTIONS[name])}")


def build_seg_splits(name: str, *, val_size: int = 0, root=None, model=None, train_subset: int | None = None,
                     test_subset: int | None = None, augment: bool = True, seed: int = 0, **options):
    """(train, validation or None, test) :class:`SegTensorData` for ``name`` in SEG_DATASETS.

    'fmnist-scenes' options: ``train_size`` (20000), ``size`` (the model's input size, else 56), ``max_items`` (4),
    ``in_chans``, ``classes`` (items of these Fashion-MNIST labels only, in every split: see :func:`fmnist_scenes`);
    ``val_size`` validation scenes draw from the ``val_size`` training images that ``data.build_splits`` holds out,
    the 2000 test scenes from the test images.  'ade' options: ``reduce_zero_label`` (True), ``num_classes`` (max
    label + 1), ``img_size`` (the model's input size), ``in_chans``, ``class_names``;
    ``val_size`` images of ``training`` are carved out by the fixed ``VAL_SEED`` draw, ``validation`` is the test
    split.  ``in_chans`` defaults to the model's; mean/std come from the model's pretrained config when it has them
    for that many channels."""
    if name not in SEG_DATASETS:
        raise ValueError(f"dataset={name!r} is not a segmentation dataset: use one of {SEG_DATASETS}")
    check_data_options(name, options)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    in_chans = options.get("in_chans") or _model_channels(model) or (1 if name == "fmnist-scenes" else 3)
    if name == "fmnist-scenes":
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans={in_chans} is not supported: scenes are greyscale (1) or repeated to RGB (3)")
        size = options.get("size") or (cfg.get("input_size") or (SCENE_SIZE,))[-1]
        scene = dict(size=size, max_items=options.get("max_items", 4), root=root, classes=options.get("classes"))
        counts = {"train": options.get("train_size", SCENE_COUNTS["train"]), "val": val_size,
                  "test": SCENE_COUNTS["test"]}
        splits = {}
        for split, n in counts.items():
            if n or split != "val":
                x, y, _ = fmnist_scenes(split, n, val_size=val_size, **scene)
                splits[split] = (x.expand(-1, 3, -1, -1).contiguous() if in_chans == 3 else x, y)
        num_classes, class_names = len(SCENE_CLASSES), SCENE_CLASSES
        stats = (FMNIST_STATS[0] * in_chans, FMNIST_STATS[1] * in_chans)
    else:
        root = root or os.environ.get("WORKBENCH_DATA")
        if root is None:
            raise DatasetNotFound("the 'ade' dataset needs a folder in the ADE20K layout: pass --data-root or set "
                                  "WORKBENCH_DATA")
        img_size = options.get("img_size") or (tuple(cfg["input_size"][-2:]) if cfg.get("input_size") else None)
        reduce = options.get("reduce_zero_label", True)
        load = dict(reduce_zero_label=reduce, img_size=img_size, in_chans=in_chans)
        (tx, ty, tpaths), (vx, vy, vpaths) = (load_seg_folder(root, s, **load) for s in ("training", "validation"))
        labelled = torch.cat([ty.flatten(), vy.flatten()])
        labelled = labelled[labelled != IGNORE_INDEX]
        num_classes = options.get("num_classes") or (int(labelled.max()) + 1 if len(labelled) else 0)
        if not 0 < num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes={num_classes} for {root} must be between 1 and {IGNORE_INDEX} (masks are "
                             "uint8 with 255 = ignore); check the annotations or pass num_classes")
        _check_labels(ty, tpaths, num_classes, reduce)
        _check_labels(vy, vpaths, num_classes, reduce)
        class_names = tuple(options.get("class_names") or (f"class {i}" for i in range(num_classes)))
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes in {root}; "
                             "give one name per class")
        splits = {"train": (tx, ty), "test": (vx, vy)}
        stats = IMAGENET_STATS if in_chans == 3 else ((0.449,), (0.226,))
    if cfg.get("mean") and len(cfg["mean"]) == in_chans:
        stats = (tuple(cfg["mean"]), tuple(cfg["std"]))
    data = {split: SegTensorData(x, y, *stats, num_classes, class_names, augment=augment and split == "train")
            for split, (x, y) in splits.items()}
    train, val, test = data["train"], data.get("val"), data["test"]
    if name == "ade" and val_size:
        if not 0 < val_size < len(train):
            raise ValueError(f"val_size={val_size} must be between 1 and {len(train) - 1} (the training folder of "
                             f"{root} has {len(train)} images)")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(VAL_SEED))
        train, val = train._pick(order[val_size:], augment), train._pick(order[:val_size], False)
    return train.subset(train_subset, seed), val, test.subset(test_subset, seed)
