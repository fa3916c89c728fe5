"""Losses of the two-tower retriever, separate from the towers: each maps (query vectors, target item
rows, item vectors) to a scalar.

:class:`SampledSoftmaxLoss` (the default) scores each query against its target and a shared candidate
set made of the targets of other positions in the batch (in-batch negatives) and items drawn uniformly
from the catalogue, de-duplicated. Because popular items are over-represented among in-batch targets, every
logit gets the logQ correction of Yi et al. (RecSys 2019): ``logit - log Q(item)`` with ``Q(item)`` the
probability that the item is in the candidate set. For a set built from ``b`` in-batch draws from the
target distribution ``p`` and ``m`` uniform draws over ``n`` items, de-duplicated (TensorFlow's
``unique=True`` expected counts)::

    Q(j) = 1 - (1 - p_j) ** b * (1 - 1 / n) ** m

A candidate equal to a row's target (an "accidental hit") is masked for that row.

:class:`FullSoftmaxLoss` is the exact cross-entropy over the whole catalogue (affordable for small
catalogues, like SASRec trained with cross-entropy).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SampledSoftmaxLoss(nn.Module):
    """Sampled softmax with in-batch + uniform negatives and logQ correction.

    Args:
        target_probs: ``(n_items,)`` probability of each item as a training target (its frequency).
        n_uniform: uniform negatives drawn per batch.
        n_inbatch: positions whose targets serve as negatives (drawn without replacement from the batch);
            0 uses every position of the batch.
        logq_correction: subtract ``log Q(item)`` from every logit.
        temperature: logits are divided by it.
    """

    def __init__(self, target_probs: torch.Tensor, *, n_uniform: int = 512, n_inbatch: int = 2048,
                 logq_correction: bool = True, temperature: float = 1.0) -> None:
        super().__init__()
        probs = torch.as_tensor(target_probs, dtype=torch.float32)
        self.register_buffer("target_probs", probs / probs.sum().clamp(min=1e-12), persistent=False)
        self.n_uniform, self.n_inbatch = n_uniform, n_inbatch
        self.logq_correction, self.temperature = logq_correction, temperature

    def log_q(self, n_draws: int) -> torch.Tensor:
        """``log Q(j)`` for every item when the candidate set comes from ``n_draws`` in-batch targets."""
        n = self.target_probs.numel()
        log_miss = n_draws * torch.log1p(-self.target_probs.clamp(max=1 - 1e-7))
        log_miss = log_miss + self.n_uniform * torch.log1p(torch.tensor(-1.0 / n, device=log_miss.device))
        return torch.log(-torch.expm1(log_miss)).clamp(min=-30.0)

    def forward(self, queries: torch.Tensor, targets: torch.Tensor, items: torch.Tensor,
                reduction: str = "mean") -> torch.Tensor:
        """Mean loss over rows (``reduction="none"``: one loss per row).

        Args:
            queries: ``(p, d)`` query vectors, one per target.
            targets: ``(p,)`` target item rows (into ``items``).
            items: ``(n_items, d)`` item vectors.
        """
        p, n = targets.numel(), items.shape[0]
        device = items.device
        if 0 < self.n_inbatch < p:
            draws = targets[torch.randperm(p, device=device)[: self.n_inbatch]]
        else:
            draws = targets
        uniform = torch.randint(0, n, (self.n_uniform,), device=device)
        candidates = torch.unique(torch.cat([draws, uniform]))
        if self.temperature != 1.0:
            queries = queries / self.temperature
        positive = (queries * items[targets]).sum(-1)
        negative = queries @ items[candidates].T
        if self.logq_correction:
            log_q = self.log_q(draws.numel())
            positive = positive - log_q[targets]
            negative = negative - log_q[candidates]
        negative = negative.masked_fill(candidates.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
        logits = torch.cat([positive.unsqueeze(1), negative], dim=1)
        losses = -F.log_softmax(logits, dim=1)[:, 0]
        return losses if reduction == "none" else losses.mean()


class FullSoftmaxLoss(nn.Module):
    """Cross-entropy over every item (no sampling, no correction).

    Args:
        temperature: logits are divided by it.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, queries: torch.Tensor, targets: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            queries = queries / self.temperature
        return F.cross_entropy(queries @ items.T, targets)


__all__ = ["FullSoftmaxLoss", "SampledSoftmaxLoss"]
