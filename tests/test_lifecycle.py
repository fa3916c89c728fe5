"""One retriever lifecycle: the registry, fit_retriever, the seeded two-tower search, the user's own files.

The registry is the one place a model is named: a new retriever is one class, one config and one
``register`` call (the README's example is :class:`PureSVDRetriever` below), and it then trains through
``fit_retriever``, ``shortlist train --model`` and passes the retriever contract mixin.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import scipy.sparse as sp
from test_retrievers import RetrieverContract

from data.config import JsonConfig, require
from data.errors import ConfigError, DataValidationError
from data.generic import load_interactions
from data.protocol import leave_one_out
from data.synthetic import SyntheticConfig, generate
from pipeline.cli import build_parser, main
from pipeline.config import TrainConfig
from retrieval import registry
from retrieval.base import EmbeddingRetriever
from retrieval.fitting import FitOptions, fit_retriever
from retrieval.index import IndexConfig
from retrieval.tuning import random_points
from retrieval.two_tower import TwoTowerConfig

SYNTH = SyntheticConfig(n_users=200, n_items=80, n_clusters=4, mean_history=15, sequential_strength=0.8,
                        mean_session_length=8, seed=3)
FAST = TwoTowerConfig(dim=16, max_len=12, n_blocks=1, n_heads=1, dropout=0.1, batch_size=32, learning_rate=5e-3,
                      max_epochs=6, eval_every=2, patience=2, n_uniform_negatives=16, n_inbatch_negatives=64,
                      text_model="", text_cache_dir="", progress=False)


# ------------------------------------------------------------------------------ a new retriever, end to end
@dataclass
class PureSVDConfig(JsonConfig):
    """PureSVD (Cremonesi et al. 2010): a truncated SVD of the user x item matrix.

    Attributes:
        factors: singular vectors kept.
        index: the FAISS index of the item vectors.
    """

    factors: int = 8
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self) -> None:
        require(self.factors >= 1, f"PureSVDConfig.factors must be >= 1, got {self.factors}")


class PureSVDRetriever(EmbeddingRetriever):
    name = "pure_svd"
    config_type = PureSVDConfig

    def _learn(self, matrix: sp.csr_matrix, **_) -> tuple[np.ndarray, np.ndarray]:
        k = min(self.config.factors, min(matrix.shape) - 1)
        u, s, vt = sp.linalg.svds(matrix.astype(np.float64), k=k, random_state=0)
        return u * s, vt.T

    def history_query(self, item_rows: np.ndarray) -> np.ndarray:
        return self.item_factors[np.unique(item_rows)].sum(axis=0)  # the fold-in x V


@pytest.fixture
def pure_svd_registered():
    spec = registry.register(registry.RetrieverSpec("pure_svd", PureSVDRetriever, PureSVDConfig,
                                                    search_space={"factors": (2, 4)}))
    yield spec
    registry.SPECS.pop("pure_svd")


class TestPureSVD(RetrieverContract):
    def make(self):
        return PureSVDRetriever(PureSVDConfig(factors=2))

    @pytest.fixture(autouse=True)
    def _registered(self, pure_svd_registered):  # load_retriever finds the class through the registry
        yield


@pytest.fixture(scope="module")
def synth():
    return generate(SYNTH, progress=False)


@pytest.fixture(scope="module")
def split(synth):
    return leave_one_out(synth)


def test_a_registered_retriever_is_tuned_fitted_and_offered_by_the_cli(pure_svd_registered, split):
    fitted = fit_retriever("pure_svd", split, "test", options=FitOptions(progress=False))
    assert [t["factors"] for t in fitted.tuning["pure_svd"]["trials"]] == [2, 4]
    best = max(fitted.tuning["pure_svd"]["trials"], key=lambda t: t["NDCG@10"])
    assert fitted.config.factors == best["factors"]
    assert fitted.model.history_fingerprint == split.history("test").fingerprint()
    args = build_parser().parse_args(["train", "--model", "pure_svd"])
    assert args.model == "pure_svd"
    assert TrainConfig(model="pure_svd", models={"pure_svd": {"factors": 3}}).configs()["pure_svd"] == {"factors": 3}


def test_unknown_names_and_bad_settings_fail_early():
    with pytest.raises(ConfigError, match="unknown retriever 'knn'"):
        registry.spec("knn")
    with pytest.raises(ConfigError, match="model must be one of"):
        TrainConfig(model="knn")
    with pytest.raises(ConfigError, match="unknown field"):
        TrainConfig(models={"als": {"factor": 3}})
    with pytest.raises(ConfigError, match="TrainConfig.two_tower"):
        TrainConfig(models={"two_tower": {"dim": 8}})
    with pytest.raises(ConfigError, match="unknown"):
        registry.RetrieverSpec("x", PureSVDRetriever, PureSVDConfig, search_space={"rank": (1, 2)})
    with pytest.raises(ConfigError, match="not registered"):
        registry.register(registry.RetrieverSpec("mix", PureSVDRetriever, PureSVDConfig, components=("nope",)))


def test_train_config_round_trips_with_the_new_fields():
    config = TrainConfig(model="als", search_trials=2, search_budget_s=60.0, models={"bpr": {"factors": 16}},
                         interactions="events.parquet", items="items.csv")
    assert TrainConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="interactions"):
        TrainConfig(items="items.csv")


# ------------------------------------------------------------------------------ the two-tower's search
def test_random_points_start_from_the_default_then_the_first_points_and_are_seeded():
    space = {"loss": ("sampled_softmax", "full_softmax"), "n_blocks": (1, 2, 3), "dropout": (0.1, 0.2)}
    base = TwoTowerConfig(n_blocks=2, dropout=0.2)
    points, refused = random_points(space, base, 5, first=[{"loss": "full_softmax"}], seed=0)
    assert points[0] == {} and points[1] == {"loss": "full_softmax"} and len(points) == 5 and not refused
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 5  # distinct
    assert points == random_points(space, base, 5, first=[{"loss": "full_softmax"}], seed=0)[0]
    no_full, refused = random_points(space, base, 5, first=[{"loss": "full_softmax"}], seed=0,
                                     allowed=lambda p: p["loss"] != "full_softmax")
    assert {"loss": "full_softmax"} in refused and all(p.get("loss") != "full_softmax" for p in no_full)


def test_the_two_tower_search_tries_the_full_softmax_and_keeps_the_best_on_validation(split):
    fitted = fit_retriever("two_tower", split, "val", configs={"two_tower": FAST},
                           options=FitOptions(search_trials=3, progress=False))
    search = fitted.tuning["two_tower"]
    trials = search["trials"]
    assert len(trials) == 3 and "loss" not in trials[0] and trials[1]["loss"] == "full_softmax"
    best = max(trials, key=lambda t: t["NDCG@10"])
    assert search["best"] == pytest.approx(best["NDCG@10"])
    assert fitted.config.loss == best.get("loss", FAST.loss)
    from retrieval.evaluate import evaluate_retriever

    got = evaluate_retriever(fitted.model, split, "val", ks=(10, 50), n_boot=0).means["NDCG@10"]
    assert got == pytest.approx(best["NDCG@10"], abs=1e-6)  # the model returned is the one scored (trials round)
    # two worker processes (the default) give the same trials as one process
    alone = fit_retriever("two_tower", split, "val", configs={"two_tower": FAST},
                          options=FitOptions(search_trials=3, search_workers=1, progress=False))
    assert [{k: v for k, v in t.items() if k != "fit_s"} for t in alone.tuning["two_tower"]["trials"]] == \
        [{k: v for k, v in t.items() if k != "fit_s"} for t in trials]


def test_past_the_catalogue_limit_the_search_keeps_the_sampled_softmax(split, monkeypatch):
    import retrieval.two_tower as tt

    monkeypatch.setattr(tt, "FULL_SOFTMAX_MAX_ITEMS", len(split.items) - 1)
    fitted = fit_retriever("two_tower", split, "val", configs={"two_tower": FAST},
                           options=FitOptions(search_trials=2, search_workers=1, progress=False))
    search = fitted.tuning["two_tower"]
    assert all(t.get("loss") != "full_softmax" for t in search["trials"])
    assert any(s.get("loss") == "full_softmax" and "not allowed" in s["why"] for s in search["skipped"])


def test_the_time_budget_stops_the_search_after_the_default(split):
    fitted = fit_retriever("two_tower", split, "val", configs={"two_tower": FAST},
                           options=FitOptions(search_trials=3, search_budget_s=1e-3, search_workers=1,
                                              progress=False))
    search = fitted.tuning["two_tower"]
    assert len(search["trials"]) == 1 and len(search["skipped"]) == 2
    assert all("time budget" in s["why"] for s in search["skipped"])


def test_a_composite_reuses_components_fitted_elsewhere(split):
    """``fitted=``: a two-tower trained once (a saved one, say) joins the hybrid as it is; the other
    components are searched and fitted, both fusions tuned, and everything moves to the test stage."""
    from retrieval.two_tower import TwoTowerRetriever

    two_tower = TwoTowerRetriever(FAST).fit(split.history("val"), items=split.items, validation=split)
    got = fit_retriever("hybrid", split, "test", options=FitOptions(progress=False), fitted={"two_tower": two_tower})
    assert got.model.components["two_tower"] is two_tower and "two_tower" not in got.tuning
    assert {"covisit", "als", "hybrid"} <= set(got.tuning) and got.model.sources[:2] == ("two_tower", "covisit")
    assert got.model.history_fingerprint == split.history("test").fingerprint()
    with pytest.raises(ConfigError, match="not among its components"):
        fit_retriever("hybrid", split, "val", fitted={"bpr": two_tower})
    with pytest.raises(DataValidationError, match="do not hold"):  # two_tower now holds the test history
        fit_retriever("hybrid", split, "val", options=FitOptions(progress=False), fitted={"two_tower": two_tower})
    with pytest.raises(ConfigError, match="has none"):
        fit_retriever("als", split, "val", fitted={"two_tower": two_tower})


def test_a_cache_with_a_search_is_refused(split, tmp_path):
    with pytest.raises(ConfigError, match="cache"):
        fit_retriever("two_tower", split, "val", configs={"two_tower": FAST}, cache=tmp_path / "tt")


# ------------------------------------------------------------------------------ the user's own files
@pytest.fixture(scope="module")
def own_files(synth, tmp_path_factory):
    """The synthetic events under other column names, as Parquet, and its item table as CSV."""
    folder = tmp_path_factory.mktemp("own")
    events = synth.frame.rename(columns={"user_id": "uid", "item_id": "sku", "timestamp": "ts"})
    events.to_parquet(folder / "events.parquet", index=False)
    items = synth.items.rename(columns={"item_id": "sku", "title": "name"})[["sku", "name", "genres"]]
    items.to_csv(folder / "items.csv", index=False)
    return folder


def _own_args(folder, *extra):
    return ["train", "--interactions", str(folder / "events.parquet"), "--items", str(folder / "items.csv"),
            "--user-col", "uid", "--item-col", "sku", "--time-col", "ts", "--title-col", "name",
            "--genres-col", "genres", *extra]


def test_train_on_your_own_files_end_to_end(own_files, tmp_path, capsys):
    root = tmp_path / "artifacts"
    assert main([*_own_args(own_files), "--model", "als", "--artifacts", str(root)]) == 0
    out = capsys.readouterr().out
    assert "## als: validation grid" in out and "Saved" in out
    manifest = json.loads((root / (root / "LATEST").read_text().strip() / "manifest.json").read_text())
    assert manifest["data"]["name"] == "events" and manifest["config"]["train"]["columns"]["user"] == "uid"
    assert main(["evaluate", "--artifacts", str(root), "--json"]) == 0  # the files are read again, checked
    out = capsys.readouterr().out
    row = json.loads(out[out.index("{"):])
    assert row["NDCG@10"] == pytest.approx(manifest["metrics"]["test"]["NDCG@10"], abs=1e-9)
    assert main(["recommend", "--user", "5", "--k", "3", "--artifacts", str(root)]) == 0
    import pandas as pd

    titles = pd.read_csv(own_files / "items.csv")["name"].astype(str)
    printed = capsys.readouterr().out
    assert any(t in printed for t in titles)


def test_bad_columns_give_the_librarys_error(own_files, tmp_path, capsys):
    with pytest.raises(DataValidationError) as library:
        load_interactions(own_files / "events.parquet", user_col="user", item_col="sku", time_col="ts")
    args = _own_args(own_files, "--model", "popularity", "--artifacts", str(tmp_path / "a"))
    args[args.index("uid")] = "user"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(library.value) in err and "uid" in err  # names the missing column and lists those present
    assert not (tmp_path / "a").exists()


def test_fit_options_validate():
    with pytest.raises(ConfigError, match="search_trials"):
        FitOptions(search_trials=0)
    assert FitOptions.from_json(FitOptions(index=IndexConfig(factory="HNSW32")).to_json()).index.factory == "HNSW32"
    assert dataclasses.replace(FitOptions(), tune=False).tune is False


def test_a_broken_worker_pool_falls_back_to_this_process(split, monkeypatch, caplog):
    """A spawned worker that dies (say, a caller's script without a main guard) costs time, not the search."""
    from concurrent.futures.process import BrokenProcessPool

    from retrieval import tuning

    def broken(*args, **kwargs):
        raise BrokenProcessPool("a child process terminated abruptly")

    monkeypatch.setattr(tuning, "_run_parallel", broken)
    fitted = fit_retriever("two_tower", split, "val", configs={"two_tower": FAST},
                           options=FitOptions(search_trials=2, search_workers=2, progress=False))
    assert len(fitted.tuning["two_tower"]["trials"]) == 2 and "main" in caplog.text
