"""The retrieval contract, once, as a mixin; one small subclass per implementation: every registered
retriever (popularity, ALS, BPR, the two-tower and the hybrid) passes all of it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.errors import ArtifactError, DataValidationError, NotFittedError
from retrieval.cf import ALSConfig, ALSRetriever, BPRConfig, BPRRetriever
from retrieval.covisit import CovisitConfig
from retrieval.covisit_retriever import CovisitRetriever
from retrieval.hybrid import HybridConfig, HybridRetriever
from retrieval.index import IndexConfig
from retrieval.popularity import PopularityRetriever
from retrieval.registry import load_retriever, make_retriever
from retrieval.two_tower import TwoTowerConfig, TwoTowerRetriever


class RetrieverContract:
    """Subclasses set ``make()`` returning an unfitted retriever; the block data has known answers."""

    learns_taste = True
    #: how much more an in-block item must score once its block-mates join the history; ``None``: the
    #: scores are fused ranks (the hybrid), so the item's rank must improve instead
    score_margin: float | None = 0.1
    #: the query of a stored history is the user's own query (popularity ignores the user; the two-tower
    #: reads the history with the same tower), so ``retrieve_history`` must equal ``retrieve`` exactly
    exact_history_query = False
    #: served from a FAISS index (``reindex`` swaps it); ``False``: exact scoring with no index to swap
    vector_index = True

    def make(self):
        raise NotImplementedError

    @pytest.fixture
    def fitted(self, block_events):
        return self.make().fit(block_events)

    def test_scalar_gives_1d_and_array_gives_2d(self, fitted):
        ids, scores = fitted.retrieve(1, 3)
        assert ids.shape == scores.shape == (3,)
        ids2, scores2 = fitted.retrieve([1, 2], 3)
        assert ids2.shape == scores2.shape == (2, 3)
        assert ids2.dtype == np.int64 and scores2.dtype == np.float32

    def test_batch_equals_single(self, fitted):
        batch_ids, batch_scores = fitted.retrieve(np.array([1, 25, 7]), 5)
        for row, user in enumerate([1, 25, 7]):
            ids, scores = fitted.retrieve(user, 5)
            np.testing.assert_array_equal(ids, batch_ids[row])
            np.testing.assert_allclose(scores, batch_scores[row], rtol=1e-5)

    def test_scores_sorted_descending(self, fitted):
        _, scores = fitted.retrieve([1, 30], 10)
        assert (np.diff(scores, axis=1) <= 1e-6).all()

    def test_seen_items_are_excluded_without_losing_k(self, fitted, block_events):
        seen = set(block_events.frame.query("user_id == 1")["item_id"])
        ids, _ = fitted.retrieve(1, 10)
        assert not seen & set(ids.tolist())
        assert (ids != -1).sum() == 10  # 20 items, 6 seen: 14 eligible, so 10 real results
        ids_all, _ = fitted.retrieve(1, 10, exclude_seen=False)
        assert seen & set(ids_all.tolist())

    def test_known_answer_in_block(self, fitted):
        if not self.learns_taste:
            pytest.skip("popularity has no taste")
        ids, _ = fitted.retrieve(1, 4)  # user 1 (block 100) must get its unseen block items first
        assert all(100 <= i < 110 for i in ids), ids
        ids, _ = fitted.retrieve(30, 4)
        assert all(200 <= i < 210 for i in ids), ids

    def test_unknown_user_gets_popularity_fallback(self, fitted):
        ids, scores = fitted.retrieve(424242, 2)
        assert set(ids.tolist()) == {100, 200} and scores[0] == scores[1] == 20  # the two most popular items
        mixed, _ = fitted.retrieve([1, 424242], 2)
        np.testing.assert_array_equal(mixed[1], ids)

    def test_padding_when_k_exceeds_catalogue(self, fitted):
        ids, scores = fitted.retrieve(1, 30)
        assert (ids[:14] != -1).all() and (ids[14:] == -1).all()
        assert np.isneginf(scores[14:]).all() and np.isfinite(scores[:14]).all()
        cold_ids, _ = fitted.retrieve(424242, 30)
        assert (cold_ids[:20] != -1).all() and (cold_ids[20:] == -1).all()

    def test_allow_and_deny_lists(self, fitted):
        ids, _ = fitted.retrieve(1, 3, allow=[205, 206, 107, 108])
        assert set(ids.tolist()) <= {205, 206, 107, 108} and (ids != -1).all()
        # user 1 saw 101 and 102: an allow list of seen items leaves padding, never a seen item
        ids, _ = fitted.retrieve(1, 3, allow=[101, 102, 207])
        assert ids.tolist()[0] == 207 and ids.tolist()[1:] == [-1, -1]
        denied, _ = fitted.retrieve(1, 5, deny=[101, 102, 103])
        assert not {101, 102, 103} & set(denied.tolist())

    def test_bad_arguments_raise_clear_errors(self, fitted):
        with pytest.raises(DataValidationError, match="k must be"):
            fitted.retrieve(1, 0)
        with pytest.raises(DataValidationError, match="user_ids"):
            fitted.retrieve("alice", 3)
        with pytest.raises(NotFittedError):
            self.make().retrieve(1, 3)

    def test_save_load_gives_identical_results(self, fitted, tmp_path):
        fitted.save(tmp_path / "m")
        loaded = load_retriever(tmp_path / "m")
        users = np.array([1, 5, 25, 424242])
        a_ids, a_scores = fitted.retrieve(users, 8)
        b_ids, b_scores = loaded.retrieve(users, 8)
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_array_equal(a_scores, b_scores)
        assert loaded.history_fingerprint == fitted.history_fingerprint
        assert loaded.config == fitted.config

    def test_corrupted_or_mismatched_artifact_refuses_to_load(self, fitted, tmp_path):
        folder = fitted.save(tmp_path / "m")
        tensors = min(folder.rglob("tensors.safetensors"))  # a composite keeps them per component
        data = bytearray(tensors.read_bytes())
        data[-5] ^= 0xFF
        tensors.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="checksum"):
            load_retriever(folder)
        folder = fitted.save(tmp_path / "m2")
        path = next(p for p in sorted(folder.rglob("manifest.json")) if "items" in json.loads(p.read_text()))
        manifest = json.loads(path.read_text())
        manifest["items"]["ids"] = manifest["items"]["ids"][::-1]
        manifest["items"].pop("fingerprint")
        path.write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError):
            load_retriever(folder)

    def test_set_history_updates_the_mask(self, fitted, block_events):
        frame = block_events.frame
        extra = frame.iloc[:1].assign(item_id=109, timestamp=10_000)
        ids_before, _ = fitted.retrieve(1, 14)
        assert 109 in ids_before
        fitted.set_history(block_events.with_frame(frame._append(extra) if hasattr(frame, "_append")
                                                   else __import__("pandas").concat([frame, extra])))
        ids_after, _ = fitted.retrieve(1, 14)
        assert 109 not in ids_after

    def test_hnsw_index_gives_the_same_contract(self, fitted):
        if not self.vector_index:
            pytest.skip("no vector index: scoring is exact")
        _, exact_scores = fitted.retrieve([1, 30], 5)
        fitted.reindex(IndexConfig(factory="HNSW32", search_params="efSearch=64"))
        ann_ids, ann_scores = fitted.retrieve([1, 30], 5)
        assert ann_ids.shape == (2, 5) and (ann_ids != -1).all()
        # 20 items: HNSW finds the exact top scores (compared by score: popularity has ties)
        np.testing.assert_allclose(ann_scores, exact_scores, rtol=1e-5)

    # ---- explicit histories (retrieve_history, stored_history, popular_items) ----------------------------
    def test_stored_history_is_the_users_events_oldest_first(self, fitted, block_events, tmp_path):
        frame = block_events.frame.sort_values("timestamp")
        for user in (1, 30):
            expected = frame.loc[frame["user_id"] == user, "item_id"].tolist()
            assert fitted.stored_history(user).tolist() == expected
        assert fitted.stored_history(424242).size == 0
        loaded = load_retriever(fitted.save(tmp_path / "m"))  # the order survives save/load
        assert loaded.stored_history(1).tolist() == fitted.stored_history(1).tolist()

    def test_own_history_gives_the_users_answer(self, fitted):
        """Popularity ignores the user, so its history answer equals retrieve exactly. CF folds the history
        in (ALS: exact solve, BPR: mean factor), whose vector differs a little from the trained one, so the
        invariant is the known answer: first come the user's unseen in-block items, the set retrieve gives."""
        for user in (1, 5, 30):
            history = fitted.stored_history(user)
            ids, scores = fitted.retrieve_history(history, 6)
            want_ids, want_scores = fitted.retrieve(user, 6)
            if not self.learns_taste or self.exact_history_query:
                np.testing.assert_array_equal(ids, want_ids)
                np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
                continue
            block = 100 if user <= 20 else 200
            unseen = set(range(block, block + 10)) - set(history.tolist())  # 4 (5 for user 30)
            assert set(ids[:len(unseen)].tolist()) == unseen
            if user != 5:  # retrieve's own known answer holds for users 1 and 30 (BPR's user 5 misses one)
                assert set(want_ids[:len(unseen)].tolist()) == unseen

    def test_the_history_not_the_stored_user_decides(self, fitted):
        history = fitted.stored_history(1)
        before, _ = fitted.retrieve_history(history, 6)
        appended = int(before[4])
        after, _ = fitted.retrieve_history(np.r_[history, appended], 6)
        assert appended not in after and not np.array_equal(before, after)
        if not self.learns_taste:
            return
        # items of block 200 in the history raise the score of their unseen block-mates
        if self.score_margin is None:
            def block_200_on_top(ids):
                return sum(200 <= i < 210 for i in ids[:5].tolist())

            alone, _ = fitted.retrieve_history(history, 20)
            mixed, _ = fitted.retrieve_history(np.r_[history, 200:206], 20)
            assert block_200_on_top(mixed) > block_200_on_top(alone)
        else:
            _, alone = fitted.retrieve_history(history, 1, allow=[206])
            _, mixed = fitted.retrieve_history(np.r_[history, 200:206], 1, allow=[206])
            assert mixed[0] > alone[0] + self.score_margin
        # a history of block-200 items only (no user has it) gets block-200 items first
        ids, _ = fitted.retrieve_history([200, 201, 202], 3)
        assert all(200 <= i < 210 for i in ids), ids

    def test_empty_or_unknown_history_gets_popular_items_with_1d_padding(self, fitted):
        popular, popular_scores = fitted.popular_items(25)
        assert popular.shape == popular_scores.shape == (25,)
        for history in ([], np.array([], dtype=np.int64), [10**9], None):
            ids, scores = fitted.retrieve_history(history, 25)
            np.testing.assert_array_equal(ids, popular)
            np.testing.assert_array_equal(scores, popular_scores)
        np.testing.assert_array_equal(popular, fitted.retrieve(424242, 25)[0])
        assert (popular[:20] != -1).all() and (popular[20:] == -1).all() and np.isneginf(popular_scores[20:]).all()
        assert 100 not in fitted.popular_items(3, exclude=[100, 10**9])[0]
        ids, scores = fitted.retrieve_history(fitted.stored_history(1), 30)  # 20 items, 6 in the history
        assert ids.shape == scores.shape == (30,) and ids.dtype == np.int64 and scores.dtype == np.float32
        assert (ids[:14] != -1).all() and (ids[14:] == -1).all() and np.isneginf(scores[14:]).all()
        kept, _ = fitted.retrieve_history(fitted.stored_history(1), 30, exclude_seen=False)
        assert (kept[:20] != -1).all() and set(fitted.stored_history(1).tolist()) <= set(kept.tolist())
        denied, _ = fitted.retrieve_history([100], 5, deny=[200])
        assert not {100, 200} & set(denied.tolist())
        with pytest.raises(DataValidationError, match="1-D"):
            fitted.retrieve_history([[100, 101]], 3)
        with pytest.raises(DataValidationError, match="k must be"):
            fitted.retrieve_history([100], 0)
        with pytest.raises(NotFittedError):
            self.make().retrieve_history([100], 3)


