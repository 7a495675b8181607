"""The trainer: one loop for CPU, one GPU (bf16 autocast, optional torch.compile) and several GPUs or nodes under
``torchrun`` (DDP: gloo on CPU, nccl on GPU).

* AdamW, linear warmup + cosine decay per step, label smoothing, gradient clipping, MoE auxiliary losses.
* Upcycling runs: ``init_from`` a dense checkpoint, converted with :func:`workbench.upcycle`, then fine-tuned.
* Exact resume: every batch, augmentation and noise draw is a function of (seed, epoch, step) or of RNG states
  saved in the checkpoint, so a run killed anywhere resumes from its last checkpoint and ends with the same weights
  and metrics as an uninterrupted run (on CPU; CUDA kernels are not bitwise deterministic).
* ``metrics.jsonl``: one line per epoch (losses, accuracies, per-MoE-layer load / load CV / drop rate,
  throughput, wall time), rewritten atomically from the checkpoint's history so it always matches the checkpoint.
* Classification or semantic segmentation, decided by the dataset (``fmnist-scenes``, ``ade``: segmentation,
  with a ``vimoe_seg_*`` model): the loop is the same; the loss is per pixel (``ignore_index`` pixels left out),
  ``*_acc`` is pixel accuracy and the rows add ``test_miou``, ``test_pixel_acc``, ``test_iou`` (per class) and
  ``val_miou``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .data import DATASETS, build_splits
from .moe import moe_aux_loss, moe_modules
from .vimoe import ViMoE, split_moe_kwargs

DEFAULT_MODEL = "vimoe_tiny_patch4_28"
DEFAULT_SEG_MODEL = "vimoe_seg_micro_patch7_56"
TASKS = ("classification", "segmentation")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the run stopped and the last good checkpoint is untouched."""


@dataclass
class TrainConfig:
    model: str | None = None  # timm name; None: DEFAULT_MODEL (DEFAULT_SEG_MODEL), or the init_from checkpoint's
    task: str | None = None  # None: the dataset's task (segmentation for SEG_DATASETS); if set, it must agree
    model_kwargs: dict = field(default_factory=dict)  # MoE switches and timm ViT kwargs
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    data_options: dict = field(default_factory=dict)  # segmentation datasets: build_seg_splits options
    epochs: int = 10
    batch_size: int = 128  # global batch: split across DDP ranks
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    augment: bool = True
    train_subset: int | None = None
    test_subset: int | None = None
    val_size: int = 0  # images held out of the training set (fixed draw, same for every seed) as a validation split
    eval_at_start: bool = False  # evaluate before the first step (step-0 accuracy: is an upcycled start clean?)
    seed: int = 0
    init_from: str | None = None  # dense checkpoint to upcycle (folder, .safetensors or .pt)
    shared_init: str = "copy"  # upcycling only: see workbench.upcycle
    expert_noise: float = 0.0  # upcycling only
    output: str = "runs/default"
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA (CPU always runs fp32)
    compile: bool = False
    save_every: int = 0  # also checkpoint every N steps (0: at the end of each epoch only)
    eval_batch_size: int = 500
    num_workers: int = 4
    quiet: bool = False

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: use an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is invalid: use a learning rate > 0")
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError(f"train_subset={self.train_subset!r} is invalid: use an integer >= 1 or leave it unset")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device={self.device!r} is invalid: use auto, cpu, cuda or cuda:N")
        if self.task not in (None,) + TASKS:
            raise ValueError(f"task={self.task!r} is invalid: use one of {TASKS} or leave it unset (from the dataset)")


def dataset_task(name: str) -> str:
    """'classification' for the datasets of ``workbench.data``, 'segmentation' for ``workbench.segdata``'s."""
    if name in DATASETS:
        return "classification"
    try:
        from .segdata import SEG_DATASETS
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.segdata":
            raise
        SEG_DATASETS = ()
    if name in SEG_DATASETS:
        return "segmentation"
    raise ValueError(f"dataset={name!r} is not known: use one of {DATASETS + tuple(SEG_DATASETS)}")


def resolve_task(cfg: TrainConfig) -> str:
    """The run's task: the dataset's; ``cfg.task``, when set, must agree."""
    task = dataset_task(cfg.dataset)
    if cfg.task not in (None, task):
        raise ValueError(f"task={cfg.task!r} does not fit dataset={cfg.dataset!r} (a {task} dataset): leave task "
                         f"unset or choose a {cfg.task} dataset")
    return task


