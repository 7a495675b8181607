"""Pruning a trained ViMoE: whole MoE layers back to dense FFNs, or every MoE layer from E to m experts.

Layer level (``densify``): the chosen MoE layers' experts merged into one FFN (``workbench.analysis.densify``,
usage-weighted); the model keeps the other MoE layers.  ``reinit``, its control: the chosen MoE layers replaced by
freshly initialised dense FFNs (timm's init, seeded), everything else kept; meant to be fine-tuned after, so that
"densify, then fine-tune" can be told from "any dense FFN there, fine-tuned".

Expert level, every MoE layer from E to ``keep`` experts, chosen on calibration data (the validation split: never
the test set), after the methods of the MoE-compression literature (all of them on language MoEs):

* ``frequency``: keep the ``keep`` experts that take the most tokens (all k choices).
* ``reap`` (REAP, ICLR 2026): keep the experts of highest saliency, the mean over the tokens routed to an expert of
  gate x ||expert output||.
* ``merge`` (M-SMoE of MC-SMoE, ICLR 2024): the ``keep`` most used experts are dominant; every other expert joins
  the dominant one whose router logits on the calibration tokens it most resembles (cosine similarity), and each
  group is merged into one expert, its weights averaged by how often each member is chosen; the merged expert keeps
  the dominant expert's router row.  MC-SMoE first aligns the experts' hidden units by permutation; that step is
  left out here (upcycled experts start aligned; experts trained from scratch are not, so merging them averages
  unaligned units).
* ``random`` (the baseline every method must beat): ``keep`` experts drawn at random (seeded), the rest dropped.
* ``cluster`` (HC-SMoE, ICML 2025): experts clustered hierarchically (average linkage, scipy) by their mean output
  on the calibration tokens into ``keep`` groups; each group merged as above, its router row the usage-weighted
  mean of the members' rows.

The pruned model is an ordinary checkpoint: its config is the original's with ``num_experts`` (or ``moe_layers``)
changed, and ``pruned`` records what was done.  Pruning refuses, in one line, what it cannot express: a dense
model, ``keep`` >= E or < top_k, unknown layers, image routing or the experts-choose / Soft MoE routers.

Imports: numpy, scipy, ``workbench.moe``, ``workbench.train.checkpoint`` (to rebuild the pruned architecture) and
this package's ``densify`` and ``routing``.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from ..moe import moe_modules

METHODS = ("densify", "reinit", "frequency", "reap", "merge", "cluster", "random")
LAYER_METHODS = ("densify", "reinit")
EXPERT_METHODS = ("frequency", "reap", "merge", "cluster")  # the literature's; ``random`` is their baseline


class PruneError(ValueError):
    """A pruning request that cannot be carried out; the message names the fix."""


def _moe_blocks(model) -> dict:
    return {i: m for i, m in moe_modules(model).items() if isinstance(i, int)}


@torch.no_grad()
def calibrate(model, data, *, max_images: int = 2000, batch_size: int = 250, max_tokens: int = 20000) -> dict:
    """Per MoE block, on the first ``max_images`` images of ``data`` (the calibration split): ``load`` (tokens per
    expert, all k choices), ``gate_mass``, ``saliency`` (REAP: mean over routed tokens of gate x ||output||),
    ``logits`` (router logits of up to ``max_tokens`` tokens, for M-SMoE's similarity) and ``mean_output`` (each
    expert's mean output over those tokens, for HC-SMoE's clustering)."""
    layers = _moe_blocks(model)
    seen: dict[int, list] = {i: [] for i in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(args[0].detach().float().cpu()))
             for i, m in layers.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    count = 0
    try:
        for images, _ in data.batches(batch_size, shuffle=False):
            if count >= max_images:
                break
            images = images[: max_images - count]
            model(images.to(device))
            count += len(images)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {}
    for i, layer in layers.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[i]])
        router = layer.router
        logits = F.linear(x, router.weight.float().cpu())
        probs = logits.softmax(-1)
        gates, experts = probs.topk(layer.top_k, dim=-1)
        if router.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        E = layer.num_experts
        load = torch.bincount(experts.flatten(), minlength=E).float()
        gate_mass = torch.zeros(E).index_add_(0, experts.flatten(), gates.flatten())
        sub = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:max_tokens]
        outputs = _expert_outputs(layer, x[sub])  # (E, T, o)
        norms = outputs.norm(dim=-1)  # (E, T)
        saliency = torch.zeros(E)
        chosen = experts[sub]
        for e in range(E):
            routed = (chosen == e)
            if routed.any():
                g = (gates[sub] * routed).sum(-1)[routed.any(-1)]
                saliency[e] = (g * norms[e, routed.any(-1)]).mean()
        out[i] = {"load": load, "gate_mass": gate_mass, "saliency": saliency, "logits": logits[sub],
                  "mean_output": outputs.mean(1), "tokens": len(x)}
    return out


def _expert_outputs(layer, x: torch.Tensor) -> torch.Tensor:
    """(E, T, o): every routed expert's output on tokens ``x`` (fp32, CPU)."""
    w1, w2 = layer.w1.detach().float().cpu(), layer.w2.detach().float().cpu()
    h = torch.einsum("td,edh->eth", x, w1)
    if layer.b1 is not None:
        h = h + layer.b1.detach().float().cpu()[:, None]
    h = layer.act.cpu()(h) if hasattr(layer.act, "cpu") else layer.act(h)
    y = torch.einsum("eth,eho->eto", h, w2)
    if layer.b2 is not None:
        y = y + layer.b2.detach().float().cpu()[:, None]
    return y


