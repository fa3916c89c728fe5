"""Seeded synthetic interaction data with known structure.

Used for two things: large-scale data for the scale benchmarks (1M users x 1M items in well under two
minutes) and tiny data with known answers for unit tests of later stages. The generative story:

* **Items** (external ids ``1..n_items``) are split evenly over ``n_clusters`` latent taste clusters; the
  cluster is also the item's "genre" (1-3 genre names per cluster) and its title is built from words
  unique to the cluster, so item text carries the cluster signal.
* **Popularity**: inside a cluster, items are ranked at random and drawn with Zipf weights
  ``(rank + 1) ** -popularity_exponent``.
* **Users** (external ids ``1..n_users``) have a Dirichlet(``taste_concentration``) preference over
  clusters and ``min_history`` + a rounded lognormal number of events (mean about ``mean_history``).
* **Sessions**: a user's events are cut into sessions (each event starts a new session with probability
  ``1 / mean_session_length``, so lengths are geometric); each session has one cluster drawn from the
  user's preference. Events inside a session are seconds to minutes apart (at most
  ``MAX_SESSION_GAP_SECONDS``); sessions are hours to days apart (at least ``MIN_BREAK_SECONDS``), so
  sessions can be recovered from the timestamps with :data:`SESSION_GAP_SECONDS`.
* **Next-item rule**: each item has a fixed successor in its cluster (the clusters' items form one random
  cycle each). With probability ``sequential_strength`` an event after the first of its session is the
  successor of the previous event; otherwise it is a fresh popularity draw from the session's cluster.
  Because the cycle is random, the rule flattens popularity somewhat as ``sequential_strength`` grows.

**Repeats**: a user may meet the same item twice (a re-watch), so ``(user, item)`` pairs can repeat; the
frame keeps them by default (dropping them would break successor chains). ``drop_repeats=True`` keeps only
each pair's first event, which can leave a user with fewer than ``min_history`` events.

The ground truth (item clusters, successors, popularity) is available from :func:`item_catalog` without
generating events. Everything is vectorised numpy; the only Python loop runs over blocks of users when
sampling tastes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data.config import JsonConfig, require
from data.dataset import ITEM, ITEM_COLUMNS, TIME, USER, Interactions

#: Largest gap between two events of one session, in seconds.
MAX_SESSION_GAP_SECONDS = 1_800
#: Smallest gap between two sessions of one user, in seconds.
MIN_BREAK_SECONDS = 3 * 3_600
#: A gap of at least this many seconds between a user's consecutive events means a new session.
SESSION_GAP_SECONDS = 3_600

GENRES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
#: Words any title may start with (shared across clusters, so they carry no cluster signal).
GENERIC_WORDS = (
    "The", "Last", "Night", "Return", "Secret", "City", "Little", "Dark", "Lost", "Great", "Blue", "Wild",
)
WORDS_PER_CLUSTER = 8
_SYLLABLES = (
    "ka", "lo", "mi", "ra", "te", "su", "vo", "ne", "di", "pa", "zu", "ho", "be", "fi", "go", "ya",
)
_HISTORY_SIGMA = 0.8  # log-space spread of the number of extra events per user
_WITHIN_SESSION_MIN, _WITHIN_SESSION_MEAN = 20, 120.0  # seconds
_BREAK_MEAN = 36 * 3_600.0  # mean extra seconds between sessions, on top of MIN_BREAK_SECONDS
_START_SPREAD = 365 * 86_400  # users start uniformly within a year after start_timestamp
_TASTE_BLOCK = 1 << 22  # users x clusters floats sampled per block (bounds memory)
_PHASES = ("catalog", "histories", "sessions", "tastes", "items", "timestamps", "frame", "item text")


@dataclass
class SyntheticConfig(JsonConfig):
    """Parameters of the synthetic generator; the same config (seed included) gives identical output.

    Attributes:
        n_users: number of users (external ids ``1..n_users``); every user gets events.
        n_items: number of items (external ids ``1..n_items``); must be >= ``n_clusters``. Rare items
            may get no events.
        n_clusters: latent taste clusters; each item belongs to one, which is also its "genre" and the
            source of its title words.
        mean_history: approximate mean number of events per user (``min_history`` + a rounded lognormal
            with mean ``mean_history - min_history``).
        min_history: smallest number of events per user.
        popularity_exponent: Zipf exponent of item popularity within a cluster (0 = uniform; 1.0 makes
            the top 10% of items take well over 40% of the events when ``sequential_strength`` is 0).
        taste_concentration: Dirichlet alpha of each user's preference over clusters; small values
            focus users on few clusters, large values spread them evenly.
        mean_session_length: mean number of events per session (geometric lengths, >= 1).
        sequential_strength: probability that an event after the first of its session is the fixed
            successor of the previous event (a learnable next-item rule); 0 = no order signal.
        start_timestamp: Unix time (seconds) of the earliest possible event.
        seed: seed of every random draw (non-negative).
        drop_repeats: keep only the first event of each repeated ``(user, item)`` pair; off by default
            because repeats are part of the process and removing them breaks successor chains.
    """

    n_users: int = 10_000
    n_items: int = 5_000
    n_clusters: int = 20
    mean_history: float = 30.0
    min_history: int = 5
    popularity_exponent: float = 1.0
    taste_concentration: float = 0.3
    mean_session_length: float = 6.0
    sequential_strength: float = 0.5
    start_timestamp: int = 1_500_000_000
    seed: int = 0
    drop_repeats: bool = False

    def __post_init__(self) -> None:
        require(self.n_users >= 1, f"n_users must be >= 1, got {self.n_users}")
        require(self.n_clusters >= 1, f"n_clusters must be >= 1, got {self.n_clusters}")
        require(
            self.n_items >= self.n_clusters,
            f"n_items ({self.n_items}) must be >= n_clusters ({self.n_clusters}); raise n_items or "
            "lower n_clusters",
        )
        require(self.min_history >= 1, f"min_history must be >= 1, got {self.min_history}")
        require(
            self.mean_history >= self.min_history,
            f"mean_history ({self.mean_history}) must be >= min_history ({self.min_history})",
        )
        require(self.popularity_exponent >= 0, "popularity_exponent must be >= 0 (0 = uniform popularity)")
        require(self.taste_concentration > 0, "taste_concentration must be > 0 (e.g. 0.3)")
        require(self.mean_session_length >= 1, "mean_session_length must be >= 1")
        require(0.0 <= self.sequential_strength <= 1.0, "sequential_strength must be in [0, 1]")
        require(self.start_timestamp >= 0, "start_timestamp must be >= 0 (Unix seconds)")
        require(self.seed >= 0, f"seed must be a non-negative integer, got {self.seed}")


@dataclass(frozen=True)
class SyntheticCatalog:
    """The ground truth about the items of a :class:`SyntheticConfig` (row ``i`` is item id ``i + 1``).

    Attributes:
        item_ids: int64 external item ids ``1..n_items``.
        cluster: int64 cluster of each item.
        successor: int64 external id of each item's fixed successor (same cluster; an item that is
            alone in its cluster is its own successor).
        popularity: float64 probability of each item in a fresh draw from its cluster.
        cluster_words: per cluster, the words its titles are built from (disjoint across clusters).
        cluster_genres: per cluster, its 1-3 genre names.
    """

    item_ids: np.ndarray
    cluster: np.ndarray
    successor: np.ndarray
    popularity: np.ndarray
    cluster_words: tuple[tuple[str, ...], ...]
    cluster_genres: tuple[tuple[str, ...], ...]

    def successor_of(self, item_ids: np.ndarray) -> np.ndarray:
        """External ids of the successors of external ``item_ids`` (which must be in ``1..n_items``)."""
        return self.successor[np.asarray(item_ids, dtype=np.int64) - 1]


@dataclass(frozen=True)
class _Layout:
    """Item rows grouped by cluster: the popularity order and the successor cycle order."""

    cluster: np.ndarray  # int64 per item row
    start: np.ndarray  # int64 first slot of each cluster in the grouped orders
    size: np.ndarray  # int64 items per cluster
    pop_order: np.ndarray  # item rows grouped by cluster, most popular first
    pop_prob: np.ndarray  # probability within the cluster, aligned with pop_order
    pop_cdf: np.ndarray  # cluster + within-cluster CDF, aligned with pop_order (non-decreasing)
    cycle_order: np.ndarray  # item rows grouped by cluster, in successor-cycle order
    cycle_rank: np.ndarray  # per item row, its slot in cycle_order minus its cluster's start


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent generators for the catalogue, the item text and the events (so each is reproducible
    on its own)."""
    children = np.random.SeedSequence(seed).spawn(3)
    return tuple(np.random.default_rng(child) for child in children)  # type: ignore[return-value]


