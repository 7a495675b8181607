"""Analysis of trained models: routing capture (``routing``), specialisation against random routers
(``specialisation``), routing against ground-truth regions (``regions``), a checkpoint's model card with its
per-layer verdicts, cached beside it (``card``), movement from the init (``movement``),
MoE-aware parameters and FLOPs (``flops``), MoE layers back to dense FFNs (``densify``), the statistics the tests
and claims use (``stats``, scipy), and the ``profile`` command (``cli``).

Imports: ``workbench.moe``, ``workbench.models``, ``workbench.train`` (evaluation, rebuilding an init),
``workbench.data`` and ``workbench.atomic`` (the model card's validation split and cache file), scipy,
scikit-learn, fvcore.
"""
from .._lazy import exports

__getattr__, __dir__, __all__ = exports(__name__, {
    "collect_routing": "routing", "run_with_routing": "routing", "RoutingCache": "routing",
    "specialisation_report": "specialisation", "layers_to_densify": "specialisation",
    "router_inputs": "specialisation", "region_report": "regions", "profile": "flops", "analytic_macs": "flops",
    "densify": "densify", "expert_spread": "movement", "router_at_init": "movement", "paired": "stats",
    "holm": "stats", "verdict": "stats", "mcnemar": "stats"})
