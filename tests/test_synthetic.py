"""Tests of the seeded synthetic generator: every property it promises, checked against its ground truth."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from data.config import JsonConfig
from data.dataset import ITEM, ITEM_COLUMNS, TIME, USER
from data.errors import ConfigError
from data.protocol import apply_filters, leave_one_out
from data.synthetic import (
    GENRES,
    MAX_SESSION_GAP_SECONDS,
    MIN_BREAK_SECONDS,
    SESSION_GAP_SECONDS,
    SyntheticConfig,
    generate,
    item_catalog,
)

SMALL = SyntheticConfig(n_users=1_500, n_items=600, n_clusters=12, mean_history=25.0, seed=7)


def small(**changes) -> SyntheticConfig:
    return SyntheticConfig.from_dict({**SMALL.to_dict(), **changes})


def _top_decile_share(frame: pd.DataFrame, n_items: int) -> float:
    counts = np.sort(np.bincount(frame[ITEM].to_numpy(), minlength=n_items + 1)[1:])[::-1]
    return counts[: n_items // 10].sum() / counts.sum()


def _within_session_pairs(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(previous item, next item) of consecutive events in the same session (same user, short gap)."""
    f = frame.sort_values([USER, TIME], kind="stable")
    u, i, t = f[USER].to_numpy(), f[ITEM].to_numpy(), f[TIME].to_numpy()
    same = (u[1:] == u[:-1]) & (t[1:] - t[:-1] < SESSION_GAP_SECONDS)
    return i[:-1][same], i[1:][same]


@pytest.fixture(scope="module")
def data():
    return generate(SMALL, progress=False)


@pytest.fixture(scope="module")
def catalog():
    return item_catalog(SMALL)


def test_same_seed_same_output_and_other_seed_differs(data):
    again = generate(SMALL, progress=False)
    pd.testing.assert_frame_equal(data.frame, again.frame)
    pd.testing.assert_frame_equal(data.items, again.items)
    other = generate(small(seed=8), progress=False)
    assert not data.frame.equals(other.frame)
    assert not data.items["text"].equals(other.items["text"])


def test_sizes_dtypes_and_item_table(data):
    f = data.frame
    assert list(f.columns) == [USER, ITEM, TIME]
    assert all(f[c].dtype == np.int64 for c in f.columns)
    assert np.array_equal(np.unique(f[USER]), np.arange(1, SMALL.n_users + 1))
    assert f[ITEM].between(1, SMALL.n_items).all()
    per_user = f.groupby(USER).size()
    assert per_user.min() >= SMALL.min_history
    assert abs(per_user.mean() - SMALL.mean_history) < 0.1 * SMALL.mean_history
    assert per_user.max() > 2 * SMALL.mean_history  # a long tail, not a constant
    assert f[TIME].min() >= SMALL.start_timestamp

    items = data.items
    assert tuple(items.columns) == ITEM_COLUMNS
    assert np.array_equal(items["item_id"].to_numpy(), np.arange(1, SMALL.n_items + 1))
    assert items["year"].dtype == "Int64"
    assert items["year"].between(1920, 2024).all()
    assert (items["title"].str.strip() != "").all()
    assert data.meta["config"] == SMALL.to_dict()


def test_item_text_format_and_genres(data, catalog):
    items = data.items
    for row in items.head(50).itertuples(index=False):
        genres = catalog.cluster_genres[catalog.cluster[row.item_id - 1]]
        assert 1 <= len(genres) <= 3 and set(genres) <= set(GENRES)
        assert row.genres == "|".join(genres)
        assert row.text == f"{row.title} ({row.year}) | {', '.join(genres)}"
        assert re.fullmatch(r".+ \(\d{4}\) \| .+", row.text)


def test_titles_carry_the_cluster_words(data, catalog):
    all_words = [set(w) for w in catalog.cluster_words]
    for c in range(len(all_words)):
        for d in range(c + 1, len(all_words)):
            assert not all_words[c] & all_words[d]
    word_sets = [set(t.split()) for t in data.items["title"]]
    for item, words in enumerate(word_sets):
        own = all_words[catalog.cluster[item]]
        assert len(words & own) == 2
        assert all(not (words & other) for c, other in enumerate(all_words) if c != catalog.cluster[item])

    rng = np.random.default_rng(0)
    a, b = rng.integers(SMALL.n_items, size=(2, 4_000))

    def jaccard(x: int, y: int) -> float:
        return len(word_sets[x] & word_sets[y]) / len(word_sets[x] | word_sets[y])

    same = catalog.cluster[a] == catalog.cluster[b]
    scores = np.array([jaccard(x, y) for x, y in zip(a, b)])
    assert scores[same & (a != b)].mean() > 0.1  # about 0.15: two of eight cluster words each
    assert scores[~same].mean() < 0.02  # only the shared generic first words can overlap


