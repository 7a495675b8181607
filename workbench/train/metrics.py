"""Evaluation and task metrics: accuracy and loss of a classifier, mIoU / pixel accuracy / per-class IoU of a
segmentation model, and the per-MoE-layer expert load of both, over a whole split (sharded across DDP ranks).

Imports: ``workbench.moe`` (to read each MoE layer's load), ``.config``, ``.distributed``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from .progress import tqdm

from ..moe import moe_modules
from .config import model_task
from .distributed import Dist, all_reduce

DEFAULT_IGNORE_INDEX = 255


@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int = 500, device=None, amp: bool = False,
             d: Dist = Dist(), progress: bool | str = False) -> dict:
    """Accuracy, loss and per-MoE-layer expert load over a whole dataset (sharded across DDP ranks);
    ``progress``: a tqdm bar on stderr (main rank only), labelled with it when it is a string.  A segmentation
    model (``task = 'segmentation'``) is scored per pixel (the data's ``ignore_index`` left out): ``acc`` is pixel
    accuracy, and ``miou``, ``pixel_acc``, ``iou`` (per class), ``confusion`` and ``pixels`` are added."""
    core = getattr(model, "module", model)
    was_training = core.training
    core.eval()
    device = torch.device(device) if device is not None else next(core.parameters()).device  # default: the model's
    layers = moe_modules(core)
    loads = {i: torch.zeros(layer.num_experts, device=device) for i, layer in layers.items()}
    drops = {i: torch.zeros((), device=device) for i in layers}
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # correct, counted targets, loss sum, images
    seg = model_task(core) == "segmentation"
    ignore = getattr(data, "ignore_index", -100) if seg else -100
    confusion = torch.zeros(core.num_classes, core.num_classes, dtype=torch.long, device=device) if seg else None
    batches = 0
    loader = data.batches(batch_size, shuffle=False, rank=d.rank, world=d.world)
    label = progress if isinstance(progress, str) else "eval"
    for x, y in tqdm(loader, total=data.num_batches(batch_size, d.world), desc=label, unit="batch", leave=False,
                     disable=not (progress and d.main)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits = core(x)
        pred, valid = logits.argmax(1), y != ignore
        totals[0] += ((pred == y) & valid).sum()
        totals[1] += valid.sum()
        totals[2] += F.cross_entropy(logits.float(), y, ignore_index=ignore, reduction="sum")
        totals[3] += len(y)
        if seg:
            confusion += confusion_matrix(pred, y, core.num_classes, ignore)
        for i, layer in layers.items():
            loads[i] += layer.last_load
            drops[i] += layer.last_drop_rate
        batches += 1
    all_reduce(totals, d)
    n_batches = all_reduce(torch.tensor(float(batches), device=device), d)
    out = {"acc": float(totals[0] / totals[1]), "loss": float(totals[2] / totals[1]), "n": int(totals[3])}
    if seg:
        all_reduce(confusion, d)
        out.update(segmentation_scores(confusion), pixels=int(totals[1]), confusion=confusion.tolist())
    out["moe"] = {str(i): load_stats(all_reduce(loads[i], d), all_reduce(drops[i], d) / n_batches)
                  for i in layers}
    core.train(was_training)
    return out


def seg_metrics(split: str, result: dict) -> dict:
    """``{split}_miou``, ``{split}_pixel_acc`` and ``{split}_iou`` (per class) of a segmentation evaluation."""
    if "miou" not in result:
        return {}
    return {f"{split}_miou": round(result["miou"], 6), f"{split}_pixel_acc": round(result["pixel_acc"], 6),
            f"{split}_iou": result["iou"]}


def load_stats(load: torch.Tensor, drop_rate: torch.Tensor) -> dict:
    share = (load / load.sum().clamp(min=1)).tolist()
    cv = float(load.std(unbiased=False) / load.mean().clamp(min=1e-9))
    return {"load": [round(s, 5) for s in share], "load_cv": round(cv, 5), "drop_rate": round(float(drop_rate), 5)}



def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = target class, columns = predicted class; pixels whose
    target is ``ignore_index`` are left out.  ``pred``: class indices of target's shape, or logits (B, C, ...)."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    if pred.is_floating_point():
        pred = pred.argmax(1)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    return multiclass_confusion_matrix(pred, target, num_classes, ignore_index=ignore_index, validate_args=False)


def segmentation_scores(confusion: torch.Tensor) -> dict:
    """mIoU, pixel accuracy and per-class IoU (None for a class absent from target and prediction)."""
    conf = confusion.double().cpu()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.nan)
    total = conf.sum()
    return {"miou": float(iou[present].mean()) if present.any() else float("nan"),
            "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "iou": [round(float(v), 6) if ok else None for v, ok in zip(iou, present)]}


def evaluate_segmentation(model: nn.Module, data, batch_size: int = 500, device=None, **kwargs) -> dict:
    """``{"miou", "pixel_acc", "iou" (per class), "loss" (per pixel), "n" (images), "pixels", "confusion", "acc"
    (= pixel_acc), "moe"}`` over a whole split, on ``device`` (default: the model's); the trainer's evaluation loop
    (``amp``, ``d``, ``progress`` pass through)."""
    if model_task(model) != "segmentation":
        raise ValueError(f"{type(model).__name__} is not a segmentation model (no task='segmentation'); use "
                         "workbench.train.evaluate for classifiers")
    return evaluate(model, data, batch_size=batch_size, device=device, **kwargs)
