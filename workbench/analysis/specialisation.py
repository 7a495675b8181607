"""Does a layer's routing specialise?  Per-layer metrics from class x expert statistics, each beside a null.

From P(expert | class) over a labelled set (first-choice experts of patch tokens, or of images):

* ``entropy``: mean over classes (weighted by class size) of H(e | c) / log E.  1 = every class spread over all
  experts; 0 = each class uses one expert.
* ``purity``: mean over classes of max_e P(e | c).
* ``nmi``: I(class; expert) / mean(H(class), H(expert)) (arithmetic normalisation, as scikit-learn's default: the
  min-entropy form inflates layers with unbalanced loads), in [0, 1].
* ``consistency``: share of images whose majority expert is their class's most used expert.
* ``position_nmi``: the same mutual information between patch position and expert (token routing): does routing
  follow *where* a patch is rather than *what* the image is?
* ``load_cv`` (std / mean of expert load) and ``drop_rate``: health, not specialisation.

Two baselines:

* The **label permutation** (``null_*`` columns): labels shuffled across images, each image keeping its routing.
  Beating it only says routing carries *some* class information, which any partition of class-clustered
  features does: routers that were never trained beat it in every layer.  It is kept as a description.
* The **random router** (``random_*`` columns, the test that decides): ``draws`` Gaussian routers with the trained
  router's norm, applied to the *same* layer inputs.  Whatever class information a random split of the features
  carries for free, they carry too; a trained router is *specialised* only when its NMI beats them: one-sided
  p = (1 + #{random >= trained}) / (1 + draws), Holm-corrected across the layers of a model, at ``alpha``.
  A router that was never trained is one more draw from that distribution, so it is rejected with probability
  at most alpha (tests/test_specialisation.py shows untrained routers coming out not specialised).
* The **balanced** test (``bal_*`` columns, ``p_balanced``, ``specialised_balanced``): NMI divides the mutual
  information by the mean of the class and expert entropies, so uneven loads (a random router's; a trained
  router's are evened out by its balance loss) change it for the same information.  Here the trained router and
  every random draw are each given one bias per expert (:func:`match_load`) so that all experts take equal
  loads, and the balanced NMIs are compared.  Matching the draws to the *trained* router's loads instead would
  not be a fair null: a router whose loads come from the geometry of its inputs carries more class information
  than a random one forced to those loads, so untrained routers would come out "specialised" about 30% of the
  time (tests/test_specialisation.py measures both).  Reported beside the decision above (which the recorded
  studies' claims were written against), as its sensitivity check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from .routing import RoutingStats

METRICS = ("entropy", "purity", "nmi", "consistency")


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(p * torch.log(p.clamp(min=1e-12))).sum(dim)


def mutual_information(joint_counts: torch.Tensor) -> tuple[float, float, float]:
    """(I(X;Y), H(X), H(Y)) in nats from a (X, Y) count table."""
    p = joint_counts / joint_counts.sum()
    px, py = p.sum(1), p.sum(0)
    hx, hy, hxy = float(_entropy(px)), float(_entropy(py)), float(_entropy(p.flatten()))
    return hx + hy - hxy, hx, hy


def nmi(joint_counts: torch.Tensor, average: str = "arithmetic") -> float:
    """Normalised mutual information of a count table: I / mean(H(X), H(Y)) (``average='min'``: I / min)."""
    i, hx, hy = mutual_information(joint_counts)
    denom = min(hx, hy) if average == "min" else (hx + hy) / 2
    return max(0.0, i / denom) if denom > 1e-12 else 0.0


def class_metrics(class_expert: torch.Tensor, image_hist: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Specialisation metrics from a (C, E) count table and per-image expert histograms."""
    E = class_expert.shape[1]
    sizes = class_expert.sum(1)
    present = sizes > 0
    cond = class_expert[present] / sizes[present, None]
    weights = sizes[present] / sizes[present].sum()
    entropy = float((weights * _entropy(cond)).sum() / math.log(E)) if E > 1 else 0.0
    purity = float(cond.max(1).values.mean())
    favourite = class_expert.argmax(1)  # each class's most used expert
    majority = image_hist.argmax(1)
    consistency = float((majority == favourite[labels]).float().mean())
    return {"entropy": entropy, "purity": purity, "nmi": nmi(class_expert), "consistency": consistency}


