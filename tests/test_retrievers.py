"""The retrieval contract, once, as a mixin; one small subclass per implementation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.errors import ArtifactError, DataValidationError, NotFittedError
from retrieval.cf import ALSConfig, ALSRetriever, BPRConfig, BPRRetriever
from retrieval.index import IndexConfig
from retrieval.popularity import PopularityRetriever
from retrieval.registry import load_retriever, make_retriever


class RetrieverContract:
    """Subclasses set ``make()`` returning an unfitted retriever; the block data has known answers."""

    learns_taste = True

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
        tensors = folder / "tensors.safetensors"
        data = bytearray(tensors.read_bytes())
        data[-5] ^= 0xFF
        tensors.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="checksum"):
            load_retriever(folder)
        folder = fitted.save(tmp_path / "m2")
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["items"]["ids"] = manifest["items"]["ids"][::-1]
        manifest["items"].pop("fingerprint")
        (folder / "manifest.json").write_text(json.dumps(manifest))
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
        _, exact_scores = fitted.retrieve([1, 30], 5)
        fitted.reindex(IndexConfig(factory="HNSW32", search_params="efSearch=64"))
        ann_ids, ann_scores = fitted.retrieve([1, 30], 5)
        assert ann_ids.shape == (2, 5) and (ann_ids != -1).all()
        # 20 items: HNSW finds the exact top scores (compared by score: popularity has ties)
        np.testing.assert_allclose(ann_scores, exact_scores, rtol=1e-5)


class TestPopularity(RetrieverContract):
    learns_taste = False

    def make(self):
        return PopularityRetriever()


class TestALS(RetrieverContract):
    def make(self):
        return ALSRetriever(ALSConfig(factors=2, iterations=15, regularization=0.1, alpha=5.0))  # true rank 2


class TestBPR(RetrieverContract):
    def make(self):
        return BPRRetriever(BPRConfig(factors=2, iterations=300, learning_rate=0.05, regularization=0.01))


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
