"""Models: the timm-registered ViMoE classifiers (``vimoe_*``) and segmentation ViMoE (``vimoe_seg_*``), upcycling
a dense ViT into a ViMoE, and the model keywords' command-line vocabulary (``args``).

Imports: ``workbench.moe`` (the MoE layer); nothing above it.
"""
from .._lazy import exports

__getattr__, __dir__, __all__ = exports(__name__, {
    "ViMoE": "vimoe", "upcycle": "vimoe", "resolve_moe_layers": "vimoe", "split_moe_kwargs": "vimoe",
    "MODEL_NAMES": "vimoe", "FASHION_MNIST_LABELS": "vimoe", "SegViMoE": "segmentation",
    "SEG_MODEL_NAMES": "segmentation"})


def register() -> None:
    """Registers every ``vimoe_*`` and ``vimoe_seg_*`` model with timm (idempotent); call it before building a model
    by name from inside the package."""
    import importlib

    importlib.import_module(f"{__name__}.segmentation")  # imports .vimoe first
