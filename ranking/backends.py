"""Scoring backends: what runs the cross-encoder's tensors, behind one interface.

The ranker (:mod:`ranking.cross_encoder`) builds inputs from cached token ids and hands them to a backend:

* :meth:`ScoringBackend.score_pairs` — pairwise rows -> scores;
* :meth:`ScoringBackend.encode_history` — history rows -> an opaque per-history state (keys/values) that
  the ranker may cache;
* :meth:`ScoringBackend.score_candidates` — that state plus candidate rows -> scores.

:class:`TorchBackend` (fp32 eager PyTorch, CPU or CUDA) is the reference. Faster backends implement the
same three methods and give the same scores within their stated tolerance (:attr:`ScoringBackend.tolerance`,
:attr:`ScoringBackend.min_spearman`); :func:`make_backend` builds one by name (:data:`BACKENDS`):

========== ============================================================== ========== ============
name       what runs                                                      tolerance  min Spearman
========== ============================================================== ========== ============
torch      fp32 eager PyTorch (the reference)                             1e-5       0.999
torch-int8 dynamic int8 ``nn.Linear`` layers of the encoder (head fp32)   0.1        0.98
torch-bf16 a bfloat16 copy of the model on the CPU                        0.1        0.98
onnx       ONNX Runtime, fp32 (:mod:`ranking.onnx_backend`)               1e-4       0.999
onnx-int8  ONNX Runtime, dynamic int8 weights (MatMul with constant B)    0.1        0.98
cuda       bfloat16 on a CUDA device, CUDA graphs (:mod:`ranking.cuda_backend`) 0.1   0.98
========== ============================================================== ========== ============

A cached history state is backend specific (a :class:`~ranking.encoder.HistoryState` of the backend's
dtype, or numpy arrays for ONNX), so a ranker switching backend starts with an empty KV cache.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data.errors import ConfigError
from ranking.encoder import CrossEncoder, HistoryState
from ranking.inputs import PairwiseBatch
from retrieval.trainer import torch_threads

#: Every backend :func:`make_backend` knows.
BACKENDS = ("torch", "torch-int8", "torch-bf16", "onnx", "onnx-int8", "cuda")


@contextlib.contextmanager
def inference_scope(model: nn.Module, threads: int = 0) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (restored after), ``threads`` torch threads (0: unchanged) and
    ``torch.inference_mode``: how every backend scores."""
    was_training = model.training
    model.eval()
    try:
        with torch_threads(threads), torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


class ScoringBackend(ABC):
    """Runs a cross-encoder's forward passes; see the module docstring.

    Attributes:
        name: the backend's name in :data:`BACKENDS`.
        tolerance: the largest absolute score difference from the fp32 :class:`TorchBackend` expected on the
            same inputs, in units of ``max(1, std of the reference scores)`` (see :func:`within_tolerance`).
        min_spearman: the lowest Spearman rank correlation with the fp32 scores of one candidate list
            expected (0.999 for exact backends: the same order but for near-ties flipped by rounding).
    """

    name: str = "backend"
    tolerance: float = 1e-5
    min_spearman: float = 0.999

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
    tolerance = 1e-5

    def __init__(self, model: CrossEncoder, device: str | torch.device = "cpu", threads: int = 0) -> None:
        self.model = model
        self.device = torch.device(device)
        self.threads = threads

    def _scope(self) -> contextlib.AbstractContextManager[None]:
        return inference_scope(self.model, self.threads)

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


class TorchInt8Backend(TorchBackend):
    """Dynamic int8 quantization (``torch.ao.quantization.quantize_dynamic``: qint8 weights per output
    channel, activations quantized per batch) of every ``nn.Linear`` of the encoder, on a deep copy of the
    model; the head stays fp32. CPU only. Scores depend slightly on what else is in the batch (the activation
    scale does). Per-channel weights: on the bundled MiniLM ranker, per-tensor weights gave Spearman
    0.88-0.97 with the fp32 order of 100 candidates, per-channel 0.98-0.985."""

    name = "torch-int8"
    tolerance = 0.1
    min_spearman = 0.98

    def __init__(self, model: CrossEncoder, threads: int = 0) -> None:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantized = copy.deepcopy(model).to("cpu").eval()
        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
            warnings.simplefilter("ignore")
            quantized.bert = quantize_dynamic(quantized.bert, {nn.Linear: per_channel_dynamic_qconfig},
                                              dtype=torch.qint8)
        super().__init__(quantized, "cpu", threads)


class TorchBf16Backend(TorchBackend):
    """A bfloat16 copy of the model on the CPU: weights, activations and cached keys/values in bf16 (masks
    use bf16's minimum, see :meth:`~ranking.encoder.CrossEncoder.key_bias`); scores come back float32.
    Fast on CPUs with AVX512-BF16/AMX, slow elsewhere."""

    name = "torch-bf16"
    tolerance = 0.1
    min_spearman = 0.98

    def __init__(self, model: CrossEncoder, threads: int = 0) -> None:
        super().__init__(copy.deepcopy(model).to("cpu", torch.bfloat16).eval(), "cpu", threads)


