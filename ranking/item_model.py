"""The item-token cross-encoder: one input vector per item, a BERT-family encoder, a scoring head.

Where the title cross-encoder (:mod:`ranking.encoder`) spends ~16 word tokens on each of a user's last ~6
titles, this model spends one token on each of the last ``max_history`` (100) items, so it reads the
whole recent history, with the item's learned id embedding alongside its content.

* :class:`ItemInputs` turns item rows into input vectors: a learned id embedding (initialised from the
  retriever's item vectors; zero for items added later, which have no id history), plus projections of
  the frozen MiniLM text embedding, the genres multi-hot and a year-bucket embedding.
* :class:`ItemTokenModel` runs those through a Hugging Face ``BertModel``'s own submodules (its embedding
  block adds positions, token types, LayerNorm; then every layer's ``query``/``key``/``value``,
  ``attention.output``, ``intermediate``, ``output``), so peft's LoRA adapters injected into those
  ``nn.Linear`` layers take part, exactly as in :mod:`ranking.encoder`. The encoder is either a narrow
  BERT trained from scratch or the bundled MiniLM's first layers (:func:`build_encoder`).

The forward is split in two, as serving needs it. :meth:`ItemTokenModel.encode_history` runs the history
tokens alone (they attend to the history) and keeps every layer's keys and values plus the mean final
state (:class:`ItemHistoryState`, cached per user by the ranker). :meth:`ItemTokenModel.score` then runs
the candidate tokens: each attends to its own list's history keys/values and to itself only (one softmax
over both), so a candidate's score never depends on the other candidates or their order, and a list of M
candidates costs one pass. The head reads the candidate's final state (an MLP) plus two bilinear terms:
the final state and the mean history state against the candidate's own input token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.errors import ConfigError
from ranking.item_config import ItemTokenConfig

#: Layer orders: BERT's own post-LN (pretrained MiniLM layers need it) or pre-LN (same modules, reordered).
NORMS = ("post", "pre")
#: Token types of the encoder's embedding block.
HISTORY_TYPE, CANDIDATE_TYPE = 0, 1


def build_encoder(config: ItemTokenConfig) -> nn.Module:
    """The BERT encoder of ``config``: narrow and randomly initialised, or the first ``config.layers``
    layers of the pretrained ``config.base_model``. Its word embeddings are cut to one row (tokens are
    items, not words); positions cover ``max_history`` recency slots plus the candidate slot."""
    from transformers import BertConfig, BertModel

    if config.encoder == "narrow":
        hf = BertConfig(vocab_size=1, hidden_size=config.hidden, num_hidden_layers=config.layers,
                        num_attention_heads=config.heads, intermediate_size=config.ffn,
                        hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout,
                        max_position_embeddings=config.max_history + 1, type_vocab_size=2)
        bert = BertModel(hf, add_pooling_layer=False)
        return bert
    from ranking.encoder import resolve_base_model

    bert = BertModel.from_pretrained(resolve_base_model(config.base_model), add_pooling_layer=False)
    if bert.config.model_type != "bert":
        raise ConfigError(f"ItemTokenConfig.base_model must be a BERT model, got {bert.config.model_type!r}")
    if config.layers > len(bert.encoder.layer):
        raise ConfigError(f"ItemTokenConfig.layers={config.layers} but {config.base_model} has "
                          f"{len(bert.encoder.layer)} layers; lower layers")
    if config.max_history + 1 > bert.config.max_position_embeddings:
        raise ConfigError(f"ItemTokenConfig.max_history={config.max_history} needs {config.max_history + 1} "
                          f"positions; {config.base_model} has {bert.config.max_position_embeddings}")
    bert.encoder.layer = bert.encoder.layer[:config.layers]
    bert.config.num_hidden_layers = config.layers
    if bert.config.type_vocab_size < 2:
        raise ConfigError(f"{config.base_model} has {bert.config.type_vocab_size} token type(s); need 2")
    return _one_word(bert)


def encoder_from_dict(values: dict[str, Any]) -> nn.Module:
    """A randomly initialised encoder of a saved config dict (weights are loaded after)."""
    from transformers import BertConfig, BertModel

    values = {k: v for k, v in values.items() if k != "model_type"}
    return _one_word(BertModel(BertConfig(**values), add_pooling_layer=False))


def _one_word(bert: nn.Module) -> nn.Module:
    if bert.embeddings.word_embeddings.num_embeddings != 1:
        bert.embeddings.word_embeddings = nn.Embedding(1, bert.config.hidden_size)
        bert.config.vocab_size = 1
    return bert


def id_init(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Initial id embeddings ``(n, dim)`` from a retriever's item vectors ``(n, d)``: centred, reduced to
    ``dim`` by PCA (or zero-padded) and scaled to unit RMS per coordinate."""
    vectors = np.asarray(vectors, dtype=np.float64)
    centred = vectors - vectors.mean(axis=0)
    if vectors.shape[1] > dim:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        centred = centred @ vt[:dim].T
    elif vectors.shape[1] < dim:
        centred = np.pad(centred, ((0, 0), (0, dim - vectors.shape[1])))
    scale = float(np.sqrt(np.mean(centred ** 2))) or 1.0
    return (centred / scale).astype(np.float32)