def null_metrics(image_hist: torch.Tensor, labels: torch.Tensor, num_classes: int, repeats: int = 20,
                 seed: int = 0) -> dict[str, tuple[float, float]]:
    """(mean, std) of each metric over label permutations."""
    g = torch.Generator().manual_seed(seed)
    values = {m: [] for m in METRICS}
    for _ in range(repeats):
        perm = labels[torch.randperm(len(labels), generator=g)]
        table = torch.nn.functional.one_hot(perm, num_classes).float().t() @ image_hist  # in images, not tokens
        for name, v in class_metrics(table, image_hist, perm).items():
            values[name].append(v)
    return {m: (float(torch.tensor(v).mean()), float(torch.tensor(v).std())) for m, v in values.items()}


@dataclass
class RouterInputs:
    """What one MoE layer's router saw over a dataset: units (patch tokens or images) and their labels."""

    x: torch.Tensor  # (U, d) router inputs, fp32
    labels: torch.Tensor  # (U,) class of each unit's image
    positions: torch.Tensor | None  # (U,) patch index (token routing), None for image routing
    weight: torch.Tensor  # (E, d) the router's weight; Soft MoE: (E*S, d) slot weights, grouped by expert
    router: str = "topk"  # 'topk' | 'experts_choose' | 'soft' (MoEMlp's router)
    num_experts: int | None = None
    scale: float | None = None  # Soft MoE's normalised-logit scale

    @classmethod
    def of_layer(cls, layer, x: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None) -> "RouterInputs":
        """The inputs ``x`` a MoE ``layer``'s router saw, with that router's weight, kind, experts and scale."""
        scale = getattr(layer.router, "scale", None)
        return cls(x, labels, positions, layer.router.weight.detach().float().cpu(), router=layer.router_type,
                   num_experts=layer.num_experts, scale=None if scale is None else float(scale))

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        """(U, E) how much each unit prefers each expert under ``weight``: router logits; for Soft MoE the share
        of the token's combine weight held by each expert's slots."""
        if self.router == "soft":
            from ..moe.soft import expert_weights, slot_logits

            scale = None if self.scale is None else torch.tensor(self.scale)
            return expert_weights(slot_logits(self.x, weight, scale), self.num_experts)
        return self.x @ weight.t()

    def first_choice(self, weight: torch.Tensor) -> torch.Tensor:
        """Each unit's expert under ``weight``: top-k's first choice; for experts-choose the expert the token
        prefers (its largest router probability: which experts take it also depends on the other tokens); for
        Soft MoE the expert whose slots hold most of the token's combine weight."""
        return self.scores(weight).argmax(-1)


@torch.no_grad()
def capture_router_inputs(model, data, *, max_images: int | None = 2000, batch_size: int = 500):
    """One pass over the first ``max_images`` items of ``data`` in eval mode: (the MoE layers by block, each one's
    router inputs (units, d) fp32 on the CPU, the batches' targets (labels or masks) concatenated)."""
    from ..moe import moe_modules

    layers = {i: m for i, m in moe_modules(model).items() if isinstance(i, int)}
    seen: dict[int, list] = {i: [] for i in layers}
    hooks = [m.router.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(args[0].detach().float()))
             for i, m in layers.items()]
    was_training = model.training
    model.eval()
    targets, count = [], 0
    device = next(model.parameters()).device
    try:
        for images, y in data.batches(batch_size, shuffle=False):
            if max_images is not None and count >= max_images:
                break
            if max_images is not None:
                images, y = images[: max_images - count], y[: max_images - count]
            model(images.to(device))
            targets.append(y.cpu())
            count += len(y)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return layers, {i: torch.cat(seen[i]).cpu() for i in layers}, torch.cat(targets)


def router_inputs(model, data, *, max_images: int | None = 2000, batch_size: int = 500,
                  tokens: str = "patch") -> dict[int, RouterInputs]:
    """Capture each MoE layer's router inputs over the first ``max_images`` images of ``data``.  ``tokens='patch'``
    (default): the patch tokens (prefix tokens dropped); ``'cls'``: the class token alone, one unit per image: under
    token pooling (``global_pool='token'``) it is the only token whose routing reaches the prediction in the last
    block.  Image-routed layers have one unit per image either way; a model without a class token has no 'cls'
    units (an empty result)."""
    if tokens not in ("patch", "cls"):
        raise ValueError(f"tokens={tokens!r} is invalid: use 'patch' or 'cls'")
    layers, inputs, y = capture_router_inputs(model, data, max_images=max_images, batch_size=batch_size)
    out = {}
    for i, layer in layers.items():
        x = inputs[i]
        if layer.routing == "image":
            if tokens == "patch":
                out[i] = RouterInputs.of_layer(layer, x, y, None)
            continue
        per_image = x.shape[0] // len(y)
        prefix = layer.num_prefix_tokens
        x = x.view(len(y), per_image, -1)
        if tokens == "cls":
            if prefix and getattr(model, "cls_token", None) is not None:
                out[i] = RouterInputs.of_layer(layer, x[:, 0].contiguous(), y, None)
            continue
        x = x[:, prefix:]
        n = x.shape[1]
        out[i] = RouterInputs.of_layer(layer, x.reshape(-1, x.shape[-1]), y.repeat_interleave(n),
                                       torch.arange(n).repeat(len(y)))
    return out