class TestPopularity(RetrieverContract):
    learns_taste = False

    def make(self):
        return PopularityRetriever()


class TestALS(RetrieverContract):
    def make(self):
        return ALSRetriever(ALSConfig(factors=2, iterations=15, regularization=0.1, alpha=5.0))  # true rank 2

    def test_fold_in_solves_the_als_normal_equations(self, fitted):
        """The folded-in vector u of history H is the ALS user solve (implicit gives an event confidence
        alpha): (YᵀY + λI + (alpha-1) Σ_H y yᵀ) u = alpha Σ_H y; a repeated item counts once."""
        c = fitted.config
        rows = fitted.items.rows([100, 101, 205, 101])
        u = fitted.history_query(rows)
        y = fitted.item_factors.astype(np.float64)
        h = y[np.unique(rows)]
        a = y.T @ y + c.regularization * np.eye(y.shape[1]) + (c.alpha - 1) * h.T @ h
        np.testing.assert_allclose(u, np.linalg.solve(a, c.alpha * h.sum(axis=0)), rtol=1e-4, atol=1e-5)
        _, scores = fitted.retrieve_history([100, 101, 205, 101], 19, exclude_seen=False)
        np.testing.assert_allclose(np.sort(y @ u)[::-1][:19], scores, rtol=1e-4, atol=1e-5)


