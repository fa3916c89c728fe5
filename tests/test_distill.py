"""Distilled students: exact layer copies, distillation that moves toward the teacher, the saved check.

Tiny random BERT teachers (hidden 32) from :mod:`ranking.testing`; nothing loads pretrained weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.errors import ArtifactError, ConfigError, DataValidationError
from data.io import sha256_file
from ranking.config import RankerConfig, TextConfig
from ranking.cross_encoder import CrossEncoderRanker
from ranking.distill import DistillConfig, distill, distill_lists, ranking_kl
from ranking.scoring import score_lists
from ranking.student import default_layers, make_student, save_student, verify_student, weights_fingerprint
from ranking.testing import colour_task, tiny_catalogue, tiny_encoder, tiny_tokenizer
from ranking.text import ItemTokens

TEXT = TextConfig(history_tokens=40, history_item_tokens=10, item_tokens=10)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def make_teacher(tokenizer, mode="one_pass", layers=4, seed=0, n_items=24):
    table, items = tiny_catalogue(n_items)
    ranker = CrossEncoderRanker.build(table, items, RankerConfig(mode=mode, text=TEXT, head_dropout=0.0),
                                      encoder=tiny_encoder(len(tokenizer), layers=layers, seed=seed),
                                      tokenizer=tokenizer, seed=seed)
    with torch.no_grad():
        # BERT's init (std 0.02) leaves a random tiny encoder's layers near the identity after LayerNorm, so
        # dropping layers would change nothing; larger weights make every layer matter, as in a trained model
        for name, p in ranker.model.bert.encoder.named_parameters():
            if p.dim() == 2:
                p.mul_(10.0)
        for p in ranker.model.head.parameters():  # a wide score range: lists far from uniform
            p.mul_(8.0)
    return ranker


def val_scores(ranker, validation, mode=None):
    return score_lists(ranker.backend, ranker.tokens, mode or ranker.mode, validation.histories,
                       validation.candidates)


# ---- students -----------------------------------------------------------------------------------
def test_default_layers_spread_evenly_and_keep_the_top_layer():
    assert default_layers(6, 3) == (1, 3, 5)
    assert default_layers(6, 2) == (2, 5)
    assert default_layers(6, 1) == (5,)
    assert default_layers(6, 6) == (0, 1, 2, 3, 4, 5)
    assert default_layers(12, 4) == (2, 5, 8, 11)
    for bad in (0, 7, 2.0, True):
        with pytest.raises(ConfigError, match="n_student"):
            default_layers(6, bad)


@pytest.mark.parametrize("layers", [(1, 3), (0,), (3,)])
def test_student_copies_the_chosen_layers_embeddings_and_head_exactly(tokenizer, layers):
    teacher = make_teacher(tokenizer)
    student = make_student(teacher, layers)
    assert len(student.model.bert.encoder.layer) == len(layers)
    assert student.encoder_config["num_hidden_layers"] == len(layers)
    assert teacher.encoder_config["num_hidden_layers"] == 4  # the teacher is untouched
    t_state, s_state = teacher.model.state_dict(), student.model.state_dict()
    for name, tensor in s_state.items():
        if name.startswith("bert.encoder.layer."):
            index, rest = name[len("bert.encoder.layer."):].split(".", 1)
            source = f"bert.encoder.layer.{layers[int(index)]}.{rest}"
        else:
            source = name
        assert torch.equal(tensor, t_state[source]), name
    assert sum(n.startswith("bert.embeddings.") for n in s_state) > 0 and any(n.startswith("head.") for n in s_state)
    assert student.meta["student_layers"] == list(layers) and student.meta["teacher"]["layers"] == 4
    assert student.items == teacher.items and student.mode == teacher.mode


def test_a_student_of_every_layer_scores_exactly_like_the_teacher_and_fewer_layers_do_not(tokenizer):
    teacher = make_teacher(tokenizer, mode="pairwise")
    history, candidates = [100, 103, 106], [101, 102, 104, 105, 107]
    full = make_student(teacher, (0, 1, 2, 3))
    np.testing.assert_array_equal(full.score(history, candidates), teacher.score(history, candidates))
    assert weights_fingerprint(full.model) == weights_fingerprint(teacher.model)
    short = make_student(teacher, (2, 3))
    assert not np.allclose(short.score(history, candidates), teacher.score(history, candidates))
    assert weights_fingerprint(short.model) != weights_fingerprint(teacher.model)


def test_ffn_pruning_drops_the_least_important_neurons_exactly(tokenizer):
    """Neurons whose output weights are zero change nothing: pruning exactly those scores like the unpruned
    student, the config says the new width, and the saved student reloads with it."""
    teacher = make_teacher(tokenizer)
    width = teacher.model.bert.encoder.layer[0].intermediate.dense.out_features  # 64
    dead = np.arange(0, width, 4)  # a quarter of every layer's neurons contribute nothing
    with torch.no_grad():
        for layer in teacher.model.bert.encoder.layer:
            layer.output.dense.weight[:, dead] = 0.0
    history, candidates = [100, 103, 106], [101, 102, 104, 105, 107]
    full = make_student(teacher, (1, 3))
    pruned = make_student(teacher, (1, 3), ffn_width=width - dead.size)
    for layer in pruned.model.bert.encoder.layer:
        assert layer.intermediate.dense.weight.shape == (width - dead.size, 32)
        assert layer.output.dense.weight.shape == (32, width - dead.size)
    assert pruned.encoder_config["intermediate_size"] == width - dead.size
    assert pruned.meta["ffn_pruning"]["width"] == width - dead.size
    np.testing.assert_allclose(pruned.score(history, candidates), full.score(history, candidates), atol=1e-5)
    narrower = make_student(teacher, (1, 3), ffn_width=width // 4)  # live neurons go too: scores move
    assert not np.allclose(narrower.score(history, candidates), full.score(history, candidates), atol=1e-3)
    assert make_student(teacher, (1, 3), ffn_width=width).meta.get("ffn_pruning") is None


def test_a_pruned_student_saves_and_verifies(tokenizer, tmp_path):
    student = make_student(make_teacher(tokenizer), (1, 3), ffn_width=24)
    save_student(student, tmp_path / "pruned")
    assert verify_student(tmp_path / "pruned")["max_abs_diff"] <= 1e-5
    loaded = CrossEncoderRanker.load(tmp_path / "pruned")
    assert loaded.model.bert.encoder.layer[1].intermediate.dense.out_features == 24


@pytest.mark.parametrize("width", [0, 65, 2.5, True])
def test_invalid_ffn_widths_are_refused(tokenizer, width):
    with pytest.raises(ConfigError, match="ffn_width"):
        make_student(make_teacher(tokenizer), (1, 3), ffn_width=width)


@pytest.mark.parametrize("layers", [(), (3, 1), (1, 1), (0, 4), (-1,), "01"])
def test_invalid_layer_choices_are_refused(tokenizer, layers):
    with pytest.raises(ConfigError, match="layers"):
        make_student(make_teacher(tokenizer), layers)


def test_a_shorter_student_text_cuts_the_cached_tokens_like_retokenizing(tokenizer):
    teacher = make_teacher(tokenizer)
    table, items = tiny_catalogue()
    short = TextConfig(history_tokens=24, history_item_tokens=4, item_tokens=3)
    cut = make_student(teacher, (3,), short)
    rebuilt = make_student(teacher, (3,), short, table)
    fresh = ItemTokens.build(table, items, tokenizer, short)
    for rows in ([0, 5, 9], [1, 2, 3, 4, 5, 6, 7]):
        assert cut.tokens.history(rows).tolist() == fresh.history(rows).tolist()
        assert [c.tolist() for c in cut.tokens.candidates(rows)] == [c.tolist() for c in fresh.candidates(rows)]
        assert [c.tolist() for c in rebuilt.tokens.candidates(rows)] == [c.tolist() for c in fresh.candidates(rows)]
    assert max(c.size for c in cut.tokens.candidates(range(24))) == 4  # 3 tokens + [SEP]
    assert cut.config.text == short and teacher.config.text == TEXT
    with pytest.raises(ConfigError, match="item_table"):
        make_student(teacher, (3,), TextConfig(history_tokens=40, history_item_tokens=10, item_tokens=16))


# ---- distillation -------------------------------------------------------------------------------
def test_distillation_moves_a_one_layer_student_toward_the_teacher(tokenizer):
    teacher = make_teacher(tokenizer, layers=3, seed=1)
    seqs, pools, validation = colour_task()
    student = make_student(teacher, (0,))  # the bottom layer: far from the teacher at the start
    before = ranking_kl(val_scores(teacher, validation), val_scores(student, validation))
    config = DistillConfig(steps=60, batch_size=8, list_size=6, hard_pool=14, positions_per_user=3, min_history=2,
                           alpha=1.0, temperature=1.0, learning_rate=3e-3, warmup_steps=5, progress=False, threads=1)
    teacher_weights = weights_fingerprint(teacher.model)
    trained, record = distill_lists(teacher, student, seqs, pools, None, config)
    after = ranking_kl(val_scores(teacher, validation), val_scores(trained, validation))
    assert before > 0.02
    assert after < 0.25 * before, (before, after)
    assert weights_fingerprint(teacher.model) == teacher_weights  # the teacher is never trained
    assert record.steps == 60 and record.best_step == 60 and record.n_train_lists >= 60 * 8
    assert not any(p.requires_grad for p in trained.model.parameters()) and not trained.model.training


@pytest.mark.parametrize("select", ["ndcg", "val_kl"])
def test_early_stopping_keeps_the_best_validated_weights_and_logs_the_teacher(tokenizer, select):
    teacher = make_teacher(tokenizer, layers=2)
    seqs, pools, validation = colour_task()
    config = DistillConfig(steps=20, eval_every=5, patience=2, batch_size=4, list_size=4, hard_pool=14,
                           positions_per_user=2, min_history=2, learning_rate=3e-3, progress=False, threads=1,
                           select=select)
    trained, record = distill_lists(teacher, make_student(teacher, (1,)), seqs, pools, validation, config)
    steps = [h["step"] for h in record.history]
    assert steps[0] == 0 and record.best_step in steps
    assert record.start_metric == pytest.approx(record.history[0]["metric"], abs=1e-6)
    teacher_ndcg = validation_ndcg(teacher, validation)
    assert record.teacher_metric == pytest.approx(teacher_ndcg, abs=1e-9)
    assert validation_ndcg(trained, validation) == pytest.approx(record.best_metric, abs=1e-9)
    best = next(h for h in record.history if h["step"] == record.best_step)
    assert record.best_metric == pytest.approx(best["metric"], abs=1e-6)
    if select == "ndcg":
        assert record.best_metric == pytest.approx(max(h["metric"] for h in record.history), abs=1e-6)
    else:
        assert record.val_kl == pytest.approx(min(h["val_kl"] for h in record.history), abs=1e-6)
        assert len({h["val_kl"] for h in record.history}) > 1  # training moved it: the choice was a real one
    quality = trained.meta["quality"]
    assert quality["student_val_ndcg@10"] == record.best_metric and quality["teacher_val_ndcg@10"] == teacher_ndcg


def validation_ndcg(ranker, validation):
    from ranking.data import reranked_ndcg

    return reranked_ndcg(val_scores(ranker, validation), validation.target_col, validation.n_users)


def test_distillation_is_reproducible_with_a_seed(tokenizer):
    seqs, pools, validation = colour_task()
    config = DistillConfig(steps=4, eval_every=2, batch_size=4, list_size=4, hard_pool=14, positions_per_user=2,
                           min_history=2, progress=False, threads=1)
    scores = []
    for _ in range(2):
        teacher = make_teacher(tokenizer, layers=2)
        trained, _ = distill_lists(teacher, make_student(teacher, (1,)), seqs, pools, validation, config)
        scores.append(trained.score([100, 102], [101, 103, 104]))
    np.testing.assert_array_equal(scores[0], scores[1])


def test_distill_on_a_protocol_split(tokenizer, block_events):
    """Retrieval candidates -> hard negatives and validation lists -> a trained student with histories."""
    import tempfile
    from pathlib import Path

    from data.protocol import leave_one_out
    from retrieval.cf import ALSConfig, ALSRetriever

    split = leave_one_out(block_events)
    retriever = ALSRetriever(ALSConfig(factors=4, iterations=3)).fit(split.history("val"), items=split.items)
    tok = tiny_tokenizer(Path(tempfile.mkdtemp()), ("item", *map(str, range(20)), "a", "b", "|"))
    teacher = CrossEncoderRanker.build(block_events.items, split.items, RankerConfig(text=TEXT),
                                       encoder=tiny_encoder(len(tok), layers=2), tokenizer=tok)
    config = DistillConfig(steps=3, eval_every=2, batch_size=4, list_size=4, hard_pool=10, val_candidates=10,
                           positions_per_user=2, min_history=1, progress=False, threads=1)
    trained, record = distill(teacher, make_student(teacher, (1,)), split, retriever, config)
    assert record.steps == 3 and [h["step"] for h in record.history] == [0, 2, 3]
    assert 0 <= record.teacher_metric <= 1 and 0 <= record.retrieval_metric <= 1
    user = int(split.users.ids[0])
    assert trained.history_of(user).size == (split.train.frame["user_id"] == user).sum()
    with pytest.raises(DataValidationError, match="catalogue"):
        distill(make_teacher(tokenizer), make_student(make_teacher(tokenizer), (1,)), split, retriever, config)


def test_ranking_kl_known_answers():
    same = np.array([[1.0, 2.0, -np.inf], [0.0, 0.0, 0.0]])
    assert ranking_kl(same, same) == pytest.approx(0.0, abs=1e-12)
    p = np.array([[0.0, np.log(3.0)]])  # softmax (0.25, 0.75)
    q = np.array([[0.0, 0.0]])  # (0.5, 0.5)
    expected = 0.25 * np.log(0.5) + 0.75 * np.log(1.5)
    assert ranking_kl(p, q) == pytest.approx(expected)
    assert ranking_kl(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0


# ---- saving and checking ------------------------------------------------------------------------
@pytest.fixture
def saved_student(tokenizer, tmp_path):
    teacher = make_teacher(tokenizer)
    student = make_student(teacher, (1, 3), teacher_folder=tmp_path / "teacher")
    with torch.no_grad():  # weights that differ from the teacher's (as after distillation)
        student.model.head[0].bias.add_(0.25)
    student.meta.update({"distill_config": DistillConfig().to_dict(),
                         "quality": {"student_val_ndcg@10": 0.5, "teacher_val_ndcg@10": 0.6}})
    save_student(student, tmp_path / "student", metrics={"val_ndcg@10": 0.5})
    return student, tmp_path / "student"


def test_a_saved_student_loads_and_scores_like_its_manifest_says(saved_student):
    student, folder = saved_student
    report = verify_student(folder)
    assert report["max_abs_diff"] <= 1e-5 and report["layers"] == 2 and report["student_layers"] == [1, 3]
    manifest = json.loads((folder / "manifest.json").read_text())
    meta = manifest["meta"]
    assert meta["teacher"]["folder"] == "teacher" and meta["teacher"]["layers"] == 4
    assert meta["teacher"]["weights_fingerprint"] != weights_fingerprint(student.model)
    assert meta["distill_config"] == DistillConfig().to_dict() and meta["quality"]["teacher_val_ndcg@10"] == 0.6
    check = meta["check"]
    assert len(check["histories"]) == 3 and all(len(c) == 8 for c in check["candidates"])
    loaded = CrossEncoderRanker.load(folder)
    for history, candidates, scores in zip(check["histories"], check["candidates"], check["scores"]):
        np.testing.assert_allclose(loaded.score(history, candidates), scores, atol=1e-5)
        np.testing.assert_allclose(student.score(history, candidates), scores, atol=1e-6)
        assert np.ptp(scores) > 0


def test_verify_student_refuses_a_tampered_probe(saved_student):
    _, folder = saved_student
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["meta"]["check"]["scores"][1][2] += 1e-3
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="probe"):
        verify_student(folder)


def test_verify_student_refuses_changed_weights_even_with_a_matching_checksum(saved_student):
    from safetensors.torch import load_file, save_file

    _, folder = saved_student
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    name = next(n for n in state if n.startswith("bert.encoder.layer.1.attention.self.query.weight"))
    state[name] = state[name] * 1.01
    save_file(state, str(weights))
    with pytest.raises(ArtifactError, match="checksum"):  # the manifest's checksum catches it first
        verify_student(folder)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["model.safetensors"] = sha256_file(weights)  # a forger updates the checksum too
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="probe"):
        verify_student(folder)


def test_verify_student_refuses_a_ranker_that_is_not_a_student(tokenizer, tmp_path):
    make_teacher(tokenizer).save(tmp_path / "plain")
    with pytest.raises(ArtifactError, match="check"):
        verify_student(tmp_path / "plain")
    with pytest.raises(ArtifactError, match="make_student"):
        save_student(make_teacher(tokenizer), tmp_path / "nope")


def test_distill_config_round_trips_and_validates():
    config = DistillConfig(steps=7, temperature=3.0, alpha=0.25, device="cuda:1", progress=False)
    assert DistillConfig.from_json(config.to_json()) == config
    assert config.sampling().n_negatives == config.list_size - 1
    for bad, match in (({"alpha": 1.5}, "alpha"), ({"temperature": 0}, "temperature"), ({"list_size": 1}, "list_size"),
                       ({"steps": 0}, "steps"), ({"device": "tpu"}, "device"), ({"position_weighting": "x"}, "position"),
                       ({"select": "loss"}, "select")):
        with pytest.raises(ConfigError, match=match):
            DistillConfig(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        DistillConfig.from_dict({"stepz": 3})


# ---- the naive baseline of the speed benchmark -----------------------------------------------------
def test_naive_baseline_scores_like_the_pairwise_model_on_its_own_tokens(tokenizer):
    """``benchmarks.naive``: HF tokenization of the strings + eager BertModel give the ranker's pairwise
    scores of the same token ids (our functional forward), in candidate order."""
    from benchmarks.naive import catalogue_texts, history_text, naive_rank
    from ranking.inputs import PairwiseBatch

    teacher = make_teacher(tokenizer, mode="pairwise", layers=2)
    table, items = tiny_catalogue()
    texts = catalogue_texts(table, items)
    history, candidates = [100, 101, 104], [105, 102, 110, 111]
    scores = naive_rank(teacher, history, candidates, texts, max_length=32, batch_size=3)
    assert history_text(history, texts).startswith(texts[104])  # newest first
    encoded = tokenizer([history_text(history, texts)] * 4, [texts[i] for i in candidates], padding="max_length",
                        max_length=32, truncation=True, return_tensors="pt")
    batch = PairwiseBatch(encoded["input_ids"], encoded["token_type_ids"], encoded["attention_mask"].bool())
    with torch.no_grad():
        expected = teacher.model.score_pairwise(batch).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.ptp(scores) > 0 and encoded["input_ids"].shape == (4, 32)
    assert naive_rank(teacher, history, [], texts).shape == (0,)


def test_student_benchmark_fidelity_is_the_mean_rowwise_spearman():
    from benchmarks.students import spearman_rows

    a = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    assert spearman_rows(a, a) == pytest.approx(1.0)
    assert spearman_rows(a, a[:, ::-1]) == pytest.approx(-1.0)
    b = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])  # one row agrees, one is reversed
    assert spearman_rows(a, b) == pytest.approx(0.0)
    assert np.isnan(spearman_rows(np.ones((1, 4)), a[:1]))  # a constant row has no rank order
