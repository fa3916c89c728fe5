"""Hybrid candidate generation: fusion arithmetic on hand-made lists, provenance, tuning, the contract."""

from __future__ import annotations

import numpy as np
import pytest

from data.errors import ConfigError, DataValidationError
from data.protocol import leave_one_out
from data.synthetic import SyntheticConfig, generate
from retrieval.cf import ALSConfig, ALSRetriever
from retrieval.evaluate import evaluate_retriever
from retrieval.hybrid import HybridConfig, HybridRetriever, _Lists, fuse
from retrieval.popularity import PopularityRetriever

SYNTH = SyntheticConfig(n_users=300, n_items=120, n_clusters=6, mean_history=15, sequential_strength=0.3,
                        seed=1)
QUICK = HybridConfig(progress=False, tune_rrf_ks=(10.0, 60.0), tune_weights=(0.5, 1.0, 2.0))


def lists(ids, scores):
    return _Lists(ids=np.asarray(ids, dtype=np.int64), scores=np.asarray(scores, dtype=np.float32))


# --------------------------------------------------------------------------------------------- fusion
def test_rrf_by_hand():
    # user 0: component A ranks 1, 2, 3; component B ranks 3, 4, 1
    got = lists([[[1, 2, 3], [3, 4, 1]]], [[[9, 8, 7], [5, 4, 3]]])
    ids, scores, _, _ = fuse(got, 4, method="rrf", weights=(1.0, 1.0), rrf_k=0.0)
    expected = {1: 1 / 1 + 1 / 3, 2: 1 / 2, 3: 1 / 3 + 1 / 1, 4: 1 / 2}
    # 1 and 3 tie at 4/3: best single rank ties too (1), so the smaller id wins; then 2 and 4 tie at 1/2
    # with best rank 2 each, smaller id first
    assert ids[0].tolist() == [1, 3, 2, 4]
    np.testing.assert_allclose(scores[0], [expected[i] for i in ids[0]], rtol=1e-6)


def test_weights_change_the_winner_and_zero_weight_drops_a_component():
    got = lists([[[1, 2], [2, 3]]], [[[1, 0], [1, 0]]])
    ids, _, _, _ = fuse(got, 3, method="rrf", weights=(1.0, 1.0), rrf_k=1.0)
    assert ids[0, 0] == 2  # found by both
    ids, _, _, _ = fuse(got, 2, method="rrf", weights=(1.0, 0.0), rrf_k=1.0)
    assert ids[0].tolist() == [1, 2]  # component A alone


def test_weighted_score_normalises_each_list():
    # A's raw scores are 100x B's; after min-max both lists span [0, 1]
    got = lists([[[1, 2, 3], [3, 2, 1]]], [[[300, 200, 100], [3, 2.5, 1]]])
    ids, scores, _, _ = fuse(got, 3, method="score", weights=(1.0, 1.0), rrf_k=0.0)
    expected = {1: 1 + 0, 2: 0.5 + 0.75, 3: 0 + 1}
    assert ids[0].tolist() == [2, 1, 3]  # 1.25, then 1 vs 3 tie at 1.0 (best rank 1 both): smaller id
    np.testing.assert_allclose(scores[0], [expected[i] for i in ids[0]], rtol=1e-6)


def test_padding_is_skipped_deduplicated_and_padded_out():
    got = lists([[[5, -1, -1], [5, 6, -1]], [[-1, -1, -1], [-1, -1, -1]]],
                [[[1, -np.inf, -np.inf], [2, 1, -np.inf]], [[-np.inf] * 3, [-np.inf] * 3]])
    ids, scores, comp_scores, comp_ranks = fuse(got, 4, method="score", weights=(1.0, 1.0), rrf_k=0.0,
                                                provenance=True)
    assert ids[0].tolist() == [5, 6, -1, -1] and np.isneginf(scores[0, 2:]).all()
    assert (ids[1] == -1).all()
    assert comp_ranks[0, 0].tolist() == [1, 1] and comp_ranks[0, 1].tolist() == [0, 2]
    np.testing.assert_array_equal(comp_scores[0, 0], [1, 2])
    assert np.isnan(comp_scores[0, 1, 0]) and comp_scores[0, 1, 1] == 1


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def split():
    return leave_one_out(generate(SYNTH, progress=False))


