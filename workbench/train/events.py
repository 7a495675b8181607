"""TensorBoard event files of a run's curves, so that ``tensorboard --logdir`` (offline) shows what
``metrics.jsonl`` holds: per epoch the losses, accuracies (mIoU and pixel accuracy for segmentation), learning rate,
throughput and, per MoE block, the expert load CV and drop rate on the training and the test images.

The event file follows the checkpoint as ``metrics.jsonl`` does.  Each process of a run (its start, or a resume)
writes a new event file holding the checkpoint's history so far (atomically, under a newer name), removes the
run's earlier event files, then appends each epoch as it is saved; so a run killed and resumed shows every epoch
once, and a TensorBoard watching the folder moves on to the new file.  Tags (TensorBoard groups by the first part):

    loss/train loss/test loss/val loss/aux      accuracy/train accuracy/test accuracy/val      aux/<term>
    miou/test miou/val pixel_acc/test           lr   throughput/img_per_s   time/wall_s
    load_cv/block<i>/train  load_cv/block<i>/test  drop_rate/block<i>/train  drop_rate/block<i>/test

The step is the epoch; a run that evaluates before its first step (``eval_at_start``) adds its step-0 test (and
validation) scores at step 0.

Imports: tensorboard's event protocol buffers and record writer (no TensorFlow); nothing of the workbench but the
``atomic`` leaf.
"""
from __future__ import annotations

import itertools
import math
import os
import socket
import time
from pathlib import Path

from ..atomic import atomic_write

SUFFIX = ".workbench"  # the event files this module writes (and may remove when it writes a newer one)
SCALARS = {"train_loss": "loss/train", "test_loss": "loss/test", "val_loss": "loss/val", "aux_loss": "loss/aux",
           "train_acc": "accuracy/train", "test_acc": "accuracy/test", "val_acc": "accuracy/val",
           "test_miou": "miou/test", "val_miou": "miou/val", "test_pixel_acc": "pixel_acc/test",
           "lr": "lr", "img_per_s": "throughput/img_per_s", "wall_time": "time/wall_s"}
_COUNTER = itertools.count()


def scalars(row: dict) -> dict[str, float]:
    """The TensorBoard scalars of one ``metrics.jsonl`` row (or a step-0 evaluation), by tag."""
    out = {tag: float(row[key]) for key, tag in SCALARS.items() if isinstance(row.get(key), (int, float))}
    for key, value in row.items():
        if key.startswith("aux_") and key != "aux_loss" and isinstance(value, (int, float)):
            out[f"aux/{key[4:]}"] = float(value)
    for split in ("train", "test"):
        for block, stats in (row.get(f"moe_{split}") or {}).items():
            for name in ("load_cv", "drop_rate"):
                if isinstance(stats.get(name), (int, float)):
                    out[f"{name}/block{block}/{split}"] = float(stats[name])
    return {tag: value for tag, value in out.items() if math.isfinite(value)}


def _events(rows: list[tuple[int, float, dict]]) -> bytes:
    """(step, wall time, row) -> serialized event records."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    out = []
    for step, wall, row in rows:
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars(row).items()]
        out.append(_record(Event(wall_time=wall, step=step, summary=Summary(value=values)).SerializeToString()))
    return b"".join(out)


def _record(data: bytes) -> bytes:
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    buffer = io.BytesIO()
    RecordWriter(buffer).write(data)
    return buffer.getvalue()


def event_files(logdir) -> list[Path]:
    """The event files this module wrote in ``logdir``, oldest first."""
    return sorted(Path(logdir).glob(f"events.out.tfevents.*{SUFFIX}"))


class EventLog:
    """A run's event file in ``logdir``: ``sync(history)`` after each save writes what is new.

    ``origin``: the run's start as a Unix time (a history row's ``wall_time`` counts from it), for the events'
    wall times."""

    def __init__(self, logdir, origin: float | None = None):
        self.logdir = Path(logdir)
        self.origin = time.time() if origin is None else origin
        self.path: Path | None = None
        self.written = 0

    def _row(self, row: dict) -> tuple[int, float, dict]:
        return int(row["epoch"]), self.origin + float(row.get("wall_time", 0.0)), row

    def sync(self, history: list[dict], step0: dict | None = None) -> Path:
        """Write the rows of ``history`` not yet in this process's event file (the first call: all of them, in a new
        file replacing the run's earlier ones)."""
        from tensorboard.compat.proto.event_pb2 import Event

        if self.path is None or not self.path.is_file() or len(history) < self.written:
            rows = ([(0, self.origin, step0)] if step0 else []) + [self._row(r) for r in history]
            header = _record(Event(wall_time=self.origin, file_version="brain.Event:2").SerializeToString())
            body = header + _events(rows)
            name = (f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}."
                    f"{next(_COUNTER)}{SUFFIX}")
            path = self.logdir / name

            def write(tmp):
                with open(tmp, "wb") as f:
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())

            # the temporary name must not contain "tfevents": a TensorBoard watching the folder would read it
            atomic_write(path, write, prefix=".writing-")
            for old in event_files(self.logdir):
                if old != path:
                    old.unlink(missing_ok=True)
            self.path, self.written = path, len(history)
            return path
        new = history[self.written:]
        if new:
            with open(self.path, "ab") as f:
                f.write(_events([self._row(r) for r in new]))
                f.flush()
                os.fsync(f.fileno())
            self.written = len(history)
        return self.path


def write_events(logdir, history: list[dict], step0: dict | None = None, origin: float | None = None) -> Path:
    """One event file in ``logdir`` holding ``history`` (e.g. a study record's), replacing earlier ones there."""
    return EventLog(logdir, origin).sync(history, step0)


def sync_trainer(trainer) -> None:
    """After a trainer's save: its event file (``cfg.tensorboard_dir``, or the run folder) gets the new epochs."""
    log = getattr(trainer, "_event_log", None)
    if log is None:
        logdir = trainer.cfg.tensorboard_dir or trainer.out
        log = trainer._event_log = EventLog(logdir, origin=trainer.started - trainer.wall_offset)
    log.sync(trainer.history, trainer.step0)
