"""The online recommender: stage order, budget planning and degrading, cold start, real-time events,
explanations, loading checks, the micro-batcher, and batch candidates with reranking.

The pipeline is tiny and built here: a hybrid (two-tower + popularity) on synthetic sessions, saved as a
pipeline artifact, and a tiny random BERT one-pass ranker over the same catalogue (:mod:`ranking.testing`).
:func:`build_tiny_pipeline` is also used by ``tests/test_service.py``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.dataset import Interactions
from data.errors import ArtifactError, OverloadedError, UnknownIdError
from data.items import build_item_table
from data.protocol import leave_one_out
from data.synthetic import SyntheticConfig, generate
from pipeline.batch import generate_candidates, rerank_lists
from pipeline.budget import LinearLatency, plan_shortlist
from pipeline.microbatch import MicroBatcher
from pipeline.recommender import Recommender, filter_candidates
from pipeline.recommender_config import MicroBatchConfig, RecommenderConfig

SYNTH = SyntheticConfig(n_users=80, n_items=60, n_clusters=4, mean_history=14, sequential_strength=0.8,
                        mean_session_length=6, seed=0)
TWO_TOWER = {"dim": 16, "max_len": 20, "n_blocks": 1, "n_heads": 2, "dropout": 0.1, "batch_size": 32,
             "learning_rate": 5e-3, "max_epochs": 2, "eval_every": 1, "patience": 2, "n_uniform_negatives": 16,
             "n_inbatch_negatives": 64, "text_model": "", "text_cache_dir": "", "progress": False, "seed": 0,
             "threads": 1}
TITLE_WORDS = ("alpha", "beta", "gamma", "delta", "red", "blue", "green", "story", "night", "day", "return")


def tiny_events() -> Interactions:
    """Synthetic sessions whose item titles use the tiny tokenizer's words (so item texts differ)."""
    data = generate(SYNTH, progress=False)
    rng = np.random.default_rng(0)
    ids = np.arange(1, SYNTH.n_items + 1)
    titles = [" ".join(rng.choice(TITLE_WORDS, size=3)) + (" (1995)" if i % 2 else " (2005)") for i in ids]
    genres = ["Drama" if i % 2 else "Comedy" for i in ids]
    items = build_item_table(pd.DataFrame({"item_id": ids, "title": titles, "genres": genres}))
    return Interactions(data.frame, items, name="tiny")


#: The RecommenderConfig fields the service, reliability, explorer, fuzz and Ray tests serve the tiny pipeline with.
TINY_CONFIG = {"retrieve_k": 40, "max_m": 20, "min_m": 3, "calibrate": False, "warm_up_users": 2}


