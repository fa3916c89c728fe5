"""The residual objective: leak-free position lists, the retrieval-only base, batches, and training on offsets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from data.dataset import Interactions
from data.errors import ConfigError, DataValidationError
from ranking.config import RankerConfig, TextConfig, TrainerConfig
from ranking.cross_encoder import CrossEncoderRanker
from ranking.data import validation_lists
from ranking.residual import (
    ResidualBatches,
    ResidualLists,
    base_offsets,
    drop_tail,
    fit_base,
    position_lists,
)
from ranking.testing import tiny_catalogue, tiny_encoder, tiny_tokenizer
from ranking.trainer import train_ranker, validate

TEXT = TextConfig(history_tokens=40, history_item_tokens=10, item_tokens=10)
N_ITEMS = 12


class NextRowRetriever:
    """Scores item ``j`` by ``-j`` (low rows first) plus 100 for the row right after the history's last item."""

    def __init__(self) -> None:
        self.item_factors = np.eye(N_ITEMS, dtype=np.float32)

    def encode_histories(self, histories):
        out = np.tile(-np.arange(N_ITEMS, dtype=np.float32), (len(histories), 1))
        for i, h in enumerate(histories):
            out[i, (int(h[-1]) + 1) % N_ITEMS] += 100.0
        return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_drop_tail_removes_each_users_last_events():
    frame = pd.DataFrame({"user_id": [1, 1, 1, 1, 2, 2, 2], "item_id": [10, 11, 12, 13, 10, 12, 14],
                          "timestamp": [4, 1, 2, 3, 1, 2, 3]})
    kept = drop_tail(Interactions(frame, name="x"), 2).frame
    assert sorted(zip(kept["user_id"], kept["item_id"])) == [(1, 11), (1, 12), (2, 10)]
    with pytest.raises(DataValidationError, match="tail"):
        drop_tail(Interactions(frame, name="x"), 0)


def test_position_lists_known_answers():
    # t=3: history [5, 3, 8] boosts row 9 = the positive -> column 0; row 0 is the user's later event, so
    #      it is not a candidate either.
    # t=4: history ends in 9, boosts row 10; the positive 0 comes next (row order; 3, 5, 8, 9 are the
    #      user's and never candidates) -> column 1.
    # a second user whose positive (row 11) is outside the top 3 gives no list.
    seqs = [np.array([5, 3, 8, 9, 0]), np.array([1, 2, 4, 11])]
    lists = position_lists(NextRowRetriever(), seqs, tail=2, m=3, min_history=3, progress=False)
    assert lists.n_positions == 3 and len(lists) == 2
    np.testing.assert_array_equal(lists.candidates, [[9, 1, 2], [10, 0, 1]])
    np.testing.assert_array_equal(lists.target_col, [0, 1])
    np.testing.assert_array_equal(lists.users, [0, 0])
    np.testing.assert_array_equal(lists.histories[1], [5, 3, 8, 9])
    assert np.all(np.diff(lists.retrieval, axis=1) <= 0)
    assert lists.retrieval[0, 0] == pytest.approx(100 - 9)
    # a depth beyond the catalogue gives every item; the user's other items are there as -inf (never chosen)
    deep = position_lists(NextRowRetriever(), seqs[:1], tail=1, m=50, progress=False)
    assert deep.candidates.shape == (1, N_ITEMS)
    assert np.isneginf(deep.retrieval[0]).sum() == 4 and np.isfinite(deep.retrieval[0, deep.target_col[0]])


def test_base_is_fitted_on_retrieval_and_keeps_its_order():
    rng = np.random.default_rng(0)
    retrieval = np.sort(rng.normal(size=(200, 8)), axis=1)[:, ::-1].copy()
    target = np.minimum(rng.geometric(0.5, size=200) - 1, 7)  # early columns hold the positive more often
    lists = ResidualLists([np.array([0])] * 200, np.tile(np.arange(8), (200, 1)), retrieval, target,
                          np.zeros(200, np.int64), 200)
    base = fit_base(lists)
    assert base.report["weights"]["ce"] == 0.0
    offsets = base_offsets(base, retrieval)
    assert np.all(np.diff(offsets, axis=1) < 0)  # the base ranks like retrieval
    padded = retrieval.copy()
    padded[:, -1] = -np.inf
    assert np.isneginf(base_offsets(base, padded)[:, -1]).all()


