"""Reranker training: sampled lists, LoRA/AdaLoRA adapters, merging, early stopping, a learnable task."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data.errors import ConfigError
from ranking.config import RankerConfig, TextConfig, TrainerConfig
from ranking.cross_encoder import CrossEncoderRanker
from ranking.data import reranked_ndcg, sample_lists, validation_lists
from ranking.inputs import one_pass_batch, pairwise_batch
from ranking.testing import colour_task, tiny_catalogue, tiny_encoder, tiny_tokenizer
from ranking.trainer import apply_peft, merge_adapters, target_regex, train_ranker, validate

TEXT = TextConfig(history_tokens=40, history_item_tokens=10, item_tokens=10)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def make_ranker(tokenizer, mode, seed=0, n_items=24):
    table, items = tiny_catalogue(n_items)
    return CrossEncoderRanker.build(table, items, RankerConfig(mode=mode, text=TEXT, head_dropout=0.0),
                                    encoder=tiny_encoder(len(tokenizer), seed=seed), tokenizer=tokenizer, seed=seed)


# ---- sampling -----------------------------------------------------------------------------------
def test_sample_lists_positions_and_negatives():
    rng = np.random.default_rng(0)
    seqs = [np.arange(0, 30), np.arange(30, 40), np.array([50, 51])]
    pools = np.full((3, 20), -1)
    pools[0, :15] = np.arange(60, 75)
    pools[1, :3] = [0, 76, 77]  # item 0 is not user 1's; allowed as a negative
    config = TrainerConfig(positions_per_user=25, min_history=3, n_negatives=4, hard_fraction=0.75)
    lists = sample_lists(seqs, pools, n_items=100, config=config, rng=rng)
    assert set(lists.users.tolist()) == {0, 1}  # user 2 has no position with 3 items before it
    positions = []
    for history, row, user in zip(lists.histories, lists.items, lists.users):
        seq = seqs[user]
        t = history.size
        assert t >= 3 and row[0] == seq[t] and np.array_equal(history, seq[:t])
        negatives = row[1:]
        assert len(set(negatives.tolist())) == 4 and not np.isin(negatives, seq).any()
        if user == 0:
            assert np.isin(negatives, pools[0]).sum() >= 3  # 3 of 4 hard (a uniform one may hit the pool too)
            positions.append(t)
    assert min(positions) < 10 and max(positions) > 25  # early and late positions, not only the last


def test_validation_lists_and_reranked_ndcg_known_answers():
    candidates = np.array([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    lists = validation_lists([np.array([1]), np.array([2]), np.array([3])], candidates, np.array([7, 99, 11]))
    assert len(lists) == 2 and lists.n_users == 3
    assert lists.target_col.tolist() == [2, 0]
    assert lists.retrieval_ndcg == pytest.approx((1 / np.log2(4) + 1.0) / 3)
    perfect = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert reranked_ndcg(perfect, lists.target_col, 3) == pytest.approx(2 / 3)
    tie = np.zeros((2, 3))  # ties rank the target last
    assert reranked_ndcg(tie, lists.target_col, 3) == pytest.approx(2 / np.log2(4) / 3)


# ---- adapters -----------------------------------------------------------------------------------
def test_target_regex_selects_exactly_the_six_projections(tokenizer):
    ranker = make_ranker(tokenizer, "one_pass")
    import re

    pattern = re.compile(target_regex(TrainerConfig().target_modules))
    chosen = sorted(n for n, m in ranker.model.named_modules() if pattern.fullmatch(n))
    layer0 = [n for n in chosen if ".layer.0." in n]
    assert [n.split(".layer.0.")[1] for n in layer0] == sorted([
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense"])
    assert len(chosen) == 6 * 2 and not any("head" in n or "embeddings" in n for n in chosen)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_merged_adapters_score_like_unmerged(tokenizer, method):
    ranker = make_ranker(tokenizer, "one_pass")
    model = ranker.model
    peft_model = apply_peft(model, TrainerConfig(peft=method, lora_r=4, max_steps=50))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn_like(p))  # adapters and head away from their (no-op) init
    rng = np.random.default_rng(0)
    history = np.r_[2, rng.integers(5, 30, 12), 3]
    candidates = [np.r_[rng.integers(5, 30, n), 3] for n in (3, 5, 4)]
    pairs = pairwise_batch([history] * 3, candidates, pad=0)
    model.eval()
    with torch.no_grad():
        unmerged = (model.score_one_pass(one_pass_batch([history], [candidates], 0)), model.score_pairwise(pairs))
        head = next(p for n, p in peft_model.named_parameters() if "modules_to_save" in n).clone()
    merged = merge_adapters(peft_model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        after = (merged.score_one_pass(one_pass_batch([history], [candidates], 0)), merged.score_pairwise(pairs))
    for a, b in zip(unmerged, after):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()  # float re-association only
    assert any(torch.equal(p, head) for p in merged.head.parameters())  # the trained head, not the original
    assert unmerged[0].std() > 0


# ---- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["one_pass", "pairwise"])
def test_training_learns_a_learnable_task_and_the_merged_ranker_keeps_the_best_score(tokenizer, mode):
    seqs, pools, validation = colour_task()
    ranker = make_ranker(tokenizer, mode)
    before = validate(ranker, ranker.model, validation, torch.device("cpu"))
    config = TrainerConfig(max_steps=75, eval_every=25, patience=3, batch_size=8, n_negatives=5, lora_r=8,
                           learning_rate=5e-3, head_learning_rate=1e-2, warmup_steps=5, hard_pool=14,
                           positions_per_user=3, min_history=2, progress=False, threads=1)
    trained, record = train_ranker(ranker, seqs, pools, validation, config)
    assert record.retrieval_metric == pytest.approx(1 / np.log2(5))
    assert record.best_metric > max(before, record.retrieval_metric) + 0.1
    assert record.best_step in {h["step"] for h in record.history} and record.steps <= 75
    # the merged ranker (no peft) scores exactly like the best adapters did
    assert not any("lora_" in n for n, _ in trained.model.named_parameters())
    again = validate(trained, trained.model, validation, torch.device("cpu"))
    assert again == pytest.approx(record.best_metric, abs=1e-9)
    assert trained.meta["training"]["best_step"] == record.best_step


def test_training_is_reproducible_with_a_seed(tokenizer):
    seqs, pools, validation = colour_task()
    config = TrainerConfig(max_steps=6, eval_every=3, batch_size=4, n_negatives=3, hard_pool=14,
                           positions_per_user=2, min_history=2, progress=False, threads=1)
    scores = []
    for _ in range(2):
        trained, _ = train_ranker(make_ranker(tokenizer, "one_pass"), seqs, pools, validation, config)
        scores.append(trained.score([100, 102], [101, 103, 104]))
    np.testing.assert_array_equal(scores[0], scores[1])


def test_trainer_config_validation():
    with pytest.raises(ConfigError, match="peft"):
        TrainerConfig(peft="prefix")
    with pytest.raises(ConfigError, match="hard_fraction"):
        TrainerConfig(hard_fraction=1.5)
    assert TrainerConfig.from_json(TrainerConfig(peft="adalora").to_json()).peft == "adalora"


def test_adalora_trains_through_the_same_interface(tokenizer):
    seqs, pools, validation = colour_task()
    config = TrainerConfig(peft="adalora", max_steps=8, eval_every=4, batch_size=4, n_negatives=3, hard_pool=14,
                           positions_per_user=2, min_history=2, lora_r=4, adalora_target_r=2, progress=False,
                           threads=1)
    trained, record = train_ranker(make_ranker(tokenizer, "one_pass"), seqs, pools, validation, config)
    assert record.peft == "adalora" and record.steps == 8
    assert not any("lora_" in n for n, _ in trained.model.named_parameters())
    assert np.isfinite(trained.score([100, 102], [101, 103])).all()


@pytest.mark.parametrize("objective", ["listwise", "residual"])
def test_fit_on_split_runs_the_protocol_recipe(tokenizer, block_events, objective):
    """Retrieval candidates -> hard negatives and validation lists -> a trained, merged ranker. The residual
    objective's lists come from a prefix ALS fitted without each user's last 2 training events."""
    from data.protocol import leave_one_out
    from ranking.trainer import fit_on_split
    from retrieval.cf import ALSConfig, ALSRetriever

    split = leave_one_out(block_events)
    retriever = ALSRetriever(ALSConfig(factors=4, iterations=3)).fit(split.history("val"), items=split.items)
    words = ("item", *map(str, range(20)), "a", "b", "|")
    tok = tiny_tokenizer(Path(tempfile.mkdtemp()), words)
    ranker = CrossEncoderRanker.build(block_events.items, split.items, RankerConfig(text=TEXT),
                                      encoder=tiny_encoder(len(tok)), tokenizer=tok)
    config = TrainerConfig(max_steps=4, eval_every=2, batch_size=4, n_negatives=3, hard_pool=10, val_candidates=10,
                           positions_per_user=2, min_history=1, progress=False, threads=1, objective=objective,
                           residual_tail=2)
    trained, record = fit_on_split(split, retriever, block_events.items, config=config, ranker=ranker)
    assert record.steps >= 2 and record.history and 0 <= record.retrieval_metric <= 1
    user = int(split.users.ids[0])
    assert trained.history_of(user).size == (split.train.frame["user_id"] == user).sum()
    ids, scores = trained.rank(user, [100, 101, 200, 201])
    assert sorted(ids.tolist()) == [100, 101, 200, 201] and np.all(np.diff(scores) <= 0)
    if objective == "residual":  # the base blend travels with the model
        base = trained.meta["residual_base"]
        assert base["kind"] == "hybrid_blend" and base["report"]["lists"] > 0
    else:
        assert "residual_base" not in trained.meta