def wait_ready(client, timeout: float = 30.0) -> None:
    """Poll ``/readyz`` (a TestClient or an httpx client) until the service says ready, at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.02)


def build_tiny_pipeline(root: Path) -> dict:
    """Build and save a tiny pipeline under ``root``: ``{"artifact", "ranker", "split", "events"}``.

    The artifact holds a hybrid (two-tower + popularity) with the test-stage histories; the ranker is a
    tiny random one-pass cross-encoder over the same catalogue.
    """
    from pipeline.artifacts import save_artifact
    from ranking.config import RankerConfig, TextConfig
    from ranking.cross_encoder import CrossEncoderRanker
    from ranking.testing import tiny_encoder, tiny_tokenizer
    from retrieval.hybrid import HybridConfig, HybridRetriever
    from retrieval.popularity import PopularityRetriever
    from retrieval.two_tower import TwoTowerConfig, TwoTowerRetriever

    events = tiny_events()
    split = leave_one_out(events)
    history = split.history("val")
    two_tower = TwoTowerRetriever(TwoTowerConfig(**TWO_TOWER)).fit(history, items=split.items, validation=split)
    popularity = PopularityRetriever().fit(history, items=split.items)
    hybrid = HybridRetriever({"two_tower": two_tower, "popularity": popularity},
                             HybridConfig(weights=(1.0, 0.25), progress=False))
    hybrid.set_history(split.history("test"))
    artifact = save_artifact(root / "artifacts", hybrid, events.items, config={}, data={"name": "tiny"},
                             metrics={}, version="tiny")
    tokenizer = tiny_tokenizer(root / "tokenizer")
    text = TextConfig(history_tokens=48, history_item_tokens=8, item_tokens=8)
    ranker = CrossEncoderRanker.build(events.items, split.items, RankerConfig(mode="one_pass", text=text),
                                      encoder=tiny_encoder(len(tokenizer), hidden=32, layers=2), tokenizer=tokenizer)
    ranker_dir = ranker.save(root / "ranker")
    return {"artifact": artifact, "ranker": ranker_dir, "split": split, "events": events}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def loaded(tiny):
    """The recommender with no latency model (M = max_m) and no calibration: deterministic plans."""
    rec = Recommender.load(tiny["artifact"], tiny["ranker"],
                           config=RecommenderConfig(retrieve_k=40, max_m=20, min_m=3, calibrate=False))
    yield rec
    rec.close()


def fresh(tiny, **config) -> Recommender:
    defaults = {"retrieve_k": 40, "max_m": 20, "min_m": 3, "calibrate": False}
    return Recommender.load(tiny["artifact"], tiny["ranker"], config=RecommenderConfig(**{**defaults, **config}))


def known_user(tiny, index: int = 0) -> int:
    return int(tiny["split"].users.ids[index])


# ---- the micro-batcher ---------------------------------------------------------------------------------
class CountingScorer:
    """Scores ``candidate id * 10 + history length``; counts calls and the jobs per call."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.delay = delay
        self.fail = fail

    def __call__(self, histories, candidates):
        self.calls.append(len(histories))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("scorer broke")
        return [c.astype(np.float32) * 10 + h.size for h, c in zip(histories, candidates)]


def test_concurrent_jobs_are_batched_into_fewer_calls_with_each_result_routed_back():
    scorer = CountingScorer(delay=0.02)
    batcher = MicroBatcher(scorer, MicroBatchConfig(max_batch=8, max_wait_ms=20, max_queue=64)).start()
    futures = {}

    def submit(i):
        futures[i] = batcher.submit(np.arange(i), np.array([i, i + 1]))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = {i: f.result(timeout=5) for i, f in futures.items()}
    batcher.close()
    for i, scores in results.items():
        np.testing.assert_array_equal(scores, [i * 10 + i, (i + 1) * 10 + i])
    assert sum(scorer.calls) == 16
    assert len(scorer.calls) < 16 and max(scorer.calls) > 1  # batched
    assert max(scorer.calls) <= 8


def test_batch_size_one_scores_every_job_alone():
    scorer = CountingScorer()
    batcher = MicroBatcher(scorer, MicroBatchConfig(max_batch=1, max_wait_ms=0)).start()
    futures = [batcher.submit(np.arange(2), np.array([i])) for i in range(5)]
    assert [float(f.result(timeout=5)[0]) for f in futures] == [i * 10 + 2 for i in range(5)]
    batcher.close()
    assert scorer.calls == [1] * 5


def test_full_queue_sheds_and_errors_and_cancellations_reach_the_callers():
    scorer = CountingScorer(delay=0.2)
    batcher = MicroBatcher(scorer, MicroBatchConfig(max_batch=1, max_wait_ms=0, max_queue=2)).start()
    first = batcher.submit(np.arange(1), np.array([1]))
    time.sleep(0.05)  # the worker holds the first job; two more fill the queue
    queued = [batcher.submit(np.arange(1), np.array([2])), batcher.submit(np.arange(1), np.array([3]))]
    with pytest.raises(OverloadedError, match="max_queue=2"):
        batcher.submit(np.arange(1), np.array([4]))
    assert batcher.queue_depth == 2 and batcher.stats.rejected == 1
    assert queued[0].cancel()  # the caller gave up: the job is skipped, never scored
    assert first.result(timeout=5)[0] == 11 and queued[1].result(timeout=5)[0] == 31
    assert batcher.stats.cancelled == 1 and sum(scorer.calls) == 2
    batcher.close()
    with pytest.raises(OverloadedError, match="not running"):
        batcher.submit(np.arange(1), np.array([5]))

    broken = MicroBatcher(CountingScorer(fail=True), MicroBatchConfig(max_batch=4, max_wait_ms=5)).start()
    with pytest.raises(RuntimeError, match="scorer broke"):
        broken.submit(np.arange(1), np.array([1])).result(timeout=5)
    broken.close()


