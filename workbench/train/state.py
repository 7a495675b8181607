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
from pathlib import Path

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


# how this invocation runs, not what the run is: always the new call's, never reported as a change
RUN_LOCAL = ("quiet", "output", "tensorboard", "tensorboard_dir")  # and where it logs
# what a run in progress may change on resume: how long and how fast it learns from here, and where it runs.  The
# rest is fixed when a run starts (the model, its initialisation, the data and its split, the batch size and the seed
# that order the batches the run is in the middle of) and a change to it is refused.
CHANGEABLE = ("epochs", "lr", "min_lr", "warmup_epochs", "weight_decay", "label_smoothing", "clip_grad", "device",
              "amp", "compile", "cpu_matmul", "save_every", "eval_batch_size", "test_every", "num_workers", "data_root")
_UNSET = "(unset)"


def _shown(value) -> str:
    return "none" if value is None else value if isinstance(value, str) else repr(value)


def _same(name: str, old, new, state: dict, saved: TrainConfig) -> bool:
    if name == "model":  # none: the model the run was built as
        built = state.get("model_config", {}).get("model")
        return (old or built) == (new or built)
    if name == "task":
        return new is None or old == new or (old is None and _task_of(saved) == new)
    if name == "init_from" and old and new:
        from pathlib import Path

        return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()
    if name == "clip_grad":
        return (old or None) == (new or None)
    number = (int, float)
    if isinstance(old, bool) or isinstance(new, bool) or not (isinstance(old, number) and isinstance(new, number)):
        return old == new and type(old) is type(new)
    return old == new  # 1 and 1.0 are one learning rate


def _task_of(cfg: TrainConfig) -> str | None:
    from .config import resolve_task

    try:
        return resolve_task(cfg)
    except ValueError:
        return None


def resumed_config(state: dict, cfg: TrainConfig, given=None, source="the checkpoint"):
    """(config, changes) of a resumed run: the checkpoint's config, changed only by the fields named in ``given``
    (the command line's explicit flags and --config keys; None: every field of ``cfg``, as the Python API and
    studies pass a whole config) whose value differs from the saved one.  ``changes``: (field, old, new) of each
    change made.  A change to a field outside ``CHANGEABLE`` is refused in one line that names the fields and the
    fix; ``quiet`` and ``output`` are always the new call's."""
    try:
        saved = TrainConfig.from_dict(state["train_config"])
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{source} holds a run config this version cannot read ({err}); resume it with the version "
                         "that wrote it, or start a new run with another --output") from None
    values, new = dataclasses.asdict(saved), dataclasses.asdict(cfg)
    names = [f.name for f in dataclasses.fields(TrainConfig)
             if f.name not in RUN_LOCAL and (given is None or f.name in given)]
    changes, refused = [], []
    for name in names:
        old, value = values[name], new[name]
        if isinstance(old, dict) and isinstance(value, dict):  # model_kwargs, data_options: the keys given
            diffs = [(f"{name}.{k}", old.get(k, _UNSET), v) for k, v in value.items() if k not in old or old[k] != v]
        elif _same(name, old, value, state, saved):
            continue
        else:
            shown = state.get("model_config", {}).get("model") if name == "model" and old is None else old
            diffs = [(name, shown, value)]
        if name in CHANGEABLE:
            values[name] = value
            changes += diffs
        else:
            refused += diffs
    if refused:
        listed = ", ".join(f"{n} {_shown(o)} -> {_shown(v)}" for n, o, v in refused)
        raise ValueError(f"--resume cannot change {listed}: a run in progress keeps its model, data, batch size and "
                         f"seed; leave {'that' if len(refused) == 1 else 'those'} out to continue the run as it was "
                         f"planned (its config: {Path(cfg.output) / 'train_config.json'}), or start a new run with "
                         "another --output")
    for name in RUN_LOCAL:
        values[name] = new[name]
    out = TrainConfig.from_dict(values)
    out.validate()
    return out, [(n, _shown(o), _shown(v)) for n, o, v in changes]


def apply_changes(trainer, changes) -> None:
    """After ``restore``: put a resumed run's changed learning rate, schedule or weight decay into the optimizer and
    scheduler (their saved state holds the old ones).  Nothing is touched when nothing changed, so an unchanged
    resume stays exact."""
    names = {name.split(".")[0] for name, _, _ in changes}
    cfg, optimizer, scheduler = trainer.cfg, trainer.optimizer, trainer.scheduler
    if "lr" in names:
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.lr
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    if names & {"lr", "min_lr", "warmup_epochs", "epochs"}:  # the schedule from here on is the new one
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if "weight_decay" in names:
        optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # the decayed group (param_groups' order)


def snapshot(trainer, accumulators=None) -> dict:
    """Everything a checkpoint holds for an exact resume (``accumulators``: the epoch's partial sums to save, by
    default the trainer's own)."""
    return {"model": trainer.model.state_dict(), "model_config": trainer.model_config,
            "train_config": dataclasses.asdict(trainer.cfg), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "epoch": trainer.epoch, "step": trainer.step,
            "history": trainer.history, "step0": trainer.step0,
            "accumulators": trainer.acc if accumulators is None else accumulators,
            "rng": rng_state(trainer.device), "wall_time": trainer.wall_offset + (time.time() - trainer.started)}


def save(trainer, accumulators=None) -> None:
    """The checkpoint (atomically), then ``metrics.jsonl`` rewritten from its history, so the two always agree; then
    the TensorBoard event file gets the new epochs (``workbench.train.events``)."""
    ckpt.save_checkpoint(trainer.ckpt_path, snapshot(trainer, accumulators))
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
    if trainer.d.rank != 0:  # under DDP rank 0 saved every rank's partial sums; the others start theirs afresh
        trainer.acc = None
    trainer.step0 = state.get("step0")
    set_rng_state(state["rng"], trainer.device)