@pytest.fixture(scope="module")
def components(split):
    history = split.history("val")
    return {
        "als": ALSRetriever(ALSConfig(factors=16, iterations=5)).fit(history, items=split.items),
        "popularity": PopularityRetriever().fit(history, items=split.items),
    }


@pytest.fixture(scope="module")
def retriever(components, split):
    return HybridRetriever(components, QUICK).tune(split)


# --------------------------------------------------------------------------------------------- behaviour
def test_candidates_report_provenance_consistent_with_components(retriever, components, split):
    users = split.users.ids[:8]
    cands = retriever.candidates(users, 10)
    ids, scores = retriever.retrieve(users, 10)
    np.testing.assert_array_equal(cands.item_ids, ids)
    np.testing.assert_array_equal(cands.scores, scores)
    assert cands.sources == ("als", "popularity") and cands.component_ranks.shape == (8, 10, 2)
    depth = retriever.depth(10)
    for r, name in enumerate(cands.sources):
        comp_ids, comp_scores = components[name].retrieve(users, depth)
        for u in range(len(users)):
            for j, item in enumerate(cands.item_ids[u]):
                where = np.flatnonzero(comp_ids[u] == item)
                if where.size:
                    assert cands.component_ranks[u, j, r] == where[0] + 1
                    assert cands.component_scores[u, j, r] == comp_scores[u, where[0]]
                else:
                    assert cands.component_ranks[u, j, r] == 0 and np.isnan(cands.component_scores[u, j, r])
    assert cands.found.any(axis=2).all()  # every candidate came from some component
    single = retriever.candidates(int(users[0]), 10)
    np.testing.assert_array_equal(single.item_ids, cands.item_ids[0])
    assert single.component_ranks.shape == (10, 2)


def test_tuning_is_at_least_as_good_as_every_component_on_validation(retriever, components, split):
    """Both lists: the candidate fusion on Recall@50, the served list on NDCG@10."""
    for view, metric, best in ((retriever.for_candidates(), retriever.config.tune_metric, "best"),
                               (retriever, retriever.config.served_metric, "served_best")):
        assert retriever.tuning[best] == pytest.approx(max(t[metric] for t in retriever.tuning["trials"]), abs=1e-6)
        tuned = evaluate_retriever(view, split, "val", ks=(10, 50), n_boot=0).means[metric]
        assert tuned == pytest.approx(retriever.tuning[best], abs=1e-9)
        for comp in components.values():
            alone = evaluate_retriever(comp, split, "val", ks=(10, 50), n_boot=0).means[metric]
            assert tuned >= alone - 1e-12


def test_served_list_and_candidates_have_their_own_fusions(retriever, components, split):
    users = split.users.ids[:40]
    cands = retriever.candidates(users, 20)
    np.testing.assert_array_equal(retriever.for_candidates().retrieve(users, 20)[0], cands.item_ids)
    served = retriever.config.served_fusion()
    assert retriever.tuning["served_source"] == retriever.served_source
    assert served.method == retriever.config.served_method  # tune() set the served fusion explicitly
    history = retriever.stored_history(int(users[0]))
    depth, fusion = retriever.depth(20), retriever.config.candidate_fusion()
    by_hand = fuse(_Lists.stack([c.retrieve_history(history, depth) for c in components.values()]), 20,
                   method=fusion.method, weights=retriever.weights, rrf_k=fusion.rrf_k)[0][0]
    np.testing.assert_array_equal(retriever.for_candidates().retrieve_history(history, 20)[0], by_hand)