# ---- latency models ------------------------------------------------------------------------------------
def test_linear_latency_fit_recovers_exact_coefficients_and_max_candidates_fits_the_budget():
    truth = LinearLatency(intercept=2.0, per_candidate_token=0.05, per_history_token=0.01)
    samples = [(h, t, truth.predict_ms(h, 0, t)) for h in (10, 40, 90) for t in (10, 200, 900)]
    fitted = LinearLatency.fit(samples)
    assert fitted.intercept == pytest.approx(2.0) and fitted.per_candidate_token == pytest.approx(0.05)
    m = truth.max_candidates(20.0, 50, 10.0, cap=1000)
    assert truth.predict_ms(50, m, m * 10) <= 20.0 < truth.predict_ms(50, m + 1, (m + 1) * 10)
    assert truth.max_candidates(20.0, 50, 10.0, cap=7) == 7
    assert truth.max_candidates(1.0, 50, 10.0, cap=100) == 0


def test_plan_shortlist_fits_the_budget_and_refuses_below_min_m():
    latency = LinearLatency(intercept=1.0, per_candidate_token=0.5)
    tokens = np.full(30, 4.0)  # 2 ms per candidate
    m, cost, reason = plan_shortlist(latency, 21.0, 0, tokens, min_m=5)
    assert (m, reason) == (10, None) and cost == pytest.approx(21.0)
    assert plan_shortlist(latency, 8.0, 0, tokens, min_m=5) == (0, 0.0, "budget")  # 3 fit, 5 needed
    assert plan_shortlist(latency, 8.0, 0, tokens[:3], min_m=5)[0] == 3  # min_m is capped by the candidates
    assert plan_shortlist(None, 0.0, 0, tokens, min_m=5) == (30, 0.0, None)  # no model: the cap


def test_filter_candidates_drops_padding_repeats_and_excluded_ids_keeping_order():
    ids = np.array([5, 3, -1, 5, 7, 9, 3, 11])
    scores = np.arange(8, dtype=np.float32)[::-1].copy()
    got, got_scores = filter_candidates(ids, scores, deny=np.array([9]), seen=np.array([11]))
    assert got.tolist() == [5, 3, 7] and got_scores.tolist() == [7, 6, 3]
    assert filter_candidates(ids, scores, allow=np.array([7, 3]))[0].tolist() == [3, 7]


def test_observed_events_change_cf_results_through_fold_in(block_events):
    """A CF retriever (no ranker): events observed since training are folded into the user's vector."""
    from retrieval.cf import ALSConfig, ALSRetriever

    als = ALSRetriever(ALSConfig(factors=2, iterations=15, regularization=0.1, alpha=5.0)).fit(block_events)
    rec = Recommender(als)
    before = rec.recommend(1, k=4)
    assert before.path == "retrieval" and set(before.item_ids) <= set(range(100, 110))
    for t, item in enumerate(range(200, 208)):  # user 1 (block 100) now watches most of block 200
        rec.observe(1, item, ts=10_000 + t)
    after = rec.recommend(1, k=4)
    assert after.history_length == 6 + 8
    assert after.item_ids == als.retrieve_history(rec.history(1), 4)[0].tolist()
    assert {208, 209} <= set(after.item_ids)  # the unseen rest of block 200 now comes first
    assert all(item.because for item in after.items)  # explained by the ALS factors


