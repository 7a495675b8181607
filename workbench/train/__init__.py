"""Training: one loop for CPU, one GPU and ``torchrun`` (``trainer``), what a run is (``config``), where it runs
(``distributed``), how it is scored (``metrics``: classification and segmentation), checkpoints written atomically
and rebuilt from their architecture (``checkpoint``), what a checkpoint holds and how a resumed run's config is
decided (``state``), a changed model (pruned, merged) fine-tuned resumably with a run's recipe (``finetune``),
stopping cleanly on SIGINT / SIGTERM (``interrupt``), progress bars (``progress``), the TensorBoard event files of
its curves (``events``), shipping a finished run (``ship``), the provenance every record carries (``provenance``)
and the ``train`` / ``eval`` / ``info`` commands (``cli``).

Imports: ``workbench.data``, ``workbench.moe``, ``workbench.models``, ``workbench.atomic``; tensorboard's event
format (``events``).
"""
from .._lazy import exports

__getattr__, __dir__, __all__ = exports(__name__, {
    "TrainConfig": "config", "NonFiniteLoss": "config", "dataset_task": "config", "model_task": "config",
    "DEFAULT_MODEL": "config", "DEFAULT_SEG_MODEL": "config", "Trainer": "trainer", "train": "trainer",
    "build_training_model": "trainer", "evaluate": "metrics", "evaluate_segmentation": "metrics",
    "confusion_matrix": "metrics", "segmentation_scores": "metrics", "Dist": "distributed",
    "resolve_device": "distributed", "load_model": "checkpoint", "save_model": "checkpoint",
    "CheckpointError": "checkpoint", "finetune_from": "finetune", "finetune_plan": "finetune",
    "Interrupted": "interrupt", "StoppedAtOnce": "interrupt"})