def model_task(model: nn.Module) -> str:
    """'segmentation' for a model with ``task = 'segmentation'`` (``vimoe_seg_*``; DDP-wrapped or not), else
    'classification'."""
    return getattr(getattr(model, "module", model), "task", None) or "classification"


def check_model_task(model: nn.Module, task: str, what: str) -> None:
    """A one-line error when ``what`` (a model name or checkpoint) is built for another task than the run's."""
    if model_task(model) != task:
        fix = (f"a vimoe_seg_* model (e.g. {DEFAULT_SEG_MODEL})" if task == "segmentation"
               else f"a classifier (e.g. {DEFAULT_MODEL})")
        raise ValueError(f"{what} is a {model_task(model)} model but the dataset is a {task} dataset; use {fix} "
                         "or a dataset of its task")


# -- distributed ------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


def resolve_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} asked for, but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", d.local_rank if d.world > 1 else torch.device(name).index or 0)
    return torch.device("cpu")


# -- model ------------------------------------------------------------------------------------------------------
def build_training_model(cfg: TrainConfig) -> tuple[nn.Module, dict]:
    """The model to train and the config that rebuilds it (``checkpoint.model_config``)."""
    from .vimoe import upcycle

    task = resolve_task(cfg)
    if cfg.init_from is None:
        name = cfg.model or (DEFAULT_SEG_MODEL if task == "segmentation" else DEFAULT_MODEL)
        config = ckpt.model_config(name, cfg.model_kwargs)
        model = ckpt.build_model(config)
        check_model_task(model, task, f"model {name}")
        return model, config
    dense, dense_config = ckpt.load_model(cfg.init_from)
    if model_task(dense) != task:
        raise ckpt.CheckpointError(f"--init-from {cfg.init_from} is a {model_task(dense)} checkpoint "
                                   f"({dense_config['model']}) but {cfg.dataset} is a {task} dataset; upcycle a "
                                   f"dense {task} checkpoint or choose a {model_task(dense)} dataset")
    if cfg.model not in (None, dense_config["model"]):
        raise ckpt.CheckpointError(f"--init-from {cfg.init_from} is a {dense_config['model']} checkpoint but "
                                   f"--model asks for {cfg.model}; leave --model out (the architecture comes from "
                                   "the dense checkpoint) or pick a matching checkpoint")
    moe_kwargs, other = split_moe_kwargs(cfg.model_kwargs)
    moe_layers = other.pop("moe_layers", "last-2")
    if other:
        raise ValueError(f"with init_from only MoE switches may be given, not {sorted(other)}")
    if isinstance(dense, ViMoE) and dense.moe_layer_indices:
        raise ckpt.CheckpointError(f"--init-from {cfg.init_from} already has MoE layers "
                                   f"{dense.moe_layer_indices}; upcycle from a dense checkpoint (moe_layers='none')")
    model = upcycle(dense.train(), moe_layers, shared_init=cfg.shared_init, expert_noise=cfg.expert_noise,
                    inplace=True, **moe_kwargs)
    if isinstance(dense, ViMoE):
        config = ckpt.model_config(dense_config["model"], {**dense_config["model_kwargs"], "moe_layers": moe_layers,
                                                           **moe_kwargs})
    else:
        config = ckpt.model_config(dense_config["model"], dense_config["model_kwargs"],
                                   {"moe_layers": moe_layers, **moe_kwargs})
    return model, config


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return (min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))) / base_lr
    return f


