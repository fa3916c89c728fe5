"""The ``"cuda"`` scoring backend: a bfloat16 copy of the model on a CUDA device, replayed as CUDA graphs.

Small reranking requests are dominated by kernel launch overhead (6 layers x ~15 kernels x a few us), so
every forward pass runs as a CUDA graph captured once per shape bucket and replayed per request:

* history (one-pass): one history, padded to :data:`HISTORY_BUCKETS` tokens;
* candidates (one-pass): a state from that path, candidates padded to :data:`CANDIDATE_BUCKETS` rows (longer
  lists run in chunks of the largest) x :data:`LENGTH_BUCKETS` tokens;
* pairwise: rows padded to :data:`CANDIDATE_BUCKETS` x :data:`PAIR_LENGTH_BUCKETS` tokens.

Padding rows and tokens are masked out (keys, pooling), so a score does not depend on its bucket beyond
bf16 rounding. Shapes outside the buckets (several histories at once, longer rows) run eagerly. Graphs are
captured lazily on first use of a bucket (tens of ms each) and share one memory pool. Attention is
PyTorch's ``scaled_dot_product_attention`` (memory-efficient kernel with the additive mask).

``graphs=False`` with ``device="cpu"`` and ``dtype=torch.float32`` runs the same bucketing eagerly on the CPU;
the tests use it to check the padding logic on machines without a GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from data.errors import BackendUnavailableError, ConfigError
from ranking.backends import TorchBackend, candidate_scores, embed_unchecked, pairwise_scores
from ranking.encoder import CrossEncoder, HistoryState
from ranking.inputs import PairwiseBatch

CANDIDATE_BUCKETS = (16, 32, 64, 128)
LENGTH_BUCKETS = (16, 32)
HISTORY_BUCKETS = (64, 128)
PAIR_LENGTH_BUCKETS = (64, 128, 192)


def _bucket(size: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= size), None)


def _pad(t: torch.Tensor, rows: int, cols: int, value: Any) -> torch.Tensor:
    out = torch.full((rows, cols), value, dtype=t.dtype, device=t.device)
    out[:t.shape[0], :t.shape[1]] = t
    return out


class CudaBackend(TorchBackend):
    """bf16 + CUDA graphs; see the module docstring.

    Args:
        model: the cross-encoder; a copy is converted to ``dtype`` on ``device``.
        device: a CUDA device.
        threads: CPU threads for the host side (0: unchanged).
        dtype: the copy's dtype.
        graphs: capture and replay CUDA graphs (False: eager, for tests).
    """

    name = "cuda"
    tolerance = 0.1
    min_spearman = 0.98

    def __init__(self, model: CrossEncoder, *, device: str | torch.device = "cuda", threads: int = 0,
                 dtype: torch.dtype = torch.bfloat16, graphs: bool = True) -> None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("the cuda backend needs a CUDA device and a CUDA build of torch; "
                                          "torch.cuda.is_available() is False here, use a CPU backend")
        if graphs and device.type != "cuda":
            raise ConfigError(f"CudaBackend: CUDA graphs need a CUDA device, got device={str(device)!r}")
        super().__init__(copy.deepcopy(model).to(device, dtype).eval(), device, threads)
        self.graphs = graphs
        self._captured: dict[tuple, tuple[Any, dict[str, torch.Tensor], torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None

    def _run(self, key: tuple, fn: Callable[..., torch.Tensor], **inputs: torch.Tensor) -> torch.Tensor:
        """``fn(**inputs)``, as a replay of the graph captured for ``key`` (captured on first use). The result
        is a static buffer: copy what you need before the next call."""
        if not self.graphs:
            return fn(**inputs)
        entry = self._captured.get(key)
        if entry is None:
            static = {k: v.clone() for k, v in inputs.items()}
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside capture (kernel selection, allocator)
                    fn(**static)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = fn(**static)
            entry = self._captured[key] = (graph, static, out)
        graph, static, out = entry
        for k, v in inputs.items():
            static[k].copy_(v)
        graph.replay()
        return out

    def _clamped(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.clamp(max=self.model.max_positions - 1)  # padding tokens only; they are masked

    def score_pairs(self, batch: PairwiseBatch) -> np.ndarray:
        b, length = batch.input_ids.shape
        lb = _bucket(length, PAIR_LENGTH_BUCKETS)
        if b == 0:
            return np.empty(0, dtype=np.float32)
        if lb is None or lb > self.model.max_positions:
            return super().score_pairs(batch)
        batch = batch.to(self.device)
        out = []
        with self._scope():
            for s in range(0, b, CANDIDATE_BUCKETS[-1]):
                ids, types, mask = (t[s:s + CANDIDATE_BUCKETS[-1]] for t in
                                    (batch.input_ids, batch.token_type_ids, batch.mask))
                m = ids.shape[0]
                nb = _bucket(m, CANDIDATE_BUCKETS)
                scores = self._run(("pairs", nb, lb), self._pairs, ids=_pad(ids, nb, lb, 0),
                                   types=_pad(types, nb, lb, 0), mask=_pad(mask, nb, lb, False))
                out.append(scores[:m].float().cpu().numpy())
        return np.concatenate(out)

    def _pairs(self, ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pairwise_scores(self.model, ids, types, mask)

    def encode_history(self, ids: torch.Tensor, mask: torch.Tensor) -> HistoryState:
        b, length = ids.shape
        hb = _bucket(length, HISTORY_BUCKETS)
        if b != 1 or hb is None or hb > self.model.max_positions:
            return super().encode_history(ids, mask)
        mask = _pad(mask.to(self.device), 1, hb, False)
        with self._scope():
            kv = self._run(("history", hb), self._history, ids=_pad(ids.to(self.device), 1, hb, 0), mask=mask)
            kv = kv.clone()
        return HistoryState(list(kv[:, 0]), list(kv[:, 1]), mask, mask.sum(1))

    def _history(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        x = embed_unchecked(self.model, ids, torch.zeros_like(ids), positions)
        _, keys, values = self.model.encode(x, self.model.key_bias(mask, x.dtype), keep=True)
        return torch.stack([torch.stack([k, v]) for k, v in zip(keys, values)])

    def score_candidates(self, state: HistoryState, ids: torch.Tensor, mask: torch.Tensor,
                         owner: torch.Tensor | None = None) -> np.ndarray:
        n, length = ids.shape
        if n == 0:
            return np.empty(0, dtype=np.float32)
        lb, hb = _bucket(length, LENGTH_BUCKETS), state.mask.shape[1]
        if state.batch != 1 or lb is None or hb not in HISTORY_BUCKETS:
            return super().score_candidates(state, ids, mask, owner)
        ids, mask = ids.to(self.device), mask.to(self.device)
        kv = torch.stack([torch.stack([k, v]) for k, v in zip(state.keys, state.values)])
        out = []
        with self._scope():
            for s in range(0, n, CANDIDATE_BUCKETS[-1]):
                c_ids, c_mask = ids[s:s + CANDIDATE_BUCKETS[-1]], mask[s:s + CANDIDATE_BUCKETS[-1]]
                m = c_ids.shape[0]
                nb = _bucket(m, CANDIDATE_BUCKETS)
                offsets = torch.arange(lb, device=self.device)[None]
                positions = self._clamped(state.lengths[:1, None] + offsets)
                scores = self._run(("candidates", nb, lb, hb), self._candidates, ids=_pad(c_ids, nb, lb, 0),
                                   mask=_pad(c_mask, nb, lb, False), positions=positions.expand(nb, lb),
                                   kv=kv, history_mask=state.mask)
                out.append(scores[:m].float().cpu().numpy())
        return np.concatenate(out)

    def _candidates(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                    history_mask: torch.Tensor) -> torch.Tensor:
        keys, values = list(kv[:, 0]), list(kv[:, 1])
        return candidate_scores(self.model, keys, values, history_mask, ids, mask, positions)