def test_a_one_hot_served_fusion_is_that_components_own_order(components, split):
    hybrid = HybridRetriever(components, HybridConfig(served_method="rrf", served_weights=(0.0, 1.0),
                                                      progress=False))
    assert hybrid.served_source == "popularity" and hybrid.config.candidate_fusion().weights == ()
    users = split.users.ids[:30]
    np.testing.assert_array_equal(hybrid.retrieve(users, 15)[0], components["popularity"].retrieve(users, 15)[0])
    fused = hybrid.for_candidates().retrieve(users, 15)[0]
    assert not np.array_equal(fused, hybrid.retrieve(users, 15)[0])  # the candidates still fuse both
    with pytest.raises(ConfigError, match="served_weights"):
        HybridRetriever(components, HybridConfig(served_method="rrf", served_weights=(1.0,)))


# --------------------------------------------------------------------------------------------- histories
def test_retrieve_history_fuses_each_components_history_list(retriever, split):
    history = retriever.stored_history(int(split.users.ids[0]))[:-2]
    ids, scores = retriever.retrieve_history(history, 10)
    depth = retriever.depth(10)
    got = [c.retrieve_history(history, depth) for c in retriever.components.values()]
    want_ids, want_scores, _, _ = fuse(lists([[g[0] for g in got]], [[g[1] for g in got]]), 10,
                                       method=retriever.config.method, weights=retriever.weights,
                                       rrf_k=retriever.config.rrf_k)
    assert ids.shape == scores.shape == (10,)
    np.testing.assert_array_equal(ids, want_ids[0])
    np.testing.assert_allclose(scores, want_scores[0], rtol=1e-6)
    assert not set(history.tolist()) & set(ids.tolist())


def test_own_history_mostly_agrees_with_retrieve(retriever, components, split):
    """ALS folds the history in with an exact solve while its stored vectors come from conjugate-gradient
    sweeps, so the lists differ a little (popularity's agree exactly): high overlap, not equality."""
    overlap = []
    for user in split.users.ids[:60]:
        history = retriever.stored_history(int(user))
        assert history.tolist() == components["als"].stored_history(int(user)).tolist()
        pop_ids, _ = components["popularity"].retrieve_history(history, 10)
        np.testing.assert_array_equal(pop_ids, components["popularity"].retrieve(int(user), 10)[0])
        ids, _ = retriever.retrieve_history(history, 10)
        overlap.append(len(set(ids.tolist()) & set(retriever.retrieve(int(user), 10)[0].tolist())) / 10)
    assert np.mean(overlap) >= 0.85, np.mean(overlap)


def test_appending_to_a_history_changes_the_fused_list(retriever, split):
    history = retriever.stored_history(int(split.users.ids[1]))
    before, _ = retriever.retrieve_history(history, 10)
    after, _ = retriever.retrieve_history(np.r_[history, before[0]], 10)
    assert before[0] not in after and not np.array_equal(before, after)


def test_empty_or_unknown_history_gets_popular_items_with_padding(retriever, split):
    n = len(split.items)
    popular, popular_scores = retriever.popular_items(n + 5)
    np.testing.assert_array_equal(popular, retriever.components["als"].popular_items(n + 5)[0])
    assert (popular[:n] != -1).all() and (popular[n:] == -1).all() and np.isneginf(popular_scores[n:]).all()
    for history in ([], [10**9]):
        ids, scores = retriever.retrieve_history(history, n + 5)
        np.testing.assert_array_equal(ids, popular)
        np.testing.assert_array_equal(scores, popular_scores)
    history = retriever.stored_history(int(split.users.ids[0]))
    ids, scores = retriever.retrieve_history(history, n + 5)
    seen = np.unique(history).size
    assert ids.shape == scores.shape == (n + 5,)
    assert (ids[: n - seen] != -1).all() and (ids[n - seen:] == -1).all() and np.isneginf(scores[n - seen:]).all()
    assert retriever.stored_history(10**9).size == 0