def test_hybrid_history_retrieval_of_a_stored_history_equals_retrieve(tiny, loaded):
    """Two-tower + popularity: the query tower reads the same sequence and popularity excludes the same
    items either way, so the fused lists are identical (exact, unlike a CF fold-in)."""
    retriever = loaded.retriever
    for user in tiny["split"].users.ids[:10]:
        ids, scores = retriever.retrieve(int(user), 40)
        got_ids, got_scores = retriever.retrieve_history(retriever.stored_history(int(user)), 40)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got_scores, scores, rtol=1e-5, atol=1e-6)


# ---- recommend -----------------------------------------------------------------------------------------
def test_known_user_reranks_the_top_m_then_keeps_the_retrieval_tail(tiny, loaded):
    user = known_user(tiny)
    result = loaded.recommend(user, k=30, budget_ms=60_000)
    assert result.path == "reranked" and not result.degraded and result.reranked_m == 20
    ids, _ = loaded.retriever.retrieve(user, 40)
    history = loaded.retriever.stored_history(user)
    ce = loaded.ranker.score(history, ids[:20])
    expected = list(ids[:20][np.argsort(-ce, kind="stable")]) + list(ids[20:30])
    assert result.item_ids == [int(i) for i in expected]
    assert not set(result.item_ids) & set(history.tolist())
    assert [i.reranked for i in result.items] == [True] * 20 + [False] * 10
    assert set(result.timings_ms) >= {"retrieve", "filter", "plan", "rerank", "blend", "total"}
    assert result.history_length == history.size


def test_small_budget_degrades_to_the_retrieval_order(tiny):
    slow = LinearLatency(intercept=1.0, per_candidate_token=10.0)  # 10 ms per token: nothing fits in 50 ms
    rec = fresh(tiny)
    rec.latency = slow
    user = known_user(tiny, 3)
    result = rec.recommend(user, k=10, budget_ms=50)
    rec.close()
    assert result.degraded and result.degraded_reason == "budget" and result.path == "retrieval"
    assert result.reranked_m == 0
    assert result.item_ids == rec.retriever.retrieve(user, 40)[0][:10].tolist()


def test_the_shortlist_size_follows_the_latency_model_and_the_cap(tiny):
    rec = fresh(tiny, max_m=20, plan_margin_ms=0.0, reserve_ms=0.0)
    rec.latency = LinearLatency(intercept=0.0, per_candidate_token=1.0)  # 1 ms per token
    user = known_user(tiny, 5)
    tokens = float(np.mean([rec.ranker.tokens.candidate(r).size for r in
                            rec.ranker.items.rows(rec.retriever.retrieve(user, 40)[0][:20])]))
    small = rec.recommend(user, budget_ms=tokens * 6.5)
    big = rec.recommend(user, budget_ms=60_000)
    rec.close()
    assert 3 <= small.reranked_m <= 6 and not small.degraded  # the elapsed time takes a little of the budget
    assert big.reranked_m == 20


class BrokenRanker:
    """Wraps a ranker; scoring raises, or sleeps past any budget."""

    def __init__(self, ranker, mode="raise"):
        self._ranker, self.mode = ranker, mode

    def __getattr__(self, name):
        return getattr(self._ranker, name)

    def _fail(self):
        if self.mode == "raise":
            raise RuntimeError("GPU on fire")
        time.sleep(1.0)

    def score(self, *args, **kwargs):
        self._fail()
        return self._ranker.score(*args, **kwargs)

    def score_lists(self, *args, **kwargs):
        self._fail()
        return self._ranker.score_lists(*args, **kwargs)


@pytest.mark.parametrize("mode,reason,logged", [("raise", "error", "GPU on fire"), ("sleep", "timeout", "timed out")])
def test_a_failing_or_slow_reranker_degrades_instead_of_raising(tiny, loaded, mode, reason, logged, caplog):
    rec = Recommender(loaded.retriever, BrokenRanker(loaded.ranker, mode),
                      config=RecommenderConfig(retrieve_k=40, max_m=20, min_m=3, calibrate=False))
    user = known_user(tiny, 2)
    started = time.perf_counter()
    result = rec.recommend(user, k=10, budget_ms=100)
    elapsed = time.perf_counter() - started
    rec.close()
    assert result.degraded and result.degraded_reason == reason and result.path == "retrieval"
    assert result.item_ids == loaded.retriever.retrieve(user, 40)[0][:10].tolist()
    assert elapsed < 0.6  # the 1 s sleep was not waited for
    assert any(logged in r.getMessage() for r in caplog.records)


