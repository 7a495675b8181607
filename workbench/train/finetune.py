"""Fine-tuning a changed model (pruned, merged, densified) with a run's own recipe, resumably.

``finetune_plan`` reads a fine-tune block (epochs, lr, min_lr defaulting to lr / 10, train_images);
``finetune_from`` saves the changed model as a start and trains it in a folder of its own, resuming there after an
interruption.  The studies' analyses (``workbench.studies.refit``, the expert-pruning analysis) and the ``prune``
command share both.

Imports: this package's ``checkpoint`` and ``trainer``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path


def finetune_plan(spec: dict) -> dict:
    """A fine-tune block as recorded: epochs, lr, min_lr (default lr / 10) and, when given, train_images."""
    lr = float(spec["lr"])
    return {"epochs": int(spec["epochs"]), "lr": lr, "min_lr": float(spec.get("min_lr", lr / 10)),
            **({"train_images": int(spec["train_images"])} if "train_images" in spec else {})}


def finetune_from(start, config: dict, cfg, folder: Path, what: dict, finetune: dict, seed: int,
                  quiet: bool = True):
    """``start`` fine-tuned: the run's own training config (optimizer, regularisation, batch, data order: ``seed``)
    for ``finetune['epochs']`` epochs from ``lr`` without warm-up, cosine to ``min_lr``, on ``train_images``
    training images when given (the validation split is never trained on).  Runs in ``folder`` and resumes from
    there, unless that folder was begun for another start or fine-tune (``what`` differs): then it starts again."""
    from .checkpoint import load_model, save_model
    from .trainer import train

    what = json.loads(json.dumps(what))  # as it reads back (tuples are lists)
    if (folder / "start.json").exists() and json.loads((folder / "start.json").read_text()) != what:
        print(f"note: {folder} held a fine-tune of another start or plan; starting this one there", file=sys.stderr)
        shutil.rmtree(folder)  # begun for other blocks or another fine-tune: not this start's
    if not (folder / "ft" / "checkpoint.pt").exists():
        base = {k: config[k] for k in ("model", "model_kwargs", "upcycle") if k in config}
        save_model(start, base, folder / "start", {"pruned": config["pruned"]} if "pruned" in config else None)
        (folder / "start.json").write_text(json.dumps(what))
    subset = finetune.get("train_images", cfg.train_subset)
    ft = dataclasses.replace(cfg, model=None, model_kwargs={}, init_from=None, weights_from=str(folder / "start"),
                             epochs=finetune["epochs"], lr=finetune["lr"], min_lr=finetune["min_lr"],
                             warmup_epochs=0.0, eval_at_start=False, output=str(folder / "ft"), quiet=quiet,
                             tensorboard=False, tensorboard_dir=None, seed=seed, train_subset=subset)
    train(ft, resume=(folder / "ft" / "checkpoint.pt").exists())
    return load_model(folder / "ft" / "model")[0].eval()
