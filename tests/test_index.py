"""Contract tests for retrieval.index.ItemIndex: every factory must honour the same search semantics.

The data are synthetic unit vectors in well-separated clusters, so exact answers are known by brute force
(numpy, float64) and ANN indexes should find nearly all of them. External ids are a shuffled, strided range
so a row/id mix-up cannot pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.errors import ArtifactError, ConfigError, DataValidationError, NotFittedError, UnknownIdError
from data.vocab import IdVocab
from retrieval.index import IndexConfig, ItemIndex

N_ITEMS, DIM, N_CLUSTERS, N_QUERIES = 200, 16, 8, 30


def _clustered(seed: int = 0) -> tuple[np.ndarray, np.ndarray, IdVocab]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((N_CLUSTERS, DIM)) * 3.0
    labels = rng.integers(N_CLUSTERS, size=N_ITEMS)
    vectors = centers[labels] + rng.standard_normal((N_ITEMS, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = centers[rng.integers(N_CLUSTERS, size=N_QUERIES)] + rng.standard_normal((N_QUERIES, DIM))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = rng.permutation(np.arange(10_000, 10_000 + 3 * N_ITEMS, 3))
    return vectors.astype(np.float32), queries.astype(np.float32), IdVocab(ids, name="item")


VECTORS, QUERIES, ITEMS = _clustered()


def brute_force(query: np.ndarray, metric: str = "ip", rows: np.ndarray | None = None):
    """Exact (rows, scores) of ``rows`` (default: all) sorted by score desc, then row asc."""
    rows = np.arange(N_ITEMS) if rows is None else np.asarray(rows)
    v = VECTORS[rows].astype(np.float64)
    q = query.astype(np.float64)
    scores = v @ q if metric == "ip" else -((v - q) ** 2).sum(axis=1)
    order = np.lexsort((rows, -scores))
    return rows[order], scores[order]


def exact_scores_of(ids: np.ndarray, query: np.ndarray, metric: str = "ip") -> np.ndarray:
    v = VECTORS[ITEMS.rows(ids)].astype(np.float64)
    q = query.astype(np.float64)
    return v @ q if metric == "ip" else -((v - q) ** 2).sum(axis=1)


class IndexContract:
    """Tests every ItemIndex configuration must pass. Subclasses set ``config``."""

    config: IndexConfig
    min_recall = 0.9

    @pytest.fixture
    def index(self) -> ItemIndex:
        return ItemIndex(self.config).build(VECTORS, ITEMS)

    def test_describe_and_sizes(self, index):
        assert index.describe() == f"{self.config.factory}|{self.config.search_params}"
        assert (index.ntotal, index.dim) == (N_ITEMS, DIM)
        assert index.items == ITEMS

    def test_shapes_and_batch_equals_single(self, index):
        ids, scores = index.search(QUERIES, 10)
        assert ids.shape == scores.shape == (N_QUERIES, 10)
        assert ids.dtype == np.int64 and scores.dtype == np.float32
        for i, query in enumerate(QUERIES):
            one_ids, one_scores = index.search(query, 10)
            assert one_ids.shape == one_scores.shape == (10,)
            np.testing.assert_array_equal(one_ids, ids[i])
            np.testing.assert_array_equal(one_scores, scores[i])

    def test_batch_equals_single_with_exclusions(self, index):
        rng = np.random.default_rng(1)
        exclude = [rng.choice(N_ITEMS, size=rng.integers(0, 60), replace=False) for _ in range(N_QUERIES)]
        ids, scores = index.search(QUERIES, 10, exclude_rows=exclude)
        for i, query in enumerate(QUERIES):
            one_ids, one_scores = index.search(query, 10, exclude_rows=exclude[i])
            np.testing.assert_array_equal(one_ids, ids[i])
            np.testing.assert_array_equal(one_scores, scores[i])

    def test_scores_are_exact_and_sorted(self, index):
        ids, scores = index.search(QUERIES, 10)
        assert (ids >= 0).all()
        for i, query in enumerate(QUERIES):
            np.testing.assert_allclose(scores[i], exact_scores_of(ids[i], query), rtol=1e-6, atol=1e-6)
            assert (np.diff(scores[i]) <= 0).all()
            assert len(set(ids[i].tolist())) == 10

    def test_recall_against_exact(self, index):
        ids, _ = index.search(QUERIES, 10)
        truth, _ = index.exact().search(QUERIES, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())])
        assert recall >= self.min_recall

    def test_ties_break_by_row(self):
        vectors = VECTORS.copy()
        for row in (5, 50, 150):
            vectors[row] = vectors[100]
        index = ItemIndex(self.config).build(vectors, ITEMS)
        ids, scores = index.search(vectors[100], 4)
        np.testing.assert_array_equal(ids, ITEMS.ids[[5, 50, 100, 150]])
        assert len(set(scores.tolist())) == 1

    def test_seen_items_never_returned_and_k_kept(self, index):
        exclude = [brute_force(q)[0][:20] for q in QUERIES]  # the best 20 of each query
        ids, scores = index.search(QUERIES, 10, exclude_rows=exclude)
        for i in range(N_QUERIES):
            assert (ids[i] >= 0).all() and np.isfinite(scores[i]).all()
            assert not set(ITEMS.rows(ids[i]).tolist()) & set(exclude[i].tolist())
            assert len(set(ids[i].tolist())) == 10

    def test_large_exclusion_returns_every_remaining_item(self, index):
        rng = np.random.default_rng(2)
        excluded = rng.choice(N_ITEMS, size=150, replace=False)
        remaining = np.setdiff1d(np.arange(N_ITEMS), excluded)
        query = QUERIES[3]
        ids, scores = index.search(query, remaining.size, exclude_rows=excluded)
        expected_rows, expected_scores = brute_force(query, rows=remaining)
        np.testing.assert_array_equal(ids, ITEMS.ids[expected_rows])
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=1e-6)

    def test_deny_list(self, index):
        top = np.unique(np.concatenate([brute_force(q)[0][:5] for q in QUERIES]))
        deny = np.concatenate([ITEMS.ids[top], [-7, 123_456_789]])  # unknown ids are ignored
        ids, _ = index.search(QUERIES, 10, deny=deny)
        assert (ids >= 0).all()
        assert not set(ids.ravel().tolist()) & set(deny.tolist())
        assert all(len(set(row)) == 10 for row in ids.tolist())

    def test_allow_list_is_exact(self, index):
        rng = np.random.default_rng(3)
        allowed_rows = rng.choice(N_ITEMS, size=15, replace=False)
        ids, scores = index.search(QUERIES, 10, allow=ITEMS.ids[allowed_rows].tolist())
        for i, query in enumerate(QUERIES):
            rows, exact = brute_force(query, rows=allowed_rows)
            np.testing.assert_array_equal(ids[i], ITEMS.ids[rows[:10]])
            np.testing.assert_allclose(scores[i], exact[:10], rtol=1e-6, atol=1e-6)

    def test_allow_combined_with_exclusion_and_padding(self, index):
        allowed_rows = np.arange(0, 40, 5)  # 8 items
        ids, scores = index.search(
            QUERIES[0], 10, allow=ITEMS.ids[allowed_rows], exclude_rows=allowed_rows[:3]
        )
        rows, _ = brute_force(QUERIES[0], rows=allowed_rows[3:])
        np.testing.assert_array_equal(ids[:5], ITEMS.ids[rows])
        assert (ids[5:] == -1).all() and np.isneginf(scores[5:]).all()

    def test_allow_with_unknown_id_raises(self, index):
        with pytest.raises(UnknownIdError, match="allow"):
            index.search(QUERIES[0], 5, allow=[ITEMS.ids[0], 7])

    def test_padding_when_k_exceeds_catalogue(self, index):
        ids, scores = index.search(QUERIES[:3], N_ITEMS + 25)
        for i in range(3):
            assert sorted(ids[i, :N_ITEMS].tolist()) == sorted(ITEMS.ids.tolist())
            assert (np.diff(scores[i, :N_ITEMS]) <= 0).all() and np.isfinite(scores[i, :N_ITEMS]).all()
            assert (ids[i, N_ITEMS:] == -1).all()
            assert np.isneginf(scores[i, N_ITEMS:]).all()

    def test_padding_when_exclusions_leave_fewer_than_k(self, index):
        keep = np.array([7, 42, 99, 123, 180])
        excluded = np.setdiff1d(np.arange(N_ITEMS), keep)
        ids, scores = index.search(QUERIES[:2], 10, exclude_rows=[excluded, excluded])
        for i in range(2):
            rows, _ = brute_force(QUERIES[i], rows=keep)
            np.testing.assert_array_equal(ids[i, :5], ITEMS.ids[rows])
            assert (ids[i, 5:] == -1).all() and np.isneginf(scores[i, 5:]).all()

    def test_save_load_round_trip(self, index, tmp_path):
        exclude = [np.arange(i) for i in range(N_QUERIES)]
        before = index.search(QUERIES, 10, exclude_rows=exclude)
        folder = index.save(tmp_path / "idx")
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["index.faiss", "manifest.json", "vectors.safetensors"]
        loaded = ItemIndex.load(folder, expected_items=IdVocab(ITEMS.ids, name="item"))
        after = loaded.search(QUERIES, 10, exclude_rows=exclude)
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(before[1], after[1])
        assert loaded.describe() == index.describe() and loaded.config == index.config
        # saving again over the same folder replaces it atomically, leaving no temp folders behind
        index.save(folder)
        assert [p.name for p in tmp_path.iterdir()] == ["idx"]

    def test_corrupted_index_file_refuses_to_load(self, index, tmp_path):
        folder = index.save(tmp_path / "idx")
        data = bytearray((folder / "index.faiss").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "index.faiss").write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="checksum"):
            ItemIndex.load(folder)

    @pytest.mark.parametrize(
        "edit",
        [
            lambda m: m.update(ntotal=m["ntotal"] - 1),
            lambda m: m.update(dim=m["dim"] + 1),
            lambda m: m["config"].update(metric="l2" if m["config"]["metric"] == "ip" else "ip"),
            lambda m: m["items"]["ids"].__setitem__(0, -5),
            lambda m: m.update(kind="something_else"),
        ],
        ids=["ntotal", "dim", "metric", "items", "kind"],
    )
    def test_edited_manifest_refuses_to_load(self, index, tmp_path, edit):
        folder = index.save(tmp_path / "idx")
        manifest = json.loads((folder / "manifest.json").read_text())
        edit(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError):
            ItemIndex.load(folder)

    def test_expected_items_mismatch_refuses_to_load(self, index, tmp_path):
        folder = index.save(tmp_path / "idx")
        other = IdVocab(ITEMS.ids[::-1], name="item")  # same ids, different rows
        with pytest.raises(ArtifactError, match="expected_items"):
            ItemIndex.load(folder, expected_items=other)

    def test_bad_queries_and_k(self, index):
        with pytest.raises(DataValidationError, match=r"queries.*dim=16"):
            index.search(np.ones(DIM + 1, dtype=np.float32), 5)
        with pytest.raises(DataValidationError, match=r"queries.*dim=16"):
            index.search(np.ones((3, DIM - 1), dtype=np.float32), 5)
        for bad_k in (0, -1, 2.5, True, "3"):
            with pytest.raises(DataValidationError, match="k must be a positive integer"):
                index.search(QUERIES[0], bad_k)
        nan_query = QUERIES[:3].copy()
        nan_query[1, 4] = np.nan
        with pytest.raises(DataValidationError, match="NaN"):
            index.search(nan_query, 5)
        with pytest.raises(DataValidationError, match="exclude_rows"):
            index.search(QUERIES[:3], 5, exclude_rows=[[1], [2]])
        with pytest.raises(DataValidationError, match="exclude_rows"):
            index.search(QUERIES[0], 5, exclude_rows=[N_ITEMS])

    def test_inputs_not_modified(self):
        vectors, queries = VECTORS.copy(), QUERIES.copy()
        exclude = [np.array([3, 1, 2])] * N_QUERIES
        index = ItemIndex(self.config).build(vectors, ITEMS)
        vectors[0] = 99.0  # the index keeps its own copy
        assert not np.shares_memory(index.vectors, vectors) and index.vectors[0, 0] != 99.0
        index.search(queries, 5, exclude_rows=exclude, deny=[ITEMS.ids[0]])
        np.testing.assert_array_equal(queries, QUERIES)
        np.testing.assert_array_equal(exclude[0], [3, 1, 2])

    def test_l2_scores_are_negative_distances_descending(self):
        config = IndexConfig(**{**self.config.to_dict(), "metric": "l2"})
        index = ItemIndex(config).build(VECTORS, ITEMS)
        ids, scores = index.search(QUERIES, 10)
        for i, query in enumerate(QUERIES):
            assert (scores[i] <= 0).all() and (np.diff(scores[i]) <= 0).all()
            np.testing.assert_allclose(scores[i], exact_scores_of(ids[i], query, "l2"), rtol=1e-5, atol=1e-5)
        truth, _ = index.exact().search(QUERIES, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())])
        assert recall >= self.min_recall


class TestFlat(IndexContract):
    config = IndexConfig(factory="Flat")
    min_recall = 1.0

    def test_matches_brute_force(self, index):
        ids, scores = index.search(QUERIES, 10)
        for i, query in enumerate(QUERIES):
            rows, exact = brute_force(query)
            np.testing.assert_array_equal(ids[i], ITEMS.ids[rows[:10]])
            np.testing.assert_allclose(scores[i], exact[:10], rtol=1e-6, atol=1e-6)

    def test_exclusion_gives_next_best(self, index):
        rows, _ = brute_force(QUERIES[0])
        ids, _ = index.search(QUERIES[0], 10, exclude_rows=rows[:20])
        np.testing.assert_array_equal(ids, ITEMS.ids[rows[20:30]])

    def test_l2_matches_brute_force(self):
        index = ItemIndex(IndexConfig(metric="l2")).build(VECTORS, ITEMS)
        ids, _ = index.search(QUERIES, 10)
        for i, query in enumerate(QUERIES):
            np.testing.assert_array_equal(ids[i], ITEMS.ids[brute_force(query, "l2")[0][:10]])


class TestHNSW(IndexContract):
    config = IndexConfig(factory="HNSW32", search_params="efSearch=64")

    def test_search_params_reach_faiss(self, index):
        assert index.faiss_index.hnsw.efSearch == 64
        index.set_search_params("efSearch=128")
        assert index.faiss_index.hnsw.efSearch == 128 and index.describe() == "HNSW32|efSearch=128"


class TestIVF(IndexContract):
    config = IndexConfig(factory="IVF4,Flat", search_params="nprobe=2")

    def test_nprobe_one_still_fills_k(self):
        index = ItemIndex(IndexConfig(factory="IVF4,Flat", search_params="nprobe=1")).build(VECTORS, ITEMS)
        assert index.faiss_index.nprobe == 1
        ids, scores = index.search(QUERIES, 120)  # more than one inverted list holds
        assert (ids >= 0).all() and all(len(set(row)) == 120 for row in ids.tolist())
        assert (np.diff(scores, axis=1) <= 0).all()

    def test_seeded_training_is_reproducible(self):
        config = IndexConfig(factory="IVF4,Flat", search_params="nprobe=1", train_sample=60, seed=5)
        a = ItemIndex(config).build(VECTORS, ITEMS).search(QUERIES, 10)
        b = ItemIndex(config).build(VECTORS, ITEMS).search(QUERIES, 10)
        np.testing.assert_array_equal(a[0], b[0])


# ---------------------------------------------------------------------- config and build errors
def test_config_round_trips_through_json():
    config = IndexConfig(
        factory="IVF8,PQ4", search_params="nprobe=4", metric="l2", threads=2, train_sample=100
    )
    assert IndexConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"metric": "cosine"}, "metric"),
        ({"threads": 0}, "threads"),
        ({"factory": " "}, "factory"),
        ({"factory": "IDMap,Flat"}, "IDMap"),
        ({"search_params": "efSearch"}, "search_params"),
        ({"train_sample": 0}, "train_sample"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        IndexConfig(**kwargs)


def test_ivf_with_too_few_points_suggests_smaller_nlist():
    with pytest.raises(ConfigError, match=r"nlist=256.*smaller nlist"):
        ItemIndex(IndexConfig(factory="IVF256,Flat")).build(VECTORS, ITEMS)
    with pytest.raises(ConfigError, match="smaller nlist"):
        ItemIndex(IndexConfig(factory="IVF16,Flat", train_sample=10)).build(VECTORS, ITEMS)


def test_bad_factory_and_search_params_raise_config_error():
    with pytest.raises(ConfigError, match="index_factory"):
        ItemIndex(IndexConfig(factory="NotAnIndex12")).build(VECTORS, ITEMS)
    with pytest.raises(ConfigError, match="nprobe"):
        ItemIndex(IndexConfig(factory="Flat", search_params="nprobe=4")).build(VECTORS, ITEMS)


def test_build_validates_vectors():
    with pytest.raises(DataValidationError, match="rows"):
        ItemIndex().build(VECTORS[:-1], ITEMS)
    bad = VECTORS.copy()
    bad[3, 0] = np.inf
    with pytest.raises(DataValidationError, match="NaN or infinite"):
        ItemIndex().build(bad, ITEMS)


def test_search_before_build_raises():
    with pytest.raises(NotFittedError, match="build"):
        ItemIndex().search(QUERIES[0], 5)


def test_load_of_a_non_index_folder_raises(tmp_path):
    with pytest.raises(ArtifactError, match="manifest"):
        ItemIndex.load(tmp_path)
