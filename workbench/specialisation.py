"""Does a layer's routing specialise?  Per-layer metrics from class x expert statistics, each beside a null.

From P(expert | class) over a labelled set (first-choice experts of patch tokens, or of images):

* ``entropy``: mean over classes (weighted by class size) of H(e | c) / log E.  1 = every class spread over all
  experts; 0 = each class uses one expert.
* ``purity``: mean over classes of max_e P(e | c).
* ``nmi``: I(class; expert) / min(H(class), H(expert)), in [0, 1].
* ``consistency``: share of images whose majority expert is their class's most used expert.
* ``position_nmi``: the same mutual information between patch position and expert (token routing): does routing
  follow *where* a patch is rather than *what* the image is?
* ``load_cv`` (std / mean of expert load) and ``drop_rate``: health, not specialisation.

The null is a **label permutation**: class labels shuffled across images, each image keeping its own routing.
It keeps everything about routing (load imbalance, images routed wholesale to one expert) except its relation to
the class, so a metric beating it says routing carries class information.  A layer counts as *specialised* when its
NMI exceeds the null mean by at least ``margin`` and by ``z`` null standard deviations.
"""
from __future__ import annotations

import math

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


def nmi(joint_counts: torch.Tensor) -> float:
    i, hx, hy = mutual_information(joint_counts)
    denom = min(hx, hy)
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


def layer_report(stats: RoutingStats, *, repeats: int = 20, margin: float = 0.05, z: float = 3.0,
                 seed: int = 0) -> pd.DataFrame:
    """One row per MoE layer: metrics, their nulls, the excess over the null, and a keep / densify call.
    Layers are ranked by NMI excess (most specialised first)."""
    rows = []
    for block, s in stats.layers.items():
        metrics = class_metrics(s.class_expert, s.image_hist, stats.labels)
        null = null_metrics(s.image_hist, stats.labels, stats.num_classes, repeats, seed)
        load = s.load
        row = {"block": block, "routing": s.routing, **{m: metrics[m] for m in METRICS}}
        for m in METRICS:
            row[f"null_{m}"], row[f"null_{m}_std"] = null[m]
        row["nmi_excess"] = metrics["nmi"] - null["nmi"][0]
        row["nmi_z"] = row["nmi_excess"] / max(null["nmi"][1], 1e-9)
        row["purity_excess"] = metrics["purity"] - null["purity"][0]
        row["position_nmi"] = nmi(s.position_expert) if s.position_expert is not None else float("nan")
        row["load_cv"] = float(load.std(unbiased=False) / load.mean().clamp(min=1e-9))
        row["drop_rate"] = s.drop_rate
        row["mean_gate"] = s.mean_gate
        row["specialised"] = bool(row["nmi_excess"] >= margin and row["nmi_z"] >= z)
        rows.append(row)
    report = pd.DataFrame(rows).sort_values("nmi_excess", ascending=False).reset_index(drop=True)
    report["rank"] = range(1, len(report) + 1)
    report["recommend"] = ["keep" if s else "densify" for s in report["specialised"]]
    return report


def layers_to_densify(report: pd.DataFrame, count: int | None = None) -> list[int]:
    """The least specialised layers: those recommended for densifying, or the ``count`` lowest ranked."""
    ranked = report.sort_values("nmi_excess")["block"].tolist()
    if count is None:
        return sorted(report.loc[report["recommend"] == "densify", "block"].tolist())
    return sorted(ranked[:count])
