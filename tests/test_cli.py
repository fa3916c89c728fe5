"""The CLI end to end on ml-latest-small: train, evaluate, recommend, candidates; and its errors."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from data.errors import ArtifactError
from pipeline.cli import main


@pytest.fixture(scope="module")
def trained(ml_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    code = main(["train", "--model", "als", "--data-path", str(ml_path), "--artifacts", str(root)])
    assert code == 0
    return root


def test_train_writes_a_versioned_artifact_with_manifest(trained, capsys):
    version = (trained / "LATEST").read_text().strip()
    folder = trained / version
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "shortlist_artifact" and manifest["model"] == "als"
    assert manifest["data"]["stats"]["users"] == 610 and manifest["data"]["stats"]["items"] == 3650
    assert len(manifest["data"]["fingerprint"]) == 16 and "numpy" in manifest["versions"]
    test = manifest["metrics"]["test"]
    assert test["NDCG@10"] > manifest["metrics"]["baselines_test"]["popularity"]["NDCG@10"]
    assert len(manifest["metrics"]["validation"]["als"]["trials"]) == 12
    assert not list(trained.glob(".*.tmp"))  # nothing half-written left behind


def test_evaluate_reproduces_the_saved_metrics(trained, ml_path, capsys):
    assert main(["evaluate", "--artifacts", str(trained), "--data-path", str(ml_path), "--json"]) == 0
    out = capsys.readouterr().out
    row = json.loads(out[out.index("{"):])
    saved = json.loads((trained / (trained / "LATEST").read_text().strip() / "manifest.json").read_text())
    assert row["NDCG@10"] == pytest.approx(saved["metrics"]["test"]["NDCG@10"], abs=1e-9)


def test_recommend_prints_titles_and_handles_unknown_users(trained, capsys):
    assert main(["recommend", "--user", "1", "--k", "5", "--artifacts", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "personalised" in out and out.count("\n| ") >= 6 and "(19" in out  # titles carry years
    assert main(["recommend", "--user", "987654", "--k", "3", "--artifacts", str(trained)]) == 0
    assert "cold-start" in capsys.readouterr().out


def test_candidates_writes_parquet_for_all_users(trained, tmp_path, capsys):
    out = tmp_path / "c.parquet"
    assert main(["candidates", "--out", str(out), "--k", "20", "--artifacts", str(trained)]) == 0
    table = pd.read_parquet(out)
    assert table["user_id"].nunique() == 610 and len(table) == 610 * 20
    assert table.groupby("user_id")["rank"].apply(lambda r: list(r) == list(range(1, 21))).all()
    assert "users/s" in capsys.readouterr().out


def test_corrupted_artifact_refuses_with_a_clear_message(trained, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(trained / (trained / "LATEST").read_text().strip(), copy)
    index_file = copy / "retriever" / "index" / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:-16] + b"\0" * 16)
    assert main(["recommend", "--user", "1", "--artifacts", str(copy)]) == 2
    assert "checksum" in capsys.readouterr().err


def test_missing_artifacts_say_how_to_fix(tmp_path, capsys):
    assert main(["recommend", "--user", "1", "--artifacts", str(tmp_path)]) == 2
    assert "shortlist train" in capsys.readouterr().err


def test_embeddings_export_matches_the_model(trained, tmp_path):
    import numpy as np

    from pipeline.artifacts import load_artifact

    assert main(["embeddings", "--out", str(tmp_path / "emb"), "--artifacts", str(trained)]) == 0
    items = pd.read_parquet(tmp_path / "emb" / "items.parquet")
    users = pd.read_parquet(tmp_path / "emb" / "users.parquet")
    model = load_artifact(trained).retriever
    assert len(items) == 3650 and len(users) == 610
    np.testing.assert_allclose(np.stack(items["embedding"]), model.item_factors)
    # a user's top item by dot product is what retrieve() returns first (seen items aside)
    scores = np.stack(users["embedding"])[0] @ np.stack(items["embedding"]).T
    seen = set(model.seen_rows(0).tolist())
    best = max((s, r) for r, s in enumerate(scores) if r not in seen)[1]
    assert model.retrieve(int(users["user_id"][0]), 1)[0][0] == items["item_id"][best]


@pytest.fixture(scope="module")
def with_ranker(trained):
    """A (very short) second stage for the ALS artifact: uniform negatives, no text features, so it trains
    in seconds; what it learns does not matter here, only that every CLI path serves it."""
    from pipeline.second_stage import SecondStageConfig, train_artifact_ranker
    from ranking.item_config import ItemTokenConfig, ItemTrainerConfig

    trainer = ItemTrainerConfig(max_steps=6, batch_size=16, n_hard=0, n_uniform=8, eval_every=3, progress=False)
    config = SecondStageConfig(model=ItemTokenConfig(hidden=16, heads=2, ffn=32, id_dim=8, head_hidden=8,
                                                     use_text=False), trainer=trainer,
                               student_trainer=trainer, retrain=True)
    return train_artifact_ranker(trained, config, progress=False)


def test_train_ranker_writes_teacher_and_student_beside_the_artifact(trained, with_ranker):
    from pipeline.second_stage import ranker_folder
    from ranking.item_ranker import ItemTokenRanker

    folder = ranker_folder(trained)
    assert folder.parent.name == "rankers" and folder == with_ranker.folder
    teacher = ItemTokenRanker.load(folder / "item-teacher")
    student = ItemTokenRanker.load(folder / "item-student")
    assert teacher.hybrid_head and student.hybrid_head
    # the default student keeps the teacher's 2 layers; its FFN (128 by default) cannot be wider than the teacher's 32
    assert student.config.layers == 2 and student.config.ffn == 32 == teacher.config.ffn
    assert teacher.meta["serving_retriever"] == "als"
    assert teacher.meta["candidates"]["name"] == "als" and student.meta["candidates"] == teacher.meta["candidates"]
    served = json.loads((folder / "served.json").read_text())
    assert served["served"] in ("item-teacher", "item-student") and with_ranker.served == served
    from pipeline.evaluate import resolve_ranker

    assert resolve_ranker("auto", trained) == folder / served["served"]
    # the artifact's own folder is untouched (its checksums still verify)
    assert main(["recommend", "--user", "1", "--k", "3", "--artifacts", str(trained)]) == 0


def test_evaluate_and_recommend_with_the_ranker(trained, with_ranker, ml_path, capsys):
    assert main(["evaluate", "--artifacts", str(trained), "--data-path", str(ml_path), "--ranker", "auto"]) == 0
    out = capsys.readouterr().out
    assert "retrieval only" in out and "two-stage (served)" in out and "dNDCG@10" in out
    assert main(["recommend", "--user", "1", "--k", "5", "--artifacts", str(trained), "--ranker", "auto"]) == 0
    out = capsys.readouterr().out
    assert "Retrieval order" in out and "Served list" in out and "per-stage latency" in out and "(19" in out


def test_serve_resolves_ranker_auto_and_refuses_it_without_a_ranker(trained, with_ranker, tmp_path):
    import argparse

    from pipeline.serve import add_arguments, build_app

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    from fastapi.testclient import TestClient

    app = build_app(parser.parse_args(["--artifacts", str(trained), "--ranker", "auto", "--no-warm-up"]))
    with TestClient(app) as client:
        assert app.state.shortlist.ready.wait(30)
        assert client.get("/readyz").status_code == 200
        body = client.post("/rerank", json={"history": [1, 50, 260], "candidates": [2571, 1, 50], "top_n": 2})
        assert body.status_code == 200 and len(body.json()["results"]) == 2  # a ranker is loaded
    bare = shutil.copytree(trained, tmp_path / "bare", ignore=shutil.ignore_patterns("rankers"))
    with pytest.raises(ArtifactError, match="train-ranker"):
        build_app(parser.parse_args(["--artifacts", str(bare), "--ranker", "auto"]))


def test_the_served_ranker_is_chosen_on_validation(tmp_path):
    from types import SimpleNamespace

    from pipeline.second_stage import SERVED_FILE, STUDENT_DIR, TEACHER_DIR, choose_served, served_ranker

    def ranker(gain: float, use: bool = True) -> SimpleNamespace:
        report = {"cv_ndcg@10_blend": 0.08 + gain, "cv_ndcg@10_retrieval": 0.08}
        return SimpleNamespace(hybrid_head={"use_blend": use, "report": report})

    assert choose_served(ranker(0.010), ranker(0.009), 0.8)["served"] == STUDENT_DIR  # keeps 90%
    lost = choose_served(ranker(0.010), ranker(0.007), 0.8)
    assert lost["served"] == TEACHER_DIR and "70%" in lost["reason"]
    # a head that lost on validation counts as no gain: the faster student is served (neither reranks)
    assert choose_served(ranker(0.010, use=False), ranker(0.0, use=False))["served"] == STUDENT_DIR
    assert choose_served(ranker(0.010), None)["served"] == TEACHER_DIR
    # reading the choice back: missing file -> the student; a bad name is refused with the fix
    for name in (TEACHER_DIR, STUDENT_DIR):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    assert served_ranker(tmp_path) == tmp_path / STUDENT_DIR
    (tmp_path / SERVED_FILE).write_text(json.dumps({"served": TEACHER_DIR}))
    assert served_ranker(tmp_path) == tmp_path / TEACHER_DIR
    (tmp_path / SERVED_FILE).write_text(json.dumps({"served": "../elsewhere"}))
    with pytest.raises(ArtifactError, match="rerun the second stage"):
        served_ranker(tmp_path)


def test_second_stage_config_round_trips_and_validates():
    from data.errors import ConfigError
    from pipeline.second_stage import SecondStageConfig, main
    from retrieval.two_tower import TwoTowerConfig

    config = SecondStageConfig(protocol="last_n", two_tower=TwoTowerConfig(loss="full_softmax"),
                               student_layers=(1,), student_ffn=None, hybrid_ms=(20, 100), student_keep=0.5)
    assert SecondStageConfig.from_json(config.to_json()) == config
    assert SecondStageConfig.from_json(SecondStageConfig().to_json()) == SecondStageConfig()
    for bad in ({"protocol": "random"}, {"hybrid_ms": ()}, {"hybrid_ms": (1, 50)}, {"student_keep": 1.5}):
        with pytest.raises(ConfigError):
            SecondStageConfig(**bad)
    # an unknown loss is refused by the flag parser (exit 2, naming the choices)
    with pytest.raises(SystemExit):
        main(["--retriever-loss", "hinge"])


def test_a_ranker_is_reused_only_with_the_candidates_it_learned_from(caplog):
    """The teacher records its candidate retriever (name, config less speed fields, history); a saved one
    is reused only with the same retriever, and one saved before the record passes with a warning."""
    from types import SimpleNamespace

    from pipeline.second_stage import candidate_identity, learned_from
    from retrieval.two_tower import TwoTowerConfig

    def retriever(**change):
        return SimpleNamespace(name="two_tower", config=TwoTowerConfig(**change), history_fingerprint="h1")

    ranker = SimpleNamespace(meta={"candidates": json.loads(json.dumps(candidate_identity(retriever())))})
    assert learned_from(ranker, retriever())
    assert learned_from(ranker, retriever(threads=4, progress=False))  # speed only
    assert not learned_from(ranker, retriever(ema_epochs=0.0))  # another two-tower
    other_history = retriever()
    other_history.history_fingerprint = "h2"
    assert not learned_from(ranker, other_history)
    with caplog.at_level("WARNING"):
        assert learned_from(SimpleNamespace(meta={}), retriever(), "old-folder")
    assert "old-folder" in caplog.text and "--retrain" in caplog.text


def test_the_ranker_table_names_the_best_head_tried_even_when_none_is_used(with_ranker):
    """When no head beats the served list, the head kept is a fallback; the table also names the strongest
    one tried, so "reads co-visitation: False" does not hide that a co-visitation head was tried and lost."""
    from pipeline.cli import _best_head

    report = {"by_m": {"20": {"cv_ndcg@10_blend": 0.081}, "50": {"cv_ndcg@10_blend": 0.085},
                       "50+covisit": {"cv_ndcg@10_blend": 0.0977}, "100+covisit": {"cv_ndcg@10_blend": 0.09}},
              "use_blend": False}
    assert _best_head(report) == "M=50 +covisit: 0.0977"
    assert _best_head({}) == ""
    real = with_ranker.teacher["hybrid_head"]["report"]
    best = max(v["cv_ndcg@10_blend"] for v in real["by_m"].values())
    assert _best_head(real).endswith(f": {best:.4f}")
