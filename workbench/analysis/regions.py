"""Routing against ground-truth regions (segmentation): does a patch's expert follow *what* is in the patch, or
*where* the patch is, and at which depth?

Every patch gets the majority label of its pixels (background included; ignored pixels do not vote), and is
*boundary* when its pixels carry more than one label, else *interior*.  Per MoE layer, from each patch token's
first-choice expert (experts-choose: the preferred expert; Soft MoE: the dominant one, as in
:meth:`~workbench.specialisation.RouterInputs.first_choice`):

* ``nmi`` / ``ami``: normalised / adjusted mutual information between expert and patch class (AMI from
  scikit-learn: 0 for chance, whatever the number of experts and classes);
* ``object_nmi``: object vs background as the label; ``object_only_nmi``: class NMI among object patches only;
* ``interior_nmi`` / ``boundary_nmi``: class NMI within interior / boundary patches;
* ``position_nmi``: patch position instead of class;
* ``mi`` (nats) and ``expert_entropy``: NMI divides the mutual information by the mean of the class and expert
  entropies, so a router with uneven loads (low expert entropy: a random one) gets a higher NMI for the same
  information than an evenly loaded one (a trained one, under a balance loss).  Compare ``mi`` with ``random_mi``
  too, and read ``expert_entropy`` beside them.

A patch's label is the most frequent label of its pixels; ties go to the lower class index (background first).

Each beside the same metric of ``draws`` random routers with the trained router's norm on the *same* layer inputs
(the baseline an untrained router must fail to beat): ``random_<metric>`` their mean and ``p_<metric>`` the
one-sided empirical p-value; ``specialised`` when the class NMI beats them after Holm across the model's layers.
The balanced test (as in :mod:`workbench.specialisation`): the trained router and every draw each given one bias
per expert so that all experts take equal loads (equal expert entropy, so NMI and MI rank alike): ``bal_nmi`` /
``bal_mi`` against ``bal_random_nmi`` / ``bal_random_mi``, ``p_bal_nmi`` / ``p_bal_mi``, ``specialised_balanced``.
"""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_mutual_info_score

from .specialisation import (RouterInputs, _table, capture_router_inputs, match_load, mutual_information, nmi,
                             random_weights, uniform_counts)
from .stats import ALPHA, empirical_p, holm

NMI_METRICS = ("nmi", "object_nmi", "object_only_nmi", "interior_nmi", "boundary_nmi", "position_nmi", "mi",
               "expert_entropy")