@dataclass
class ItemFeatureTable:
    """Content of every item row: what :class:`ItemInputs` reads besides the id.

    Attributes:
        text: float32 ``(n, text_dim)`` L2-normalised MiniLM embeddings of ``"title | genres"`` (``text_dim``
            0 when text is off).
        genres: float32 ``(n, n_genres)`` multi-hot.
        year_bucket: int64 ``(n,)`` (0 = unknown year).
        genre_names: the genre vocabulary (column order of ``genres``).
    """

    text: np.ndarray
    genres: np.ndarray
    year_bucket: np.ndarray
    genre_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.year_bucket.shape[0])


class ItemInputs(nn.Module):
    """Item rows -> input vectors ``(..., hidden)``; see the module docstring.

    Args:
        features: the catalogue's content.
        n_id_items: items with a learned id embedding (rows ``0 .. n_id_items - 1``); rows past it (items
            added later) are placed by content alone.
        config: which parts are on, ``id_dim``, ``id_dropout``.
        hidden: the encoder width.
        n_year_buckets: size of the year-bucket vocabulary.
    """

    def __init__(self, features: ItemFeatureTable, n_id_items: int, config: ItemTokenConfig, hidden: int,
                 n_year_buckets: int) -> None:
        super().__init__()
        self.use_ids, self.use_text = config.use_ids, config.use_text
        self.use_genres, self.use_year = config.use_genres, config.use_year
        self.id_dropout = config.id_dropout
        self.n_id_items = int(n_id_items)
        self.register_buffer("text", torch.as_tensor(features.text, dtype=torch.float32))
        self.register_buffer("genres", torch.as_tensor(features.genres, dtype=torch.float32))
        self.register_buffer("year_bucket", torch.as_tensor(features.year_bucket, dtype=torch.long))
        self.ids = nn.Embedding(max(self.n_id_items, 1), config.id_dim)
        nn.init.normal_(self.ids.weight, std=0.02)
        self.id_proj = nn.Linear(config.id_dim, hidden)
        self.text_proj = nn.Linear(max(features.text.shape[1], 1), hidden)
        self.genre_proj = nn.Linear(max(features.genres.shape[1], 1), hidden, bias=False)
        self.year = nn.Embedding(max(n_year_buckets, 1), hidden)
        nn.init.normal_(self.year.weight, std=0.02)

    @property
    def n_items(self) -> int:
        return int(self.year_bucket.shape[0])

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.clamp(min=0)
        out = torch.zeros(*rows.shape, self.year.embedding_dim, device=rows.device, dtype=self.year.weight.dtype)
        if self.use_ids and self.n_id_items:
            has_id = rows < self.n_id_items
            if self.training and self.id_dropout > 0:
                has_id = has_id & (torch.rand(rows.shape, device=rows.device) >= self.id_dropout)
            ids = self.id_proj(self.ids(rows.clamp(max=self.n_id_items - 1)))
            out = out + ids * has_id.unsqueeze(-1).to(ids.dtype)
        if self.use_text and self.text.shape[1]:
            out = out + self.text_proj(self.text[rows])
        if self.use_genres and self.genres.shape[1]:
            out = out + self.genre_proj(self.genres[rows])
        if self.use_year:
            out = out + self.year(self.year_bucket[rows])
        return out