def _layout(config: SyntheticConfig, rng: np.random.Generator) -> _Layout:
    n, k = config.n_items, config.n_clusters
    cluster = (rng.permutation(n) % k).astype(np.int64)
    size = np.bincount(cluster, minlength=k).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)

    pop_order = np.lexsort((rng.random(n), cluster))
    rank = np.arange(n, dtype=np.int64) - start[cluster[pop_order]]
    weight = (rank + 1.0) ** -config.popularity_exponent
    cum = np.cumsum(weight)
    before = np.concatenate([[0.0], cum])[start]  # cumulative weight before each cluster
    total = np.add.reduceat(weight, start)
    c_sorted = cluster[pop_order]
    pop_prob = weight / total[c_sorted]
    pop_cdf = c_sorted + (cum - before[c_sorted]) / total[c_sorted]

    cycle_order = np.lexsort((rng.random(n), cluster))
    cycle_rank = np.empty(n, dtype=np.int64)
    cycle_rank[cycle_order] = np.arange(n, dtype=np.int64) - start[cluster[cycle_order]]
    return _Layout(cluster, start, size, pop_order, pop_prob, pop_cdf, cycle_order, cycle_rank)


def _cluster_words(n_clusters: int) -> tuple[tuple[str, ...], ...]:
    """Pronounceable pseudo-words, ``WORDS_PER_CLUSTER`` per cluster, all distinct (a bijective code)."""
    total = n_clusters * WORDS_PER_CLUSTER
    s = len(_SYLLABLES)
    digits = 3
    while s**digits < total:
        digits += 1
    space = s**digits
    codes = (np.arange(total, dtype=np.int64) * 7_919 + 12_345) % space  # 7919 is odd -> bijection
    words = []
    for code in codes.tolist():
        parts = []
        for _ in range(digits):
            code, r = divmod(code, s)
            parts.append(_SYLLABLES[r])
        words.append("".join(parts).capitalize())
    return tuple(
        tuple(words[c * WORDS_PER_CLUSTER:(c + 1) * WORDS_PER_CLUSTER]) for c in range(n_clusters)
    )