def cls_router_report(model, data, *, draws: int = 100, max_images: int | None = 2000, seed: int = 0,
                      alpha: float = 0.05) -> pd.DataFrame:
    """Per MoE layer, the class token's routing against ``draws`` random routers of the trained router's norm on
    the same class-token inputs (one unit per image): its NMI, the random routers' mean, ``excess``, ``p_random``
    and its Holm correction across the layers, and the balanced test beside it.  Empty for a model without a
    class token or with image routing."""
    from .stats import holm

    inputs = router_inputs(model, data, max_images=max_images, tokens="cls")
    classes = getattr(model, "num_classes", None) or getattr(data, "num_classes")
    rows = []
    for block, inp in inputs.items():
        r = random_router_test(inp, classes, draws=draws, seed=seed + 1000 + block)
        rows.append({"block": block, **{k: r[k] for k in ("nmi", "random_nmi", "random_nmi_std", "excess", "p_random",
                                                           "bal_nmi", "bal_random_nmi", "bal_excess", "p_balanced",
                                                           "units")}})
    table = pd.DataFrame(rows, columns=["block", "nmi", "random_nmi", "random_nmi_std", "excess", "p_random",
                                        "bal_nmi", "bal_random_nmi", "bal_excess", "p_balanced", "units"])
    table["p_holm"] = holm(table["p_random"]) if len(table) else []
    table["specialised"] = table["p_holm"] < alpha
    return table


def _table(rows: torch.Tensor, experts: torch.Tensor, num_rows: int, num_experts: int) -> torch.Tensor:
    return torch.bincount(rows * num_experts + experts, minlength=num_rows * num_experts).view(
        num_rows, num_experts).float()