def test_cold_start_gets_popular_items_and_a_few_items_personalise(tiny, loaded):
    popular = loaded.retriever.components["popularity"]
    expected = popular.popular(1, 10)[0][0].tolist()
    unknown = loaded.recommend(10**9, k=10)
    assert unknown.path == "cold_start" and unknown.item_ids == expected and not unknown.degraded
    empty = loaded.recommend(history=[], k=10)
    assert empty.path == "cold_start" and empty.item_ids == expected

    few = np.array(tiny["split"].items.ids[:3])
    result = loaded.recommend(history=few, k=10, budget_ms=60_000)
    assert result.path == "reranked" and result.history_length == 3
    assert not set(result.item_ids) & set(few.tolist())
    ids, _ = loaded.retriever.retrieve_history(few, 40)
    ce = loaded.ranker.score(few, ids[:20])
    assert result.item_ids == ids[:20][np.argsort(-ce, kind="stable")][:10].tolist()


def test_observe_changes_the_next_recommendation_without_retraining(tiny):
    rec = fresh(tiny)
    user = known_user(tiny, 7)
    before = rec.recommend(user, k=10, budget_ms=60_000)
    top = before.item_ids[0]
    length = rec.observe(user, top, ts=2_000_000_000)
    after = rec.recommend(user, k=10, budget_ms=60_000)
    rec.close()
    history = np.r_[rec.retriever.stored_history(user), top]
    assert length == before.history_length + 1 == after.history_length
    assert top not in after.item_ids
    ids, _ = rec.retriever.retrieve_history(history, 40)  # the query tower reads the new history
    ce = rec.ranker.score(history, ids[:20])
    assert after.item_ids == ids[:20][np.argsort(-ce, kind="stable")][:10].tolist()
    with pytest.raises(UnknownIdError, match="item_id"):
        rec.observe(user, 10**9)


def test_a_new_user_with_events_is_personalised(tiny):
    rec = fresh(tiny)
    items = tiny["split"].items.ids
    rec.observe(777_777, int(items[4]), ts=1)
    rec.observe(777_777, int(items[9]), ts=2)
    result = rec.recommend(777_777, k=5, budget_ms=60_000)
    rec.close()
    assert result.path == "reranked" and result.history_length == 2
    assert not {int(items[4]), int(items[9])} & set(result.item_ids)


def test_explanations_name_the_most_similar_history_items(tiny, loaded):
    user = known_user(tiny, 1)
    result = loaded.recommend(user, k=5, budget_ms=60_000)
    history = loaded.retriever.stored_history(user)[-50:]
    two_tower = loaded.retriever.components["two_tower"]
    vectors = two_tower.item_factors / np.linalg.norm(two_tower.item_factors, axis=1, keepdims=True)
    for item in result.items:
        assert 1 <= len(item.because) <= 3 and set(item.because) <= set(history.tolist())
        sims = vectors[two_tower.items.rows(history)] @ vectors[two_tower.items.row(item.item_id)]
        assert item.because[0] == int(history[np.argmax(sims)])


def test_a_blend_orders_the_shortlist_by_the_hybrid_score(tiny, loaded, tmp_path):
    from ranking.blend import HybridBlend

    rng = np.random.default_rng(0)
    ce, target = rng.normal(size=(300, 20)), rng.integers(0, 20, 300)
    ce[np.arange(300), target] += 2.0  # an informative cross-encoder: the blend is used
    retrieval = np.sort(rng.normal(size=(300, 20)), axis=1)[:, ::-1].copy()
    blend = HybridBlend().fit(ce, retrieval, target, n_users=300)
    assert blend.use_blend
    blend.save(tmp_path / "blend.json")
    rec = Recommender.load(tiny["artifact"], tiny["ranker"], blend=tmp_path / "blend.json",
                           config=RecommenderConfig(retrieve_k=40, max_m=20, min_m=3, calibrate=False))
    user = known_user(tiny, 8)
    result = rec.recommend(user, k=20, budget_ms=60_000)
    rec.close()
    ids, scores = rec.retriever.retrieve(user, 40)
    scores_ce = rec.ranker.score(rec.retriever.stored_history(user), ids[:20])
    hybrid = blend.score(scores_ce[None], scores[None, :20])[0]
    assert result.item_ids == ids[:20][np.argsort(-hybrid, kind="stable")].tolist()
    np.testing.assert_allclose([i.score for i in result.items], np.sort(hybrid)[::-1], rtol=1e-4, atol=1e-6)


