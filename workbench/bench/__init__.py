"""Benchmarks (``python -m workbench bench ...``): ratios against dense equivalents, interleaved in one run.
``timing`` (how to measure) -> ``layers`` (one MoE layer; peers), ``split`` (where one layer's time goes),
``matmul`` (one expert's matmul by rows) and ``models`` (training img/s, eval latency,
the app) -> ``cli``.

Imports: ``workbench.moe``, ``workbench.analysis.flops``, ``workbench.train.provenance``, ``workbench.explorer``
(the app's cost); nothing imports it but the top-level cli.
"""
from .._lazy import exports

__getattr__, __dir__, __all__ = exports(__name__, {
    "bench_moe": "layers", "bench_peers": "layers", "format_peers_table": "layers", "format_moe_table": "layers",
    "peer_contenders": "layers", "bench_train": "models", "bench_app": "models", "format_train": "models",
    "bench_step": "models", "format_step": "models", "bench_split": "split", "format_split": "split", "MOE_PRESETS": "layers",
    "saved_bytes": "timing", "write_result": "timing", "time_interleaved": "timing", "load_note": "timing",
    "repo_relative": "timing", "LOAD_LIMIT": "timing", "PEER_DISTRIBUTIONS": "timing",
    "PEERS_INSTALL": "timing"})
