"""Co-visitation counts (retrieval/covisit.py): known answers, batch equals single, persistence inside the
ranker's folder, and the hybrid head that reads them, online and in batch."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data.dataset import Interactions
from data.errors import ArtifactError, ConfigError, DataValidationError, NotFittedError
from data.vocab import IdVocab
from ranking.blend import HybridBlend, extra_features
from ranking.config import BlendConfig
from retrieval.covisit import Covisitation, CovisitConfig


def events(seqs: dict[int, list[int]]) -> Interactions:
    rows = [{"user_id": u, "item_id": i, "timestamp": t} for u, s in seqs.items() for t, i in enumerate(s)]
    return Interactions(pd.DataFrame(rows), name="covisit-test")


ITEMS = IdVocab(np.array([1, 2, 3, 4]), name="item")
DATA = events({10: [1, 2, 3], 11: [1, 2], 12: [2, 1], 13: [4, 3, 2]})


def test_counts_pairs_within_the_window_and_weights_recent_items():
    one = Covisitation(CovisitConfig(window=1, recent=1)).fit(DATA, ITEMS)
    # window 1: 1->2 twice (users 10, 11), 2->3 once, 2->1 once, 4->3 once, 3->2 once
    np.testing.assert_allclose(one.score([4, 1], [2, 3, 99, -1]), np.log1p([2, 0, 0, 0]))
    np.testing.assert_allclose(one.score([1, 2], [3, 1]), np.log1p([1, 1]))
    two = Covisitation(CovisitConfig(window=2, recent=2)).fit(DATA, ITEMS)
    # the latest item (2) votes with weight 1, the one before (1) with 1/2; window 2 adds 1->3 and 4->2
    expected = {3: 1 * 1 + 0.5 * 1, 4: 0.0}
    np.testing.assert_allclose(two.score([1, 2], [3, 4]), np.log1p([expected[3], expected[4]]))
    assert two.score([], [1, 2]).tolist() == [0.0, 0.0]  # an empty history says nothing
    assert two.score([99], [1, 2]).tolist() == [0.0, 0.0]  # nor one of unknown items


def test_score_lists_equals_one_history_at_a_time():
    model = Covisitation().fit(DATA, ITEMS)
    histories = [np.array([1]), np.array([4, 3]), np.array([], dtype=np.int64)]
    candidates = np.array([[2, 3, -1], [2, 1, 4], [1, 2, 3]])
    batch = model.score_lists(histories, candidates)
    for i, history in enumerate(histories):
        np.testing.assert_array_equal(batch[i], model.score(history, candidates[i]))
    with pytest.raises(DataValidationError, match=r"\(n, M\)"):
        model.score_lists(histories, candidates[:2])
    # the whole catalogue at once (the retriever's path) gives the same scores, in catalogue row order
    catalogue = model.score_catalogue([ITEMS.rows(h) for h in histories])
    for i, history in enumerate(histories):
        np.testing.assert_allclose(catalogue[i], model.score(history, ITEMS.ids), rtol=1e-12)


def test_bad_config_and_unfitted_use_are_refused_with_the_field_named():
    with pytest.raises(ConfigError, match="window"):
        CovisitConfig(window=0)
    with pytest.raises(ConfigError, match="recent"):
        CovisitConfig(recent=1.5)
    with pytest.raises(NotFittedError, match="fit"):
        Covisitation().score([1], [2])
    with pytest.raises(DataValidationError, match="no events"):
        Covisitation().fit(Interactions(DATA.frame.iloc[:0], name="empty"), ITEMS)
    assert CovisitConfig.from_dict(json.loads(json.dumps(CovisitConfig(window=5).to_dict()))) == CovisitConfig(window=5)


def test_tensors_round_trip_and_a_mismatch_is_refused():
    model = Covisitation().fit(DATA, ITEMS)
    again = Covisitation.from_tensors(model.to_tensors(), model.to_manifest(), "here")
    np.testing.assert_array_equal(again.score([1, 2], [3, 4, 1]), model.score([1, 2], [3, 4, 1]))
    assert again.fingerprint == DATA.fingerprint()
    tensors = model.to_tensors()
    tensors["covisit_indptr"] = tensors["covisit_indptr"][:-1]
    with pytest.raises(ArtifactError, match="do not match"):
        Covisitation.from_tensors(tensors, model.to_manifest(), "here")


def covisit_head(m: int) -> HybridBlend:
    """A fitted-looking head that trusts co-visitation only (weights set by hand)."""
    blend = HybridBlend(BlendConfig(features=("ce", "retrieval", "log_rank", "covisit")))
    blend.weights = np.array([0.0, 0.0, 0.0, 1.0])
    blend.feature_names = ["ce", "retrieval", "log_rank", "covisit"]
    blend.use_blend = True
    blend.report = {"m": m}
    return blend


def test_a_head_that_reads_covisit_needs_the_scores_and_the_ranker_to_carry_them():
    blend = covisit_head(3)
    ce, retrieval = np.zeros((1, 3)), np.array([[3.0, 2.0, 1.0]])
    with pytest.raises(DataValidationError, match="covisit"):
        blend.score(ce, retrieval)

    class NoCounts:
        covisit = None

    with pytest.raises(ConfigError, match="co-visitation"):
        extra_features(blend, NoCounts(), [np.array([1])], np.array([[2, 3, 4]]))

    class WithCounts:
        covisit = Covisitation(CovisitConfig(window=1, recent=1)).fit(DATA, ITEMS)

    extra = extra_features(blend, WithCounts(), [np.array([2])], np.array([[4, 3, 1]]))
    # after item 2: 3 once and 1 once, 4 never -> the head puts 4 last
    order = blend.rerank(np.array([[4, 3, 1]]), ce, retrieval, extra=extra)
    assert order[0, -1] == 4
    assert extra_features(HybridBlend.from_dict({**blend.to_dict(), "use_blend": False}), NoCounts(),
                          [np.array([1])], np.array([[2, 3, 4]])) is None


def test_the_ranker_saves_its_counts_and_serves_a_covisit_head_online_as_in_batch(tmp_path):
    from pipeline.batch import rerank_lists
    from pipeline.recommender import Recommender
    from pipeline.stages import candidate_retriever
    from ranking.item_ranker import COVISIT_FILE, ItemTokenRanker
    from tests.test_item_training import colour_split, tiny_ranker

    split, table, items = colour_split()
    ranker = tiny_ranker(items, table)
    ranker.covisit = Covisitation().fit(split.history("val"), ranker.items)
    head = covisit_head(6)
    ranker.set_hybrid_head(head)
    folder = ranker.save(tmp_path / "ranker")
    loaded = ItemTokenRanker.load(folder)
    history = split.history("val").frame.query("user_id == 0").sort_values("timestamp")["item_id"].to_numpy()
    candidates = np.setdiff1d(items.ids, history)[:6]
    np.testing.assert_array_equal(loaded.covisit.score(history, candidates), ranker.covisit.score(history, candidates))

    retriever = candidate_retriever(split, "popularity")
    rec = Recommender(retriever, loaded)
    assert rec.blend is not None and rec.blend.extra_names == ("covisit",)
    out = rec.recommend(history=history, k=6, budget_ms=10_000, explain=False)
    assert out.path == "reranked"
    ids, scores = retriever.retrieve_history(history, 6)
    batch_ids, *_ = rerank_lists(loaded, [history], ids[None], scores[None], 6, blend=rec.blend)
    assert [i.item_id for i in out.items] == batch_ids[0].tolist()
    # the served order is the co-visitation order (the head's only weight), ties kept in retrieval order
    cov = loaded.covisit.score(history, ids)
    assert batch_ids[0].tolist() == ids[np.argsort(-cov, kind="stable")].tolist() and cov.max() > 0

    # a ranker without its counts cannot serve that head
    loaded.covisit = None
    with pytest.raises(ConfigError, match="co-visitation"):
        Recommender(retriever, loaded)
    # damaged counts are refused at load
    (folder / COVISIT_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError):
        ItemTokenRanker.load(folder)


def test_the_covisit_retriever_explains_by_what_came_before():
    """No embedding: an item is explained by the recent history items others took it right after, most
    often first; an item nothing points at gets no reason."""
    from pipeline.explain import Explainer
    from retrieval.covisit_retriever import CovisitRetriever

    retriever = CovisitRetriever(CovisitConfig(window=1, recent=2)).fit(DATA, items=ITEMS)
    assert retriever.item_embeddings() is None
    # window 1: C[1,2] = 2, C[4,3] = 1, nothing else starts at 4 or 1 towards 2, 3 or 4
    because = Explainer.from_retriever(retriever).because(np.array([2, 3, 4, 99]), np.array([4, 1]), top_n=2,
                                                          recent=2)
    assert because == [[1], [4], [], []]
    # only the retriever's 2 most recent items (2, 1) voted: 2 explains 3 (C[2,3] = 1); the older 4 does not,
    # though others also took 3 right after 4
    assert Explainer.from_retriever(retriever).because(np.array([3]), np.array([4, 2, 1]), top_n=2,
                                                       recent=50) == [[2]]


def _dense_top(retriever, history_rows, k, banned, allowed):
    """The definition the retriever's sparse path must match: every catalogue item scored (0 when nothing
    points at it; popularity counts for an empty history), banned or not-allowed items dropped, sorted by
    score, then popularity, then catalogue row; padded with -1 / -inf."""
    n = len(retriever.items)
    if history_rows.size:
        scores = retriever.covisit.score_catalogue([history_rows])[0]
    else:
        scores = retriever.popularity.astype(np.float64)
    keep = np.ones(n, dtype=bool)
    keep[banned] = False
    if allowed is not None:
        keep &= np.isin(np.arange(n), allowed)
    rows = np.flatnonzero(keep)
    rows = rows[np.lexsort((rows, -retriever.popularity[rows], -scores[rows]))][:k]
    ids = np.full(k, -1, dtype=np.int64)
    out = np.full(k, -np.inf, dtype=np.float32)
    ids[:rows.size] = retriever.items.external(rows)
    out[:rows.size] = scores[rows]
    return ids, out


def test_the_covisit_retriever_scores_only_the_neighbours_yet_ranks_as_the_whole_catalogue():
    """The sparse path (neighbours of the recent items, then the popularity order) gives exactly the list of
    scoring all items, with and without exclusion, deny and allow lists, for short and longer-than-catalogue
    lists, and for empty histories; batch ``retrieve`` equals it user by user."""
    from data.synthetic import SyntheticConfig, generate
    from retrieval.covisit_retriever import CovisitRetriever

    data = generate(SyntheticConfig(n_users=120, n_items=150, n_clusters=6, mean_history=12, seed=3), progress=False)
    retriever = CovisitRetriever(CovisitConfig(window=2, recent=3)).fit(data)
    rng = np.random.default_rng(0)
    item_ids = retriever.items.ids
    users = retriever.users.ids[:40]
    checked = 0
    for user in users:
        history = retriever.stored_history(int(user))
        for k in (1, 10, 200):
            for exclude_seen in (True, False):
                deny = rng.choice(item_ids, size=5, replace=False)
                allow = rng.choice(item_ids, size=60, replace=False) if rng.random() < 0.5 else None
                for given in (history, history[:0]):
                    rows = retriever.items.rows(given)
                    banned = np.unique(np.concatenate([rows if exclude_seen else rows[:0],
                                                       retriever.items.rows(deny)]))
                    allowed = None if allow is None else np.unique(retriever.items.rows(allow))
                    want = _dense_top(retriever, rows, k, banned, allowed)
                    got = retriever.retrieve_history(given, k, exclude_seen=exclude_seen, allow=allow, deny=deny)
                    np.testing.assert_array_equal(got[0], want[0])
                    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
                    checked += 1
    batch_ids, batch_scores = retriever.retrieve(users, 30)
    for row, user in enumerate(users):
        ids, scores = retriever.retrieve_history(retriever.stored_history(int(user)), 30)
        np.testing.assert_array_equal(batch_ids[row], ids)
        np.testing.assert_allclose(batch_scores[row], scores, rtol=1e-6)
    assert checked == 40 * 3 * 2 * 2
