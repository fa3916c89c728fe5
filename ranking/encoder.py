"""The cross-encoder model: a Hugging Face BERT-family encoder and a scoring head, in two scoring modes.

The encoder's forward pass is written here over the Hugging Face module's own submodules (embeddings,
``query``/``key``/``value``, ``attention.output``, ``intermediate``, ``output``) rather than through
``BertModel.forward``, because the one-pass mode needs three things that forward does not offer together:
a block attention mask, candidate position ids that restart after the history, and a history
key/value cache. Checked on transformers 5.x: ``BertModel`` accepts custom ``position_ids`` and a prepared
4-D *additive float* mask (eager and SDPA agree with this module, see the tests; a 4-D *boolean* mask is
silently mis-applied by the eager path), but an encoder-only ``BertModel`` never builds a key/value cache
(``use_cache`` is decoder-only), so the history could not be reused across requests.
Calling the submodules keeps every weight in one place, so LoRA adapters injected by peft into those
``nn.Linear`` layers take part, and ``tests/test_ranker.py`` checks this forward equals
``BertModel.forward`` on ordinary inputs.

Modes (see :mod:`ranking.inputs` for the tensors):

* :meth:`CrossEncoder.score_pairwise`: full attention over ``[CLS] history [SEP] item [SEP]``, scored from
  the mean of the item segment's final states (or from ``[CLS]``, ``pairwise_pooling="cls"``);
* :meth:`CrossEncoder.encode_history` + :meth:`CrossEncoder.score_candidates`: the one-pass mode in split
  form. The history runs once and leaves its per-layer keys and values (:class:`HistoryState`); every
  candidate then attends to those and to its own tokens only, at positions that restart after the history,
  and is scored from the mean of its own final states;
* :meth:`CrossEncoder.score_shared`: the split form's candidate pass when every candidate shares ONE
  history (the online case; :meth:`CrossEncoder.score_candidates` takes it at inference): each candidate
  token's scores against the history are one dense product over all candidates, against its own candidate
  a small batched one, joined in one softmax, so no candidate gets a copy of the history's keys/values;
* :meth:`CrossEncoder.score_packed`: the same one-pass scores from a single block-masked sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data.errors import ConfigError
from ranking.config import BUNDLED_MINILM
from ranking.inputs import OnePassBatch, PackedSequence, PairwiseBatch
from retrieval.item_features import bundled_minilm_path

#: How the pairwise mode pools a row into the head's input.
POOLINGS = ("candidate_mean", "cls")
#: Model types whose position ids start after the padding index (``padding_idx + 1``).
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")


def resolve_base_model(name: str) -> str:
    """The folder to load for ``name``: ``"bundled-minilm"`` -> the bundled all-MiniLM-L6-v2 folder."""
    if name != BUNDLED_MINILM:
        if not Path(name).is_dir():
            raise ConfigError(
                f"base_model {name!r} is not a folder; pass 'bundled-minilm' or a local Hugging Face folder "
                "(config.json, weights and tokenizer files)"
            )
        return name
    return bundled_minilm_path("base_model")


def load_base(name: str) -> tuple[nn.Module, Any, str]:
    """``(encoder, tokenizer, folder)``: the pretrained encoder (pooler dropped) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_base_model(name)
    encoder = AutoModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return _without_pooler(encoder), tokenizer, folder


def encoder_from_config(config: dict[str, Any]) -> nn.Module:
    """A randomly initialised encoder from a config dict (``config.json`` contents); weights come later."""
    from transformers import AutoConfig, AutoModel

    values = dict(config)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ConfigError("encoder config has no 'model_type'; pass a Hugging Face config.json's contents")
    hf_config = AutoConfig.for_model(model_type, **values)
    return _without_pooler(AutoModel.from_config(hf_config))


def _without_pooler(encoder: nn.Module) -> nn.Module:
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # the head reads token states; the pretrained pooler is unused
    return encoder