def test_residual_batches_cover_every_list_once_per_pass():
    n = 10
    lists = ResidualLists([np.array([i]) for i in range(n)], np.arange(3 * n).reshape(n, 3),
                          np.zeros((n, 3)), np.arange(n) % 3, np.arange(n), n)
    batches = ResidualBatches(lists, np.arange(3 * n, dtype=float).reshape(n, 3), np.random.default_rng(0), 5)
    seen = []
    for _ in range(2):
        histories, items, offsets, cols = batches.next()
        assert items.shape == (5, 3) and offsets.shape == (5, 3) and len(histories) == 5
        np.testing.assert_array_equal(offsets, items)  # offsets travel with their lists
        np.testing.assert_array_equal(cols, items[:, 0] // 3 % 3)
        seen += [int(h[0]) for h in histories]
    assert sorted(seen) == list(range(n)) and batches.drawn == 10
    with pytest.raises(DataValidationError, match="residual_tail"):
        ResidualBatches(lists, np.zeros((n, 3)), np.random.default_rng(0), 11)


def test_trainer_config_objective_validation_and_round_trip():
    with pytest.raises(ConfigError, match="objective"):
        TrainerConfig(objective="pointwise")
    with pytest.raises(ConfigError, match="residual_tail"):
        TrainerConfig(residual_tail=0)
    config = TrainerConfig(objective="residual", residual_tail=7)
    assert TrainerConfig.from_json(config.to_json()) == config


def _colour_lists(n_lists: int, seed: int = 0):
    """Histories of one colour (even rows red, odd blue); 6 candidates in "retrieval" order whose only
    same-colour item, the positive, sits at column 3."""
    rng = np.random.default_rng(seed)
    reds, blues = np.arange(0, 24, 2), np.arange(1, 24, 2)
    histories, cands = [], []
    for i in range(n_lists):
        mine, other = (reds, blues) if i % 2 == 0 else (blues, reds)
        order = rng.permutation(mine)
        histories.append(order[:6])
        cands.append(np.insert(rng.permutation(other)[:5], 3, order[7]))
    return histories, np.stack(cands), np.full(n_lists, 3)


def make_ranker(tokenizer):
    table, items = tiny_catalogue(24)
    return CrossEncoderRanker.build(table, items, RankerConfig(text=TEXT, head_dropout=0.0),
                                    encoder=tiny_encoder(len(tokenizer)), tokenizer=tokenizer)


def test_validation_offsets_are_added_to_the_scores(tokenizer):
    histories, cands, _ = _colour_lists(8)
    val = validation_lists(histories, cands, cands[:, 3])
    ranker = make_ranker(tokenizer)
    val.offsets = -1000.0 * np.tile(np.arange(6, dtype=float), (8, 1))  # overwhelms any score
    assert validate(ranker, ranker.model, val, torch.device("cpu")) == pytest.approx(1 / np.log2(5))
    val.offsets = np.where(np.arange(6) == 3, 1000.0, 0.0)[None].repeat(8, axis=0)
    assert validate(ranker, ranker.model, val, torch.device("cpu")) == pytest.approx(1.0)


def test_residual_training_learns_the_correction_the_offsets_miss(tokenizer):
    """The offsets rank the positive 4th (retrieval prefers the wrong colour a little); the cross-encoder
    learns the colour and the offset-plus-score order puts the positive first."""
    histories, cands, cols = _colour_lists(48)
    offsets = -0.3 * np.tile(np.arange(6, dtype=float), (48, 1))
    lists = ResidualLists(histories, cands, offsets, cols, np.arange(48), 48)
    val_h, val_c, _ = _colour_lists(12, seed=1)
    val = validation_lists(val_h, val_c, val_c[:, 3])
    val.offsets = offsets[:12]
    config = TrainerConfig(objective="residual", max_steps=150, eval_every=30, batch_size=8, lora_r=8,
                           learning_rate=5e-3, head_learning_rate=1e-2, warmup_steps=5, progress=False, threads=1)
    batches = ResidualBatches(lists, offsets, np.random.default_rng(0), config.batch_size)
    seqs = [np.arange(4)] * 2
    trained, record = train_ranker(make_ranker(tokenizer), seqs, np.zeros((2, 1), np.int64), val, config,
                                   residual=batches)
    assert record.retrieval_metric == pytest.approx(1 / np.log2(5))
    assert record.best_metric > record.retrieval_metric + 0.2
    assert record.n_train_lists == batches.drawn > 0
    # the merged ranker plus the same offsets reproduces the kept validation score
    assert validate(trained, trained.model, val, torch.device("cpu")) == pytest.approx(record.best_metric, abs=1e-9)

