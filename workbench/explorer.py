"""What the routing explorer computes, independent of the UI: safe image decoding, preprocessing from the model's
pretrained config, one forward with routing capture, and per-layer overlays.  ``app.py`` puts a Gradio face on it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .analysis.routing import run_with_routing
from .train.checkpoint import CheckpointError, load_model
from .viz.overlay import GATE_FLOOR, HATCH_PERIOD, render_mask, render_overlay  # noqa: F401  (re-exported)

MAX_PIXELS = 64_000_000  # decoded pixels allowed before we refuse (PIL's bomb guard is on top of this)
WORKING_SIZE = 1024  # large images are reduced to this before preprocessing
CHECKPOINTS = Path(__file__).resolve().parents[1] / "experiments" / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINTS / "vimoe_micro_fmnist_scratch"
EXAMPLES = CHECKPOINTS.parent / "examples"  # Fashion-MNIST test images, for classifiers
SCENES = EXAMPLES / "scenes"  # segmentation scenes, each with its ground truth beside it (scene_00.mask.png)


class BadImage(ValueError):
    """An upload we cannot use; the message is shown to the user as it is."""


def resolve_checkpoint(path) -> Path:
    """The model path the explorer loads for ``path``, or a :class:`CheckpointError` with a one-line reason, found
    without reading any weights.  A training run's folder resolves to its ``model/`` subfolder."""
    p = Path(path).expanduser()
    fix = "give a model folder (model.safetensors + config.json) or a checkpoint.pt from `python -m workbench train`"
    if not str(path).strip():
        raise CheckpointError(f"no checkpoint given: {fix}")
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: {fix}")
    if p.is_dir():
        if not (p / "model.safetensors").is_file() and (p / "model" / "model.safetensors").is_file():
            p = p / "model"
        if not ((p / "model.safetensors").is_file() and (p / "config.json").is_file()):
            raise CheckpointError(f"{p} is not a model folder: it must hold model.safetensors and config.json")
        return p
    if p.suffix == ".safetensors":
        if not p.with_name("config.json").is_file():
            raise CheckpointError(f"{p} has no config.json beside it: keep the two files of a model folder together")
        return p
    with open(p, "rb") as f:
        head = f.read(4)
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):  # torch.save writes a zip (or, once, a pickle)
        raise CheckpointError(f"{p.name} is not a workbench checkpoint: {fix}")
    return p


