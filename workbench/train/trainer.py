"""The trainer: one loop for CPU, one GPU (bf16 autocast, optional torch.compile) and several GPUs or nodes under
``torchrun`` (DDP: gloo on CPU, nccl on GPU).

* AdamW, linear warmup + cosine decay per step, label smoothing, gradient clipping, MoE auxiliary losses.
* Upcycling runs: ``init_from`` a dense checkpoint, converted with :func:`workbench.upcycle`, then fine-tuned.
* Exact resume: every batch, augmentation and noise draw is a function of (seed, epoch, step) or of RNG states
  saved in the checkpoint, so a run killed anywhere resumes from its last checkpoint and ends with the same weights
  and metrics as an uninterrupted run (on CPU; CUDA kernels are not bitwise deterministic).  A resumed run keeps
  its saved config; only what a run in progress can change (epochs, learning rate and schedule, where it runs) may be
  given anew (``state.resumed_config``).
* SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption) save a checkpoint at the current step and stop with one
  line naming the command that continues the run; a second signal stops at once (``interrupt``).
* ``metrics.jsonl``: one line per epoch (losses, accuracies, per-MoE-layer load / load CV / drop rate,
  throughput, wall time), rewritten atomically from the checkpoint's history so it always matches the checkpoint.
* Classification or semantic segmentation, decided by the dataset (``fmnist-scenes``, ``ade``: segmentation,
  with a ``vimoe_seg_*`` model): the loop is the same; the loss is per pixel (``ignore_index`` pixels left out),
  ``*_acc`` is pixel accuracy and the rows add ``test_miou``, ``test_pixel_acc``, ``test_iou`` (per class) and
  ``val_miou``.

Imports: ``workbench.data``, ``workbench.moe``, ``workbench.models`` and this package's ``config``,
``distributed``, ``interrupt``, ``metrics``, ``checkpoint``, ``state``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from .progress import tqdm

from ..data.classification import build_splits
from ..moe import moe_aux_loss, moe_modules, set_cpu_matmul
from ..moe.kernels import check_cpu_matmul
from ..models.vimoe import ViMoE, split_moe_kwargs
from . import checkpoint as ckpt
from .config import (DEFAULT_MODEL, DEFAULT_SEG_MODEL, NonFiniteLoss, TrainConfig, check_model_task,  # noqa: F401
                     model_task, resolve_task)
from .distributed import all_reduce, init_distributed, resolve_device
from .interrupt import Interrupted, StoppedAtOnce, requested, signal_name, stop_requests
from .metrics import evaluate, load_stats, seg_metrics
from .state import apply_changes, restore, resumed_config, save, seed_everything


# -- model ------------------------------------------------------------------------------------------------------
def build_training_model(cfg: TrainConfig) -> tuple[nn.Module, dict]:
    """The model to train and the config that rebuilds it (``checkpoint.model_config``)."""
    task = resolve_task(cfg)
    if cfg.weights_from is not None:  # fine-tune a saved model as it is (its own architecture)
        if cfg.init_from is not None or cfg.model_kwargs:
            raise ValueError("weights_from continues a saved model as it is: leave init_from and model keywords out")
        model, config = ckpt.load_model(cfg.weights_from)
        check_model_task(model, task, f"weights_from {cfg.weights_from}")
        return model.train(), {k: config[k] for k in ("model", "model_kwargs", "upcycle") if k in config}
    if cfg.init_from is None:
        name = cfg.model or (DEFAULT_SEG_MODEL if task == "segmentation" else DEFAULT_MODEL)
        config = ckpt.model_config(name, cfg.model_kwargs)
        model = ckpt.build_model(config)
        check_model_task(model, task, f"model {name}")
        return model, config
    dense, dense_config = ckpt.load_model(cfg.init_from)
    return upcycle_dense(dense, dense_config, cfg, task)


def upcycle_dense(dense: nn.Module, dense_config: dict, cfg: TrainConfig, task: str) -> tuple[nn.Module, dict]:
    """The ViMoE an upcycling run (``init_from``) trains, from its dense model, and the config that rebuilds it;
    also what a study checks on the meta device before any run."""
    from ..models.vimoe import upcycle

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


class Trainer:
    """Holds the run's state; ``run()`` trains to ``cfg.epochs`` from wherever the checkpoint left off."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, given=None):
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
        changes = []
        if state is not None:  # the checkpoint's config wins; fields given explicitly (``given``) may change it
            self.cfg, changes = resumed_config(state, cfg, given, self.ckpt_path)
            cfg = self.cfg
            if self.d.main:
                for name, old, new in changes:
                    print(f"resuming with {name} {old} -> {new}", flush=True)
        seed_everything(cfg.seed)
        self.task = resolve_task(cfg)
        if state is not None:
            self.model = ckpt.build_model(state["model_config"])
            self.model_config = state["model_config"]
            ckpt.load_state_into(self.model, state["model"], self.model_config, self.ckpt_path)
        else:
            self.model, self.model_config = build_training_model(cfg)
        self.model.to(self.device).train()
        if self.device.type == "cpu":
            set_cpu_matmul(self.model, check_cpu_matmul(cfg.cpu_matmul))

        split_args = dict(val_size=cfg.val_size, root=cfg.data_root, model=self.model, train_subset=cfg.train_subset,
                          test_subset=cfg.test_subset, augment=cfg.augment, seed=cfg.seed)
        if self.task == "segmentation":
            from ..data.scenes import build_seg_splits

            if cfg.train_classes is not None:
                raise ValueError("train_classes keeps classes of a classification dataset; a segmentation dataset "
                                 "labels every pixel, leave it unset")

            self.train_data, self.val_data, self.test_data = build_seg_splits(cfg.dataset, **split_args,
                                                                              **cfg.data_options)
        elif cfg.data_options:
            raise ValueError(f"data_options {sorted(cfg.data_options)} are options of the segmentation datasets; "
                             f"{cfg.dataset} takes none, leave them out")
        else:
            self.train_data, self.val_data, self.test_data = build_splits(cfg.dataset, **split_args,
                                                                          num_workers=cfg.num_workers,
                                                                          classes=cfg.train_classes)
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
            restore(self, state)
            apply_changes(self, changes)
            if self.d.main and not cfg.quiet:
                print(f"resumed from epoch {self.epoch}"
                      + (f", step {self.step} of {self.steps_per_epoch}" if self.step else "") + f" ({self.ckpt_path})"
                      + (f"; training to epoch {cfg.epochs}" if self.epoch < cfg.epochs
                         else f"; all {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} done"), flush=True)
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
        """The checkpoint (atomically) and ``metrics.jsonl``, from the main rank.  Mid-epoch under DDP every rank
        takes part: rank 0 saves the epoch's partial sums of all ranks (each rank's own are only its share), so a
        resumed epoch's metrics count every rank's steps once."""
        acc = self._all_ranks_accumulators() if self.d.world > 1 and self.acc is not None and self.step else None
        if self.d.main:
            save(self, acc)

    def _all_ranks_accumulators(self) -> dict:
        """The epoch's partial sums that the epoch's end sums over ranks (losses, counts, expert loads and drops),
        summed over ranks now; the rest (steps, aux terms, time) rank 0's own, as the epoch's end reads them."""
        acc = self.acc
        f64 = dict(dtype=torch.float64, device=self.device)
        sums = all_reduce(torch.tensor([acc["task"], acc["aux"], acc["correct"], acc["seen"], acc.get("images", 0)],
                                       **f64), self.d).tolist()
        out = {**acc, "task": sums[0], "aux": sums[1], "correct": int(sums[2]), "seen": int(sums[3]),
               "images": int(sums[4])}
        out["load"] = {k: all_reduce(torch.tensor(v, **f64), self.d).tolist() for k, v in acc["load"].items()}
        out["drop"] = {k: float(all_reduce(torch.tensor(v, **f64), self.d)) for k, v in acc["drop"].items()}
        return out

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
            stop = self._stop_requested()  # SIGINT / SIGTERM: save here, at this step, and stop
            if stop or cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.steps_per_epoch:
                self._fold(acc, loads, drops, t0)
                self.save()
                loads = {i: torch.zeros_like(v) for i, v in loads.items()}
                drops = {i: torch.zeros_like(v) for i, v in drops.items()}
                t0 = time.time()
            if stop:
                bar.close()
                if self.d.world > 1:
                    dist.barrier()  # no rank exits (and makes torchrun stop the others) before rank 0 has saved
                raise self._interrupted(stop)
        self._fold(acc, loads, drops, t0)

    def _stop_requested(self) -> int:
        """The signal number of a pending SIGINT / SIGTERM (0: none); under torchrun any rank's, so that every rank
        stops at the same step."""
        signum = requested() or 0
        if self.d.world > 1:
            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag)
        return signum

    def resume_command(self) -> str:
        if self.d.world > 1:
            return (f"torchrun --nproc_per_node={self.d.world} -m workbench train --output {self.out} --resume "
                    "(with the same torchrun options)")
        return f"python -m workbench train --output {self.out} --resume"

    def _interrupted(self, signum: int, started: bool = True) -> Interrupted:
        """The one-line stop of a run interrupted by a signal: where it saved, and how to continue."""
        name = signal_name(signum)
        if not started:
            if self.ckpt_path.exists():
                return Interrupted(f"interrupted by {name} before training went on; {self.ckpt_path} is as it was: "
                                   f"continue with: {self.resume_command()}", signum)
            return Interrupted(f"interrupted by {name} before training started; nothing to save: run the same "
                               "command again to start", signum)
        where = (f"at epoch {self.epoch + 1}, step {self.step} of {self.steps_per_epoch}" if self.step
                 else f"after epoch {self.epoch}")
        return Interrupted(f"interrupted by {name} {where}; saved {self.ckpt_path}: continue with: "
                           f"{self.resume_command()}", signum)

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
               **seg_metrics("test", test)}
        if self.val_data is not None:
            val = self._evaluate(self.val_data)
            out.update(val_acc=round(val["acc"], 6), val_loss=round(val["loss"], 6), **seg_metrics("val", val))
        return out

    def _epoch_metrics(self, test: dict) -> dict:
        acc, world = self.acc, self.d.world
        sums = all_reduce(torch.tensor([acc["task"], acc["aux"], acc["correct"], acc["seen"],
                                         acc.get("images", acc["seen"])], dtype=torch.float64, device=self.device),
                           self.d)
        task, aux, correct, seen, images = sums.tolist()
        moe = {}
        for key, load in acc["load"].items():
            total = all_reduce(torch.tensor(load, device=self.device), self.d)
            drop = all_reduce(torch.tensor(acc["drop"][key], device=self.device), self.d) / max(1, acc["steps"] * world)
            moe[key] = load_stats(total, drop)
        steps = max(1, acc["steps"])
        return {"epoch": self.epoch + 1, "train_loss": round(task / seen, 6), "aux_loss": round(aux / seen, 6),
                **{f"aux_{k}": round(v / steps, 6) for k, v in sorted(acc["terms"].items())},
                "train_acc": round(correct / seen, 6),
                **({"test_loss": round(test["loss"], 6), "test_acc": round(test["acc"], 6), "test_n": test["n"],
                    **seg_metrics("test", test)} if "acc" in test else {}),
                **({"val_loss": round(test["val"]["loss"], 6), "val_acc": round(test["val"]["acc"], 6),
                    **seg_metrics("val", test["val"])} if "val" in test else {}),
                "lr": self.scheduler.get_last_lr()[0], "img_per_s": round(images / max(acc["train_time"], 1e-9), 1),
                "wall_time": round(self.wall_offset + time.time() - self.started, 1),
                "moe_train": moe, **({"moe_test": test["moe"]} if "moe" in test else {})}

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.started = time.time()
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(self.out / "train_config.json",
                                   json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        stop = self._stop_requested()
        if stop:
            raise self._interrupted(stop, started=False)
        if cfg.eval_at_start and self.step0 is None and self.epoch == 0 and self.step == 0:
            self.step0 = self._evaluate_start()
            if self.d.main and not cfg.quiet:
                tqdm.write(f"step 0: test {self.step0['test_acc']:.4f}")
        while self.epoch < cfg.epochs:
            self._train_epoch()
            last = self.epoch + 1 == cfg.epochs
            test = self._evaluate(self.test_data) if last or (self.epoch + 1) % cfg.test_every == 0 else {}
            if self.val_data is not None:
                test["val"] = self._evaluate(self.val_data)
            row = self._epoch_metrics(test)
            self.history.append(row)
            self.epoch, self.step, self.acc = self.epoch + 1, 0, None
            self.save()
            if self.d.main and not cfg.quiet:
                tqdm.write(f"epoch {row['epoch']:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                           f"train {row['train_acc']:.4f}  "
                           + (f"test {row['test_acc']:.4f}  " if "test_acc" in row else "")
                           + (f"val {row['val_acc']:.4f}  " if "test_acc" not in row and "val_acc" in row else "")
                           + (f"mIoU {row['test_miou']:.4f}  " if "test_miou" in row else "")
                           + f"{row['img_per_s']:.0f} img/s  {row['wall_time']:.0f}s")
                if row["moe_train"]:
                    tqdm.write("    expert load CV / drop rate (train): " + "  ".join(
                        f"block {block} {stats['load_cv']:.2f} / {stats['drop_rate']:.3f}"
                        for block, stats in row["moe_train"].items()))
            stop = self._stop_requested()
            if stop and self.epoch < cfg.epochs:
                raise self._interrupted(stop)
        if self.d.main:
            ckpt.save_model(self.model, self.model_config, self.out / "model",
                            {"metrics": self.history[-1] if self.history else None})
        return {"history": self.history, "step0": self.step0, "output": str(self.out),
                "model_config": self.model_config}


def train(cfg: TrainConfig, resume: bool = False, given=None) -> dict:
    """Train (or, ``resume``, continue) the run ``cfg`` describes.  On resume the checkpoint's config wins; the
    fields named in ``given`` (None: all of ``cfg``'s) may change it, see :func:`workbench.train.state.resumed_config`.
    SIGINT / SIGTERM save a checkpoint at the current step and raise :class:`~workbench.train.interrupt.Interrupted`
    (a second one: :class:`~workbench.train.interrupt.StoppedAtOnce`, at once)."""
    with stop_requests():
        try:
            return Trainer(cfg, resume=resume, given=given).run()
        except StoppedAtOnce as err:
            path = Path(cfg.output) / "checkpoint.pt"
            kept = (f"the last checkpoint {path} is kept: continue with: python -m workbench train --output "
                    f"{cfg.output} --resume" if path.exists() else "no checkpoint had been saved yet")
            raise StoppedAtOnce(f"{err}; {kept}", err.signum) from None