def patch_labels(masks: torch.Tensor, grid: tuple[int, int], num_classes: int,
                 ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """masks (B, H, W) -> (majority label (B, gh, gw), boundary (B, gh, gw) bool).  A patch whose pixels are all
    ignored gets label -1."""
    b, h, w = masks.shape
    gh, gw = grid
    ph, pw = h // gh, w // gw
    patches = masks[:, :gh * ph, :gw * pw].reshape(b, gh, ph, gw, pw).permute(0, 1, 3, 2, 4).reshape(b, gh, gw, -1)
    valid = patches != ignore_index
    counts = F.one_hot(torch.where(valid, patches, 0).long(), num_classes) * valid.unsqueeze(-1)
    counts = counts.sum(3)  # (B, gh, gw, C)
    label = torch.where(counts.sum(-1) > 0, counts.argmax(-1), torch.full_like(counts[..., 0], -1))
    boundary = (counts > 0).sum(-1) > 1
    return label, boundary


def region_inputs(model, data, *, max_images: int | None = 1000, batch_size: int = 250) -> dict:
    """Per MoE block: (RouterInputs over patch tokens with their majority class as label, boundary flags)."""
    layers, captured, masks = capture_router_inputs(model, data, max_images=max_images, batch_size=batch_size)
    label, boundary = patch_labels(masks, tuple(model.patch_embed.grid_size), data.num_classes,
                                   getattr(data, "ignore_index", 255))
    label, boundary = label.flatten(1), boundary.flatten(1)  # (N, P)
    n, patches = label.shape
    out = {}
    for i, layer in layers.items():
        if layer.routing == "image":
            raise ValueError(f"block {i} routes whole images (routing='image'): routing against regions needs "
                             "token routing")
        x = captured[i].view(n, -1, layer.in_features)[:, layer.num_prefix_tokens:]
        inputs = RouterInputs.of_layer(layer, x.reshape(-1, x.shape[-1]), label.reshape(-1),
                                       torch.arange(patches).repeat(n))
        out[i] = (inputs, boundary.reshape(-1))
    return out


def _scores(experts: torch.Tensor, labels: torch.Tensor, boundary: torch.Tensor, positions: torch.Tensor,
            num_classes: int, num_experts: int) -> dict[str, float]:
    valid = labels >= 0
    e, y, bd, pos = experts[valid], labels[valid], boundary[valid], positions[valid]
    obj = y > 0

    def cls_nmi(mask):
        return nmi(_table(y[mask], e[mask], num_classes, num_experts)) if mask.sum() > 1 else float("nan")

    table = _table(y, e, num_classes, num_experts)
    mi, _, h_expert = mutual_information(table)
    return {"nmi": nmi(table), "mi": mi, "expert_entropy": h_expert,
            "object_nmi": nmi(_table(obj.long(), e, 2, num_experts)),
            "object_only_nmi": cls_nmi(obj), "interior_nmi": cls_nmi(~bd), "boundary_nmi": cls_nmi(bd),
            "position_nmi": nmi(_table(pos, e, int(positions.max()) + 1, num_experts))}


def region_test(inputs: RouterInputs, boundary: torch.Tensor, num_classes: int, *, draws: int = 200,
                seed: int = 0) -> dict:
    """Every region metric of the trained router and of ``draws`` random routers (same norm, same inputs)."""
    E = inputs.num_experts or inputs.weight.shape[0]
    experts = inputs.first_choice(inputs.weight)
    trained = _scores(experts, inputs.labels, boundary, inputs.positions, num_classes, E)
    valid = inputs.labels >= 0
    trained["ami"] = float(adjusted_mutual_info_score(inputs.labels[valid].numpy(), experts[valid].numpy()))
    y = inputs.labels[valid]
    equal = uniform_counts(len(y), E)  # equal loads over the labelled patches

    def balanced(scores: torch.Tensor) -> dict[str, float]:
        table = _table(y, match_load(scores[valid], equal), num_classes, E)
        return {"nmi": nmi(table), "mi": mutual_information(table)[0]}

    trained_bal = balanced(inputs.scores(inputs.weight))
    rand: dict[str, list[float]] = {k: [] for k in NMI_METRICS}
    matched: dict[str, list[float]] = {"nmi": [], "mi": []}
    for w in random_weights(inputs.weight, draws, seed):
        scores = inputs.scores(w)
        s = _scores(scores.argmax(-1), inputs.labels, boundary, inputs.positions, num_classes, E)
        for k in NMI_METRICS:
            rand[k].append(s[k])
        for k, v in balanced(scores).items():
            matched[k].append(v)
    out = dict(trained)
    for k in NMI_METRICS:
        values = torch.tensor(rand[k])
        out[f"random_{k}"] = float(values.mean())
        out[f"p_{k}"] = empirical_p(trained[k], values.numpy())
    for k, values in matched.items():
        out[f"bal_{k}"] = trained_bal[k]
        out[f"bal_random_{k}"] = float(torch.tensor(values).mean())
        out[f"p_bal_{k}"] = empirical_p(trained_bal[k], torch.tensor(values).numpy())
    out["excess"] = trained["nmi"] - out["random_nmi"]
    out["draws"], out["patches"] = draws, int(valid.sum())
    out["boundary_share"] = float(boundary[valid].float().mean())
    return out


def region_report(model, data, *, max_images: int | None = 1000, draws: int = 200, seed: int = 0,
                  alpha: float = ALPHA, inputs: dict | None = None) -> pd.DataFrame:
    """One row per MoE block: the region metrics, their random-router baselines, and ``specialised`` (class NMI
    beats the random routers, Holm across blocks).  ``inputs``: :func:`region_inputs` of ``model`` on ``data``
    when already captured.  The smallest p is 1 / (draws + 1): with L layers, Holm needs
    draws >= L / alpha (80 for 4 layers at 0.05) for a layer to be able to come out specialised at all."""
    rows = []
    for block, (units, boundary) in (inputs or region_inputs(model, data, max_images=max_images)).items():
        rows.append({"block": block, **region_test(units, boundary, data.num_classes, draws=draws, seed=seed)})
    table = pd.DataFrame(rows)
    if len(table):
        table["p_holm"] = holm(table["p_nmi"].tolist())
        table["specialised"] = table["p_holm"] < alpha
        table["p_holm_balanced"] = holm(table["p_bal_nmi"].tolist())
        table["specialised_balanced"] = table["p_holm_balanced"] < alpha
    return table