def _cluster_genres(n_clusters: int, rng: np.random.Generator) -> tuple[tuple[str, ...], ...]:
    out = []
    for _ in range(n_clusters):
        count = int(rng.integers(1, 4))
        picks = np.sort(rng.choice(len(GENRES), size=count, replace=False))
        out.append(tuple(GENRES[i] for i in picks))
    return tuple(out)


def item_catalog(config: SyntheticConfig | None = None) -> SyntheticCatalog:
    """The items' ground truth (clusters, successors, popularity, words, genres) for ``config``.

    It is exactly the structure :func:`generate` uses for the same config.
    """
    config = config or SyntheticConfig()
    rng_items, rng_text, _ = _streams(config.seed)
    return _catalog(config, _layout(config, rng_items), rng_text)


def _catalog(config: SyntheticConfig, lay: _Layout, rng_text: np.random.Generator) -> SyntheticCatalog:
    n = config.n_items
    successor_slot = lay.start[lay.cluster] + (lay.cycle_rank + 1) % lay.size[lay.cluster]
    popularity = np.empty(n, dtype=np.float64)
    popularity[lay.pop_order] = lay.pop_prob
    return SyntheticCatalog(
        item_ids=np.arange(1, n + 1, dtype=np.int64),
        cluster=lay.cluster.copy(),
        successor=lay.cycle_order[successor_slot].astype(np.int64) + 1,
        popularity=popularity,
        cluster_words=_cluster_words(config.n_clusters),
        cluster_genres=_cluster_genres(config.n_clusters, rng_text),
    )


