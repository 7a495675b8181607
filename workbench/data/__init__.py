"""Data: datasets from local files only (nothing is downloaded), as tensors with deterministic, resumable batches.

* ``classification``: Fashion-MNIST (Debian's ``dataset-fashion-mnist`` or ``$WORKBENCH_DATA``), CIFAR, image
  folders, synthetic data; the fixed validation split.
* ``scenes``: segmentation data: Fashion-MNIST scenes (items pasted on textured backgrounds) and ADE20K-layout
  folders.
* ``splits``: the splits a trained model of either task is scored on.

Imports: nothing of ``workbench`` (the bottom of the flow: data -> models -> training -> analysis -> studies).
"""
from .._lazy import exports

__getattr__, __dir__, __all__ = exports(__name__, {
    "build_splits": "classification", "build_datasets": "classification", "TensorData": "classification",
    "synthetic": "classification", "DatasetNotFound": "classification", "find_fashion_mnist": "classification",
    "load_fashion_mnist": "classification", "normalise": "classification", "DATASETS": "classification",
    "VAL_SEED": "classification", "build_seg_splits": "scenes", "example_scenes": "scenes",
    "SCENE_CLASSES": "scenes", "SEG_DATASETS": "scenes", "SegTensorData": "scenes",
    "build_eval_splits": "splits"})
