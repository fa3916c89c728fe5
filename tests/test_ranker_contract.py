"""One contract for every reranker variant: the item-token cross-encoder and the title cross-encoder.

Each variant is a small subclass of :class:`RankerContract` that builds a tiny random ranker (no pretrained
weights) over :func:`ranking.testing.tiny_catalogue`; the contract checks the invariants a pipeline relies
on: candidate-order invariance, one pass equals single-candidate scoring, batched equals single, save/load
identity, merged LoRA equals unmerged, new items scored from content, clear errors for unknown ids, empty
input gives empty output.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from data.dataset import Interactions
from data.errors import ArtifactError, DataValidationError, UnknownIdError
from data.vocab import IdVocab
from ranking.loading import load_ranker
from ranking.testing import tiny_catalogue, tiny_encoder, tiny_text_model, tiny_tokenizer

HISTORY = [100, 103, 104, 110]
CANDIDATES = np.array([101, 102, 105, 106, 107, 108, 109, 111])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return str(tiny_text_model(tmp_path_factory.mktemp("text")))


@pytest.fixture(scope="module")
def catalogue():
    return tiny_catalogue()


def perturb(model: torch.nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """Move every weight away from its (often symmetric) init so scores differ between items."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


class RankerContract:
    """The invariants; subclasses say how to build a ranker and wrap its model with LoRA."""

    @pytest.fixture
    def ranker(self, tokenizer, text_model, catalogue):
        return self.make(tokenizer, text_model, catalogue)

    def make(self, tokenizer, text_model, catalogue, **kwargs):
        raise NotImplementedError

    def backend_for(self, ranker, model):
        raise NotImplementedError

    def wrap_lora(self, model):
        raise NotImplementedError

    def test_scores_do_not_depend_on_candidate_order(self, ranker):
        scores = ranker.score(HISTORY, CANDIDATES)
        perm = np.random.default_rng(0).permutation(CANDIDATES.size)
        np.testing.assert_allclose(ranker.score(HISTORY, CANDIDATES[perm]), scores[perm], atol=1e-5)
        ids, ranked = ranker.rank(HISTORY, CANDIDATES[perm])
        np.testing.assert_array_equal(ids, CANDIDATES[np.argsort(-scores, kind="stable")])
        assert np.all(np.diff(ranked) <= 0) and np.ptp(scores) > 0

    def test_one_pass_equals_single_candidate_scoring(self, ranker):
        together = ranker.score(HISTORY, CANDIDATES)
        alone = np.array([ranker.score(HISTORY, [c])[0] for c in CANDIDATES])
        np.testing.assert_allclose(together, alone, atol=1e-5)

    def test_batched_lists_equal_single_requests(self, ranker):
        histories = [HISTORY, [102], [], [100, 101, 102, 103, 104, 105]]
        table = np.array([CANDIDATES[:5], np.r_[CANDIDATES[2:5], -1, -1], CANDIDATES[3:8], CANDIDATES[:5]])
        batched = ranker.score_lists(histories, table)
        for i, h in enumerate(histories):
            valid = table[i] >= 0
            np.testing.assert_allclose(batched[i, valid], ranker.score(h, table[i, valid]), atol=1e-5)
            assert np.all(np.isneginf(batched[i, ~valid]))

    def test_predict_matches_score_in_input_order(self, ranker):
        pairs = [([100, 101], 105), ([102], 104), ([100, 101], 103), ([102], 106)]
        expected = [ranker.score(h, [i])[0] for h, i in pairs]
        np.testing.assert_allclose(ranker.predict(pairs, batch_size=1), expected, atol=1e-5)
        np.testing.assert_allclose(ranker.predict(pairs), expected, atol=1e-5)

    def test_user_ids_read_the_stored_history_and_unknown_users_get_an_empty_one(self, ranker):
        events = pd.DataFrame({"user_id": [1, 1, 1], "item_id": HISTORY[:3], "timestamp": [1, 2, 3]})
        ranker.set_history(Interactions(events))
        np.testing.assert_allclose(ranker.score(1, CANDIDATES), ranker.score(HISTORY[:3], CANDIDATES), atol=1e-6)
        np.testing.assert_allclose(ranker.score(424242, CANDIDATES), ranker.score([], CANDIDATES), atol=1e-6)
        ids, scores = ranker.rank(424242, CANDIDATES, top_k=2)
        assert ids.shape == (2,) and scores[0] >= scores[1]

    def test_empty_input_gives_empty_output(self, ranker):
        ids, scores = ranker.rank(HISTORY, [])
        assert ids.shape == (0,) and scores.shape == (0,)
        assert ranker.score(7, []).shape == (0,)
        assert ranker.predict([]).shape == (0,)
        out = ranker.score_lists([HISTORY], np.full((1, 3), -1))
        assert out.shape == (1, 3) and np.all(np.isneginf(out))

    def test_unknown_ids_raise_naming_them(self, ranker):
        with pytest.raises(UnknownIdError, match="999"):
            ranker.rank(HISTORY, [101, 999, 102])
        with pytest.raises(UnknownIdError, match="12345"):
            ranker.score([100, 12345], [101])
        with pytest.raises(DataValidationError):
            ranker.rank(HISTORY, [[101, 102]])
        with pytest.raises(DataValidationError):
            ranker.rank(HISTORY, [101], top_k=0)

    def test_save_load_gives_identical_scores(self, ranker, tmp_path):
        ranker.save(tmp_path / "r")
        loaded = load_ranker(tmp_path / "r")
        assert type(loaded) is type(ranker) and loaded.items == ranker.items
        np.testing.assert_array_equal(loaded.score(HISTORY, CANDIDATES), ranker.score(HISTORY, CANDIDATES))

    def test_a_tampered_weights_file_refuses_to_load(self, ranker, tmp_path):
        folder = ranker.save(tmp_path / "r")
        weights = folder / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-8:] = b"\x00" * 8
        weights.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="model.safetensors"):
            load_ranker(folder)

    def test_merged_lora_equals_unmerged(self, ranker):
        from ranking.trainer import merge_adapters

        wrapped = self.wrap_lora(ranker.model)
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_" in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=generator))  # adapters away from their no-op init
        unmerged = copy.copy(ranker)
        unmerged.backend = self.backend_for(ranker, wrapped)
        unmerged.clear_cache()
        before = unmerged.score(HISTORY, CANDIDATES)
        base = copy.copy(ranker)
        merged = merge_adapters(wrapped)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        base.backend = self.backend_for(ranker, merged)
        base.clear_cache()
        np.testing.assert_allclose(base.score(HISTORY, CANDIDATES), before, rtol=1e-4, atol=1e-4)

    def test_a_new_item_scores_from_content(self, tokenizer, text_model, catalogue):
        table, _ = catalogue
        ranker = self.make(tokenizer, text_model, catalogue, content_only=True)
        twin = table[table["item_id"] == 105].assign(item_id=9105)  # the same content under a new id
        with pytest.raises(UnknownIdError, match="9105"):
            ranker.score(HISTORY, [9105])
        ranker.add_items(twin)
        assert 9105 in ranker.items
        got = ranker.score(HISTORY, [105, 9105, 106])
        assert got[1] == pytest.approx(got[0], abs=1e-5) and got[1] != pytest.approx(got[2], abs=1e-4)
        with pytest.raises(DataValidationError, match="already"):
            ranker.add_items(twin)


