"""Scoring backends: what runs the cross-encoder's tensors, behind one interface.

The ranker (:mod:`ranking.cross_encoder`) builds inputs from cached token ids and hands them to a backend:

* :meth:`ScoringBackend.score_pairs` — pairwise rows -> scores;
* :meth:`ScoringBackend.encode_history` — history rows -> an opaque per-history state (keys/values) that
  the ranker may cache;
* :meth:`ScoringBackend.score_candidates` — that state plus candidate rows -> scores.

:class:`TorchBackend` (fp32 eager PyTorch, CPU or CUDA) is the reference. Faster backends (int8, bf16,
ONNX Runtime, CUDA graphs) implement the same three methods and must give the same scores within a stated
tolerance.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ranking.encoder import CrossEncoder, HistoryState
from ranking.inputs import PairwiseBatch
from retrieval.trainer import torch_threads


class ScoringBackend(ABC):
    """Runs a cross-encoder's forward passes; see the module docstring."""

    name: str = "backend"

    @abstractmethod
    def score_pairs(self, batch: PairwiseBatch) -> np.ndarray:
        """``(B,)`` float32 scores of pairwise rows."""

    @abstractmethod
    def encode_history(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        """A state holding the history rows' keys and values (opaque to the caller)."""

    @abstractmethod
    def score_candidates(self, state: Any, ids: torch.Tensor, mask: torch.Tensor,
                         owner: torch.Tensor | None = None) -> np.ndarray:
        """``(N,)`` float32 scores of candidate rows against the histories in ``state``."""

    def state_nbytes(self, state: Any) -> int:
        """Memory a cached state holds (for cache accounting)."""
        return 0


class TorchBackend(ScoringBackend):
    """Eager PyTorch in the model's dtype, under ``torch.inference_mode`` and in eval mode.

    Args:
        model: the cross-encoder (LoRA merged, or a peft-wrapped model during training).
        device: where inputs go (the model must already be there).
        threads: ``torch.set_num_threads`` during scoring; 0 leaves it alone.
    """

    name = "torch"

    def __init__(self, model: CrossEncoder, device: str | torch.device = "cpu", threads: int = 0) -> None:
        self.model = model
        self.device = torch.device(device)
        self.threads = threads

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch_threads(self.threads), torch.inference_mode():
                yield
        finally:
            if was_training:
                self.model.train()

    def score_pairs(self, batch: PairwiseBatch) -> np.ndarray:
        with self._scope():
            scores = self.model.score_pairwise(batch.to(self.device))
        return scores.float().cpu().numpy()

    def encode_history(self, ids: torch.Tensor, mask: torch.Tensor) -> HistoryState:
        with self._scope():
            return self.model.encode_history(ids.to(self.device), mask.to(self.device))

    def score_candidates(self, state: HistoryState, ids: torch.Tensor, mask: torch.Tensor,
                         owner: torch.Tensor | None = None) -> np.ndarray:
        with self._scope():
            owner = None if owner is None else owner.to(self.device)
            scores = self.model.score_candidates(state, ids.to(self.device), mask.to(self.device), owner)
        return scores.float().cpu().numpy()

    def state_nbytes(self, state: HistoryState) -> int:
        return state.nbytes()
