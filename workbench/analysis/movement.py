"""How far training moved a model from where it started: upcycled experts apart from their copies
(``expert_spread``), routers from their init (``router_at_init``: shift and class NMI before / after).

Imports: ``workbench.moe``, ``workbench.train`` (to rebuild the init exactly) and ``.specialisation``.
"""
from __future__ import annotations


def expert_spread(model) -> dict[str, float]:
    """Per MoE block: how far the routed experts have moved apart, as the mean over experts of
    ||W_e - mean_e W|| / ||mean_e W|| over both weight matrices (biases and any shared expert left out).
    Upcycled experts start as copies (0); a value
    near 0 after fine-tuning means the experts still compute nearly one function, whatever the router does."""
    import torch

    from ..moe import moe_modules

    out = {}
    for block, layer in moe_modules(model).items():
        if not isinstance(block, int):
            continue
        with torch.no_grad():
            w = torch.cat([layer.w1.flatten(1), layer.w2.flatten(1)], 1).float()
            mean = w.mean(0, keepdim=True)
            out[str(block)] = round(float((w - mean).norm(dim=1).mean() / mean.norm()), 6)
    return out


def router_at_init(model, cfg, data, max_images: int | None = 2000, inputs: dict | None = None) -> dict[str, dict]:
    """Upcycled runs: per MoE block, how far the router moved from its upcycling init (``router_shift``,
    ||W - W0|| / ||W0||) and the class NMI of the init router's first choices on the trained model's router
    inputs (``init_nmi``), beside the trained router's on the same inputs (``trained_nmi``).  The init is rebuilt
    exactly as the trainer built it (same seed, same base).  ``inputs``: the trained model's :func:`router_inputs`
    on ``data`` when already captured (for a segmentation model, :func:`workbench.analysis.regions.region_inputs`'
    RouterInputs: patch tokens labelled with their majority class)."""
    import torch

    from ..moe import moe_modules
    from ..train.state import seed_everything
    from ..train.trainer import build_training_model
    from .specialisation import _table, nmi, router_inputs

    if not cfg.init_from:
        return {}
    with torch.random.fork_rng(devices=[]):
        seed_everything(cfg.seed)
        init, _ = build_training_model(cfg)
    start = moe_modules(init)
    classes = getattr(model, "num_classes", None) or data.num_classes
    out = {}
    inputs = inputs if inputs is not None else router_inputs(model, data, max_images=max_images)
    for block, inp in inputs.items():
        w0 = start[block].router.weight.detach().float().cpu()
        E = inp.num_experts or inp.weight.shape[0]
        known = inp.labels >= 0  # segmentation: patches whose pixels are all ignored have no label

        def class_nmi(weight):
            return round(nmi(_table(inp.labels[known], inp.first_choice(weight)[known], classes, E)), 6)

        out[str(block)] = {"router_shift": round(float((inp.weight - w0).norm() / w0.norm()), 6),
                           "init_nmi": class_nmi(w0), "trained_nmi": class_nmi(inp.weight)}
    return out
