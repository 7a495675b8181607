"""ViMoE Workbench: Vision Mixture-of-Experts on timm, with routing capture, metrics and studies.

Importing the package registers the ``vimoe_*`` models (classifiers and ``vimoe_seg_*``) with timm: at once if timm
is already imported (``import timm, workbench``), otherwise right after timm is first imported.  The package itself
imports nothing heavy (torch, timm) until one of its names is used, so ``python -m workbench --help`` answers at once.

The packages follow the flow of the work, each importing only those before it:

    moe (router, dispatch, MoE layer)      data (datasets from local files)
        -> models (timm ViMoE, SegViMoE, upcycling)
        -> train (trainer, metrics, checkpoints, provenance)
        -> analysis (routing capture, specialisation, regions, movement, FLOPs, densify, statistics)
        -> studies (study files, runs, records, claims, the notebooks' report)
        -> explorer (what the app computes), bench, cli; viz (palettes, figures) stands apart, used by the top

``atomic`` (atomic file writes) and ``_lazy`` (lazy exports) are leaves anyone may import.
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
         "MODEL_NAMES": "models.vimoe", "ViMoE": "models.vimoe", "resolve_moe_layers": "models.vimoe",
         "upcycle": "models.vimoe", "SegViMoE": "models.segmentation", "SEG_MODEL_NAMES": "models.segmentation",
         "evaluate_segmentation": "train.metrics", "load_model": "train.checkpoint", "profile": "analysis.flops"}
__all__ = ["MoEMlp", "ViMoE", "upcycle", "resolve_moe_layers", "moe_modules", "moe_aux_loss", "moe_aux_terms",
           "set_capture", "MODEL_NAMES", "SegViMoE", "SEG_MODEL_NAMES", "evaluate_segmentation", "load_model",
           "profile"]


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
    """Imports ``workbench.models.vimoe`` and ``workbench.models.segmentation`` (which register the models) as soon
    as ``timm`` has been imported."""

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
    for name in ("vimoe", "segmentation"):
        module = sys.modules.get(f"{__name__}.models.{name}")
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return  # being imported now (its `import timm` fired this hook): it registers itself as it finishes, and
            # whoever builds a model by name calls workbench.models.register() first
        importlib.import_module(f"{__name__}.models.{name}")


if "timm" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())
