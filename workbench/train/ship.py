"""Copy a finished run's model into ``experiments/checkpoints/<name>/`` with its metrics and provenance.

    python -m workbench.train.ship RUN_DIR DEST_DIR

Weights are stored in fp16 (loaded back into fp32); the shipped file is evaluated again on the full test set and
that accuracy (segmentation: mIoU, pixel accuracy, per-class IoU) is recorded as ``shipped_test``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_write, atomic_write_text
from ..data.classification import build_datasets
from .checkpoint import load_model
from .metrics import evaluate
from .provenance import provenance


def ship(run: str | Path, dest: str | Path) -> Path:
    run, dest = Path(run), Path(dest)
    model, config = load_model(run / "model")  # refuses anything that does not rebuild
    # the tree as it is before this function writes anything (a new dest folder would mark it dirty)
    source = provenance("cpu")
    dest.mkdir(parents=True, exist_ok=True)
    half = {k: v.detach().half().contiguous() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    atomic_write(dest / "model.safetensors", lambda tmp: save_file(half, tmp))  # fp16 storage: half the size
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_config = json.loads((run / "train_config.json").read_text())
    pretrain = None
    if train_config.get("init_from"):  # the dense run this model was upcycled from
        init = Path(train_config["init_from"])  # a run's model/ folder (metrics beside it) or a shipped folder
        dense_metrics = next((p for p in (init.parent / "metrics.jsonl", init / "metrics.jsonl") if p.is_file()), None)
        if dense_metrics is not None:
            rows = [json.loads(line) for line in dense_metrics.read_text().splitlines() if line.strip()]
            pretrain = {"from": train_config["init_from"], "metrics": rows[-1]}
    record = {**config, "train_config": train_config, "metrics": history[-1], "pretrain": pretrain,
              "provenance": {**source, "wall_time_s": history[-1]["wall_time"]}}
    atomic_write_text(dest / "config.json", json.dumps(record, indent=2) + "\n")
    shipped, _ = load_model(dest)  # what is shipped, after the fp16 round trip, on the full test set
    if getattr(shipped, "task", None) == "segmentation":
        from ..data.scenes import build_seg_splits

        _, _, test = build_seg_splits(train_config["dataset"], root=train_config.get("data_root"), model=shipped,
                                      val_size=train_config.get("val_size", 0), augment=False,
                                      **train_config.get("data_options", {}))
    else:
        _, test = build_datasets(train_config["dataset"], root=train_config.get("data_root"), model=shipped)
    record["shipped_test"] = {k: v for k, v in evaluate(shipped, test).items() if k not in ("moe", "confusion")}
    atomic_write_text(dest / "config.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(dest / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m workbench.train.ship RUN_DIR DEST_DIR")
    print(ship(sys.argv[1], sys.argv[2]))
