"""``python -m workbench bench train | step | app``: training images/s of a ViMoE against its dense twin, eval
latency of 1 and 8 images as a ratio to dense and to what the MACs predict; one training step of a ViT-scale ViMoE
(img/s, peak memory; the GPU check); and the app's per-request time.

Imports: ``workbench.moe``, ``workbench.analysis.flops``, ``workbench.explorer`` (bench app) and ``.timing``.
"""

import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..moe import moe_aux_loss, moe_modules, set_cpu_matmul

from .timing import _plural, time_interleaved


def _train_step(model, opt, x, y, dtype):
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = F.cross_entropy(model(x).float(), y) + moe_aux_loss(model).to(x.device)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_train(*, model: str = "vimoe_tiny_patch4_28", dense_model: str | None = None, moe_layers: str = "last-3",
                num_experts: int = 8, top_k: int = 1, batch: int = 128, steps: int = 12, warmup: int = 3,
                device: str | None = None, latency_reps: int = 50, latency_batches=(1, 8), threads=None,
                compile: bool = False, cpu_matmuls=("blas",), **model_kwargs) -> dict:
    """Training images/s and eval-forward latency of a ViMoE against its dense model, at each thread count in
    ``threads`` (default: the current one) and, on the CPU, with each matmul library in ``cpu_matmuls`` (both models
    switched alike, so each ratio compares like with like).  The first setting's figures are also at the top
    level."""
    import timm

    from ..models import register

    register()

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    moe = timm.create_model(model, moe_layers=moe_layers, num_experts=num_experts, top_k=top_k,
                            **model_kwargs).to(device)
    if dense_model is None:
        dense = timm.create_model(model, moe_layers="none", **model_kwargs).to(device)
    else:
        dense = timm.create_model(dense_model, **model_kwargs).to(device)
    macs_ratio = _macs_ratio(moe, dense)
    threads = list(threads or [torch.get_num_threads()])
    backends = list(cpu_matmuls) if device.type == "cpu" else ["blas"]
    before, training, latency = torch.get_num_threads(), [], []
    try:
        for backend in backends:
            for m in (moe, dense):
                set_cpu_matmul(m, backend)
            for n in threads:
                torch.set_num_threads(n)
                training.append({"cpu_matmul": backend, **_training_speed(moe, dense, batch, steps, warmup, device,
                                                                          dtype, compile)})
                latency += [{"cpu_matmul": backend, **row}
                            for row in _latency(moe, dense, latency_batches, latency_reps, device, macs_ratio)]
    finally:
        torch.set_num_threads(before)
        for m in (moe, dense):
            set_cpu_matmul(m, "blas")
    first = next(r for r in latency if r["threads"] == threads[0] and r["batch"] == latency_batches[0])
    return {"model": model, "dense_model": dense_model or f"{model}(moe_layers='none')", "moe_layers": moe_layers,
            "num_experts": num_experts, "top_k": top_k, **model_kwargs, "batch": batch, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), **training[0],
            "moe_latency_ms": first["moe_ms"], "dense_latency_ms": first["dense_ms"], "macs_ratio": macs_ratio,
            "training": training, "latency": latency,
            "params_moe": sum(p.numel() for p in moe.parameters()),
            "params_dense": sum(p.numel() for p in dense.parameters()),
            "weights_mb_moe": _weights_mb(moe), "weights_mb_dense": _weights_mb(dense),
            "last_level_cache_mb": last_level_cache_mb()}


def _weights_mb(model: nn.Module) -> float:
    """Bytes of the model's parameters, in MB (10**6): what one forward reads at least once."""
    return round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6, 2)