def expert_groups(method: str, calib: dict, keep: int, seed: int = 0) -> list[list[int]]:
    """The ``keep`` groups of one layer's experts: one member each for frequency / reap / random (the kept
    experts), the merged groups for merge / cluster; the first member of a group gives the router row (merge: the
    dominant one).  ``seed`` draws ``random``'s experts."""
    load = calib["load"]
    E = len(load)
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return [[int(e)] for e in sorted(torch.randperm(E, generator=generator)[:keep].tolist())]
    if method == "frequency":
        return [[int(e)] for e in sorted(torch.argsort(load, descending=True, stable=True)[:keep].tolist())]
    if method == "reap":
        return [[int(e)] for e in sorted(torch.argsort(calib["saliency"], descending=True, stable=True)[:keep].tolist())]
    if method == "merge":
        dominant = sorted(torch.argsort(load, descending=True, stable=True)[:keep].tolist())
        groups = {d: [d] for d in dominant}
        rows = F.normalize(calib["logits"].t(), dim=-1)  # (E, T): each expert's logits over the calibration tokens
        for e in range(E):
            if e not in groups:
                best = max(dominant, key=lambda d: float(rows[e] @ rows[d]))
                groups[best].append(e)
        return [groups[d] for d in dominant]
    if method == "cluster":
        from scipy.cluster.hierarchy import fcluster, linkage

        features = calib["mean_output"].numpy().astype(np.float64)
        labels = fcluster(linkage(features, method="average", metric="euclidean"), t=keep, criterion="maxclust")
        groups: dict[int, list[int]] = {}
        for e, c in enumerate(labels):
            groups.setdefault(int(c), []).append(e)
        out = [sorted(g, key=lambda e: -float(load[e])) for g in groups.values()]
        while len(out) < keep:  # ties can leave fewer clusters: split the largest group
            out.sort(key=len)
            big = out.pop()
            out += [big[:1], big[1:]]
        return sorted(out, key=lambda g: min(g))
    raise PruneError(f"method={method!r} is not an expert-level method: use one of {(*EXPERT_METHODS, 'random')}")


def _merged(tensor: torch.Tensor, groups: list[list[int]], weights: torch.Tensor) -> torch.Tensor:
    rows = []
    for g in groups:
        w = weights[g].clamp(min=0)
        w = w / w.sum() if w.sum() > 0 else torch.full((len(g),), 1.0 / len(g))
        rows.append(torch.einsum("g,g...->...", w.to(tensor.dtype), tensor[g]))
    return torch.stack(rows)


def prune_config(config: dict, **changes) -> dict:
    """The model config with MoE keywords changed where the architecture keeps them (``model_kwargs`` of a
    ``vimoe_*`` model, ``upcycle`` of an upcycled timm ViT)."""
    config = copy.deepcopy(config)
    target = config["upcycle"] if config.get("upcycle") else config.setdefault("model_kwargs", {})
    target.update(changes)
    return config