def _history_lengths(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    extra_mean = config.mean_history - config.min_history
    if extra_mean <= 0:
        return np.full(config.n_users, config.min_history, dtype=np.int64)
    mu = np.log(extra_mean) - _HISTORY_SIGMA**2 / 2
    extra = np.rint(rng.lognormal(mu, _HISTORY_SIGMA, size=config.n_users)).astype(np.int64)
    return config.min_history + extra


def _session_clusters(
    session_user: np.ndarray, n_users: int, n_clusters: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """Each session's cluster, drawn from its user's Dirichlet(alpha) preference (sampled blockwise)."""
    out = np.empty(session_user.size, dtype=np.int64)
    block = max(1, _TASTE_BLOCK // n_clusters)
    for lo in range(0, n_users, block):
        hi = min(n_users, lo + block)
        weights = rng.gamma(alpha, size=(hi - lo, n_clusters))
        sums = weights.sum(axis=1)
        dead = np.flatnonzero(sums == 0)  # every gamma draw underflowed (tiny alpha): one random cluster
        if dead.size:
            weights[dead, rng.integers(n_clusters, size=dead.size)] = 1.0
            sums[dead] = 1.0
        cdf = np.cumsum(weights, axis=1)
        cdf /= sums[:, None]
        cdf[:, -1] = 1.0
        cdf += np.arange(hi - lo, dtype=np.float64)[:, None]  # user offset -> one sorted flat array
        s_lo, s_hi = np.searchsorted(session_user, [lo, hi])
        local = session_user[s_lo:s_hi] - lo
        pos = np.searchsorted(cdf.ravel(), local + rng.random(local.size), side="right")
        out[s_lo:s_hi] = np.minimum(pos - local * n_clusters, n_clusters - 1)
    return out


def _item_table(config: SyntheticConfig, catalog: SyntheticCatalog, rng: np.random.Generator) -> pd.DataFrame:
    n, k = config.n_items, config.n_clusters
    words = np.array([w for ws in catalog.cluster_words for w in ws], dtype=object)
    c = catalog.cluster
    j1 = rng.integers(WORDS_PER_CLUSTER, size=n)
    j2 = (j1 + 1 + rng.integers(WORDS_PER_CLUSTER - 1, size=n)) % WORDS_PER_CLUSTER
    generic = np.array([g + " " for g in GENERIC_WORDS] + [""] * len(GENERIC_WORDS), dtype=object)
    prefix = generic[rng.integers(generic.size, size=n)]
    title = prefix + words[c * WORDS_PER_CLUSTER + j1] + " " + words[c * WORDS_PER_CLUSTER + j2]

    centre = rng.integers(1950, 2016, size=k)
    year = np.clip(np.rint(centre[c] + rng.normal(0.0, 8.0, size=n)), 1920, 2024).astype(np.int64)
    genres_pipe = np.array(["|".join(g) for g in catalog.cluster_genres], dtype=object)
    genres_text = np.array([", ".join(g) for g in catalog.cluster_genres], dtype=object)
    year_text = np.array([f" ({y}) | " for y in range(1920, 2025)], dtype=object)
    text = title + year_text[year - 1920] + genres_text[c]
    table = pd.DataFrame({
        "item_id": catalog.item_ids,
        "title": title,
        "genres": genres_pipe[c],
        "year": pd.array(year, dtype="Int64"),
        "text": text,
    })
    return table[list(ITEM_COLUMNS)]


def generate(config: SyntheticConfig | None = None, *, progress: bool = True) -> Interactions:
    """Generate events and the item table for ``config`` (default :class:`SyntheticConfig`).

    Returns :class:`~data.dataset.Interactions` whose frame has int64 ``user_id`` (``1..n_users``),
    ``item_id`` (``1..n_items``) and ``timestamp`` columns, ordered by user then time, with strictly
    increasing timestamps per user; ``items`` covers every item (``ITEM_COLUMNS``). ``meta`` holds the
    config (``"config"``) and the number of sessions (``"n_sessions"``). The ground truth is
    :func:`item_catalog` of the same config. ``progress`` shows a tqdm bar over the phases.
    """
    config = config or SyntheticConfig()
    rng_items, rng_text, rng = _streams(config.seed)
    bar = tqdm(total=len(_PHASES), desc="synthetic", unit="phase", disable=not progress)

    def phase(name: str) -> None:
        bar.set_postfix_str(name)

    phase("catalog")
    lay = _layout(config, rng_items)
    bar.update()

    phase("histories")
    lengths = _history_lengths(config, rng)
    n_events = int(lengths.sum())
    user_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    event_user = np.repeat(np.arange(config.n_users, dtype=np.int64), lengths)
    bar.update()

    phase("sessions")
    new_session = rng.random(n_events, dtype=np.float32) < np.float32(1.0 / config.mean_session_length)
    new_session[user_start] = True
    session_user = event_user[new_session]
    event_session = np.cumsum(new_session, dtype=np.int64) - 1
    bar.update()

    phase("tastes")
    session_cluster = _session_clusters(
        session_user, config.n_users, config.n_clusters, config.taste_concentration, rng
    )
    del session_user
    event_cluster = session_cluster[event_session]
    del event_session
    bar.update()

    phase("items")
    follows = rng.random(n_events, dtype=np.float32) < np.float32(config.sequential_strength)
    follows &= ~new_session
    anchors = ~follows
    del follows
    # fresh popularity draws for the anchors (events that do not follow the previous one)
    anchor_cluster = event_cluster[anchors]
    pos = np.searchsorted(lay.pop_cdf, anchor_cluster + rng.random(anchor_cluster.size), side="right")
    cl_start = lay.start[anchor_cluster]
    np.clip(pos, cl_start, cl_start + lay.size[anchor_cluster] - 1, out=pos)
    anchor_rank = lay.cycle_rank[lay.pop_order[pos]]
    del pos, cl_start, anchor_cluster
    # an event k steps after its anchor is the anchor's k-th successor along the cluster's cycle
    index = np.arange(n_events, dtype=np.int64)
    anchor_pos = np.maximum.accumulate(np.where(anchors, index, 0))
    steps = index - anchor_pos
    del index, anchor_pos
    slot = anchor_rank[np.cumsum(anchors, dtype=np.int64) - 1]
    del anchors, anchor_rank
    slot += steps
    del steps
    slot %= lay.size[event_cluster]
    slot += lay.start[event_cluster]
    del event_cluster
    event_item = lay.cycle_order[slot]
    del slot
    bar.update()

    phase("timestamps")
    n_sessions = int(np.count_nonzero(new_session))
    within = _WITHIN_SESSION_MIN + rng.exponential(_WITHIN_SESSION_MEAN - _WITHIN_SESSION_MIN, n_events)
    gaps = np.minimum(within, MAX_SESSION_GAP_SECONDS).astype(np.int64)
    del within
    breaks = MIN_BREAK_SECONDS + rng.exponential(_BREAK_MEAN, n_sessions)
    gaps[new_session] = breaks.astype(np.int64)
    del breaks, new_session
    gaps[user_start] = rng.integers(0, _START_SPREAD, size=config.n_users)
    timestamp = np.cumsum(gaps)
    offset = timestamp[user_start] - gaps[user_start] - config.start_timestamp
    del gaps
    timestamp -= np.repeat(offset, lengths)
    del offset
    bar.update()

    phase("frame")
    event_user += 1
    event_item += 1
    frame = pd.DataFrame({USER: event_user, ITEM: event_item, TIME: timestamp}, copy=False)
    del event_user, event_item, timestamp
    if config.drop_repeats:
        frame = frame[~frame.duplicated([USER, ITEM], keep="first").to_numpy()].reset_index(drop=True)
    bar.update()

    phase("item text")
    catalog = _catalog(config, lay, rng_text)
    items = _item_table(config, catalog, rng_text)
    bar.update()
    bar.close()
    meta = {"generator": "data.synthetic", "config": config.to_dict(), "n_sessions": n_sessions}
    return Interactions(frame=frame, items=items, name=f"synthetic-seed{config.seed}", meta=meta)
