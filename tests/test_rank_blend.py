"""The hybrid blend: it uses an informative cross-encoder and never makes the retrieval order worse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.errors import ArtifactError, ConfigError, NotFittedError
from ranking.blend import HybridBlend
from ranking.config import BlendConfig
from ranking.data import reranked_ndcg


def lists(n=400, m=20, signal=2.0, seed=0):
    """Targets anywhere in a top-m list; the cross-encoder adds ``signal`` to the target's score."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, m, n)
    retrieval = np.sort(rng.normal(size=(n, m)), axis=1)[:, ::-1].copy()  # descending, like a retriever
    ce = rng.normal(size=(n, m))
    ce[np.arange(n), target] += signal
    return ce, retrieval, target


def test_informative_cross_encoder_is_used_and_beats_retrieval_order():
    ce, retrieval, target = lists(signal=2.0)
    blend = HybridBlend().fit(ce, retrieval, target, n_users=1000)
    assert blend.use_blend
    assert blend.report["weights"]["ce"] > 0.5
    assert blend.report["cv_ndcg@10_blend"] > blend.report["cv_ndcg@10_retrieval"] + 0.05
    ce2, retrieval2, target2 = lists(signal=2.0, seed=1)  # fresh lists
    blended = reranked_ndcg(blend.score(ce2, retrieval2), target2, 1000)
    order = reranked_ndcg(-np.tile(np.arange(20.0), (400, 1)), target2, 1000)
    assert blended > order + 0.05


def test_useless_cross_encoder_keeps_the_retrieval_order_exactly():
    ce, retrieval, target = lists(signal=0.0)
    # the target is likelier the higher retrieval ranks it, so the retrieval order is the best order
    target = np.minimum(np.random.default_rng(5).geometric(0.3, size=target.size) - 1, 19)
    blend = HybridBlend().fit(ce, retrieval, target)
    scores = blend.score(ce, retrieval)
    if not blend.use_blend:
        assert np.array_equal(np.argsort(-scores, axis=1, kind="stable"), np.tile(np.arange(20), (400, 1)))
    else:  # only allowed when cross-validation says it is better
        assert blend.report["cv_ndcg@10_blend"] > blend.report["cv_ndcg@10_retrieval"]
    assert reranked_ndcg(scores, target, 400) >= reranked_ndcg(-np.tile(np.arange(20.0), (400, 1)), target, 400) - 1e-9
    assert not blend.use_blend  # a pure-noise score cannot win cross-validation here


def test_padding_and_rerank():
    ce, retrieval, target = lists(n=100, m=6, signal=3.0)
    ce[:, 5] = -np.inf
    retrieval[:, 5] = -np.inf
    target = np.minimum(target, 4)
    blend = HybridBlend(BlendConfig(folds=3)).fit(ce, retrieval, target)
    candidates = np.tile(np.arange(10, 16), (100, 1))
    candidates[:, 5] = -1
    ranked = blend.rerank(candidates, ce, retrieval)
    assert (ranked[:, -1] == -1).all()
    assert np.array_equal(np.sort(ranked, axis=1), np.sort(candidates, axis=1))


def test_source_feature_learns_which_retriever_to_trust():
    rng = np.random.default_rng(3)
    n, m = 300, 10
    sources = rng.integers(0, 2, (n, m))
    target = np.array([rng.choice(np.flatnonzero(row == 1)) if (row == 1).any() else 0 for row in sources])
    sources[np.arange(n), target] = 1  # targets always come from retriever 1
    ce, retrieval = rng.normal(size=(n, m)), np.sort(rng.normal(size=(n, m)), axis=1)[:, ::-1].copy()
    blend = HybridBlend(BlendConfig(features=("ce", "retrieval", "log_rank", "source"))).fit(
        ce, retrieval, target, sources=sources)
    weights = blend.report["weights"]
    assert weights["source=1"] > weights["source=0"] + 0.5


def test_save_load_round_trip_and_errors(tmp_path):
    ce, retrieval, target = lists(n=100)
    with pytest.raises(NotFittedError):
        HybridBlend().score(ce, retrieval)
    blend = HybridBlend().fit(ce, retrieval, target)
    blend.save(tmp_path / "blend.json")
    loaded = HybridBlend.load(tmp_path / "blend.json")
    np.testing.assert_array_equal(loaded.score(ce, retrieval), blend.score(ce, retrieval))
    payload = json.loads((tmp_path / "blend.json").read_text())
    payload["kind"] = "something else"
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    with pytest.raises(ArtifactError, match="kind"):
        HybridBlend.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="ce"):
        BlendConfig(features=("retrieval",))


def test_text_similarity_signal_takes_the_best_match_among_the_last_history_items():
    from benchmarks.blend_signals import text_similarity

    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    histories = [np.array([0, 1]), np.empty(0, np.int64)]
    candidates = np.array([[2, 3, -1], [2, 3, 0]])
    last2 = text_similarity(emb, histories, np.array([0, 1]), candidates, last=2)
    np.testing.assert_allclose(last2[0, :2], [0.8, 0.0])  # item 2 is closest to item 1; item 3 to item 1 (0.0)
    assert np.isneginf(last2[0, 2]) and np.isneginf(last2[1]).all()  # padding; a user without history
    last1 = text_similarity(emb, histories, np.array([0, 1]), candidates, last=1)
    np.testing.assert_allclose(last1[0, :2], [0.8, 0.0])
    first_only = text_similarity(emb, [np.array([1, 0])], np.array([0]), candidates[:1], last=1)
    np.testing.assert_allclose(first_only[0, :2], [0.6, -1.0])  # only the latest item (0) counts