def test_set_history_moves_every_component_and_test_stage_evaluates(components, split):
    hybrid = HybridRetriever(dict(components), QUICK)
    with pytest.raises(DataValidationError):
        evaluate_retriever(hybrid, split, "test")
    hybrid.set_history(split.history("test"))
    report = evaluate_retriever(hybrid, split, "test", ks=(10, 50), n_boot=0)
    assert 0 < report.means["Recall@50"] <= 1
    hybrid.set_history(split.history("val"))  # leave the shared fixtures as they were
    assert hybrid.history_fingerprint == split.history("val").fingerprint()


def test_mixed_histories_are_refused(components, split):
    other = PopularityRetriever().fit(split.history("test"), items=split.items)
    hybrid = HybridRetriever([components["als"], other], QUICK)
    assert hybrid.history_fingerprint.startswith("mixed:")
    with pytest.raises(DataValidationError):
        hybrid.tune(split)


def test_save_and_load_round_trip(retriever, split, tmp_path):
    folder = retriever.save(tmp_path / "hybrid")
    loaded = HybridRetriever.load(folder)
    assert loaded.config == retriever.config and loaded.sources == retriever.sources
    users = split.users.ids
    np.testing.assert_array_equal(loaded.retrieve(users, 30)[0], retriever.retrieve(users, 30)[0])


def test_config_validation():
    with pytest.raises(ConfigError):
        HybridConfig(method="borda")
    with pytest.raises(ConfigError):
        HybridConfig(tune_metric="AUC")
    with pytest.raises(ConfigError, match="served_method"):
        HybridConfig(served_method="borda")
    with pytest.raises(ConfigError):
        HybridRetriever([PopularityRetriever()], HybridConfig(weights=(1.0, 2.0)))
    assert HybridConfig.from_json(QUICK.to_json()) == QUICK


def test_save_and_load_keeps_component_order_and_weights(components, split, tmp_path):
    """Regression: weights follow component order, so a reload must not re-sort the components."""
    ordered = {"popularity": components["popularity"], "als": components["als"]}  # not alphabetical
    hybrid = HybridRetriever(ordered, HybridConfig(method="score", weights=(0.1, 1.0)))
    loaded = HybridRetriever.load(hybrid.save(tmp_path / "ordered"))
    assert loaded.sources == ("popularity", "als") and loaded.weights == (0.1, 1.0)
    users = split.users.ids[:50]
    np.testing.assert_array_equal(loaded.retrieve(users, 20)[0], hybrid.retrieve(users, 20)[0])


def test_a_covisit_component_fuses_saves_and_is_skipped_by_the_embedding_export(components, split, tmp_path):
    """Co-visitation (no vectors, no index) as a component: tuned with the others, never below any single
    component on validation, identical after save/load, and left out of ``export_embeddings``."""
    from pipeline.batch import export_embeddings
    from retrieval.covisit_retriever import CovisitRetriever

    parts = {**components, "covisit": CovisitRetriever().fit(split.history("val"), items=split.items)}
    hybrid = HybridRetriever(parts, QUICK).tune(split)
    singles = [t for t in hybrid.tuning["trials"] if sorted(t["weights"]) == [0.0, 0.0, 1.0]]
    assert len(singles) == 3 and hybrid.tuning["served_best"] >= max(t["NDCG@10"] for t in singles)
    loaded = HybridRetriever.load(hybrid.save(tmp_path / "with-covisit"))
    users = split.users.ids[:60]
    for a, b in zip(loaded.retrieve(users, 20), hybrid.retrieve(users, 20)):
        np.testing.assert_array_equal(a, b)
    history = hybrid.stored_history(int(users[0]))
    np.testing.assert_array_equal(loaded.retrieve_history(history, 20)[0], hybrid.retrieve_history(history, 20)[0])
    written = export_embeddings(hybrid, tmp_path / "emb")
    assert {p.parent.name for p in written} == {"als", "popularity"}
    with pytest.raises(ConfigError, match="'covisit' retriever learns no embeddings"):
        export_embeddings(parts["covisit"], tmp_path / "alone")
