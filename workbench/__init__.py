"""ViMoE Workbench: Vision Mixture-of-Experts on timm, with routing capture, metrics and studies.

Importing the package registers the ``vimoe_*`` models with timm.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from .moe import MoEMlp, moe_aux_loss, moe_aux_terms, moe_modules, set_capture  # noqa: E402
from .vimoe import MODEL_NAMES, ViMoE, resolve_moe_layers, upcycle  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MoEMlp", "ViMoE", "upcycle", "resolve_moe_layers", "moe_modules", "moe_aux_loss", "moe_aux_terms",
           "set_capture", "MODEL_NAMES"]