def random_weights(weight: torch.Tensor, draws: int, seed: int = 0):
    """``draws`` Gaussian router weights of ``weight``'s shape and norm, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    norm = weight.norm()
    for _ in range(draws):
        w = torch.randn(weight.shape, generator=g)
        yield w * norm / w.norm()


def match_load(scores: torch.Tensor, counts: torch.Tensor, sweeps: int = 30) -> torch.Tensor:
    """Each of U units' expert under ``scores`` (U, E) plus one bias per expert, the biases chosen so that expert
    e gets exactly ``counts[e]`` units (sum U): still an argmax router (a linear router with a bias, as aux-loss-free
    balancing uses), only with its loads set.  Gauss-Seidel over the experts: each bias is set so that its expert
    takes its quota given the others; with distinct scores a few sweeps meet every quota.  Where tied scores keep
    a quota from being met by biases alone, the units of an over-full expert with the smallest margin move to
    their best expert that still has room, so the quotas always hold exactly."""
    U, E = scores.shape
    counts = counts.long()
    if int(counts.sum()) != U or (counts < 0).any():
        raise ValueError(f"the quotas sum to {int(counts.sum())}, not to the {U} units")
    if (counts == U).any():  # one expert takes everything
        return torch.full((U,), int((counts == U).nonzero()[0]), dtype=torch.long)
    scores = scores.double()
    bias = torch.zeros(E, dtype=scores.dtype)
    bias[counts == 0] = -math.inf
    live = [e for e in range(E) if counts[e] > 0]
    for _ in range(sweeps):
        for e in live:
            shifted = scores + bias
            shifted[:, e] = -math.inf
            margin = scores[:, e] - shifted.max(1).values  # unit joins e when bias_e > -margin
            k = int(counts[e])
            top = margin.topk(k + 1).values
            # midway between the k-th and (k+1)-th largest margins: exactly k units prefer e (ties aside)
            bias[e] = -(top[k - 1] + top[k]) / 2
        if torch.equal(torch.bincount((scores + bias).argmax(-1), minlength=E), counts):
            break
    shifted = scores + bias
    expert = shifted.argmax(-1)
    load = torch.bincount(expert, minlength=E)
    while (load > counts).any():  # ties: move the least committed units of an over-full expert
        e = int((load - counts).argmax())
        mine = (expert == e).nonzero().squeeze(1)
        room = load < counts
        others = shifted[mine].masked_fill(~room, -math.inf)
        best, target = others.max(1)
        order = (shifted[mine, e] - best).argsort()  # smallest margin first
        moved = 0
        for i in order.tolist():
            if moved == int(load[e] - counts[e]):
                break
            t = int(target[i]) if load[int(target[i])] < counts[int(target[i])] else \
                int(shifted[mine[i]].masked_fill(~(load < counts), -math.inf).argmax())
            expert[mine[i]] = t
            load[t] += 1
            load[e] -= 1
            moved += 1
    return expert


def uniform_counts(units: int, experts: int) -> torch.Tensor:
    """Equal loads: ``units`` split over ``experts`` as evenly as integers allow."""
    counts = torch.full((experts,), units // experts)
    counts[: units % experts] += 1
    return counts


def principal_weights(inputs: RouterInputs) -> torch.Tensor:
    """A router built without labels: the top E/2 principal directions of the layer inputs and their negatives
    (E experts), at the trained router's norm.  What beats the random routers only by following the inputs' main
    axes of variation, this router matches too: a reference for reading ``specialised``."""
    E = inputs.num_experts or inputs.weight.shape[0]
    x = inputs.x - inputs.x.mean(0)
    _, _, v = torch.linalg.svd(x[:20000], full_matrices=False)
    half = v[: (E + 1) // 2]
    w = torch.cat([half, -half])[:E]
    return w * inputs.weight.norm() / w.norm()


def random_router_test(inputs: RouterInputs, num_classes: int, *, draws: int = 100, seed: int = 0) -> dict:
    """Class (and position) NMI of the trained router's first choices on ``inputs`` against ``draws`` random
    routers with the same norm on the same inputs (``random_*``, ``p_random``); and the *balanced* test
    (``bal_*``, ``p_balanced``): the trained router and every draw each given one bias per expert
    (:func:`match_load`) so that all experts get equal loads, then compared.  NMI divides by the expert entropy,
    which uneven loads lower; balancing both sides removes that difference, and since the trained and the random
    routers go through the same transformation, a router that was never trained is still one more draw."""
    E = inputs.num_experts or inputs.weight.shape[0]
    n_pos = int(inputs.positions.max()) + 1 if inputs.positions is not None else 0
    equal = uniform_counts(len(inputs.labels), E)

    def metrics(experts: torch.Tensor) -> tuple[float, float]:
        cls = nmi(_table(inputs.labels, experts, num_classes, E))
        pos = nmi(_table(inputs.positions, experts, n_pos, E)) if n_pos else float("nan")
        return cls, pos

    own = inputs.scores(inputs.weight)
    trained = metrics(own.argmax(-1))
    balanced = metrics(match_load(own, equal))[0]
    rand, bal = [], []
    for w in random_weights(inputs.weight, draws, seed):
        s = inputs.scores(w)
        rand.append(metrics(s.argmax(-1)))
        bal.append(metrics(match_load(s, equal))[0])
    cls_draws = torch.tensor([r[0] for r in rand])
    pos_draws = torch.tensor([r[1] for r in rand])
    bal_draws = torch.tensor(bal)
    from .stats import empirical_p

    return {"nmi": trained[0], "random_nmi": float(cls_draws.mean()), "random_nmi_std": float(cls_draws.std()),
            "random_nmi_max": float(cls_draws.max()), "p_random": empirical_p(trained[0], cls_draws.numpy()),
            "excess": trained[0] - float(cls_draws.mean()),
            "bal_nmi": balanced, "bal_random_nmi": float(bal_draws.mean()),
            "bal_random_nmi_std": float(bal_draws.std()), "p_balanced": empirical_p(balanced, bal_draws.numpy()),
            "bal_excess": balanced - float(bal_draws.mean()),
            "position_nmi": trained[1], "random_position_nmi": float(pos_draws.mean()) if n_pos else float("nan"),
            "p_position_random": empirical_p(trained[1], pos_draws.numpy()) if n_pos else float("nan"),
            "draws": draws, "units": int(inputs.x.shape[0])}


def layer_report(stats: RoutingStats, *, baseline: dict[int, dict] | None = None, repeats: int = 20,
                 alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """One row per MoE layer: descriptive metrics and their label-permutation nulls and, with ``baseline``
    (from :func:`random_router_baseline`), the random-router test: ``p_random``, its Holm correction ``p_holm``
    across the layers, ``specialised`` (p_holm < alpha) and a keep / densify recommendation.  Layers are ranked
    by ``excess`` (NMI over the random routers' mean; without a baseline, NMI over the permutation null)."""
    from .stats import holm

    rows = []
    for block, s in stats.layers.items():
        metrics = class_metrics(s.class_expert, s.image_hist, stats.labels)
        null = null_metrics(s.image_hist, stats.labels, stats.num_classes, repeats, seed)
        load = s.load
        row = {"block": block, "routing": s.routing, **{m: metrics[m] for m in METRICS}}
        for m in METRICS:
            row[f"null_{m}"], row[f"null_{m}_std"] = null[m]
        row["nmi_excess"] = metrics["nmi"] - null["nmi"][0]
        row["purity_excess"] = metrics["purity"] - null["purity"][0]
        row["position_nmi"] = nmi(s.position_expert) if s.position_expert is not None else float("nan")
        row["load_cv"] = float(load.std(unbiased=False) / load.mean().clamp(min=1e-9))
        row["drop_rate"] = s.drop_rate
        row["mean_gate"] = s.mean_gate
        if baseline is not None:
            b = baseline[block]
            # router_*: the trained router's own choices on the test's inputs, the quantity the random routers are
            # compared with (for experts-choose, the expert a token prefers, not the one that took it)
            row.update({"router_nmi": b["nmi"], "random_nmi": b["random_nmi"], "random_nmi_std": b["random_nmi_std"],
                        "p_random": b["p_random"], "excess": b["nmi"] - b["random_nmi"],
                        "router_position_nmi": b.get("position_nmi", float("nan")),
                        "random_position_nmi": b["random_position_nmi"]})
            if "p_balanced" in b:
                row.update({k: b[k] for k in ("bal_nmi", "bal_random_nmi", "bal_excess", "p_balanced")})
        rows.append(row)
    report = pd.DataFrame(rows)
    if baseline is not None:
        report["p_holm"] = holm(report["p_random"])
        report["specialised"] = report["p_holm"] < alpha
        report["recommend"] = ["keep" if s else "densify" for s in report["specialised"]]
        if "p_balanced" in report:
            report["p_holm_balanced"] = holm(report["p_balanced"])
            report["specialised_balanced"] = report["p_holm_balanced"] < alpha
    else:
        report["excess"] = report["nmi_excess"]
    report = report.sort_values("excess", ascending=False).reset_index(drop=True)
    report["rank"] = range(1, len(report) + 1)
    return report


def random_router_baseline(model, data, *, draws: int = 100, max_images: int | None = 2000, seed: int = 0,
                           num_classes: int | None = None, inputs: dict | None = None,
                           progress: bool = False) -> dict[int, dict]:
    """:func:`random_router_test` for every MoE layer of ``model`` on (the first ``max_images`` of) ``data``;
    ``inputs``: the layers' :func:`router_inputs` when already captured (then ``data`` gives only the classes);
    ``progress``: a bar over the layers on stderr."""
    from ..train.progress import tqdm

    inputs = inputs if inputs is not None else router_inputs(model, data, max_images=max_images)
    classes = num_classes or getattr(model, "num_classes", None) or getattr(data, "num_classes")
    return {i: random_router_test(inp, classes, draws=draws, seed=seed + i)
            for i, inp in tqdm(inputs.items(), desc=f"{draws} random routers per MoE layer", unit="layer",
                               disable=not progress)}


def specialisation_report(model, data, *, draws: int = 100, max_images: int | None = 2000, repeats: int = 20,
                          alpha: float = 0.05, seed: int = 0, stats: RoutingStats | None = None,
                          progress: bool = False, inputs: dict | None = None) -> tuple[pd.DataFrame, RoutingStats]:
    """Routing statistics over ``data`` and the per-layer report with the random-router test (``stats`` and
    ``inputs``, the router inputs over the first ``max_images``, reused when given)."""
    from .routing import collect_routing

    stats = stats or collect_routing(model, data, progress=progress)
    baseline = random_router_baseline(model, data, draws=draws, max_images=max_images, seed=seed, inputs=inputs,
                                      progress=progress)
    return layer_report(stats, baseline=baseline, repeats=repeats, alpha=alpha, seed=seed), stats


def layers_to_densify(report: pd.DataFrame, count: int | None = None) -> list[int]:
    """The least specialised layers: those recommended for densifying, or the ``count`` lowest ranked."""
    ranked = report.sort_values("excess")["block"].tolist()
    if count is None:
        if "recommend" not in report:
            raise ValueError("this report has no keep / densify calls: build it with a random-router baseline "
                             "(specialisation_report) or pass count=")
        return sorted(report.loc[report["recommend"] == "densify", "block"].tolist())
    return sorted(ranked[:count])
