"""The two towers of the two-tower retriever, as torch modules that return embeddings only.

* :class:`ItemTower` maps an item to a vector from its id embedding and its content (genres multi-hot,
  year bucket, a frozen text embedding). The id part is scaled by a learned gate of the item's training
  frequency, so rare items lean on content; a brand-new item has no id row and is embedded from content
  alone. During training the id part is also dropped at random (``id_dropout``), which trains the content
  path to stand on its own.
* :class:`QueryTower` encodes a user's most recent items (right-padded, item rows shifted by one so
  ``0`` is padding) with a small causal transformer (SASRec-like, pre-LayerNorm) and returns a hidden
  state per position; the query vector of a user is the state at their last item. Its input item embeddings are
  the item tower's vectors (weights tied, as in SASRec), passed in as a table, so an item added after
  training can appear in histories too.

The loss lives in :mod:`retrieval.losses`; the training loop in :mod:`retrieval.trainer`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ItemTower(nn.Module):
    """Item id embedding + content features -> item vector.

    Args:
        n_items: items with a learned id embedding (the training catalogue).
        dim: output dimension.
        n_genres: width of the genres multi-hot (0: no genre features).
        n_year_buckets: number of year buckets including 0 = unknown (1: no year features).
        text_dim: width of the frozen text embedding (0: no text features).
        id_dropout: probability, in training, of dropping an item's id part (content only).
    """

    def __init__(self, n_items: int, dim: int, *, n_genres: int, n_year_buckets: int, text_dim: int,
                 id_dropout: float = 0.0) -> None:
        super().__init__()
        self.n_items, self.dim, self.id_dropout = n_items, dim, id_dropout
        self.id_embedding = nn.Embedding(n_items, dim)
        nn.init.normal_(self.id_embedding.weight, std=dim ** -0.5)
        self.genre_proj = nn.Linear(n_genres, dim, bias=False) if n_genres else None
        self.year_embedding = nn.Embedding(max(n_year_buckets, 1), dim)
        nn.init.normal_(self.year_embedding.weight, std=0.02)
        self.text_proj = nn.Linear(text_dim, dim, bias=False) if text_dim else None
        self.content_mlp = nn.Sequential(nn.GELU(), nn.Linear(dim, dim))
        # gate(count) = sigmoid(softplus(slope) * log1p(count) + offset), increasing in the count
        self.gate_slope = nn.Parameter(torch.tensor(1.0))
        self.gate_offset = nn.Parameter(torch.tensor(0.0))

    def content(self, genres: torch.Tensor, year_bucket: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The content-only embedding ``(n, dim)`` of items with the given features."""
        out = self.year_embedding(year_bucket)
        if self.genre_proj is not None:
            out = out + self.genre_proj(genres)
        if self.text_proj is not None:
            out = out + self.text_proj(text)
        return out + self.content_mlp(out)

    def gate(self, counts: torch.Tensor) -> torch.Tensor:
        """Weight in (0, 1) of the id embedding for items seen ``counts`` times in training."""
        return torch.sigmoid(F.softplus(self.gate_slope) * torch.log1p(counts) + self.gate_offset)

    def forward(self, genres: torch.Tensor, year_bucket: torch.Tensor, text: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
        """Vectors ``(n, dim)`` of the first ``n`` item rows (``n`` may exceed ``n_items``: the rows past
        it are new items, embedded from content alone)."""
        content = self.content(genres, year_bucket, text)
        n = content.shape[0]
        known = min(n, self.n_items)
        ids = self.id_embedding.weight[:known] * self.gate(counts[:known]).unsqueeze(-1)
        if self.training and self.id_dropout > 0:
            keep = torch.rand(known, 1, device=ids.device) >= self.id_dropout
            ids = ids * keep
        if known < n:
            ids = torch.cat([ids, ids.new_zeros(n - known, self.dim)])
        return content + ids


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention and a point-wise feed-forward network."""

    def __init__(self, dim: int, n_heads: int, dropout: float, ffn_mult: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = ffn_mult * dim
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.n_heads, d // self.n_heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
        )  # no dropout on the attention weights: it forces the slow unfused kernel on CPU
        x = x + self.drop(self.out(attn.transpose(1, 2).reshape(b, length, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


class QueryTower(nn.Module):
    """Causal transformer over a user's recent items -> one hidden state per position.

    Sequences are RIGHT-padded: with causal attention a real position never sees the padding after it,
    so a user's states do not depend on what else is in the batch. Positions are counted from the end of
    each sequence (the last item is position 0), so training windows and serving agree whatever the length.

    Args:
        dim: hidden size (must equal the item tower's).
        max_len: most recent items read.
        n_blocks: transformer blocks.
        n_heads: attention heads (must divide ``dim``).
        dropout: dropout on embeddings, attention and feed-forward layers.
        ffn_mult: feed-forward hidden size as a multiple of ``dim``.
    """

    def __init__(self, dim: int, *, max_len: int = 200, n_blocks: int = 2, n_heads: int = 1,
                 dropout: float = 0.2, ffn_mult: int = 1) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self.dim, self.max_len = dim, max_len
        self.position = nn.Embedding(max_len, dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.input_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, n_heads, dropout, ffn_mult) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(dim)

    def forward(self, seq: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(b, L, dim)`` (rows at padding positions are meaningless).

        Args:
            seq: ``(b, L)`` item rows + 1, right-padded with 0 (``L <= max_len``).
            item_table: ``(n_items + 1, dim)`` input embeddings, row 0 the padding (ignored).
        """
        length = seq.shape[1]
        lengths = (seq != 0).sum(1, keepdim=True)
        steps = torch.arange(length, device=seq.device).unsqueeze(0)
        positions = (lengths - 1 - steps).clamp(min=0)
        x = item_table[seq] * math.sqrt(self.dim) + self.position(positions)
        x = self.input_drop(x).masked_fill((seq == 0).unsqueeze(-1), 0.0)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def encode(self, seq: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
        """The query vectors ``(b, dim)``: the hidden state at each sequence's last item."""
        last = ((seq != 0).sum(1) - 1).clamp(min=0)
        return self.forward(seq, item_table)[torch.arange(seq.shape[0], device=seq.device), last]


__all__ = ["ItemTower", "QueryTower"]
