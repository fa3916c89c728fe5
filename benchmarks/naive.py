"""The textbook cross-encoder baseline that ``benchmarks.rerank_speed`` measures speedups against.

Per request, with nothing cached: the history's item texts (newest first, ``"; "``-joined) and every
candidate's text are looked up as strings, each ``(history text, item text)`` pair is tokenized by the
Hugging Face tokenizer into ``[CLS] history [SEP] item [SEP]`` padded to ``max_length=128`` (truncating
the longer segment first), and every pair runs through the ranker's own ``BertModel`` with the eager
attention implementation in fp32, 32 pairs per forward pass (the sentence-transformers default). The
pooled state (the ranker's ``pairwise_pooling``) goes through the ranker's head. Scores therefore equal
the ranker's pairwise scores of the same token ids; only the inputs (string tokenization, fixed 128-token
padding, no history reuse) and the execution (eager, fp32, every layer) are the textbook ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from data.errors import ConfigError
from ranking.cross_encoder import CrossEncoderRanker
from ranking.text import item_texts

#: Tokens per pair (padded and truncated to this), as a textbook cross-encoder serves.
MAX_LENGTH = 128
#: Pairs per forward pass.
BATCH_SIZE = 32
#: History items put into the history text, newest first.
HISTORY_ITEMS = 20


def catalogue_texts(item_table: Any, items: Any) -> dict[int, str]:
    """Item id -> the text the ranker was built from (title, year and genres)."""
    return dict(zip((int(i) for i in items.ids), item_texts(item_table, items)))


def history_text(history_item_ids: Sequence[int], item_texts_by_id: Mapping[int, str],
                 max_items: int = HISTORY_ITEMS) -> str:
    """The newest ``max_items`` history items' texts, newest first, joined by ``"; "``."""
    newest = [int(i) for i in list(history_item_ids)[::-1][:max_items]]
    return "; ".join(item_texts_by_id[i] for i in newest if i in item_texts_by_id)


@contextlib.contextmanager
def eager_attention(encoder: torch.nn.Module) -> Iterator[None]:
    """Run ``encoder``'s Hugging Face forward with the eager attention implementation, then restore."""
    config = encoder.config
    previous = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def naive_rank(ranker: CrossEncoderRanker, history_item_ids: Sequence[int], candidate_item_ids: Sequence[int],
               item_texts: Mapping[int, str], *, max_length: int = MAX_LENGTH,
               batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Scores of ``candidate_item_ids`` (in their order) the textbook way; see the module docstring.

    Args:
        ranker: supplies the tokenizer, the ``BertModel`` weights, the pooling and the head.
        history_item_ids: the user's history, oldest first.
        candidate_item_ids: items to score; an id without text scores as ``"item <id>"``.
        item_texts: item id -> text (:func:`catalogue_texts`).
        max_length: tokens per pair after padding/truncation.
        batch_size: pairs per forward pass.
    """
    if ranker.tokenizer is None:
        raise ConfigError("naive_rank: the ranker has no tokenizer; load it with load_tokenizer=True")
    candidates = [int(i) for i in candidate_item_ids]
    if not candidates:
        return np.empty(0, dtype=np.float32)
    history = history_text(history_item_ids, item_texts)
    texts = [item_texts.get(i) or f"item {i}" for i in candidates]
    encoded = ranker.tokenizer([history] * len(texts), texts, padding="max_length", max_length=max_length,
                               truncation=True, return_tensors="pt")
    model = ranker.model
    out = []
    with eager_attention(model.bert), torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            part = slice(start, start + batch_size)
            ids, types, mask = (encoded[k][part] for k in ("input_ids", "token_type_ids", "attention_mask"))
            hidden = model.bert(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
            if model.pairwise_pooling == "cls":
                pooled = hidden[:, 0]
            else:
                pooled = model.mean_pool(hidden, mask.bool() & (types == 1))
            out.append(model.score_head(pooled).float())
    return torch.cat(out).numpy()
