"""ViMoE Workbench: Vision Mixture-of-Experts on timm, with routing capture, metrics and studies.

Importing the package registers the ``vimoe_*`` models (classifiers and ``vimoe_seg_*``) with timm: at once if timm
is already imported (``import timm, workbench``), otherwise right after timm is first imported.  The package itself
imports nothing heavy (torch, timm) until one of its names is used, so ``python -m workbench --help`` answers at once.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
_LAZY = {"MoEMlp": "moe", "moe_aux_loss": "moe", "moe_aux_terms": "moe", "moe_modules": "moe", "set_capture": "moe",
         "MODEL_NAMES": "vimoe", "ViMoE": "vimoe", "resolve_moe_layers": "vimoe", "upcycle": "vimoe",
         "SegViMoE": "segmentation", "SEG_MODEL_NAMES": "segmentation", "evaluate_segmentation": "segmentation"}
__all__ = ["MoEMlp", "ViMoE", "upcycle", "resolve_moe_layers", "moe_modules", "moe_aux_loss", "moe_aux_terms",
           "set_capture", "MODEL_NAMES", "SegViMoE", "SEG_MODEL_NAMES", "evaluate_segmentation"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:  # workbench.viz
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Imports ``workbench.vimoe`` and ``workbench.segmentation`` (which register the models) as soon as ``timm``
    has been imported."""

    active = True

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm" or not self.active:
            return None
        self.active = False  # one shot; find the real spec with the other finders
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


def _register() -> None:
    importlib.import_module(f"{__name__}.vimoe")
    importlib.import_module(f"{__name__}.segmentation")


if "timm" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())