def within_tolerance(scores: np.ndarray, reference: np.ndarray, tolerance: float) -> bool:
    """Whether ``max |scores - reference| <= tolerance * max(1, std(reference))`` (the backends' contract)."""
    scores, reference = np.asarray(scores, np.float64), np.asarray(reference, np.float64)
    if scores.shape != reference.shape:
        return False
    if scores.size == 0:
        return True
    scale = max(1.0, float(reference.std()))
    return float(np.abs(scores - reference).max()) <= tolerance * scale


def embed_unchecked(model: CrossEncoder, ids: torch.Tensor, types: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
    """:meth:`CrossEncoder.embed` without its position range check (which syncs with the host)."""
    emb = model.bert.embeddings
    x = emb.word_embeddings(ids) + emb.token_type_embeddings(types.clamp(max=model.n_types - 1))
    return emb.dropout(emb.LayerNorm(x + emb.position_embeddings(positions + model.position_offset)))


def pairwise_scores(model: CrossEncoder, ids: torch.Tensor, types: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """:meth:`CrossEncoder.score_pairwise` without a host sync (for CUDA graphs; positions checked by the
    caller)."""
    x = embed_unchecked(model, ids, types, torch.arange(ids.shape[1], device=ids.device).expand_as(ids))
    hidden, _, _ = model.encode(x, model.key_bias(mask, x.dtype))
    if model.pairwise_pooling == "cls":
        return model.score_head(hidden[:, 0])
    return model.score_head(model.mean_pool(hidden, mask & (types == 1)))


def candidate_scores(model: CrossEncoder, keys: list[torch.Tensor], values: list[torch.Tensor],
                     history_mask: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """:meth:`CrossEncoder.score_candidates` with explicit ``positions`` ``(N, Lc)`` and no host sync: the
    form exported to ONNX and captured in CUDA graphs (the caller checks positions are in range).

    ``keys``/``values`` are per layer ``(1 or N, heads, Lh, head_dim)``, ``history_mask`` ``(1 or N, Lh)``.
    """
    n = ids.shape[0]
    x = embed_unchecked(model, ids, torch.ones_like(ids), positions)
    bias = model.key_bias(torch.cat([history_mask.expand(n, -1), mask], dim=1), x.dtype)
    past = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in zip(keys, values)]
    hidden, _, _ = model.encode(x, bias, past)
    return model.score_head(model.mean_pool(hidden, mask))


def check_positions(model: CrossEncoder, longest: int) -> None:
    """Raise :class:`ConfigError` when a sequence of ``longest`` positions does not fit the encoder."""
    if longest > model.max_positions:
        raise ConfigError(
            f"a sequence reaches position {longest - 1} but the encoder has {model.max_positions} positions; "
            "lower TextConfig.history_tokens or item_tokens"
        )


def make_backend(name: str, model: CrossEncoder, *, threads: int = 0, device: str = "cpu",
                 cache_dir: str | Path | None = None) -> ScoringBackend:
    """The scoring backend ``name`` (one of :data:`BACKENDS`) over ``model``.

    Args:
        name: the backend (see the module docstring's table).
        model: the cross-encoder (adapters merged); converted backends work on a copy, never change it.
        threads: intra-op threads while scoring (0: torch's setting for torch backends, 2 for ONNX Runtime).
        device: where ``"torch"`` runs (a model elsewhere is copied there); ``"cuda"`` uses ``cuda`` when
            ``device`` is the CPU. The other backends run on the CPU.
        cache_dir: where the ONNX backends keep their export (default: a temporary folder).

    Raises:
        ConfigError: unknown ``name``.
        BackendUnavailableError: the backend cannot run here (no ``onnxruntime``, no CUDA device).
    """
    if name not in BACKENDS:
        raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"threads must be an integer >= 0, got {threads!r}")
    if name == "torch":
        target = torch.device(device)
        current = next(model.parameters()).device
        if current.type != target.type or (target.index is not None and current != target):
            model = copy.deepcopy(model).to(target)
        return TorchBackend(model, target, threads)
    if name == "torch-int8":
        return TorchInt8Backend(model, threads)
    if name == "torch-bf16":
        return TorchBf16Backend(model, threads)
    if name in ("onnx", "onnx-int8"):
        from ranking.onnx_backend import OnnxBackend

        return OnnxBackend(model, quantize=name == "onnx-int8", threads=threads or 2, cache_dir=cache_dir)
    from ranking.cuda_backend import CudaBackend

    cuda = "cuda" if torch.device(device).type == "cpu" else device
    return CudaBackend(model, device=cuda, threads=threads)
