"""What a run is: ``TrainConfig`` (every field a run needs, validated), the tasks and their defaults.

Imports: ``workbench.data`` only (which datasets are classification or segmentation).  No torch at import time,
so ``python -m workbench train --help`` reads the defaults from here quickly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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
    train_classes: list | None = None  # only these labels in every split (labels unchanged): pretraining on part of a task
    test_subset: int | None = None
    val_size: int = 0  # images held out of the training set (fixed draw, same for every seed) as a validation split
    eval_at_start: bool = False  # evaluate before the first step (step-0 accuracy: is an upcycled start clean?)
    seed: int = 0
    init_from: str | None = None  # dense checkpoint to upcycle (folder, .safetensors or .pt)
    weights_from: str | None = None  # a checkpoint to continue as it is (its architecture and weights), e.g. a pruned model
    shared_init: str = "copy"  # upcycling only: see workbench.upcycle
    expert_noise: float = 0.0  # upcycling only
    output: str = "runs/default"
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA (CPU always runs fp32)
    compile: bool = False
    cpu_matmul: str = "blas"  # CPU fp32 matmuls: 'blas' (torch's MKL) or 'onednn' (see workbench.moe.kernels)
    save_every: int = 0  # also checkpoint every N steps (0: at the end of each epoch only)
    eval_batch_size: int = 500
    test_every: int = 1  # score the test split after every N-th epoch and after the last (validation: every epoch)
    num_workers: int = 4
    quiet: bool = False
    tensorboard: bool = True  # TensorBoard event files of the curves (workbench.train.events); not recorded
    tensorboard_dir: str | None = None  # where they go; None: the run folder, beside metrics.jsonl

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "test_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: use an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is invalid: use a learning rate > 0")
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError(f"train_subset={self.train_subset!r} is invalid: use an integer >= 1 or leave it unset")
        if self.train_classes is not None and not (
                isinstance(self.train_classes, (list, tuple)) and self.train_classes
                and all(type(c) is int and c >= 0 for c in self.train_classes)
                and len(set(self.train_classes)) == len(self.train_classes)):
            raise ValueError(f"train_classes={self.train_classes!r} is invalid: use a list of distinct labels >= 0, "
                             f"e.g. [0, 1, 2, 3, 4], or leave it unset (every class)")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device={self.device!r} is invalid: use auto, cpu, cuda or cuda:N")
        if self.cpu_matmul not in ("blas", "onednn"):
            raise ValueError(f"cpu_matmul={self.cpu_matmul!r} is invalid: use 'blas' (default) or 'onednn'")
        if self.task not in (None,) + TASKS:
            raise ValueError(f"task={self.task!r} is invalid: use one of {TASKS} or leave it unset (from the dataset)")


def dataset_task(name: str) -> str:
    """'classification' for the datasets of ``workbench.data.classification``, 'segmentation' for
    ``workbench.data.scenes``'s."""
    from ..data.classification import DATASETS

    if name in DATASETS:
        return "classification"
    try:
        from ..data.scenes import SEG_DATASETS
    except ModuleNotFoundError as err:
        if err.name != "workbench.data.scenes":
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


def model_task(model) -> str:
    """'segmentation' for a model with ``task = 'segmentation'`` (``vimoe_seg_*``; DDP-wrapped or not), else
    'classification'."""
    return getattr(getattr(model, "module", model), "task", None) or "classification"


def check_model_task(model, task: str, what: str) -> None:
    """A one-line error when ``what`` (a model name or checkpoint) is built for another task than the run's."""
    if model_task(model) != task:
        fix = (f"a vimoe_seg_* model (e.g. {DEFAULT_SEG_MODEL})" if task == "segmentation"
               else f"a classifier (e.g. {DEFAULT_MODEL})")
        raise ValueError(f"{what} is a {model_task(model)} model but the dataset is a {task} dataset; use {fix} "
                         "or a dataset of its task")

