"""A run's state on disk, for an exact resume: what the checkpoint holds (weights, optimizer, scheduler, counters,
metric history, RNG states), how a resumed run's config is decided, and putting a checkpoint's state back.

Every batch, augmentation and noise draw is a function of (seed, epoch, step) or of the RNG states saved here, so a
run killed anywhere resumes from its last checkpoint and ends with the same weights and metrics as an uninterrupted
run (on CPU; CUDA kernels are not bitwise deterministic).

Imports: torch, numpy and this package's ``config``, ``checkpoint`` and ``events``.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import TrainConfig


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def resumed_config(state: dict, cfg: TrainConfig) -> TrainConfig:
    """The config a resumed run continues with: the checkpoint's, except for how long to train and where to run."""
    saved = TrainConfig.from_dict(state["train_config"])
    saved.epochs, saved.device, saved.quiet, saved.output = cfg.epochs, cfg.device, cfg.quiet, cfg.output
    saved.tensorboard, saved.tensorboard_dir = cfg.tensorboard, cfg.tensorboard_dir  # where to log, as now asked
    return saved


def snapshot(trainer) -> dict:
    """Everything a checkpoint holds for an exact resume."""
    return {"model": trainer.model.state_dict(), "model_config": trainer.model_config,
            "train_config": dataclasses.asdict(trainer.cfg), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "epoch": trainer.epoch, "step": trainer.step,
            "history": trainer.history, "step0": trainer.step0, "accumulators": trainer.acc,
            "rng": rng_state(trainer.device), "wall_time": trainer.wall_offset + (time.time() - trainer.started)}


def save(trainer) -> None:
    """The checkpoint (atomically), then ``metrics.jsonl`` rewritten from its history, so the two always agree; then
    the TensorBoard event file gets the new epochs (``workbench.train.events``)."""
    ckpt.save_checkpoint(trainer.ckpt_path, snapshot(trainer))
    lines = "".join(json.dumps(row) + "\n" for row in trainer.history)
    ckpt.atomic_write_text(trainer.out / "metrics.jsonl", lines)
    if trainer.cfg.tensorboard:
        from .events import sync_trainer

        sync_trainer(trainer)


def restore(trainer, state: dict) -> None:
    """Optimizer, scheduler, counters, history, accumulators and RNG states from a checkpoint (the weights are loaded
    when the model is built)."""
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.epoch, trainer.step, trainer.history = state["epoch"], state["step"], state["history"]
    trainer.acc, trainer.wall_offset = state.get("accumulators"), state.get("wall_time", 0.0)
    trainer.step0 = state.get("step0")
    set_rng_state(state["rng"], trainer.device)