def test_a_residual_ranker_is_served_as_its_base_plus_its_correction(tiny, tmp_path):
    """A ranker trained with the residual objective carries its base retrieval blend; with no fitted blend the
    recommender orders the top-M by base offset + cross-encoder score, not by the correction alone."""
    from ranking.blend import HybridBlend
    from ranking.cross_encoder import CrossEncoderRanker
    from ranking.residual import base_offsets

    rng = np.random.default_rng(1)
    retrieval = np.sort(rng.normal(size=(200, 20)), axis=1)[:, ::-1].copy()
    base = HybridBlend().fit(np.zeros_like(retrieval), retrieval, np.minimum(rng.geometric(0.3, 200) - 1, 19))
    ranker = CrossEncoderRanker.load(tiny["ranker"])
    ranker.meta["residual_base"] = base.to_dict()
    folder = ranker.save(tmp_path / "residual")
    rec = Recommender.load(tiny["artifact"], folder,
                           config=RecommenderConfig(retrieve_k=40, max_m=20, min_m=3, calibrate=False))
    user = known_user(tiny, 5)
    result = rec.recommend(user, k=20, budget_ms=60_000)
    rec.close()
    assert result.path == "reranked"
    ids, scores = rec.retriever.retrieve(user, 40)
    ce = rec.ranker.score(rec.retriever.stored_history(user), ids[:20])
    expected = base_offsets(base, scores[None, :20])[0] + ce
    assert result.item_ids == ids[:20][np.argsort(-expected, kind="stable")].tolist()
    np.testing.assert_allclose([i.score for i in result.items], np.sort(expected)[::-1], rtol=1e-4, atol=1e-6)


def test_allow_and_deny_filter_the_candidates(tiny, loaded):
    user = known_user(tiny, 4)
    base = loaded.recommend(user, k=10, budget_ms=60_000, explain=False)
    denied = loaded.recommend(user, k=10, budget_ms=60_000, deny=base.item_ids[:3], explain=False)
    assert not set(base.item_ids[:3]) & set(denied.item_ids)
    allow = base.item_ids[3:8]
    allowed = loaded.recommend(user, k=10, budget_ms=60_000, allow=allow, explain=False)
    assert set(allowed.item_ids) == set(allow)
    with pytest.raises(UnknownIdError, match="allow"):
        loaded.recommend(user, allow=[10**9])


# ---- loading -------------------------------------------------------------------------------------------
def test_corrupted_or_mismatched_artifacts_refuse_to_load(tiny, tmp_path):
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(tiny["artifact"], copy)
    tensors = next((copy / "retriever").rglob("tensors.safetensors"))
    raw = bytearray(tensors.read_bytes())
    raw[-10] ^= 0xFF
    tensors.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum"):
        Recommender.load(copy, tiny["ranker"])

    from ranking.cross_encoder import CrossEncoderRanker

    ranker = CrossEncoderRanker.load(tiny["ranker"])
    keep = ranker.items.ids[:-5]  # a ranker built on a smaller catalogue
    smaller = CrossEncoderRanker.build(tiny["events"].items, type(ranker.items)(keep, name="item"), ranker.config,
                                       encoder=ranker.model.bert, tokenizer=ranker.tokenizer)
    smaller.save(tmp_path / "smaller")
    with pytest.raises(ArtifactError, match="lacks 5 of the retriever's"):
        Recommender.load(tiny["artifact"], tmp_path / "smaller")
    with pytest.raises(ArtifactError, match="no such folder"):
        Recommender.load(tmp_path / "nowhere")


