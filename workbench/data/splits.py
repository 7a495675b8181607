"""The splits a trained model is scored on, whatever its task: one entry point for the commands and studies that
evaluate, prune or analyse a model on the data it was trained on.

Imports: this package's ``classification`` and ``scenes``.
"""
from __future__ import annotations


def build_eval_splits(dataset: str, *, val_size: int = 0, root=None, model=None, test_subset: int | None = None,
                      data_options: dict | None = None, seed: int = 0):
    """(train, validation, test) of any dataset as a trained model is scored on it (no augmentation): a
    segmentation dataset's scenes (with its ``data_options``, e.g. ``train_size``) or a classification dataset's
    images (which take no ``data_options``)."""
    from .scenes import SEG_DATASETS, build_seg_splits

    if dataset in SEG_DATASETS:
        return build_seg_splits(dataset, val_size=val_size, root=root, model=model, augment=False,
                                test_subset=test_subset, seed=seed, **(data_options or {}))
    from .classification import build_splits

    return build_splits(dataset, val_size=val_size, root=root, model=model, augment=False, test_subset=test_subset,
                        seed=seed)