def one_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, without a library's parenthesised details once it runs long."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "weights_only" in text.lower() or "weights only" in text.lower():  # torch's advice, not ours to give
        text = text.split(" (", 1)[0]
    if len(text) > limit and "; " in text:  # keep the whole first clause rather than cut a sentence
        text = text.split("; ", 1)[0]
        if text.count("(") > text.count(")") and text.rfind(" (") > 0:  # and leave out a parenthesis it cut
            text = text[: text.rfind(" (")]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def visible_content_problem(img: Image.Image, seen: np.ndarray, output: str = "top-5") -> str | None:
    """Why an image shows the model nothing (fully transparent, or one flat colour as the model sees it), or None;
    ``output`` names what is then meaningless (a classifier's top-5, a segmentation model's mask)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        if img.convert("RGBA").getchannel("A").getextrema()[1] == 0:
            return f"the image is fully transparent, so the model sees a blank input and its {output} is meaningless"
    flat = all(lo == hi for lo, hi in img.convert("RGB").getextrema())
    if flat or float(seen.max() - seen.min()) < 2 / 255:
        return f"the image is one flat colour, so the model sees no content and its {output} is meaningless"
    return None


def invert_hint(seen: np.ndarray, invert: bool) -> str | None:
    """For a grayscale model (a light object on black, as Fashion-MNIST): a hint when the model sees a light
    background (the image's edge, padding left out), which Invert would turn dark."""
    if seen.ndim != 2:
        return None
    edge = np.concatenate([seen[0], seen[-1], seen[:, 0], seen[:, -1]])
    shown = edge[edge > 0.02]  # the black padding of a non-square image is not its background
    if len(shown) < len(edge) // 4 or float(np.median(shown)) < 0.6:
        return None
    if invert:
        return ("with Invert ticked the model sees a light background, while it expects a light object on black: "
                "untick Invert")
    return ("the model sees a light background, while it expects a light object on black (as in Fashion-MNIST): "
            "for a dark object photographed on a light background, tick Invert")


SCENE_ON_CLASSIFIER = ("this is one of the segmentation scenes (several items on a textured background), but the "
                       "checkpoint is a classifier: its top-5 names one class for the whole scene")


def read_image(path) -> Image.Image:
    """Decode an upload safely: PNG, JPEG, WebP, GIF (first frame), ...; RGB, RGBA, grayscale, palette; any size."""
    path = Path(path)
    if not path.is_file():
        raise BadImage(f"no file at {path}")
    if path.stat().st_size == 0:
        raise BadImage("the file is empty: upload an image (PNG, JPEG, WebP or GIF)")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        img = Image.open(path)
        if img.width * img.height > MAX_PIXELS:
            raise BadImage(f"the image is {img.width}x{img.height}, more than {MAX_PIXELS // 1_000_000} megapixels")
        img.draft("RGB", (WORKING_SIZE, WORKING_SIZE))  # JPEG: decode at reduced size directly
        img.seek(0)  # GIF / animated WebP: the first frame
        img.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("this file is not an image we can read: upload a PNG, JPEG, WebP or GIF") from None
    except Image.DecompressionBombError:
        raise BadImage(f"the image is too large to decode safely (over {MAX_PIXELS // 1_000_000} megapixels)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"the image is corrupt or truncated and cannot be decoded ({err})") from None
    img = ImageOps.exif_transpose(img)
    if img.width < 2 or img.height < 2:
        raise BadImage(f"the image is {img.width}x{img.height} pixels: too small to route (use at least 2x2)")
    img.thumbnail((WORKING_SIZE, WORKING_SIZE))
    return img


def to_model_input(img: Image.Image, cfg: dict, invert: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """(normalised tensor (1, C, H, W), the picture the model sees in [0, 1] (H, W[, 3])).

    Grayscale models (Fashion-MNIST style: a bright object on black) get transparency composited on black (on white
    when ``invert``, for dark objects photographed on a light background, which are then inverted), and the image
    padded to a square on black so its aspect is kept.  RGB models get timm's eval view: transparency on white,
    shorter side resized, centre crop."""
    chans, height, width = cfg["input_size"]
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        shade = 255 if (invert or chans == 3) else 0
        img = Image.alpha_composite(Image.new("RGBA", img.size, (shade, shade, shade, 255)), img)
    if chans == 1:
        img = img.convert("L")
        if invert:
            img = ImageOps.invert(img)
        side = max(img.size)
        square = Image.new("L", (side, side), 0)
        square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        view = square.resize((width, height), Image.Resampling.BILINEAR)
    else:
        img = img.convert("RGB")
        if invert:
            img = ImageOps.invert(img)
        view = ImageOps.fit(img, (width, height), Image.Resampling.BICUBIC)
    seen = np.asarray(view, dtype=np.float32) / 255.0
    x = torch.from_numpy(seen.copy())
    x = x.unsqueeze(0) if chans == 1 else x.permute(2, 0, 1)
    mean = torch.tensor(cfg["mean"]).view(-1, 1, 1)
    std = torch.tensor(cfg["std"]).view(-1, 1, 1)
    return ((x - mean) / std).unsqueeze(0), seen


def input_config(model) -> dict:
    """Input size from the model itself (``create_model`` kwargs such as img_size / in_chans do not update
    ``pretrained_cfg``), mean/std and labels from its pretrained config when they fit."""
    cfg = dict(model.pretrained_cfg)
    chans = model.patch_embed.proj.in_channels
    cfg["input_size"] = (chans, *model.patch_embed.img_size)
    if len(cfg.get("mean") or ()) != chans:
        cfg["mean"], cfg["std"] = (0.5,) * chans, (0.5,) * chans
    if cfg.get("label_names") and len(cfg["label_names"]) != getattr(model, "num_classes", 0):
        cfg["label_names"] = None
    return cfg


def scene_truth_path(image_path) -> Path | None:
    """The ground truth of an example scene: the ``.mask.png`` beside it, or, for a copy of a shipped scene (an
    upload, or an example that Gradio copied into its cache), the shipped scene's, found by the file's content."""
    path = Path(image_path)
    if path.with_suffix(".mask.png").is_file():
        return path.with_suffix(".mask.png")
    size = path.stat().st_size
    for scene in map(Path, example_scenes_paths()):
        if scene.stat().st_size == size and scene.read_bytes() == path.read_bytes():
            return scene.with_suffix(".mask.png")
    return None


def read_truth(mask_path: Path, img: Image.Image, cfg: dict) -> np.ndarray:
    """A ground-truth mask (mode L or P: class per pixel) as the model sees its image: the geometry of
    :func:`to_model_input` (padded to a square with background and resized, or centre-cropped), nearest class."""
    fix = "rewrite the example scenes with `python tools/make_example_scenes.py`"
    try:
        with Image.open(mask_path) as im:
            im.load()
            mask = im.copy()
    except (OSError, SyntaxError, ValueError):
        raise BadImage(f"the ground truth {mask_path.name} cannot be read: {fix}") from None
    if mask.mode not in ("L", "P") or mask.size != img.size:
        raise BadImage(f"the ground truth {mask_path.name} is not a {img.width}x{img.height} class mask "
                       f"(mode L or P): {fix}")
    mask = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    chans, height, width = cfg["input_size"]
    if chans == 3:
        return np.array(ImageOps.fit(mask, (width, height), Image.Resampling.NEAREST))
    side = max(mask.size)
    square = Image.new("L", (side, side), 0)
    square.paste(mask, ((side - mask.width) // 2, (side - mask.height) // 2))
    return np.array(square.resize((width, height), Image.Resampling.NEAREST))


def mask_scores(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> dict:
    """Pixel accuracy, mIoU and per-class IoU of one predicted mask against its ground truth, as the trainer scores
    a whole split (:func:`workbench.segmentation.segmentation_scores`: mIoU over the classes in either mask)."""
    from .train.metrics import confusion_matrix, segmentation_scores

    conf = confusion_matrix(torch.from_numpy(pred).long(), torch.from_numpy(truth).long(), num_classes)
    return segmentation_scores(conf)


def segment(logits: torch.Tensor, cfg: dict, img: Image.Image, image_path) -> dict:
    """The segmentation fields of an :class:`Analysis` from one image's logits (C, H, W)."""
    from .data.scenes import SCENE_CLASSES

    mask = logits.argmax(0).numpy().astype(np.int64)
    names = tuple(cfg.get("label_names") or (str(c) for c in range(logits.shape[0])))
    counts = np.bincount(mask.reshape(-1), minlength=len(names)) / mask.size
    share = {names[c]: float(counts[c]) for c in np.argsort(-counts, kind="stable") if counts[c] > 0}
    out = {"task": "segmentation", "mask": mask, "class_names": names, "class_share": share}
    truth_path = scene_truth_path(image_path) if names == SCENE_CLASSES else None
    if truth_path is not None:
        out["truth"] = read_truth(truth_path, img, cfg)
        out["scores"] = mask_scores(mask, out["truth"], len(names))
    return out


@dataclass
class Analysis:
    """One image through one model: what the UI shows."""

    seen: np.ndarray  # the model's view in [0, 1]
    top5: dict[str, float]
    layers: list[int]
    routing: str  # 'token' or 'image'
    experts: dict[int, np.ndarray]  # block -> (gh, gw) first-choice expert ((1, 1) for image routing; -1: none)
    gates: dict[int, np.ndarray]
    probs: dict[int, np.ndarray]  # block -> (gh, gw, E) router probabilities ((1, 1, E) for image routing)
    num_experts: int
    timings: dict[str, float] = field(default_factory=dict)
    warning: str | None = None  # set when the image shows the model nothing (see visible_content_problem)
    hint: str | None = None  # a grayscale model sees a light background (see invert_hint)
    mismatch: str | None = None  # a segmentation scene through a classifier (SCENE_ON_CLASSIFIER)
    task: str = "classification"  # or "segmentation"; then top5 is ``class_share``, every class in the mask
    mask: np.ndarray | None = None  # segmentation: the predicted class per pixel (H, W) at the model's input size
    class_names: tuple[str, ...] = ()  # segmentation: the model's class names, class 0 first
    class_share: dict[str, float] = field(default_factory=dict)  # segmentation: share of the mask's pixels per class
    truth: np.ndarray | None = None  # an example scene's ground truth (H, W), as the model sees the image
    scores: dict | None = None  # pixel_acc, miou, iou (per class) of ``mask`` against ``truth``

    def mask_picture(self, scale: int = 1, truth: bool = False) -> np.ndarray:
        """The predicted mask (or the ground truth) in the class palette, ``scale`` pixels per model pixel."""
        return render_mask(self.truth if truth else self.mask, scale, len(self.class_names), hatch=True)

    def overlay(self, block: int, scale: int = 32, use_gates: bool = True,
                picked: tuple[int, int] | None = None) -> np.ndarray:
        """The expert-per-patch picture of one layer: opacity by gate, or opaque (``use_gates=False``)."""
        return render_overlay(self.seen, self.experts[block], self.gates[block] if use_gates else None, scale=scale,
                              picked=picked)

    def load(self) -> dict[int, np.ndarray]:
        """Per layer, the share of this image's patches whose first choice is each expert (patches no expert took,
        under experts-choose routing, count towards no expert)."""
        out = {}
        for b, e in self.experts.items():
            counts = np.bincount(e[e >= 0].reshape(-1), minlength=self.num_experts).astype(float)
            out[b] = counts / e.size
        return out

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the routing grid: the patch grid, (1, 1) for image routing; (0, 0) without MoE layers."""
        return next(iter(self.experts.values())).shape if self.experts else (0, 0)

    def patch_at(self, x: float, y: float, width: int, height: int) -> tuple[int, int]:
        """(row, col) of the patch under pixel (x, y) of a width x height rendering of the overlay."""
        gh, gw = self.grid
        return min(gh - 1, max(0, int(y * gh / height))), min(gw - 1, max(0, int(x * gw / width)))


class Explorer:
    """Loads checkpoints (cached) and analyses images; one lock per model, because MoE layers keep the last
    forward's routing on themselves and concurrent requests must not interleave between forward and read."""

    def __init__(self):
        self._models: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def model(self, checkpoint) -> tuple:
        """(model, config, lock) for a checkpoint, loaded once; a :class:`CheckpointError` with a one-line
        message (see :func:`resolve_checkpoint`) when it cannot be."""
        path = resolve_checkpoint(checkpoint)
        key = str(path.resolve())
        with self._lock:
            if key not in self._models:
                try:
                    model, config = load_model(path)
                except CheckpointError as err:
                    raise CheckpointError(one_line(err)) from err
                except (OSError, ValueError, KeyError, RuntimeError) as err:  # what else a bad file can raise
                    raise CheckpointError(f"cannot load {path}: {type(err).__name__}: {one_line(err)}") from err
                if not hasattr(model, "patch_embed"):
                    raise CheckpointError(f"{checkpoint} is not a ViT/ViMoE checkpoint")
                self._models[key] = (model, config, threading.Lock())
            return self._models[key]

    def loaded(self, checkpoint) -> bool:
        """Whether ``checkpoint`` is loaded already (an earlier request was allowed to load it)."""
        try:
            key = str(resolve_checkpoint(checkpoint).resolve())
        except (CheckpointError, OSError):
            return False
        with self._lock:
            return key in self._models

    def analyse(self, image_path, checkpoint=DEFAULT_CHECKPOINT, invert: bool = False) -> Analysis:
        t0 = time.perf_counter()
        model, _, lock = self.model(checkpoint)
        cfg = input_config(model)
        seg = getattr(model, "task", None) == "segmentation"
        img = read_image(image_path)
        x, seen = to_model_input(img, cfg, invert)
        warning = visible_content_problem(img, seen, "mask" if seg else "top-5")
        t1 = time.perf_counter()
        with lock:
            logits, cache = run_with_routing(model, x)
        t2 = time.perf_counter()
        extra = segment(logits[0], cfg, img, image_path) if seg else {}
        top5 = extra["class_share"] if seg else top5_classes(logits[0], cfg)
        experts, gates, router = {}, {}, {}
        routing = "token"
        num_experts = 0
        for b, lr in cache.items():
            num_experts = max(num_experts, lr.num_experts)
            if lr.routing == "image":
                routing = "image"
                experts[b] = lr.experts[0, :1].numpy().reshape(1, 1)
                gates[b] = lr.gates[0, :1].numpy().reshape(1, 1)
                router[b] = lr.probs[0].numpy().reshape(1, 1, -1)
            else:
                top = lr.top1()[0].numpy()
                if lr.router == "experts_choose":  # -1: no expert took this patch (drawn grey)
                    top = np.where(lr.keep[0, ..., 0].numpy(), top, -1)
                experts[b] = top
                gates[b] = lr.gates[0, ..., 0].numpy()
                router[b] = lr.probs[0].numpy()
        scene = not seg and scene_truth_path(image_path) is not None
        result = Analysis(seen, top5, sorted(cache), routing, experts, gates, router, num_experts, warning=warning,
                          hint=None if warning or scene else invert_hint(seen, invert),
                          mismatch=SCENE_ON_CLASSIFIER if scene else None, **extra)
        result.timings = {"preprocess_ms": (t1 - t0) * 1e3, "forward_ms": (t2 - t1) * 1e3,
                          "total_ms": (time.perf_counter() - t0) * 1e3}
        return result


def top5_classes(logits: torch.Tensor, cfg: dict) -> dict[str, float]:
    """A classifier's five most probable classes (fewer when it has fewer) with their probabilities."""
    probs = logits.softmax(-1)
    names = cfg.get("label_names") or [str(i) for i in range(len(probs))]
    top = probs.topk(min(5, len(probs)))
    return {str(names[i]): float(p) for p, i in zip(top.values, top.indices)}


def model_folders(root) -> list[str]:
    """The model folders in ``root``: ``root`` itself if it is one, its subfolders that are, and the ``model/`` of
    its run folders."""
    root = Path(root)
    if not root.is_dir():
        return []
    if (root / "model.safetensors").is_file() and (root / "config.json").is_file():
        return [str(root)]
    found = []
    for p in sorted(root.iterdir()):
        for folder in (p, p / "model"):
            if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
                found.append(str(folder))
                break
    return found


def list_checkpoints(root: Path = CHECKPOINTS) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.iterdir() if (p / "model.safetensors").is_file() and (p / "config.json").is_file())


def example_images(root: Path | None = None) -> list[str]:
    """The Fashion-MNIST example images (for classifiers): the PNGs directly in ``root``, not the scenes below it."""
    root = root or EXAMPLES
    return sorted(str(p) for p in root.glob("*.png"))


def example_scenes_paths(root: Path | None = None) -> list[str]:
    """The example segmentation scenes (``scene_NN.png``, without their ``.mask.png`` ground truths)."""
    root = root or SCENES
    return sorted(str(p) for p in root.glob("*.png") if not p.name.endswith(".mask.png"))
