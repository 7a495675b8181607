"""``python -m workbench bench matmul``: what one expert's matmul costs per token row as the rows per expert shrink.

At one image (50 tokens) over 8 experts each expert multiplies about 6 rows by its weights; a dense FFN multiplies
all 50.  This times ``rows x d @ d x h + b`` (an expert's first matrix) at each row count, cycling over E experts'
weights as a routed forward does, for each CPU matmul library, interleaved, and reports microseconds per call and
per row: the cost a small batch pays per row against the 50-row product a dense layer runs.

Imports: torch, ``workbench.moe.kernels`` and ``.timing``.
"""
from __future__ import annotations

import itertools

import torch

from ..moe.kernels import _dnn, onednn_available, x_w
from .timing import time_interleaved


def bench_matmul(*, rows=(1, 2, 4, 6, 8, 16, 32, 50), dim: int = 192, hidden: int = 768, num_experts: int = 8,
                 backends=("blas", "onednn"), reps: int = 200, warmup: int = 20, seed: int = 0) -> dict:
    """Median microseconds of one expert's ``x @ w1[e] + b1[e]`` per row count and backend (E experts' weights
    cycled, so that each call reads another expert's weights), interleaved in one run.  ``onednn`` is timed raw, at
    every row count (the switch itself sends products under ``ONEDNN_MIN_ROWS`` rows to BLAS)."""
    backends = [b for b in backends if b == "blas" or onednn_available()]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num_experts, dim, hidden, generator=g) * 0.02
    b = torch.randn(num_experts, hidden, generator=g) * 0.02
    xs = {m: torch.randn(m, dim, generator=g) for m in rows}
    expert = itertools.cycle(range(num_experts))

    def call(m, backend):
        e = next(expert)
        if backend == "onednn":
            return _dnn(xs[m], w[e].t(), b[e])
        return x_w(xs[m], w[e], b[e])

    fns = {(m, be): (lambda m=m, be=be: call(m, be)) for m in rows for be in backends}
    med = time_interleaved(fns, reps, warmup, torch.device("cpu"))
    table = []
    for m in rows:
        row = {"rows": m}
        for be in backends:
            us = med[(m, be)] * 1e6
            row[f"{be}_us"] = round(us, 1)
            row[f"{be}_us_per_row"] = round(us / m, 2)
        table.append(row)
    return {"dim": dim, "hidden": hidden, "num_experts": num_experts, "backends": backends, "reps": reps,
            "threads": torch.get_num_threads(), "rows": table}


def format_matmul(result: dict) -> str:
    r = result
    label = {"blas": "blas us", "onednn": "onednn raw us"}
    head = "".join(f" {label[be]:>13} {'per row':>8}" for be in r["backends"])
    lines = [f"one expert's first matmul, rows x {r['dim']} @ {r['dim']} x {r['hidden']} + bias, fp32, "
             f"{r['num_experts']} experts' weights cycled, {r['threads']} thread(s), median of {r['reps']}",
             f"  {'rows':>5}{head}"]
    for row in r["rows"]:
        cells = "".join(f" {row[be + '_us']:>13.1f} {row[be + '_us_per_row']:>8.2f}" for be in r["backends"])
        lines.append(f"  {row['rows']:>5}{cells}")
    last = r["rows"][-1]
    for be in r["backends"]:
        small = [row for row in r["rows"] if row["rows"] <= 8]
        if small:
            s = small[-1]
            lines.append(f"  {be}: {s['rows']} rows cost {s[be + '_us_per_row'] / last[be + '_us_per_row']:.2f}x "
                         f"the per-row time of {last['rows']} rows")
    return "\n".join(lines)