class TestBPR(RetrieverContract):
    def make(self):
        return BPRRetriever(BPRConfig(factors=2, iterations=300, learning_rate=0.05, regularization=0.01))


class TestCovisit(RetrieverContract):
    """Co-visitation reads sequences: a window of 5 events and the 6 most recent items cover a block user's
    whole history (6 events), so every unseen block-mate is pointed at by some recent item."""

    exact_history_query = True
    vector_index = False

    def make(self):
        return CovisitRetriever(CovisitConfig(window=5, recent=6))

    def test_known_counts_give_known_scores(self, fitted):
        c = fitted.covisit.counts
        rows = fitted.items.rows([100, 101, 102])
        expected = np.log1p(c[rows[2]].toarray()[0] + c[rows[1]].toarray()[0] / 2 + c[rows[0]].toarray()[0] / 3)
        ids, scores = fitted.retrieve_history([100, 101, 102], 20, exclude_seen=False)
        np.testing.assert_allclose(scores, expected[fitted.items.rows(ids)], rtol=1e-6)
        assert (np.diff(scores) <= 0).all() and scores[0] > 0


class TestTwoTower(RetrieverContract):
    """Block data: genre A is block 100, genre B block 200, so content alone tells the blocks apart."""

    exact_history_query = True

    def make(self):
        return TwoTowerRetriever(TwoTowerConfig(
            dim=16, max_len=8, n_blocks=1, n_heads=1, dropout=0.0, id_dropout=0.0, batch_size=8, learning_rate=1e-2,
            max_epochs=20, eval_every=5, patience=2, n_uniform_negatives=8, n_inbatch_negatives=0,
            text_model="", text_cache_dir="", progress=False, seed=0))