def check_layout(encoder: nn.Module) -> None:
    """Raise :class:`ConfigError` unless ``encoder`` has the BERT module layout this forward reads."""
    try:
        emb = encoder.embeddings
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"):
            getattr(emb, name)
        layer = encoder.encoder.layer[0]
        for path in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output",
                     "intermediate", "output"):
            obj = layer
            for part in path.split("."):
                obj = getattr(obj, part)
    except (AttributeError, IndexError) as exc:
        raise ConfigError(
            f"{type(encoder).__name__} does not have the BERT layout (embeddings.word/position/token_type, "
            f"encoder.layer[i].attention.self.query/key/value, ...): {exc}; use a BERT-family model such as "
            "BERT, MiniLM or RoBERTa"
        ) from exc
    config = encoder.config
    if getattr(config, "embedding_size", config.hidden_size) != config.hidden_size:
        raise ConfigError(f"{config.model_type}: embedding_size differs from hidden_size; not supported")


@dataclass
class HistoryState:
    """A history's per-layer keys and values, computed once and reused by every candidate.

    Attributes:
        keys: per layer ``(B, heads, Lh, head_dim)``.
        values: per layer ``(B, heads, Lh, head_dim)``.
        mask: ``(B, Lh)`` bool, True on real history tokens.
        lengths: ``(B,)`` long, real history tokens per row (candidates' first position).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    lengths: torch.Tensor

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class CrossEncoder(nn.Module):
    """A BERT-family encoder plus a scoring head.

    Args:
        encoder: a Hugging Face encoder with the BERT layout (``BertModel``; pooler not needed).
        head_hidden: hidden width of the head (0: one linear layer).
        head_dropout: dropout on the pooled state before the head (training only).
        pairwise_pooling: ``"candidate_mean"`` (the mean of the candidate segment's final states, as the
            one-pass mode pools) or ``"cls"`` (the ``[CLS]`` state, the textbook cross-encoder).
    """

    def __init__(self, encoder: nn.Module, head_hidden: int = 0, head_dropout: float = 0.1,
                 pairwise_pooling: str = "candidate_mean") -> None:
        super().__init__()
        if pairwise_pooling not in POOLINGS:
            raise ConfigError(f"pairwise_pooling must be one of {list(POOLINGS)}, got {pairwise_pooling!r}")
        self.pairwise_pooling = pairwise_pooling
        check_layout(encoder)
        self.bert = encoder
        config = encoder.config
        self.hidden = int(config.hidden_size)
        self.n_heads = int(config.num_attention_heads)
        self.head_dim = self.hidden // self.n_heads
        self.position_offset = (int(config.pad_token_id) + 1) if config.model_type in _OFFSET_POSITIONS else 0
        self.max_positions = int(config.max_position_embeddings) - self.position_offset
        self.n_types = int(getattr(config, "type_vocab_size", 1) or 1)
        self.attention_dropout = float(getattr(config, "attention_probs_dropout_prob", 0.0))
        self.pool_dropout = nn.Dropout(head_dropout)
        if head_hidden:
            self.head = nn.Sequential(nn.Linear(self.hidden, head_hidden), nn.GELU(), nn.Linear(head_hidden, 1))
        else:
            self.head = nn.Sequential(nn.Linear(self.hidden, 1))

    # ---- the functional BERT forward ------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor, *,
              check: bool = True) -> torch.Tensor:
        """Word + token type + position embeddings, LayerNorm and dropout (BertEmbeddings' order).

        ``check`` raises :class:`ConfigError` on a position past the encoder's (a host sync; off for export)."""
        if check and position_ids.numel() and int(position_ids.max()) >= self.max_positions:
            raise ConfigError(
                f"a sequence reaches position {int(position_ids.max())} but the encoder has "
                f"{self.max_positions} positions; lower TextConfig.history_tokens or item_tokens"
            )
        emb = self.bert.embeddings
        types = token_type_ids.clamp(max=self.n_types - 1)
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(types)
        x = x + emb.position_embeddings(position_ids + self.position_offset)
        return emb.dropout(emb.LayerNorm(x))

    @staticmethod
    def key_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(B, Lk)`` bool key mask -> ``(B, 1, 1, Lk)`` additive bias (0 or the dtype's minimum)."""
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)[:, None, None, :]

    def _layer(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor,
               past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.attention.self
        b, n, _ = x.shape
        q = attn.query(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = attn.key(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        v = attn.value(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k_all, v_all = k, v
        if past is not None:
            k_all = torch.cat([past[0], k], dim=2)
            v_all = torch.cat([past[1], v], dim=2)
        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=bias, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(b, n, self.hidden)
        x = layer.attention.output(out, x)
        x = layer.output(layer.intermediate(x), x)
        return x, k, v

    def encode(self, x: torch.Tensor, bias: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
               keep: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Run every layer; ``past[l]`` are keys/values prepended at layer ``l``; ``keep`` returns this
        input's own keys and values per layer."""
        keys, values = [], []
        for i, layer in enumerate(self.bert.encoder.layer):
            x, k, v = self._layer(layer, x, bias, None if past is None else past[i])
            if keep:
                keys.append(k)
                values.append(v)
        return x, keys, values

    def score_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool_dropout(pooled)).squeeze(-1)

    # ---- pairwise -------------------------------------------------------------------------------
    def score_pairwise(self, batch: PairwiseBatch) -> torch.Tensor:
        """``(B,)`` scores of ``[CLS] history [SEP] item [SEP]`` rows under full attention, pooled as
        ``pairwise_pooling`` says."""
        ids = batch.input_ids
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.embed(ids, batch.token_type_ids, positions)
        hidden, _, _ = self.encode(x, self.key_bias(batch.mask, x.dtype))
        if self.pairwise_pooling == "cls":
            return self.score_head(hidden[:, 0])
        return self.score_head(self.mean_pool(hidden, batch.mask & (batch.token_type_ids == 1)))

    @staticmethod
    def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of ``hidden`` ``(B, L, H)`` over the positions where ``mask`` ``(B, L)`` is True."""
        weights = mask.to(hidden.dtype)
        return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)

    # ---- one-pass, split form -------------------------------------------------------------------
    def encode_history(self, ids: torch.Tensor, mask: torch.Tensor) -> HistoryState:
        """Run the history rows alone (they never attend to candidates) and keep their keys/values."""
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.embed(ids, torch.zeros_like(ids), positions)
        _, keys, values = self.encode(x, self.key_bias(mask, x.dtype), keep=True)
        return HistoryState(keys, values, mask, mask.sum(1))

    def score_candidates(self, state: HistoryState, ids: torch.Tensor, mask: torch.Tensor,
                         owner: torch.Tensor | None = None) -> torch.Tensor:
        """``(N,)`` scores of candidate rows against their histories in ``state``.

        ``owner[n]`` is the history row of candidate ``n`` (default: all row 0). Candidate ``n`` attends to
        its history's keys/values and its own tokens, at positions ``lengths[owner[n]] + 0, 1, ...``.
        A single shared history (``state.batch == 1`` or no ``owner``) outside training runs
        :meth:`score_shared`, which never copies the history's keys/values per candidate.
        """
        n = ids.shape[0]
        shared = state.batch == 1 or owner is None
        if shared and not self.training and state.keys and state.keys[0].shape[2] > 0:
            positions = state.lengths[0] + torch.arange(ids.shape[1], device=ids.device).expand(n, -1)
            return self.score_shared(state.keys, state.values, state.mask[:1], ids, mask, positions)
        if owner is None:
            owner = torch.zeros(n, dtype=torch.long, device=ids.device)
        start = state.lengths[0].expand(n) if shared else state.lengths[owner]
        positions = start[:, None] + torch.arange(ids.shape[1], device=ids.device)[None, :]
        x = self.embed(ids, torch.ones_like(ids), positions)
        history_mask = state.mask[:1].expand(n, -1) if shared else state.mask[owner]
        bias = self.key_bias(torch.cat([history_mask, mask], dim=1), x.dtype)
        if shared:
            past = [(k[:1].expand(n, -1, -1, -1), v[:1].expand(n, -1, -1, -1)) for k, v in zip(state.keys, state.values)]
        else:
            past = [(k[owner], v[owner]) for k, v in zip(state.keys, state.values)]
        hidden, _, _ = self.encode(x, bias, past)
        return self.score_head(self.mean_pool(hidden, mask))

    def score_shared(self, keys: list[torch.Tensor], values: list[torch.Tensor], history_mask: torch.Tensor,
                     ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, *,
                     check: bool = True) -> torch.Tensor:
        """``(N,)`` scores of candidate rows ``ids``/``mask`` ``(N, Lc)`` that all share ONE history: the
        online case (inference only; no attention dropout).

        ``keys``/``values`` are per layer ``(1, heads, Lh, head_dim)``, ``history_mask`` ``(1, Lh)`` bool with
        at least one real token, ``positions`` ``(N, Lc)``. The same scores as :meth:`score_candidates` with
        the history broadcast, but no candidate gets a copy of the history's keys/values: every candidate
        token's scores against the history are one dense ``(heads, N*Lc, Lh)`` product, its scores against its
        own candidate a small ``(heads, N, Lc, Lc)`` one, and the two share one softmax (see
        :meth:`_shared_layer`). ``check=False`` skips the position range check (a host sync), for export.
        """
        x = self.embed(ids, torch.ones_like(ids), positions, check=check)
        history_bias = self.key_bias(history_mask, x.dtype)  # (1, 1, 1, Lh)
        own_bias = self.key_bias(mask, x.dtype).transpose(0, 1)  # (1, N, 1, Lc)
        for i, layer in enumerate(self.bert.encoder.layer):
            x = self._shared_layer(layer, x, keys[i][0], values[i][0], history_bias, own_bias)
        return self.score_head(self.mean_pool(x, mask))

    def _shared_layer(self, layer: nn.Module, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                      history_bias: torch.Tensor, own_bias: torch.Tensor) -> torch.Tensor:
        """One layer of :meth:`score_shared`: ``x`` ``(N, Lc, H)``, ``past_k``/``past_v`` ``(heads, Lh, d)``.

        Softmax over ``[history keys ; own keys]`` written out (one max, one sum over both parts) so the two
        parts are never concatenated: ``out = (e_hist @ V_hist + e_own @ V_own) / (sum e_hist + sum e_own)``.
        """
        attn = layer.attention.self
        n, length, _ = x.shape
        heads, dim = self.n_heads, self.head_dim

        def split(t: torch.Tensor) -> torch.Tensor:  # (N, Lc, H) -> (heads, N, Lc, d)
            return t.view(n, length, heads, dim).permute(2, 0, 1, 3)

        q = split(attn.query(x)) * (dim ** -0.5)
        k, v = split(attn.key(x)), split(attn.value(x))
        s_hist = torch.matmul(q.reshape(heads, n * length, dim), past_k.transpose(1, 2))
        s_hist = s_hist.view(heads, n, length, -1) + history_bias  # (heads, N, Lc, Lh)
        s_own = torch.matmul(q, k.transpose(2, 3)) + own_bias  # (heads, N, Lc, Lc)
        top = torch.maximum(s_hist.amax(-1, keepdim=True), s_own.amax(-1, keepdim=True))
        e_hist, e_own = torch.exp(s_hist - top), torch.exp(s_own - top)
        total = e_hist.sum(-1, keepdim=True) + e_own.sum(-1, keepdim=True)
        out = torch.matmul(e_hist.view(heads, n * length, -1), past_v).view(heads, n, length, dim)
        out = (out + torch.matmul(e_own, v)) / total
        out = out.permute(1, 2, 0, 3).reshape(n, length, self.hidden)
        x = layer.attention.output(out, x)
        return layer.output(layer.intermediate(x), x)

    def score_one_pass(self, batch: OnePassBatch) -> torch.Tensor:
        """``(N,)`` scores of every candidate of ``batch`` (histories run once each)."""
        state = self.encode_history(batch.history_ids, batch.history_mask)
        return self.score_candidates(state, batch.candidate_ids, batch.candidate_mask, batch.owner)

    # ---- one-pass, packed form ------------------------------------------------------------------
    def score_packed(self, packed: PackedSequence) -> torch.Tensor:
        """``(M,)`` scores from one block-masked sequence (the reference for the split form)."""
        x = self.embed(packed.input_ids, packed.token_type_ids, packed.position_ids)
        bias = torch.zeros(packed.allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~packed.allowed, torch.finfo(x.dtype).min)[None, None]
        hidden, _, _ = self.encode(x, bias)
        return self.score_head(packed.pool.to(hidden.dtype) @ hidden[0])

    def forward(self, batch: PairwiseBatch | OnePassBatch | PackedSequence) -> torch.Tensor:
        """Scores of any input form (dispatch on its type)."""
        if isinstance(batch, PairwiseBatch):
            return self.score_pairwise(batch)
        if isinstance(batch, OnePassBatch):
            return self.score_one_pass(batch)
        return self.score_packed(batch)