class TestItemTokenRanker(RankerContract):
    def make(self, tokenizer, text_model, catalogue, content_only=False, **kwargs):
        from ranking.item_config import ItemTokenConfig
        from ranking.item_ranker import ItemTokenRanker

        table, items = catalogue
        config = ItemTokenConfig(hidden=16, layers=2, heads=2, ffn=32, max_history=8, id_dim=8, head_hidden=8,
                                 dropout=0.0, id_dropout=0.0, text_model=text_model, text_cache_dir="",
                                 use_ids=not content_only, **kwargs)
        vectors = np.random.default_rng(3).normal(size=(len(items), 6))
        ranker = ItemTokenRanker.build(table, items, config, item_vectors=(vectors, items), seed=0)
        perturb(ranker.model)
        return ranker

    def backend_for(self, ranker, model):
        from ranking.item_ranker import ItemBackend

        return ItemBackend(model)

    def wrap_lora(self, model):
        from ranking.item_config import ItemTrainerConfig
        from ranking.item_trainer import _apply_peft

        return _apply_peft(model, ItemTrainerConfig(peft="lora", lora_r=4))

    def test_history_is_cut_to_the_most_recent_items(self, ranker):
        long = list(range(100, 120))  # 20 items, the model reads 8
        np.testing.assert_allclose(ranker.score(long, CANDIDATES[:3]), ranker.score(long[-8:], CANDIDATES[:3]),
                                   atol=1e-6)
        assert not np.allclose(ranker.score(long, CANDIDATES[:3]), ranker.score(long[:8], CANDIDATES[:3]))

    def test_ids_initialise_from_the_retriever_vectors(self, tokenizer, text_model, catalogue):
        from ranking.item_config import ItemTokenConfig
        from ranking.item_model import id_init
        from ranking.item_ranker import ItemTokenRanker

        table, items = catalogue
        vectors = np.random.default_rng(3).normal(size=(len(items), 8))
        config = ItemTokenConfig(hidden=16, heads=2, ffn=32, max_history=8, id_dim=8, head_hidden=8,
                                 text_model=text_model, text_cache_dir="")
        ranker = ItemTokenRanker.build(table, items, config, item_vectors=(vectors[:10], IdVocab(items.ids[:10])))
        weights = ranker.model.items.ids.weight.detach().numpy()
        np.testing.assert_allclose(weights[:10], id_init(vectors[:10], 8), atol=1e-6)
        assert np.abs(weights[10:]).max() < 0.2  # items the retriever lacks keep the small random init

    def test_int8_backend_stays_close_to_fp32(self, ranker):
        from scipy.stats import spearmanr

        fp32 = ranker.score(HISTORY, CANDIDATES)
        int8 = ranker.with_backend("torch-int8").score(HISTORY, CANDIDATES)
        assert np.abs(int8 - fp32).max() <= 0.15 * max(1.0, fp32.std())
        assert spearmanr(int8, fp32)[0] >= 0.9