class TestHybrid(RetrieverContract):
    """ALS + popularity, popularity as a tie-breaker (its RRF weight is below the gap between two ALS
    ranks), fitted without validation (no tuning)."""

    score_margin = None

    def make(self):
        components = {"als": ALSRetriever(ALSConfig(factors=2, iterations=15, regularization=0.1, alpha=5.0)),
                      "popularity": PopularityRetriever()}
        return HybridRetriever(components, HybridConfig(weights=(1.0, 0.01), progress=False))


def test_registry_names_the_choices():
    from data.errors import ConfigError

    with pytest.raises(ConfigError, match="als"):
        make_retriever("nope")


def test_config_round_trip():
    cfg = ALSConfig(factors=16, index=IndexConfig(factory="HNSW32", search_params="efSearch=32"))
    assert ALSConfig.from_json(cfg.to_json()) == cfg
    from data.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown field"):
        ALSConfig.from_dict({"factor": 3})
    with pytest.raises(ConfigError, match="factors"):
        ALSConfig(factors=0)


def test_als_beats_popularity_on_movielens(ml_split):
    """A sanity bound on the real data: tuned-default ALS beats popularity on validation NDCG@10."""
    from retrieval.evaluate import evaluate_retriever

    history = ml_split.history("val")
    als = ALSRetriever().fit(history, items=ml_split.items)
    pop = PopularityRetriever().fit(history, items=ml_split.items)
    a = evaluate_retriever(als, ml_split, "val", n_boot=0).means["NDCG@10"]
    p = evaluate_retriever(pop, ml_split, "val", n_boot=0).means["NDCG@10"]
    assert a > p > 0
    with pytest.raises(DataValidationError, match="history"):
        evaluate_retriever(als, ml_split, "test")  # fitted on the val history: refuses to score test