# -- evaluation -------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int = 500, device=None, amp: bool = False,
             d: Dist = Dist(), progress: bool = False) -> dict:
    """Accuracy, loss and per-MoE-layer expert load over a whole dataset (sharded across DDP ranks);
    ``progress``: a tqdm bar on stderr (main rank only).  A segmentation model (``task = 'segmentation'``) is
    scored per pixel (the data's ``ignore_index`` left out): ``acc`` is pixel accuracy, and ``miou``,
    ``pixel_acc``, ``iou`` (per class), ``confusion`` and ``pixels`` are added."""
    from .segmentation import confusion_matrix, segmentation_scores

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
    for x, y in tqdm(loader, total=data.num_batches(batch_size, d.world), desc="eval", unit="batch", leave=False,
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
    _all_reduce(totals, d)
    n_batches = _all_reduce(torch.tensor(float(batches), device=device), d)
    out = {"acc": float(totals[0] / totals[1]), "loss": float(totals[2] / totals[1]), "n": int(totals[3])}
    if seg:
        _all_reduce(confusion, d)
        out.update(segmentation_scores(confusion), pixels=int(totals[1]), confusion=confusion.tolist())
    out["moe"] = {str(i): _load_stats(_all_reduce(loads[i], d), _all_reduce(drops[i], d) / n_batches)
                  for i in layers}
    core.train(was_training)
    return out


def _seg_metrics(split: str, result: dict) -> dict:
    """``{split}_miou``, ``{split}_pixel_acc`` and ``{split}_iou`` (per class) of a segmentation evaluation."""
    if "miou" not in result:
        return {}
    return {f"{split}_miou": round(result["miou"], 6), f"{split}_pixel_acc": round(result["pixel_acc"], 6),
            f"{split}_iou": result["iou"]}


def _load_stats(load: torch.Tensor, drop_rate: torch.Tensor) -> dict:
    share = (load / load.sum().clamp(min=1)).tolist()
    cv = float(load.std(unbiased=False) / load.mean().clamp(min=1e-9))
    return {"load": [round(s, 5) for s in share], "load_cv": round(cv, 5), "drop_rate": round(float(drop_rate), 5)}


# -- training ---------------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Trainer:
    """Holds the run's state; ``run()`` trains to ``cfg.epochs`` from wherever the checkpoint left off."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.d = init_distributed("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.device = resolve_device(cfg.device, self.d)
        if self.ckpt_path.exists() and not resume:
            raise FileExistsError(f"{self.ckpt_path} exists; pass --resume to continue that run or choose another "
                                  "--output")
        state = ckpt.read_checkpoint(self.ckpt_path) if resume and self.ckpt_path.exists() else None
        if state is not None:  # the checkpoint's config wins, except for how long to train and where to run
            saved = TrainConfig.from_dict(state["train_config"])
            saved.epochs, saved.device, saved.quiet, saved.output = cfg.epochs, cfg.device, cfg.quiet, cfg.output
            self.cfg = cfg = saved
        _seed_everything(cfg.seed)
        self.task = resolve_task(cfg)
        if state is not None:
            self.model = ckpt.build_model(state["model_config"])
            self.model_config = state["model_config"]
            ckpt.load_state_into(self.model, state["model"], self.model_config, self.ckpt_path)
        else:
            self.model, self.model_config = build_training_model(cfg)
        self.model.to(self.device).train()

        split_args = dict(val_size=cfg.val_size, root=cfg.data_root, model=self.model, train_subset=cfg.train_subset,
                          test_subset=cfg.test_subset, augment=cfg.augment, seed=cfg.seed)
        if self.task == "segmentation":
            from .segdata import build_seg_splits

            self.train_data, self.val_data, self.test_data = build_seg_splits(cfg.dataset, **split_args,
                                                                              **cfg.data_options)
        elif cfg.data_options:
            raise ValueError(f"data_options {sorted(cfg.data_options)} are options of the segmentation datasets; "
                             f"{cfg.dataset} takes none, leave them out")
        else:
            self.train_data, self.val_data, self.test_data = build_splits(cfg.dataset, **split_args,
                                                                          num_workers=cfg.num_workers)
        self.ignore_index = getattr(self.train_data, "ignore_index", -100) if self.task == "segmentation" else -100
        head = getattr(self.model, "num_classes", None)
        if head is not None and head != self.train_data.num_classes:
            raise ValueError(f"the model has {head} classes but {cfg.dataset} has {self.train_data.num_classes}; "
                             f"pass --model-arg num_classes={self.train_data.num_classes}")
        self.train_data.to(self.device)
        self.test_data.to(self.device)
        if self.val_data is not None:
            self.val_data.to(self.device)
        if cfg.batch_size % self.d.world:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes "
                             f"({self.d.world})")
        self.rank_batch = cfg.batch_size // self.d.world
        self.steps_per_epoch = self.train_data.num_batches(self.rank_batch, self.d.world, drop_last=True)
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({len(self.train_data)})")

        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
        total = cfg.epochs * self.steps_per_epoch
        warmup = max(1, int(cfg.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(total, warmup, cfg.lr,
                                                                                    cfg.min_lr))
        self.epoch, self.step, self.history, self.acc = 0, 0, [], None
        self.step0 = None
        self.wall_offset = 0.0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
            self.acc, self.wall_offset = state.get("accumulators"), state.get("wall_time", 0.0)
            self.step0 = state.get("step0")
            _set_rng_state(state["rng"], self.device)
            if self.d.main and not cfg.quiet:
                print(f"resumed from epoch {self.epoch}"
                      + (f", step {self.step} of {self.steps_per_epoch}" if self.step else "") + f" ({self.ckpt_path})"
                      + (f"; training to epoch {cfg.epochs}" if self.epoch < cfg.epochs
                         else f"; all {cfg.epochs} epochs are done"), flush=True)
        elif resume and self.d.main and not cfg.quiet:
            print(f"no checkpoint in {self.out} to resume: starting a new run", flush=True)

        self.forward_model = self.model
        if self.d.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                                     find_unused_parameters=False)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.layers = moe_modules(self.model)
        self.amp = cfg.amp and self.device.type == "cuda"

    # -- pieces ---------------------------------------------------------------------------------------------------
    def compute_loss(self, x, y):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.forward_model(x)
            task = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing,
                                   ignore_index=self.ignore_index)
        aux = moe_aux_loss(self.model).to(task.device)
        return logits, task, aux

    def _new_accumulators(self) -> dict:
        return {"task": 0.0, "aux": 0.0, "correct": 0, "seen": 0, "images": 0, "train_time": 0.0,
                "terms": {}, "load": {str(i): [0.0] * l.num_experts for i, l in self.layers.items()},
                "drop": {str(i): 0.0 for i in self.layers}, "steps": 0}

    def save(self) -> None:
        if not self.d.main:
            return
        state = {"model": self.model.state_dict(), "model_config": self.model_config,
                 "train_config": dataclasses.asdict(self.cfg), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                 "history": self.history, "step0": self.step0, "accumulators": self.acc, "rng": _rng_state(self.device),
                 "wall_time": self.wall_offset + (time.time() - self.started)}
        ckpt.save_checkpoint(self.ckpt_path, state)
        lines = "".join(json.dumps(row) + "\n" for row in self.history)
        ckpt.atomic_write_text(self.out / "metrics.jsonl", lines)

    def _train_epoch(self) -> None:
        cfg = self.cfg
        if self.acc is None or self.step == 0:
            self.acc = self._new_accumulators()
        acc = self.acc
        batches = self.train_data.batches(self.rank_batch, seed=cfg.seed, epoch=self.epoch, start=self.step,
                                          rank=self.d.rank, world=self.d.world, drop_last=True)
        bar = tqdm(batches, total=self.steps_per_epoch, initial=self.step, leave=False,
                   desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=cfg.quiet or not self.d.main)
        loads = {i: torch.zeros(l.num_experts, device=self.device) for i, l in self.layers.items()}
        drops = {i: torch.zeros((), device=self.device) for i in self.layers}
        t0 = time.time()
        for x, y in bar:
            logits, task, aux = self.compute_loss(x, y)
            loss = task + aux
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"loss became {value} at epoch {self.epoch + 1}, step {self.step + 1}; stopped without saving. "
                    f"The last good checkpoint ({self.ckpt_path}, epoch {self.history[-1]['epoch'] if self.history else 0}) "
                    "is untouched: lower --lr, keep --clip-grad on, or check the data, then --resume")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                valid = y != self.ignore_index  # classification: every label; segmentation: labelled pixels
                counted = int(valid.sum())
                acc["task"] += float(task) * counted
                acc["aux"] += float(aux) * counted
                acc["correct"] += int(((logits.argmax(1) == y) & valid).sum())
                acc["seen"] += counted
                acc["images"] = acc.get("images", 0) + len(y)
                acc["steps"] += 1
                for i, layer in self.layers.items():
                    loads[i] += layer.last_load
                    drops[i] += layer.last_drop_rate
                    for name, term in layer.aux_terms.items():
                        acc["terms"][name] = acc["terms"].get(name, 0.0) + float(term) / len(self.layers)
            self.step += 1
            if not cfg.quiet:
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.steps_per_epoch:
                self._fold(acc, loads, drops, t0)
                self.save()
                loads = {i: torch.zeros_like(v) for i, v in loads.items()}
                drops = {i: torch.zeros_like(v) for i, v in drops.items()}
                t0 = time.time()
        self._fold(acc, loads, drops, t0)

    def _fold(self, acc, loads, drops, t0) -> None:
        """Move device-side accumulators into the (checkpointable) python ones."""
        acc["train_time"] += time.time() - t0
        for i in self.layers:
            key = str(i)
            acc["load"][key] = [a + b for a, b in zip(acc["load"][key], loads[i].tolist())]
            acc["drop"][key] += float(drops[i])

    def _evaluate(self, data) -> dict:
        if self.d.world > 1:  # per-rank BatchNorm statistics (segmentation heads): evaluate rank 0's, the saved ones
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)
        return evaluate(self.forward_model, data, batch_size=self.cfg.eval_batch_size, device=self.device,
                        amp=self.amp, d=self.d)

    def _evaluate_start(self) -> dict:
        """Accuracy before any training step: for an upcycled run, the test of a function-preserving start."""
        test = self._evaluate(self.test_data)
        out = {"test_acc": round(test["acc"], 6), "test_loss": round(test["loss"], 6), "test_n": test["n"],
               **_seg_metrics("test", test)}
        if self.val_data is not None:
            val = self._evaluate(self.val_data)
            out.update(val_acc=round(val["acc"], 6), val_loss=round(val["loss"], 6), **_seg_metrics("val", val))
        return out

    def _epoch_metrics(self, test: dict) -> dict:
        acc, world = self.acc, self.d.world
        sums = _all_reduce(torch.tensor([acc["task"], acc["aux"], acc["correct"], acc["seen"],
                                         acc.get("images", acc["seen"])], dtype=torch.float64, device=self.device),
                           self.d)
        task, aux, correct, seen, images = sums.tolist()
        moe = {}
        for key, load in acc["load"].items():
            total = _all_reduce(torch.tensor(load, device=self.device), self.d)
            drop = _all_reduce(torch.tensor(acc["drop"][key], device=self.device), self.d) / max(1, acc["steps"] * world)
            moe[key] = _load_stats(total, drop)
        steps = max(1, acc["steps"])
        return {"epoch": self.epoch + 1, "train_loss": round(task / seen, 6), "aux_loss": round(aux / seen, 6),
                **{f"aux_{k}": round(v / steps, 6) for k, v in sorted(acc["terms"].items())},
                "train_acc": round(correct / seen, 6), "test_loss": round(test["loss"], 6),
                "test_acc": round(test["acc"], 6), "test_n": test["n"], **_seg_metrics("test", test),
                **({"val_loss": round(test["val"]["loss"], 6), "val_acc": round(test["val"]["acc"], 6),
                    **_seg_metrics("val", test["val"])} if "val" in test else {}),
                "lr": self.scheduler.get_last_lr()[0], "img_per_s": round(images / max(acc["train_time"], 1e-9), 1),
                "wall_time": round(self.wall_offset + time.time() - self.started, 1),
                "moe_train": moe, "moe_test": test["moe"]}

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.started = time.time()
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(self.out / "train_config.json",
                                   json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if cfg.eval_at_start and self.step0 is None and self.epoch == 0 and self.step == 0:
            self.step0 = self._evaluate_start()
            if self.d.main and not cfg.quiet:
                tqdm.write(f"step 0: test {self.step0['test_acc']:.4f}")
        while self.epoch < cfg.epochs:
            self._train_epoch()
            test = self._evaluate(self.test_data)
            if self.val_data is not None:
                test["val"] = self._evaluate(self.val_data)
            row = self._epoch_metrics(test)
            self.history.append(row)
            self.epoch, self.step, self.acc = self.epoch + 1, 0, None
            self.save()
            if self.d.main and not cfg.quiet:
                tqdm.write(f"epoch {row['epoch']:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                           f"train {row['train_acc']:.4f}  test {row['test_acc']:.4f}  "
                           + (f"mIoU {row['test_miou']:.4f}  " if "test_miou" in row else "")
                           + f"{row['img_per_s']:.0f} img/s  {row['wall_time']:.0f}s")
                if row["moe_train"]:
                    tqdm.write("    expert load CV / drop rate (train): " + "  ".join(
                        f"block {block} {stats['load_cv']:.2f} / {stats['drop_rate']:.3f}"
                        for block, stats in row["moe_train"].items()))
        if self.d.main:
            ckpt.save_model(self.model, self.model_config, self.out / "model",
                            {"metrics": self.history[-1] if self.history else None})
        return {"history": self.history, "step0": self.step0, "output": str(self.out),
                "model_config": self.model_config}


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    return Trainer(cfg, resume=resume).run()
