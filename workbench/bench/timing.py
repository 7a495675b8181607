"""How the benchmarks measure: interleaved timing (A, B, A, B, ... as a ratio of medians), autograd's saved bytes,
machine load, allocator, versions, and results written atomically with provenance.

Imports: torch, ``workbench.moe``, ``workbench.train.provenance``, ``workbench.atomic``.
"""

import ctypes
import importlib.metadata
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ..moe import MoEMlp
from ..atomic import atomic_write_text
from ..train.provenance import ROOT as REPO_ROOT, provenance



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def saved_bytes(exclude: nn.Module | None = None):
    """Bytes autograd keeps for backward inside the block (each storage once), not counting ``exclude``'s
    parameters: the activation memory of a training step, which is what dispatch changes."""
    params = {p.untyped_storage().data_ptr() for p in exclude.parameters()} if exclude is not None else set()
    seen, total = set(), [0]

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and storage.data_ptr() not in params:
            seen.add(key)
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def _fresh_grads(module: nn.Module, x: torch.Tensor) -> None:
    """As a training step starts (``optimizer.zero_grad(set_to_none=True)``): the backward then writes the
    gradients instead of adding to last step's, which would charge each layer in proportion to its parameters."""
    module.zero_grad(set_to_none=True)
    x.grad = None


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype) -> torch.Tensor:
    """One forward + backward with ``grad`` as the output's gradient; an MoE layer's aux loss enters the backward
    as the scalar a training loss adds (its router gradient is part of the layer's real cost; records before
    2026-12-08 added it as ``y + 0 * aux_loss``, which also charged the layer a (T, d) add and its reduction).
    Returns the output."""
    _fresh_grads(module, x)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        y = module(x)
    backward_with_aux(y, module.aux_loss if isinstance(module, MoEMlp) else None, grad.to(y.dtype))
    return y


def backward_with_aux(y: torch.Tensor, aux, grad: torch.Tensor) -> None:
    """Backward from ``y`` with ``grad`` and, where ``aux`` is a loss with a graph, from ``aux`` as the scalar a
    training loss adds to the task loss."""
    if isinstance(aux, torch.Tensor) and aux.requires_grad:
        torch.autograd.backward([y, aux], [grad, torch.ones_like(aux)])
    else:
        y.backward(grad)


def _memory(module, x, grad, dtype, device) -> int:
    """Activation memory of one forward: CUDA peak allocated above the baseline; on CPU the bytes saved for backward."""
    module.zero_grad(set_to_none=True)
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with autocast:
            y = module(x)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        y.backward(grad.to(y.dtype))
        return peak
    with saved_bytes(exclude=module) as total, autocast:
        y = module(x)
    y.backward(grad.to(y.dtype))
    return total[0]


def time_interleaved(fns: dict, reps: int, warmup: int, device: torch.device, on_round=None) -> dict[str, float]:
    """Median seconds of each callable, run round-robin ``reps`` times after ``warmup`` rounds; ``on_round()`` after
    each round (a progress bar)."""
    times = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
        if on_round is not None:
            on_round()
    return {name: statistics.median(v) for name, v in times.items()}


PROGRESS_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n}/{total} rounds [{elapsed} so far, expected {remaining} more]"




PEERS_INSTALL = "pip install -e '.[peers]'"
PEER_DISTRIBUTIONS = ("transformers", "st-moe-pytorch", "mixture-of-experts")
LOAD_LIMIT = 0.5  # 1-min load average above which timings are flagged as taken under load


def load_note() -> dict:
    """The 1-min load average now, and whether the machine looks quiet enough for timings (a warning if not)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    quiet = load <= LOAD_LIMIT
    if not quiet:
        print(f"warning: 1-min load average is {load:.2f} (> {LOAD_LIMIT}): other processes share the CPU, so these "
              "timings are erratic; re-run on a quiet machine for figures to record", file=sys.stderr)
    return {"load_avg_1min": round(load, 2), "quiet": quiet}


def steady_allocator() -> str:
    """Pin glibc malloc's adaptive thresholds, as ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` would:
    tensors up to 32 MiB then reuse the heap, as in a steady training loop, instead of being mapped afresh, so
    that a layer is not charged page faults that depend on what ran before it in the round (which moved the dense
    reference by 10% between rounds).  Returns what was done, for the record."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        pinned = libc.mallopt(-3, 32 << 20) == 1 and libc.mallopt(-1, 2**31 - 1) == 1  # M_MMAP_/M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pinned = False
    return "glibc malloc: mmap threshold 32 MiB, no trimming" if pinned else "default allocator"


def machine() -> str:
    """The CPU's model name and core count (the thread counts vary within a run, so they are not part of it)."""
    from ..train.provenance import device_description

    return f"{device_description('cpu').split(': ', 1)[1].rsplit(',', 1)[0]}, {os.cpu_count()} cores"


def default_threads() -> list[int]:
    return sorted({1, os.cpu_count() or 1})




def _versions(distributions) -> dict[str, str]:
    found = {}
    for dist in distributions:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")




def repo_relative(value):
    """``value`` with every absolute path inside the repository (a string or a Path, in dicts and lists at any
    depth) written relative to the repository root, so a recorded result names no machine's folders."""
    if isinstance(value, dict):
        return {k: repo_relative(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [repo_relative(v) for v in value]
    if isinstance(value, (str, Path)) and Path(value).is_absolute():
        for candidate in (Path(value), Path(value).resolve()):  # REPO_ROOT is resolved; the path may not be
            if candidate.is_relative_to(REPO_ROOT):
                return candidate.relative_to(REPO_ROOT).as_posix()
    return str(value) if isinstance(value, Path) else value


def write_result(kind: str, payload, folder: str | Path) -> Path:

    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    path = folder / f"{kind}-{dev}-{stamp}.json"
    record = {"kind": kind, "results": repo_relative(payload), "provenance": provenance()}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