def check_request(model, method: str, *, keep: int | None = None, layers=None) -> None:
    """Refuses, in one line, what :func:`prune` cannot do with ``model``, before any data is read."""
    blocks = _moe_blocks(model)
    if not blocks:
        raise PruneError("this checkpoint has no MoE layers to prune: pick a ViMoE checkpoint (e.g. "
                         "experiments/checkpoints/vimoe_tiny_fmnist)")
    if method not in METHODS:
        raise PruneError(f"--method {method!r} is not known: use one of {', '.join(METHODS)}")
    for i, layer in blocks.items():
        if layer.router_type != "topk" or layer.routing != "token":
            raise PruneError(f"block {i} uses the {layer.router_type} router with {layer.routing} routing; pruning "
                             f"works on token-routed top-k layers only")
    if method in LAYER_METHODS:
        if not layers:
            raise PruneError(f"--method {method} needs --layers (the MoE blocks to make dense, e.g. --layers 4)")
        unknown = sorted(set(layers) - set(blocks))
        if unknown:
            raise PruneError(f"--layers {unknown}: not MoE blocks of this model (its MoE blocks: {sorted(blocks)})")
        if method == "densify" and any(blocks[i].shared is not None for i in layers):
            raise PruneError("densifying a layer with a shared expert gives an FFN wider than the architecture can "
                             "rebuild from its config; prune experts instead (--method frequency --keep-experts M)")
        return
    if keep is None:
        raise PruneError(f"--method {method} needs --keep-experts M (experts left in every MoE layer)")
    counts = {layer.num_experts for layer in blocks.values()}
    k = max(layer.top_k for layer in blocks.values())
    if len(counts) != 1:
        raise PruneError(f"the MoE layers have different expert counts {sorted(counts)}; pruning keeps one count for all")
    E = counts.pop()
    if not k <= keep < E:
        raise PruneError(f"--keep-experts {keep} is invalid: use top_k ({k}) <= M < the {E} experts each layer has")


def prune(model, config: dict, method: str, *, keep: int | None = None, layers=None, calib: dict | None = None,
          seed: int = 0):
    """(pruned model, its config).  ``method='densify'`` with ``layers`` (block indices): those MoE layers merged
    into dense FFNs.  An expert-level ``method`` with ``keep``: every MoE layer reduced to ``keep`` experts,
    chosen on ``calib`` (from :func:`calibrate` on the validation split); ``random`` draws them with ``seed`` (each
    layer its own draw)."""
    from ..train.checkpoint import build_model

    check_request(model, method, keep=keep, layers=layers)
    blocks = _moe_blocks(model)
    if method == "reinit":  # the control: fresh dense FFNs where the MoE layers were, the rest as trained
        rest = sorted(set(blocks) - set(layers))
        new_config = prune_config(config, moe_layers=rest if rest else "none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pruned = build_model(new_config)
        fresh = tuple(f"blocks.{i}.mlp." for i in layers)
        trained = model.state_dict()
        pruned.load_state_dict({k: v if k.startswith(fresh) else trained[k] for k, v in pruned.state_dict().items()})
        new_config["pruned"] = {"method": "reinit", "layers": sorted(layers), "seed": seed}
        return pruned.eval(), new_config
    if method == "densify":
        from .densify import densify

        stats = calib.get("_stats") if calib else None
        dense = densify(model, list(layers), "merge", stats=stats)
        rest = sorted(set(blocks) - set(layers))
        new_config = prune_config(config, moe_layers=rest if rest else "none")
        pruned = build_model(new_config)
        pruned.load_state_dict(dense.state_dict())
        new_config["pruned"] = {"method": "densify", "layers": sorted(layers)}
        return pruned.eval(), new_config
    E = next(iter(blocks.values())).num_experts
    if calib is None:
        raise PruneError("expert-level pruning needs calibration data (the validation split): pass calib=")
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    record = {}
    for i, layer in blocks.items():
        groups = expert_groups(method, calib[i], keep, seed=seed * 1000 + i)
        usage = calib[i]["load"]
        prefix = f"blocks.{i}.mlp."
        for name in ("w1", "b1", "w2", "b2"):
            if prefix + name in state:
                state[prefix + name] = _merged(state[prefix + name], groups, usage)
        router = state[prefix + "router.weight"]
        if method == "cluster":
            state[prefix + "router.weight"] = _merged(router, groups, usage)
        else:
            state[prefix + "router.weight"] = router[[g[0] for g in groups]].clone()
        record[str(i)] = groups
    new_config = prune_config(config, num_experts=keep)
    pruned = build_model(new_config)
    pruned.load_state_dict(state)
    new_config["pruned"] = {"method": method, "keep_experts": keep, "from_experts": E, "groups": record,
                            **({"seed": seed} if method == "random" else {})}
    return pruned.eval(), new_config