@dataclass
class ItemHistoryState:
    """A batch of histories after the encoder: what every candidate of those lists attends to.

    Attributes:
        keys: per layer ``(B, heads, Lh, head_dim)``.
        values: per layer ``(B, heads, Lh, head_dim)``.
        mask: ``(B, Lh)`` bool, True on real history items.
        summary: ``(B, hidden)`` the mean final state of the real history items (0 for an empty history).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    summary: torch.Tensor

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    def select(self, index: torch.Tensor) -> ItemHistoryState:
        return ItemHistoryState([k[index] for k in self.keys], [v[index] for v in self.values], self.mask[index],
                                self.summary[index])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, self.summary))


class ItemTokenModel(nn.Module):
    """Item inputs + BERT encoder + head; see the module docstring.

    Args:
        inputs: the item input vectors.
        encoder: a Hugging Face ``BertModel`` (from :func:`build_encoder`).
        max_history: history items read (recency positions ``0 .. max_history - 1``; candidates use slot
            ``max_history``).
        head_hidden: hidden width of the head's MLP.
    """

    def __init__(self, inputs: ItemInputs, encoder: nn.Module, max_history: int, head_hidden: int,
                 norm: str = "post") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"norm must be one of {list(NORMS)}, got {norm!r}")
        self.norm = norm
        self.items = inputs
        self.bert = encoder
        config = encoder.config
        self.hidden = int(config.hidden_size)
        self.n_heads = int(config.num_attention_heads)
        self.head_dim = self.hidden // self.n_heads
        self.max_history = int(max_history)
        self.attention_dropout = float(config.attention_probs_dropout_prob)
        if self.max_history + 1 > int(config.max_position_embeddings):
            raise ConfigError(f"max_history={max_history} needs {max_history + 1} positions; the encoder has "
                              f"{config.max_position_embeddings}")
        if norm == "pre":  # pre-LN stacks end with a LayerNorm of their own
            self.final_norm = nn.LayerNorm(self.hidden, eps=float(getattr(config, "layer_norm_eps", 1e-12)))
        self.head = nn.Sequential(nn.Linear(self.hidden, head_hidden), nn.GELU(), nn.Linear(head_hidden, 1))
        self.state_bilinear = nn.Linear(self.hidden, self.hidden, bias=False)
        self.history_bilinear = nn.Linear(self.hidden, self.hidden, bias=False)
        for layer in (self.state_bilinear, self.history_bilinear):
            nn.init.normal_(layer.weight, std=0.02)

    # ---- embedding ------------------------------------------------------------------------------
    def embed(self, rows: torch.Tensor, positions: torch.Tensor, token_type: int) -> torch.Tensor:
        """Item vectors + position + token type, LayerNorm and dropout (BertEmbeddings' order)."""
        emb = self.bert.embeddings
        x = self.items(rows) + emb.position_embeddings(positions)
        x = x + emb.token_type_embeddings(torch.full_like(rows, token_type).clamp(min=0))
        return emb.dropout(emb.LayerNorm(x))

    def _qkv(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``(B, heads, L, d)`` of ``x`` (pre-LN: of its LayerNorm)."""
        attn = layer.attention.self
        if self.norm == "pre":
            x = layer.attention.output.LayerNorm(x)
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

        return split(attn.query(x)), split(attn.key(x)), split(attn.value(x))

    def _finish(self, layer: nn.Module, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The rest of a layer after attention: BERT's post-LN order (``LN(x + attn)``, ``LN(h + ffn)``),
        or pre-LN (``x + attn(LN x)``, ``h + ffn(LN h)``) with the same modules."""
        b, n = x.shape[:2]
        out = attended.transpose(1, 2).reshape(b, n, self.hidden)
        if self.norm == "post":
            x = layer.attention.output(out, x)
            return layer.output(layer.intermediate(x), x)
        x = x + layer.attention.output.dropout(layer.attention.output.dense(out))
        h = layer.intermediate(layer.output.LayerNorm(x))
        return x + layer.output.dropout(layer.output.dense(h))

    def _last(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(x) if self.norm == "pre" else x

    # ---- history --------------------------------------------------------------------------------
    def encode_history(self, rows: torch.Tensor, mask: torch.Tensor) -> ItemHistoryState:
        """History item rows ``(B, Lh)``, most recent first (``mask`` False on padding) -> their state."""
        b, length = rows.shape
        if length > self.max_history:
            raise ConfigError(f"history of {length} items; this model reads at most {self.max_history}")
        if length == 0:
            empty = rows.new_zeros((b, self.n_heads, 0, self.head_dim), dtype=self.bert.embeddings.LayerNorm.weight.dtype)
            layers = len(self.bert.encoder.layer)
            return ItemHistoryState([empty] * layers, [empty] * layers, mask,
                                    empty.new_zeros((b, self.hidden)))
        positions = torch.arange(length, device=rows.device).expand(b, -1)
        x = self.embed(rows, positions, HISTORY_TYPE)
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~mask, torch.finfo(x.dtype).min)[:, None, None, :]
        keys, values = [], []
        dropout = self.attention_dropout if self.training else 0.0
        for layer in self.bert.encoder.layer:
            q, k, v = self._qkv(layer, x)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
            x = self._finish(layer, attended, x)
            keys.append(k)
            values.append(v)
        x = self._last(x)
        weights = mask.to(x.dtype).unsqueeze(-1)
        summary = (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return ItemHistoryState(keys, values, mask, summary)

    # ---- candidates -----------------------------------------------------------------------------
    def score(self, state: ItemHistoryState, rows: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` scores of candidate rows ``(B, C)`` against history ``b`` of ``state`` (``B`` equal to
        ``state.batch``, or ``state.batch == 1``: every row shares that history). Padding rows may hold any
        valid item row; their scores are ignored by the caller."""
        b = rows.shape[0]
        if state.batch not in (1, b):
            raise ConfigError(f"score: {b} candidate rows for {state.batch} histories")
        positions = torch.full_like(rows, self.max_history)
        x = self.embed(rows, positions, CANDIDATE_TYPE)
        token = x
        hist_bias = torch.zeros(state.mask.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~state.mask, torch.finfo(x.dtype).min)[:, None, None, :]  # (Bh, 1, 1, Lh)
        scale = self.head_dim ** -0.5
        dropout = self.attention_dropout if self.training else 0.0
        for i, layer in enumerate(self.bert.encoder.layer):
            q, k, v = self._qkv(layer, x)  # (B, heads, C, d)
            past_k, past_v = state.keys[i], state.values[i]  # (Bh, heads, Lh, d)
            s_hist = torch.matmul(q, past_k.transpose(-1, -2)) * scale + hist_bias  # (B, heads, C, Lh)
            s_self = (q * k).sum(-1, keepdim=True) * scale  # (B, heads, C, 1)
            probs = torch.softmax(torch.cat([s_hist, s_self], dim=-1), dim=-1)
            if dropout:
                probs = F.dropout(probs, dropout)
            lh = past_k.shape[2]
            attended = torch.matmul(probs[..., :lh], past_v) + probs[..., lh:] * v
            x = self._finish(layer, attended, x)
        x = self._last(x)
        summary = state.summary[:, None, :]  # (Bh, 1, H)
        mlp = self.head(x).squeeze(-1)
        bilinear = (self.state_bilinear(x) * token).sum(-1)
        from_history = (self.history_bilinear(summary) * token).sum(-1)
        return mlp + bilinear + from_history

    def forward(self, history_rows: torch.Tensor, history_mask: torch.Tensor,
                candidate_rows: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` scores of ``B`` lists: histories ``(B, Lh)`` (most recent first) and candidates
        ``(B, C)``."""
        return self.score(self.encode_history(history_rows, history_mask), candidate_rows)


def history_tensor(histories: list[np.ndarray], max_history: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, mask)`` ``(B, L)``: each history's last ``max_history`` item rows, most recent first,
    right-padded (``L`` the longest kept)."""
    kept = [np.asarray(h, dtype=np.int64)[-max_history:][::-1] for h in histories]
    width = max((h.size for h in kept), default=0)
    rows = np.zeros((len(kept), width), dtype=np.int64)
    mask = np.zeros((len(kept), width), dtype=bool)
    for i, h in enumerate(kept):
        rows[i, :h.size] = h
        mask[i, :h.size] = True
    return torch.from_numpy(rows), torch.from_numpy(mask)


__all__ = ["CANDIDATE_TYPE", "HISTORY_TYPE", "ItemFeatureTable", "ItemHistoryState", "ItemInputs",
           "ItemTokenModel", "build_encoder", "encoder_from_dict", "history_tensor", "id_init"]
