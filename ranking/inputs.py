"""Model inputs built from cached token ids: pairwise batches, one-pass blocks and packed sequences.

* **pairwise**: per (history, candidate) pair one row ``[CLS] history [SEP] candidate [SEP]``; token type
  0 for the history segment, 1 for the candidate; positions ``0..L-1``; right padding.
* **one-pass, split form** (what serving and training run): the history rows ``(B, Lh)`` once, and the
  candidate rows ``(N, Lc)`` with ``owner[n]``, the history row each candidate belongs to. A candidate's
  positions start right after its history (``Lh_b, Lh_b + 1, ...``), so every candidate of a list gets
  the same positions whatever its order.
* **one-pass, packed form** (the block-mask reference, and a shape that exports): one sequence holding
  the history, then every candidate; ``allowed[i, j]`` says whether token ``i`` may attend to token ``j``
  (history -> history; candidate -> history and its own tokens), and ``pool`` averages each candidate's
  own tokens. Both forms compute the same scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def length_buckets(lengths: Sequence[int] | np.ndarray, size: int) -> list[np.ndarray]:
    """Indices sorted by length (stable), cut into consecutive chunks of ``size``: rows of similar length
    share a batch, so little compute goes to padding."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[s:s + size] for s in range(0, order.size, max(1, size))]


def _pad(rows: Sequence[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(n, L)`` long tensor of ``rows`` and its boolean validity mask."""
    length = max((r.size for r in rows), default=0)
    ids = np.full((len(rows), max(length, 1)), pad, dtype=np.int64)
    mask = np.zeros(ids.shape, dtype=bool)
    for i, r in enumerate(rows):
        ids[i, :r.size] = r
        mask[i, :r.size] = True
    return torch.from_numpy(ids), torch.from_numpy(mask)


@dataclass
class PairwiseBatch:
    """Pairwise rows. Attributes: ``input_ids``, ``token_type_ids`` ``(B, L)`` long; ``mask`` ``(B, L)``
    bool, True on real tokens."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> PairwiseBatch:
        return PairwiseBatch(self.input_ids.to(device), self.token_type_ids.to(device), self.mask.to(device))


def pairwise_batch(histories: Sequence[np.ndarray], candidates: Sequence[np.ndarray], pad: int) -> PairwiseBatch:
    """Rows ``history + candidate`` (each history already ``[CLS] ... [SEP]``, each candidate ``... [SEP]``)."""
    if len(histories) != len(candidates):
        raise ValueError(f"pairwise_batch: {len(histories)} histories for {len(candidates)} candidates")
    rows = [np.concatenate([h, c]) for h, c in zip(histories, candidates)]
    ids, mask = _pad(rows, pad)
    types = np.zeros(ids.shape, dtype=np.int64)
    for i, (h, c) in enumerate(zip(histories, candidates)):
        types[i, h.size:h.size + c.size] = 1
    return PairwiseBatch(ids, torch.from_numpy(types), mask)


@dataclass
class OnePassBatch:
    """The split one-pass form.

    Attributes:
        history_ids: ``(B, Lh)`` long, right padded.
        history_mask: ``(B, Lh)`` bool.
        candidate_ids: ``(N, Lc)`` long, right padded.
        candidate_mask: ``(N, Lc)`` bool.
        owner: ``(N,)`` long, the history row of each candidate.
    """

    history_ids: torch.Tensor
    history_mask: torch.Tensor
    candidate_ids: torch.Tensor
    candidate_mask: torch.Tensor
    owner: torch.Tensor

    def to(self, device: torch.device | str) -> OnePassBatch:
        return OnePassBatch(*(t.to(device) for t in (self.history_ids, self.history_mask, self.candidate_ids,
                                                     self.candidate_mask, self.owner)))


def history_batch(histories: Sequence[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _pad(histories, pad)


def candidate_batch(candidates: Sequence[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _pad(candidates, pad)


def one_pass_batch(histories: Sequence[np.ndarray], candidates: Sequence[Sequence[np.ndarray]],
                   pad: int) -> OnePassBatch:
    """One history per list and that list's candidates; candidates of all lists are flattened in order."""
    if len(histories) != len(candidates):
        raise ValueError(f"one_pass_batch: {len(histories)} histories for {len(candidates)} candidate lists")
    h_ids, h_mask = history_batch(histories, pad)
    flat = [c for group in candidates for c in group]
    c_ids, c_mask = candidate_batch(flat, pad)
    owner = torch.as_tensor(np.repeat(np.arange(len(candidates)), [len(g) for g in candidates]), dtype=torch.long)
    return OnePassBatch(h_ids, h_mask, c_ids, c_mask, owner)


@dataclass
class PackedSequence:
    """The packed one-pass form of one list.

    Attributes:
        input_ids: ``(1, L)`` long: the history, then every candidate.
        token_type_ids: ``(1, L)`` long: 0 on the history, 1 on candidates.
        position_ids: ``(1, L)`` long: ``0..Lh-1`` on the history, ``Lh..`` again for each candidate.
        allowed: ``(L, L)`` bool: token i may attend to token j.
        pool: ``(M, L)`` float: row m averages candidate m's tokens.
    """

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    pool: torch.Tensor


def packed_sequence(history: np.ndarray, candidates: Sequence[np.ndarray]) -> PackedSequence:
    """Pack one history and its candidates into one block-masked sequence."""
    lh = history.size
    lengths = [c.size for c in candidates]
    total = lh + sum(lengths)
    ids = np.concatenate([history, *candidates]) if candidates else history.copy()
    types = np.zeros(total, dtype=np.int64)
    types[lh:] = 1
    positions = np.concatenate([np.arange(lh)] + [lh + np.arange(n) for n in lengths])
    allowed = np.zeros((total, total), dtype=bool)
    allowed[:lh, :lh] = True
    pool = np.zeros((len(candidates), total), dtype=np.float32)
    start = lh
    for m, n in enumerate(lengths):
        allowed[start:start + n, :lh] = True
        allowed[start:start + n, start:start + n] = True
        pool[m, start:start + n] = 1.0 / n
        start += n
    return PackedSequence(torch.from_numpy(ids[None].astype(np.int64)), torch.from_numpy(types[None]),
                          torch.from_numpy(positions[None].astype(np.int64)), torch.from_numpy(allowed),
                          torch.from_numpy(pool))