class TestItemTokenRankerPreLN(RankerContract):
    """The narrow encoder with pre-LN layers (the same BERT modules, reordered, plus a final LayerNorm)."""

    def make(self, tokenizer, text_model, catalogue, content_only=False, **kwargs):
        return TestItemTokenRanker().make(tokenizer, text_model, catalogue, content_only, norm="pre", **kwargs)

    def backend_for(self, ranker, model):
        return TestItemTokenRanker().backend_for(ranker, model)

    def wrap_lora(self, model):
        return TestItemTokenRanker().wrap_lora(model)


class TestTitleRanker(RankerContract):
    def make(self, tokenizer, text_model, catalogue, content_only=False, **kwargs):
        from ranking.config import RankerConfig, TextConfig
        from ranking.cross_encoder import CrossEncoderRanker

        table, items = catalogue
        config = RankerConfig(mode="one_pass", text=TextConfig(history_tokens=40, history_item_tokens=10,
                                                               item_tokens=10), **kwargs)
        ranker = CrossEncoderRanker.build(table, items, config, encoder=tiny_encoder(len(tokenizer), seed=0),
                                          tokenizer=tokenizer, seed=0)
        perturb(ranker.model, 0.05)
        return ranker

    def backend_for(self, ranker, model):
        from ranking.backends import TorchBackend

        return TorchBackend(model)

    def wrap_lora(self, model):
        from ranking.config import TrainerConfig
        from ranking.trainer import apply_peft

        return apply_peft(model, TrainerConfig(peft="lora", lora_r=4))
