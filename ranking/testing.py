"""Tiny random BERT models, tokenizers and catalogues for fast tests and smoke runs (no pretrained weights).

A word-level WordPiece vocabulary is written to a folder and loaded as a fast BERT tokenizer; the encoder
is a randomly initialised ``BertModel`` of a few layers. Both behave like the real MiniLM for every code
path of :mod:`ranking` at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from data.items import build_item_table
from data.vocab import IdVocab

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: Words the tiny catalogue's titles and genres are made of.
WORDS = ("alpha", "beta", "gamma", "delta", "red", "blue", "green", "story", "night", "day", "return", "of",
         "the", "comedy", "drama", "action", "horror", "romance", "|", ",", ";", "(", ")", "19", "20", "##95",
         "##05", "##99")


def tiny_tokenizer(folder: str | Path, words: Sequence[str] = WORDS) -> Any:
    """A fast BERT tokenizer over ``SPECIAL + words`` (lower-cased), saved in ``folder``."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join([*SPECIAL, *words]) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)


def tiny_encoder(vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
                 max_positions: int = 256) -> Any:
    """A randomly initialised ``BertModel`` (no pooler), seeded."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=max_positions, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False)
    torch.random.set_rng_state(state)
    return model.eval()


def tiny_text_model(folder: str | Path, *, hidden: int = 16, seed: int = 0) -> Path:
    """A folder holding a tiny random ``BertModel`` and its word-level tokenizer: a stand-in for the bundled
    MiniLM wherever a text model is loaded by path (item text embeddings)."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer(folder)
    tiny_encoder(len(tokenizer), hidden=hidden, layers=1, heads=2, seed=seed).save_pretrained(str(folder))
    return folder


def tiny_catalogue(n_items: int = 24, seed: int = 0) -> tuple[pd.DataFrame, IdVocab]:
    """An item table whose titles and genres use :data:`WORDS`, and its vocabulary (ids 100, 101, ...).

    Items with an even index are "red" dramas, odd ones "blue" comedies, so a history of one colour is a
    learnable signal for candidates of the same colour.
    """
    rng = np.random.default_rng(seed)
    names = ("alpha", "beta", "gamma", "delta", "story", "night", "day", "return")
    rows = []
    for i in range(n_items):
        colour, genre = ("red", "Drama") if i % 2 == 0 else ("blue", "Comedy")
        words = " ".join(rng.choice(names, size=1 + i % 3))
        year = 1995 if i % 4 < 2 else 2005
        rows.append({"item_id": 100 + i, "title": f"{colour} {words} ({year})", "genres": genre})
    table = build_item_table(pd.DataFrame(rows))
    return table, IdVocab(table["item_id"].to_numpy(), name="item")


def colour_task(n_users: int = 24, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, Any]:
    """A known-answer reranking task over :func:`tiny_catalogue`'s 24 items: users like one colour (even
    item rows red, odd blue); hard-negative pools mix both colours, and each validation target sits at
    rank 4 of a retrieval list of the other colour. Returns ``(seqs, pools, validation lists)``."""
    from ranking.data import validation_lists

    rng = np.random.default_rng(seed)
    reds, blues = np.arange(0, 24, 2), np.arange(1, 24, 2)
    seqs, pools, val_seqs, val_cands, targets = [], [], [], [], []
    for u in range(n_users):
        mine, other = (reds, blues) if u % 2 == 0 else (blues, reds)
        order = rng.permutation(mine)
        seqs.append(order[:8])
        pools.append(np.r_[rng.permutation(other), order[8:]][:14])
        val_seqs.append(order[:8])
        val_cands.append(np.insert(rng.permutation(other)[:5], 3, order[9]))
        targets.append(order[9])
    return seqs, np.stack(pools), validation_lists(val_seqs, np.stack(val_cands), np.array(targets))