def test_catalog_ground_truth(catalog):
    n = SMALL.n_items
    assert np.array_equal(np.bincount(catalog.cluster), np.full(SMALL.n_clusters, n // SMALL.n_clusters))
    # the successor map is a bijection inside each cluster with no fixed points (clusters have > 1 item)
    assert np.array_equal(np.sort(catalog.successor), catalog.item_ids)
    assert np.array_equal(catalog.cluster[catalog.successor - 1], catalog.cluster)
    assert not np.any(catalog.successor == catalog.item_ids)
    np.testing.assert_allclose(np.bincount(catalog.cluster, weights=catalog.popularity), 1.0)
    top = np.sort(catalog.popularity[catalog.cluster == 0])[::-1]
    np.testing.assert_allclose(top[0] / top[1], 2.0 ** SMALL.popularity_exponent)
    np.testing.assert_array_equal(catalog.successor_of([1, 2]), catalog.successor[:2])


def test_popularity_is_heavy_tailed_and_follows_the_exponent():
    zipf = generate(small(sequential_strength=0.0), progress=False).frame
    default_shape = SyntheticConfig(n_users=2_000, seed=3)  # default catalogue, sequential_strength 0.5
    default_order = generate(default_shape, progress=False).frame
    flat = generate(small(popularity_exponent=0.0, sequential_strength=0.0), progress=False).frame
    assert _top_decile_share(zipf, SMALL.n_items) > 0.5
    assert _top_decile_share(default_order, default_shape.n_items) > 0.4
    assert _top_decile_share(flat, SMALL.n_items) < 0.2


def _top_cluster_share(frame: pd.DataFrame, cluster: np.ndarray) -> float:
    f = pd.DataFrame({USER: frame[USER], "c": cluster[frame[ITEM].to_numpy() - 1]})
    shares = f.groupby(USER)["c"].agg(lambda s: s.value_counts(normalize=True).iloc[0])
    return float(shares.mean())


def test_users_concentrate_on_few_clusters(catalog):
    # one event per session, so the share measures the taste, not the session grouping
    focused = generate(small(taste_concentration=0.1, mean_session_length=1.0), progress=False).frame
    spread = generate(small(taste_concentration=50.0, mean_session_length=1.0), progress=False).frame
    assert _top_cluster_share(focused, catalog.cluster) > 0.55
    assert _top_cluster_share(spread, catalog.cluster) < 0.35


def test_timestamps_increase_and_sessions_keep_one_cluster(data, catalog):
    f = data.frame
    u, t = f[USER].to_numpy(), f[TIME].to_numpy()
    same_user = u[1:] == u[:-1]
    gaps = (t[1:] - t[:-1])[same_user]
    assert (gaps > 0).all()
    # gaps are either short (within a session) or long (between sessions), never in between
    assert not ((gaps > MAX_SESSION_GAP_SECONDS) & (gaps < MIN_BREAK_SECONDS)).any()
    n_sessions = SMALL.n_users + int((gaps >= SESSION_GAP_SECONDS).sum())
    assert n_sessions == data.meta["n_sessions"]
    assert 0.6 * SMALL.mean_session_length < len(f) / n_sessions < SMALL.mean_session_length
    prev, nxt = _within_session_pairs(f)
    assert prev.size > 0.5 * len(f)
    assert np.array_equal(catalog.cluster[prev - 1], catalog.cluster[nxt - 1])


@pytest.mark.parametrize(("strength", "low", "high"), [(1.0, 0.999, 1.0), (0.5, 0.45, 0.6), (0.0, 0.0, 0.1)])
def test_successor_rule_follows_sequential_strength(catalog, strength, low, high):
    frame = generate(small(sequential_strength=strength), progress=False).frame
    prev, nxt = _within_session_pairs(frame)
    hit_rate = float(np.mean(catalog.successor_of(prev) == nxt))
    assert low <= hit_rate <= high


def test_passes_the_protocol(data):
    filtered = apply_filters(data)
    split = leave_one_out(filtered)
    assert len(split.test) == len(split.val) == filtered.n_users > 0.9 * SMALL.n_users
    assert len(split.train) + 2 * filtered.n_users == len(filtered)


def test_repeats_kept_by_default_and_dropped_on_request(data):
    assert data.frame.duplicated([USER, ITEM]).any()
    dedup = generate(small(drop_repeats=True), progress=False).frame
    assert not dedup.duplicated([USER, ITEM]).any()
    first = data.frame.drop_duplicates([USER, ITEM], keep="first").reset_index(drop=True)
    pd.testing.assert_frame_equal(dedup, first)


def test_config_json_round_trip_and_validation(tmp_path):
    cfg = small(sequential_strength=0.25, drop_repeats=True)
    assert isinstance(cfg, JsonConfig)
    assert SyntheticConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "synthetic.json")
    assert SyntheticConfig.load(tmp_path / "synthetic.json") == cfg
    with pytest.raises(ConfigError, match="n_items"):
        SyntheticConfig(n_items=5, n_clusters=10)
    with pytest.raises(ConfigError, match="sequential_strength"):
        SyntheticConfig(sequential_strength=1.5)
    with pytest.raises(ConfigError, match="mean_history"):
        SyntheticConfig(mean_history=3.0, min_history=5)
    with pytest.raises(ConfigError, match="taste_concentration"):
        SyntheticConfig(taste_concentration=0.0)
    with pytest.raises(ConfigError, match="unknown field"):
        SyntheticConfig.from_dict({"n_user": 3})


def test_progress_bar_only_when_asked(capsys):
    tiny = small(n_users=50, n_items=40, n_clusters=4)
    generate(tiny, progress=False)
    assert capsys.readouterr().err == ""
    generate(tiny, progress=True)
    assert "synthetic" in capsys.readouterr().err


def test_degenerate_configs_still_work():
    single = generate(SyntheticConfig(n_users=20, n_items=1, n_clusters=1, mean_history=5.0), progress=False)
    assert (single.frame[ITEM] == 1).all()
    assert single.frame.groupby(USER).size().eq(5).all()
    tiny_alpha = generate(small(n_users=200, taste_concentration=1e-3), progress=False)
    assert len(tiny_alpha.frame) > 0