def last_level_cache_mb(cpu_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> float | None:
    """The largest cache level's size in MB (Linux sysfs; None where it cannot be read).  A forward whose weights
    fit in it runs from cache when it is repeated; one whose weights do not reads them from memory each time."""
    import glob
    import os

    best = None
    for index in glob.glob(os.path.join(cpu_dir, "index*")):
        try:
            level = int(open(os.path.join(index, "level")).read())
            size = open(os.path.join(index, "size")).read().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(size[-1:].upper(), 1)
        try:
            size_bytes = int(size.rstrip("KMGkmg")) * unit
        except ValueError:
            continue
        if best is None or level > best[0]:
            best = (level, size_bytes)
    return None if best is None else round(best[1] / 1e6, 1)


def bench_step(*, model: str = "vimoe_small_patch16_224", moe_layers: str = "every-2", num_experts: int = 8,
               top_k: int = 1, batch: int = 128, steps: int = 20, warmup: int = 5, device: str | None = None,
               dtype: str | None = None, **model_kwargs) -> dict:
    """One training step (forward, backward, AdamW) of a ViMoE against the same model with no MoE layers (for
    ``vimoe_small_patch16_224``: ViT-S/16), on synthetic inputs of the model's own size (224x224: nothing is
    downloaded): images/s, interleaved, and the peak memory a step adds above the weights and optimizer state (CUDA:
    ``max_memory_allocated``; elsewhere not measured, None).  bf16 autocast on CUDA, fp32 elsewhere."""
    import timm

    from ..models import register

    register()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    models = {"moe": timm.create_model(model, moe_layers=moe_layers, num_experts=num_experts, top_k=top_k,
                                       **model_kwargs).to(device).train(),
              "dense": timm.create_model(model, moe_layers="none", **model_kwargs).to(device).train()}
    size = (models["moe"].patch_embed.proj.in_channels, *models["moe"].patch_embed.img_size)  # img_size= may change it
    macs_ratio = _macs_ratio(models["moe"], models["dense"], size)
    x = torch.randn(batch, *size, device=device)
    y = torch.randint(0, models["moe"].num_classes, (batch,), device=device)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    med = time_interleaved({k: (lambda k=k: _train_step(models[k], opts[k], x, y, dtype)) for k in models},
                           steps, warmup, device)
    peak = {k: _step_peak_bytes(models[k], opts[k], x, y, dtype, device) for k in models}
    ratio = med["moe"] / med["dense"]
    return {"model": model, "dense_model": f"{model}(moe_layers='none')", "moe_layers": moe_layers,
            "num_experts": num_experts, "top_k": top_k, **model_kwargs, "batch": batch, "steps": steps,
            "input_size": list(size), "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "moe_img_s": round(batch / med["moe"], 1), "dense_img_s": round(batch / med["dense"], 1),
            "step_ratio": round(ratio, 3), "macs_ratio": macs_ratio, "vs_macs": round(ratio / macs_ratio, 3),
            "moe_peak_mb": _mb(peak["moe"]), "dense_peak_mb": _mb(peak["dense"]),
            "peak_ratio": round(peak["moe"] / peak["dense"], 3) if peak["dense"] else None,
            "params_moe": sum(p.numel() for p in models["moe"].parameters()),
            "params_dense": sum(p.numel() for p in models["dense"].parameters())}


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _step_peak_bytes(model, opt, x, y, dtype, device) -> int | None:
    """Peak CUDA memory one training step allocates above what is held before it (weights, optimizer state)."""
    if device.type != "cuda":
        return None
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _train_step(model, opt, x, y, dtype)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def format_step(result: dict) -> str:
    r = result
    peak = ("peak step memory not measured (CUDA only)" if r["moe_peak_mb"] is None else
            f"peak step memory ViMoE {r['moe_peak_mb']:.0f} MB   dense {r['dense_peak_mb']:.0f} MB   "
            f"ratio {r['peak_ratio']:.3f}")
    return "\n".join([
        f"training step {r['model']} (moe_layers={r['moe_layers']}, E={r['num_experts']}, top-{r['top_k']}) vs "
        f"{r['dense_model']}, batch {r['batch']} x {'x'.join(map(str, r['input_size']))}, {r['dtype']} on "
        f"{r['device']}, median of {r['steps']} interleaved steps",
        f"  ViMoE {r['moe_img_s']:.1f} img/s   dense {r['dense_img_s']:.1f} img/s   step time ratio "
        f"{r['step_ratio']:.3f} (MACs {r['macs_ratio']:.3f}x dense; vs MACs {r['vs_macs']:.3f})",
        f"  {peak}"])


def _macs_ratio(moe: nn.Module, dense: nn.Module, size=None) -> float:
    """Activated MACs of one image, ViMoE over dense (the router and a shared expert count; experts count k times)."""
    from ..analysis.flops import profile

    x = torch.zeros(1, *(size or moe.pretrained_cfg["input_size"]), device=next(moe.parameters()).device)
    return round(profile(moe, x).macs / profile(dense, x).macs, 4)


def _training_speed(moe, dense, batch, steps, warmup, device, dtype, compile) -> dict:
    x = torch.randn(batch, *moe.pretrained_cfg["input_size"], device=device)
    y = torch.randint(0, moe.num_classes, (batch,), device=device)
    models = {"moe": moe.train(), "dense": dense.train()}
    if compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    med = time_interleaved({k: (lambda k=k: _train_step(models[k], opts[k], x, y, dtype)) for k in models},
                           steps, warmup, device)
    # the optimizer step alone (AdamW over each model's own parameters, the gradients the last step left): the part of
    # a training step that grows with total, not activated, parameters
    opt = time_interleaved({k: opts[k].step for k in models}, steps, 1, device)
    return {"threads": torch.get_num_threads(), "moe_img_s": round(batch / med["moe"], 1),
            "dense_img_s": round(batch / med["dense"], 1), "throughput_ratio": round(med["dense"] / med["moe"], 3),
            "moe_step_ms": round(med["moe"] * 1e3, 1), "dense_step_ms": round(med["dense"] * 1e3, 1),
            "moe_optimizer_ms": round(opt["moe"] * 1e3, 2), "dense_optimizer_ms": round(opt["dense"] * 1e3, 2),
            "ratio_without_optimizer": round((med["dense"] - opt["dense"]) / (med["moe"] - opt["moe"]), 3)}


def _fixed_routing(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose every token goes to experts 0..k-1 (gates as routed): the same MACs, one or k
    experts' weights read and one or k expert calls per layer."""
    fixed = copy.deepcopy(model)
    for layer in moe_modules(fixed).values():
        router, route = layer.router, layer.router.forward

        def forward(x, route=route):
            logits, probs, experts, gates = route(x)
            return logits, probs, torch.arange(experts.shape[-1], device=x.device).expand_as(experts), gates
        router.forward = forward
    return fixed


def _one_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose experts are all views of expert 0's weights: routed as trained, the same expert
    calls, but one expert's bytes read per layer."""
    copied = copy.deepcopy(model)
    for layer in moe_modules(copied).values():
        for name in ("w1", "b1", "w2", "b2"):
            p = getattr(layer, name)
            if p is not None:
                p.data = p.data[:1].expand_as(p.data)
    return copied


def _latency(moe, dense, batches, reps: int, device, macs_ratio: float) -> list[dict]:
    """Eval forward under ``torch.no_grad()``, interleaved; ``vs_macs`` = (ViMoE / dense) / MACs ratio, so 1.0 means
    the ViMoE costs exactly what its extra MACs predict.  The ViMoE runs four times per round: as shipped (its
    dispatch picks the padded batched matmul at few tokens per expert); with every MoE layer on the sorted path
    (``sorted_*``), so the row shows what the automatic choice saves; and two diagnostics at equal MACs that split
    what routing to many experts costs: ``fixed_*`` sends every token to experts 0..k-1 (k experts' weights read,
    k expert calls per layer) and ``one_copy_*`` keeps the routing but makes every expert a view of expert 0's
    weights (every expert call, one expert's bytes).  moe - one_copy is what reading E experts' weights costs;
    one_copy - fixed what the extra expert calls cost."""
    rows = []
    moe.eval()
    dense.eval()
    layers = list(moe_modules(moe).values())
    fixed, one_copy = _fixed_routing(moe).eval(), _one_copy(moe).eval()

    def sorted_path(x):
        saved = [layer.padded_max_rows for layer in layers]
        for layer in layers:
            layer.padded_max_rows = 0
        try:
            return moe(x)
        finally:
            for layer, value in zip(layers, saved):
                layer.padded_max_rows = value

    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, *moe.pretrained_cfg["input_size"], device=device)
            med = time_interleaved({"moe": lambda: moe(x), "sorted": lambda: sorted_path(x),
                                    "fixed": lambda: fixed(x), "one_copy": lambda: one_copy(x),
                                    "dense": lambda: dense(x)}, reps, 5, device)
            row = {"threads": torch.get_num_threads(), "batch": b, "moe_ms": round(med["moe"] * 1e3, 2),
                   "dense_ms": round(med["dense"] * 1e3, 2), "ratio": round(med["moe"] / med["dense"], 3),
                   "vs_macs": round(med["moe"] / med["dense"] / macs_ratio, 3)}
            for k in ("sorted", "fixed", "one_copy"):
                row[f"{k}_ms"] = round(med[k] * 1e3, 2)
                row[f"{k}_vs_macs"] = round(med[k] / med["dense"] / macs_ratio, 3)
            rows.append(row)
    return rows


def bench_app(checkpoint=None, reps: int = 30) -> dict:
    """Per-request latency of the routing explorer (decode + preprocess, forward with capture, first overlay),
    over the shipped example images, after one warm-up request that loads the checkpoint."""
    from ..explorer import DEFAULT_CHECKPOINT, Explorer, example_images

    explorer = Explorer()
    examples = example_images()
    checkpoint = checkpoint or DEFAULT_CHECKPOINT
    explorer.analyse(examples[0], checkpoint)
    timings = []
    for i in range(reps):
        analysis = explorer.analyse(examples[i % len(examples)], checkpoint)
        t0 = time.perf_counter()
        analysis.overlay(analysis.layers[-1])  # what the page shows first
        overlay_ms = (time.perf_counter() - t0) * 1e3
        t = analysis.timings
        timings.append({**t, "overlay_ms": overlay_ms, "total_ms": t["total_ms"] + overlay_ms})
    med = {k: round(statistics.median(t[k] for t in timings), 2) for k in timings[0]}
    return {"checkpoint": str(checkpoint), "reps": reps, "threads": torch.get_num_threads(), **med}




def format_train(result: dict) -> str:
    r = result
    lines = [f"training {r['model']} (moe_layers={r['moe_layers']}, E={r['num_experts']}, top-{r['top_k']}) vs "
             f"{r['dense_model']}, batch {r['batch']}, {r['dtype']} on {r['device']}"]
    lib = lambda t: f"{t.get('cpu_matmul', 'blas'):>6} " if r["device"] == "cpu" else ""  # noqa: E731
    for t in r["training"]:
        lines.append(f"  {lib(t)}{_plural(t['threads'], 'thread'):>10}: ViMoE {t['moe_img_s']:.1f} img/s   dense "
                     f"{t['dense_img_s']:.1f} img/s   ratio {t['throughput_ratio']:.3f}")
        if "moe_optimizer_ms" in t:  # records saved before these keys existed print without the line
            lines.append(f"  {'':>{len(lib(t))}}{'':>10}  of a step (ViMoE {t['moe_step_ms']:.0f} ms, dense "
                         f"{t['dense_step_ms']:.0f} ms) the optimizer alone takes {t['moe_optimizer_ms']:.1f} / "
                         f"{t['dense_optimizer_ms']:.1f} ms; ratio without it {t['ratio_without_optimizer']:.3f}")
    lines.append(f"eval forward latency (ViMoE MACs = {r['macs_ratio']:.3f}x dense; vs MACs = latency ratio / MACs "
                 "ratio, 1.00 = costs what its MACs predict)")
    lines.append("  (sorted: the padded small-batch path off; fixed: every token to experts 0..k-1; one copy: every "
                 "expert a view of expert 0's weights; all at the ViMoE's MACs)")
    lines.append(f"  {'matmul ' if r['device'] == 'cpu' else ''}{'threads':>7} {'batch':>5} {'ViMoE ms':>9} "
                 f"{'dense ms':>9} {'ratio':>6} {'vs MACs':>8} {'sorted':>7} {'fixed':>7} {'one copy':>8}   (vs MACs)")
    for t in r["latency"]:
        lines.append(f"  {lib(t)}{t['threads']:>7} {t['batch']:>5} {t['moe_ms']:>9.2f} {t['dense_ms']:>9.2f} "
                     f"{t['ratio']:>6.3f} {t['vs_macs']:>8.3f} {t['sorted_vs_macs']:>7.3f} "
                     f"{t['fixed_vs_macs']:>7.3f} {t['one_copy_vs_macs']:>8.3f}")
    if "weights_mb_moe" in r:  # records saved before these keys existed print without the line
        cache = r["last_level_cache_mb"]
        lines.append(f"weights: ViMoE {r['weights_mb_moe']:.1f} MB (every expert), dense "
                     f"{r['weights_mb_dense']:.1f} MB ({r['weights_mb_moe'] / r['weights_mb_dense']:.2f}x); "
                     "last-level cache "
                     + ("unknown" if cache is None else f"{cache:.1f} MB"))
        lines.append("  (a forward of few tokens reads nearly every expert, so reading weights, not MACs, can set "
                     "its latency)")
    return "\n".join(lines)


