"""Auxiliary router losses.  Each is a function of one forward's :class:`Routing`.

* ``balance``: Switch Transformer load balance, ``E * sum_e f_e * P_e`` with ``f_e`` the share of the k*U
  assignments sent to expert e (divided by k, so the shares sum to 1 for any top-k) and ``P_e`` the mean router
  probability.  Exactly 1.0 under perfectly uniform routing, for any k.
* ``importance``, ``load``: V-MoE (arXiv 2106.05974, appendix A): squared coefficient of variation of the summed
  router probabilities, and of each expert's probability of being selected under the router noise.
* ``zloss``: ST-MoE router z-loss, mean squared log-sum-exp of the logits; keeps logits small.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AUX_LOSSES = ("balance", "importance", "load", "zloss")


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean()
    return x.var(unbiased=False) / (mean * mean + 1e-10)


def balance_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    num_experts = probs.shape[-1]
    share = F.one_hot(experts, num_experts).float().sum(dim=(0, 1)) / experts.numel()
    return num_experts * (share * probs.mean(dim=0)).sum()


def importance_loss(probs: torch.Tensor) -> torch.Tensor:
    return cv_squared(probs.sum(dim=0))


def load_loss(logits: torch.Tensor, top_k: int, noise_std: float) -> torch.Tensor:
    """P(expert e is among the top-k | fresh noise) summed over units, as V-MoE computes it."""
    noisy = logits + noise_std * torch.randn_like(logits)
    threshold = noisy.topk(top_k, dim=-1).values[:, -1:]
    normal = torch.distributions.Normal(0.0, 1.0)
    selected = 1.0 - normal.cdf((threshold - logits) / noise_std)
    return cv_squared(selected.sum(dim=0))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
