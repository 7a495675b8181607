"""TensorBoard event files beside metrics.jsonl: read back with TensorBoard's own event reader, one point per epoch
after a crash and resume, off with --no-tensorboard, elsewhere with --tensorboard-dir."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from workbench.cli import main
from workbench.train.config import TrainConfig
from workbench.train.events import event_files, scalars, write_events
from workbench.train.trainer import train


def _cfg(tmp_path, **kw):
    base = dict(dataset="synthetic", train_subset=128, test_subset=64, val_size=32, epochs=2, batch_size=32,
                lr=5e-3, warmup_epochs=0.25, output=str(tmp_path / "run"), quiet=True,
                model_kwargs=dict(moe_layers="last-2", num_experts=4, top_k=2, depth=2, embed_dim=32, num_heads=2))
    base.update(kw)
    return TrainConfig(**base)


def _read(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return acc


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_its_curves_for_tensorboard(tmp_path):
    train(_cfg(tmp_path, eval_at_start=True))
    run = tmp_path / "run"
    [path] = event_files(run)
    assert path.parent == run  # beside metrics.jsonl
    acc = _read(run)
    rows = _rows(run)
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/test", "loss/val", "loss/aux", "accuracy/train", "accuracy/test", "accuracy/val",
            "lr", "throughput/img_per_s", "aux/balance"} <= tags
    for block in ("0", "1"):  # per MoE layer, on the training and the test images
        assert {f"load_cv/block{block}/train", f"drop_rate/block{block}/train", f"load_cv/block{block}/test",
                f"drop_rate/block{block}/test"} <= tags
    test = acc.Scalars("accuracy/test")
    assert [e.step for e in test] == [0, 1, 2]  # step 0: the evaluation before the first step
    assert [e.value for e in test[1:]] == pytest.approx([r["test_acc"] for r in rows], abs=1e-6)
    assert [e.value for e in acc.Scalars("load_cv/block1/train")] == \
        pytest.approx([r["moe_train"]["1"]["load_cv"] for r in rows], abs=1e-5)
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([r["lr"] for r in rows], rel=1e-6)
    assert [e.step for e in acc.Scalars("loss/train")] == [1, 2]


def test_a_resumed_run_shows_each_epoch_once(tmp_path, crash_training):
    with crash_training(7):  # crash in epoch 2 (4 steps an epoch; checkpoints every 2 steps)
        train(_cfg(tmp_path, save_every=2))
    run = tmp_path / "run"
    assert [e.step for e in _read(run).Scalars("loss/train")] == [1]
    train(_cfg(tmp_path, save_every=2, epochs=3), resume=True)
    assert len(event_files(run)) == 1  # the resumed process's file replaced the first
    loss = _read(run).Scalars("loss/train")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in _rows(run)], abs=1e-6)


def test_tensorboard_flags(tmp_path, capsys):
    args = ["train", "--dataset", "synthetic", "--train-subset", "64", "--test-subset", "32", "--epochs", "1",
            "--batch-size", "32", "--quiet", "--moe-layers", "last-1", "--num-experts", "2", "--model-arg", "depth=2",
            "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2"]
    assert main(args + ["--output", str(tmp_path / "off"), "--no-tensorboard"]) == 0
    assert (tmp_path / "off" / "metrics.jsonl").is_file() and not event_files(tmp_path / "off")
    assert main(args + ["--output", str(tmp_path / "on"), "--tensorboard-dir", str(tmp_path / "tb" / "on")]) == 0
    assert not event_files(tmp_path / "on") and len(event_files(tmp_path / "tb" / "on")) == 1
    assert [e.step for e in _read(tmp_path / "tb" / "on").Scalars("accuracy/test")] == [1]


def test_scalars_of_a_segmentation_row_and_a_record_history(tmp_path):
    row = {"epoch": 3, "train_loss": 0.5, "test_miou": 0.25, "val_miou": 0.2, "test_pixel_acc": 0.9,
           "test_iou": [0.1, None], "aux_loss": 0.0, "aux_balance": 1.5, "lr": 1e-4, "val_acc": None,
           "moe_train": {"2": {"load": [0.5, 0.5], "load_cv": 0.0, "drop_rate": 0.1}}, "moe_test": {}}
    assert scalars(row) == {"loss/train": 0.5, "miou/test": 0.25, "miou/val": 0.2, "pixel_acc/test": 0.9,
                            "loss/aux": 0.0, "aux/balance": 1.5, "lr": 1e-4, "load_cv/block2/train": 0.0,
                            "drop_rate/block2/train": pytest.approx(0.1)}
    path = write_events(tmp_path / "tb", [{**row, "epoch": 1}, row])
    assert path.name.startswith("events.out.tfevents.") and path.name.endswith(".workbench")
    assert [e.step for e in _read(tmp_path / "tb").Scalars("miou/test")] == [1, 3]
    write_events(tmp_path / "tb", [row])  # rewritten from a record: one file, its rows only
    assert len(event_files(tmp_path / "tb")) == 1 and [e.step for e in _read(tmp_path / "tb").Scalars("lr")] == [3]