def test_the_real_latency_model_plans_when_available(tiny):
    latency = pytest.importorskip("ranking.latency")
    rec = fresh(tiny)
    rec.latency = latency.calibrate(rec.ranker, latency.LatencyConfig(budget_s=0.3, repeats=1))
    result = rec.recommend(known_user(tiny), k=10, budget_ms=60_000)
    rec.close()
    assert result.path == "reranked" and result.reranked_m == 20


# ---- batch ---------------------------------------------------------------------------------------------
def test_batch_candidates_rerank_the_top_m_like_the_online_path(tiny, loaded, tmp_path):
    users = tiny["split"].users.ids[:12]
    stats = generate_candidates(loaded.retriever, tmp_path / "c.parquet", k=40, users=users, ranker=loaded.ranker,
                                rerank_m=20, progress=False)
    table = pd.read_parquet(stats.path)
    assert stats.reranked_m == 20 and stats.users == 12 and stats.users_per_second > 0
    assert {"retrieval_score", "rerank_score", "reranked"} <= set(table.columns)
    for user in users[:4]:
        offline = table[table["user_id"] == user].sort_values("rank")["item_id"].head(10).tolist()
        online = loaded.recommend(int(user), k=10, budget_ms=60_000, explain=False).item_ids
        assert offline == online
    from pipeline.cli import main

    assert main(["candidates", "--artifacts", str(tiny["artifact"]), "--out", str(tmp_path / "cli.parquet"),
                 "--k", "10", "--rerank", str(tiny["ranker"]), "--rerank-m", "5", "--threads", "1"]) == 0
    written = pd.read_parquet(tmp_path / "cli.parquet")
    assert written.groupby("user_id")["reranked"].sum().eq(5).all()
    ids = np.array([[5, 6, -1]])
    out_ids, _, _, ce = rerank_lists(loaded.ranker, [np.array([1, 2])], ids, np.array([[3.0, 2.0, -np.inf]]), 3)
    assert out_ids[0, -1] == -1 and np.isnan(ce[0, -1])  # padding stays last, unscored


def test_the_reranker_reads_the_candidate_fusion_and_a_plain_request_gets_the_served_list(tiny, tmp_path):
    """A hybrid whose served list is one component (popularity, chosen as if by validation NDCG@10) but whose
    candidates fuse both: a reranked request reorders the candidate list, a request without a reranker
    returns the served list exactly."""
    import dataclasses

    from pipeline.artifacts import load_artifact, save_artifact

    hybrid = load_artifact(tiny["artifact"]).retriever
    hybrid.config = dataclasses.replace(hybrid.config, served_method="rrf", served_weights=(0.0, 1.0))
    folder = save_artifact(tmp_path / "artifacts", hybrid, tiny["events"].items, config={}, data={"name": "tiny"},
                           metrics={}, version="served")
    user = known_user(tiny)
    config = RecommenderConfig(retrieve_k=40, max_m=20, min_m=3, calibrate=False)
    rec = Recommender.load(folder, tiny["ranker"], config=config)
    assert rec.retriever.served_source == "popularity"
    candidates, _ = rec.retriever.for_candidates().retrieve(user, 40)
    served, _ = rec.retriever.retrieve(user, 40)
    assert not np.array_equal(candidates[:20], served[:20])
    result = rec.recommend(user, k=30, budget_ms=60_000)
    assert result.path == "reranked"
    ce = rec.ranker.score(rec.retriever.stored_history(user), candidates[:20])
    assert result.item_ids == [int(i) for i in list(candidates[:20][np.argsort(-ce, kind="stable")]) +
                               list(candidates[20:30])]
    rec.close()
    plain = Recommender.load(folder, tiny["ranker"], config=dataclasses.replace(config, rerank=False))
    assert plain.recommend(user, k=10, budget_ms=60_000).item_ids == served[:10].tolist()
    plain.close()
