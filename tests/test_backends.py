"""Scoring backends: one contract run for every CPU backend, export/staleness of ONNX, the CUDA bucketing.

Every backend must give the fp32 ``TorchBackend`` scores within its stated tolerance (and rank correlation)
in both modes, keep ``predict`` and ``rank`` consistent, score a candidate the same whatever its position in
the list, and return empty results for empty input. The tiny random ranker's head is scaled so scores
spread (std about 1) and rank correlation means something.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from data.errors import ArtifactError, BackendUnavailableError, ConfigError
from ranking.backends import BACKENDS, TorchBackend, make_backend, within_tolerance
from ranking.config import RankerConfig, TextConfig
from ranking.cross_encoder import CrossEncoderRanker
from ranking.inputs import candidate_batch, history_batch
from ranking.testing import tiny_catalogue, tiny_encoder, tiny_tokenizer

TEXT = TextConfig(history_tokens=40, history_item_tokens=10, item_tokens=10)
MODES = ("one_pass", "pairwise")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def catalogue():
    return tiny_catalogue(n_items=160)


def build(tokenizer, catalogue, mode: str, bucket_size: int = 16) -> CrossEncoderRanker:
    table, items = catalogue
    config = RankerConfig(mode=mode, text=TEXT, bucket_size=bucket_size, threads=1)
    ranker = CrossEncoderRanker.build(table, items, config, encoder=tiny_encoder(len(tokenizer), seed=0),
                                      tokenizer=tokenizer, seed=0)
    with torch.no_grad():
        ranker.model.head[0].weight.mul_(10.0)  # spread the scores (a random head gives near-equal ones)
    return ranker


@pytest.fixture(scope="module")
def references(tokenizer, catalogue):
    return {mode: build(tokenizer, catalogue, mode) for mode in MODES}


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def request_ids(catalogue):
    ids = catalogue[1].ids
    return ids[:8], ids[10:110]  # a history of 8 items, 100 candidates


class BackendContract:
    """The contract every backend meets; subclasses set ``backend``."""

    backend: str

    @pytest.fixture(scope="class", params=MODES)
    @classmethod
    def pair(cls, request, references, onnx_cache):
        reference = references[request.param]
        return reference, reference.with_backend(cls.backend, threads=1, cache_dir=onnx_cache)

    def test_backend_is_the_one_asked_for(self, pair):
        reference, ranker = pair
        assert ranker.backend.name == self.backend
        assert isinstance(reference.backend, TorchBackend) and reference.backend.name == "torch"
        assert ranker.model is reference.model and ranker.tokens is reference.tokens

    def test_scores_match_the_fp32_reference(self, pair, request_ids):
        reference, ranker = pair
        expected, scores = reference.score(*request_ids), ranker.score(*request_ids)
        assert expected.std() > 0.5  # a spread the rank correlation can see
        assert within_tolerance(scores, expected, ranker.backend.tolerance), np.abs(scores - expected).max()
        assert spearmanr(scores, expected).statistic >= ranker.backend.min_spearman

    def test_predict_agrees_with_rank(self, pair, request_ids):
        _, ranker = pair
        history, candidates = request_ids
        items, ranked = ranker.rank(history, candidates)
        predicted = ranker.predict([(history, c) for c in candidates])
        by_item = dict(zip(candidates.tolist(), predicted.tolist()))
        np.testing.assert_allclose(ranked, [by_item[i] for i in items.tolist()], atol=1e-6)
        assert np.all(np.diff(ranked) <= 0) and sorted(items.tolist()) == sorted(candidates.tolist())

    def test_empty_input_gives_empty_results(self, pair, request_ids):
        _, ranker = pair
        items, scores = ranker.rank(request_ids[0], [])
        assert items.size == 0 and scores.size == 0
        assert ranker.predict([]).size == 0 and ranker.score(request_ids[0], []).size == 0

    def test_a_candidate_scores_the_same_wherever_it_is(self, pair, request_ids):
        _, ranker = pair
        history, candidates = request_ids
        order = np.random.default_rng(3).permutation(candidates.size)
        scores = ranker.score(history, candidates)
        shuffled = ranker.score(history, candidates[order])
        assert within_tolerance(shuffled, scores[order], ranker.backend.tolerance)

    def test_batched_lists_match_the_reference(self, pair, catalogue):
        reference, ranker = pair
        ids = catalogue[1].ids
        histories = [ids[:3], ids[5:20], ids[40:41]]
        candidates = np.stack([ids[30:45], ids[45:60], ids[60:75]])
        candidates[2, 9:] = -1
        expected = reference.score_lists(histories, candidates)
        scores = ranker.score_lists(histories, candidates)
        valid = candidates >= 0
        assert np.array_equal(np.isfinite(scores), valid)
        assert within_tolerance(scores[valid], expected[valid], ranker.backend.tolerance)

    def test_cache_is_the_rankers_own(self, pair, request_ids):
        reference, ranker = pair
        if ranker.mode != "one_pass":
            pytest.skip("only the one-pass mode caches history keys/values")
        reference.clear_cache()
        ranker.score(*request_ids)
        ranker.score(*request_ids)
        assert ranker.cache_hits >= 1 and len(ranker._cache) == 1 and len(reference._cache) == 0


class TestTorch(BackendContract):
    backend = "torch"


class TestTorchInt8(BackendContract):
    backend = "torch-int8"

    def test_the_shared_model_stays_fp32(self, pair):
        reference, ranker = pair
        assert not any("quantized" in type(m).__module__ for m in reference.model.modules())
        dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
        quantized = [m for m in ranker.backend.model.modules() if isinstance(m, dynamic_linear)]
        assert len(quantized) == 6 * 2  # query, key, value, attention output, intermediate, output x 2 layers


class TestTorchBf16(BackendContract):
    backend = "torch-bf16"

    def test_scores_are_float32_and_state_is_bf16(self, pair, request_ids):
        _, ranker = pair
        assert ranker.score(*request_ids).dtype == np.float32
        assert next(ranker.backend.model.parameters()).dtype == torch.bfloat16


class TestOnnx(BackendContract):
    backend = "onnx"

    def test_matches_torch_within_1e_4(self, pair, request_ids):
        reference, ranker = pair
        assert np.abs(ranker.score(*request_ids) - reference.score(*request_ids)).max() <= 1e-4


class TestOnnxInt8(BackendContract):
    backend = "onnx-int8"


# ---- the ONNX export folder ---------------------------------------------------------------------
def test_onnx_export_is_reused_and_a_stale_one_refused(tokenizer, catalogue, tmp_path, request_ids):
    from ranking.onnx_backend import OnnxBackend, check_export

    ranker = build(tokenizer, catalogue, "one_pass")
    OnnxBackend(ranker.model, cache_dir=tmp_path)
    graph = tmp_path / "fp32" / "candidates.onnx"
    stamp = graph.stat().st_mtime_ns
    OnnxBackend(ranker.model, cache_dir=tmp_path)
    assert graph.stat().st_mtime_ns == stamp  # same weights: the export is reused
    with pytest.raises(ArtifactError, match="quantized"):
        check_export(tmp_path / "fp32", ranker.model, quantize=True)

    with torch.no_grad():
        ranker.model.head[0].bias.add_(1.0)  # new weights: the export is stale
    with pytest.raises(ArtifactError, match="stale"):
        check_export(tmp_path / "fp32", ranker.model)
    with pytest.raises(ArtifactError, match="stale"):
        OnnxBackend(ranker.model, cache_dir=tmp_path, reexport=False)
    fresh = OnnxBackend(ranker.model, cache_dir=tmp_path)  # re-exported
    check_export(tmp_path / "fp32", ranker.model)
    onnx_ranker = ranker.with_backend("torch")
    onnx_ranker.backend = fresh
    np.testing.assert_allclose(onnx_ranker.score(*request_ids), ranker.score(*request_ids), atol=1e-4)

    graph.write_bytes(graph.read_bytes()[:-10])  # a truncated graph fails its checksum
    with pytest.raises(ArtifactError, match="checksum"):
        OnnxBackend(ranker.model, cache_dir=tmp_path, reexport=False)


def test_an_export_of_an_older_layout_is_stale_and_re_exported(tokenizer, catalogue, tmp_path, request_ids):
    import json

    from ranking.onnx_backend import GRAPHS, OnnxBackend, check_export

    ranker = build(tokenizer, catalogue, "one_pass")
    OnnxBackend(ranker.model, cache_dir=tmp_path)
    folder = tmp_path / "fp32"
    assert sorted(p.name for p in folder.glob("*.onnx")) == sorted(f"{g}.onnx" for g in GRAPHS)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["version"], manifest["files"]["shared.onnx"]  # what the three-graph export wrote
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "shared.onnx").unlink()
    with pytest.raises(ArtifactError, match="stale"):
        check_export(folder, ranker.model)
    with pytest.raises(ArtifactError, match="stale"):
        OnnxBackend(ranker.model, cache_dir=tmp_path, reexport=False)
    OnnxBackend(ranker.model, cache_dir=tmp_path)  # re-exported
    assert check_export(folder, ranker.model)["version"] == 2 and (folder / "shared.onnx").exists()


def test_onnx_one_history_runs_the_shared_graph_and_equals_the_broadcast_graph(references, onnx_cache, request_ids):
    reference = references["one_pass"]
    ranker = reference.with_backend("onnx", threads=1, cache_dir=onnx_cache)
    backend = ranker.backend
    ids = reference.tokens
    short, long = ids.history(ids.rows(request_ids[0][:2], "history")), ids.history(ids.rows(request_ids[0], "history"))
    h_ids, h_mask = history_batch([short, long], pad=ids.special.pad)
    state = backend.encode_history(h_ids, h_mask)
    c_ids, c_mask = candidate_batch(ids.candidates(ids.rows(request_ids[1][:30], "candidate")), ids.special.pad)
    one = {"kv": state["kv"][:, :, :1], "mask": state["mask"][:1], "lengths": state["lengths"][:1]}
    assert not one["mask"].all()  # the short history is padded: masked history keys
    calls = []
    for graph in ("shared", "candidates"):
        session = backend.sessions[graph]
        backend.sessions[graph] = type("Spy", (), {"run": lambda self, *a, g=graph, s=session: calls.append(g)
                                                   or s.run(*a)})()
    shared = backend.score_candidates(one, c_ids, c_mask)
    assert calls == ["shared"]
    broadcast = backend.score_candidates(state, c_ids, c_mask, torch.zeros(c_ids.shape[0], dtype=torch.long))
    assert calls == ["shared", "candidates"]
    expected = TorchBackend(reference.model).score_candidates(
        reference.model.encode_history(h_ids[:1], h_mask[:1]), c_ids, c_mask)
    np.testing.assert_allclose(shared, broadcast, atol=1e-4)
    np.testing.assert_allclose(shared, expected, atol=1e-4)
    assert expected.std() > 0.5


def test_missing_onnxruntime_names_the_extra(references, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError, match=r"\[onnx\]"):
        make_backend("onnx", references["one_pass"].model)


def test_unknown_backend_names_the_choices(references):
    with pytest.raises(ConfigError, match="torch-int8"):
        make_backend("tensorrt", references["one_pass"].model)
    with pytest.raises(ConfigError, match="threads"):
        make_backend("torch", references["one_pass"].model, threads=-1)
    assert set(BACKENDS) == {"torch", "torch-int8", "torch-bf16", "onnx", "onnx-int8", "cuda"}


# ---- CUDA -----------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_backend_is_unavailable_without_a_gpu(references):
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        references["one_pass"].with_backend("cuda")


@pytest.mark.parametrize("mode", MODES)
def test_cuda_bucketing_matches_the_reference_on_cpu(tokenizer, catalogue, mode):
    """The CUDA backend's padding to shape buckets (and chunking past 128 candidates), run eagerly in fp32."""
    from ranking.cuda_backend import CudaBackend

    reference = build(tokenizer, catalogue, mode, bucket_size=160)
    ranker = reference.with_backend("torch")
    ranker.backend = CudaBackend(reference.model, device="cpu", dtype=torch.float32, graphs=False)
    ids = catalogue[1].ids
    history, candidates = ids[:8], ids[:150]
    expected = reference.score(history, candidates)
    np.testing.assert_allclose(ranker.score(history, candidates), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="CUDA graphs"):
        CudaBackend(reference.model, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_backend_matches_the_reference(references, request_ids, mode):
    reference = references[mode]
    ranker = reference.with_backend("cuda")
    for _ in range(2):  # the second call replays the captured graphs
        scores = ranker.score(*request_ids)
        expected = reference.score(*request_ids)
        assert within_tolerance(scores, expected, ranker.backend.tolerance)
        assert spearmanr(scores, expected).statistic >= ranker.backend.min_spearman
