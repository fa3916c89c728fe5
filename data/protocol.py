"""The evaluation protocol (LlamaRec, arXiv 2311.02089, on MovieLens ml-latest-small).

1. Every rating is an implicit interaction (no rating threshold).
2. Items without a title are dropped.
3. Iterative 5-core filtering: drop users and items with fewer than 5 events until none remain.
4. Leave-one-out per user, events ordered by (timestamp, item id): the last item is the test target, the
   second-last the validation target, the rest is training. When scoring the test target the validation
   item joins the user's history (``Split.history("test")``).

On ml-latest-small this yields 610 users and 3,650 items, the counts the paper reports.

A second protocol, **last-n** (:func:`last_n`, n=5 by default), gives about five times as many test cases
and so narrower paired intervals: each user's last n events are test cases, each scored from its own
prefix (every event before it, earlier test events included); models train on the events before them and
validate on the event just before the first test case (one per user). On ml-latest-small that is 3,050
test cases. :meth:`Split.cases` gives the cases of any split with their histories, and metrics of
several cases per user take their intervals by resampling users (``clusters=`` in
:func:`data.metrics.bootstrap_ci`), since one user's cases are not independent.

A global temporal split (:func:`temporal_split`) is available too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from data.config import JsonConfig, require
from data.dataset import ITEM, TIME, USER, Interactions
from data.errors import DataValidationError
from data.vocab import IdVocab

STAGES = ("val", "test")
#: The splits whose test stage has one case per test event with its own prefix as history.
PROTOCOLS = ("leave_one_out", "last_n")


@dataclass
class ProtocolConfig(JsonConfig):
    """How raw events become the evaluation dataset.

    Attributes:
        min_user_interactions: k of the user side of the iterative k-core filter.
        min_item_interactions: k of the item side of the iterative k-core filter.
        drop_untitled: drop events on items with no (or an empty) title in the item table.
        min_rating: keep only ratings >= this; ``None`` keeps every rating (the paper's choice).
    """

    min_user_interactions: int = 5
    min_item_interactions: int = 5
    drop_untitled: bool = True
    min_rating: float | None = None

    def __post_init__(self) -> None:
        require(self.min_user_interactions >= 1, "min_user_interactions must be >= 1")
        require(self.min_item_interactions >= 1, "min_item_interactions must be >= 1")


def k_core(frame: pd.DataFrame, min_user: int = 5, min_item: int = 5) -> pd.DataFrame:
    """Iteratively drop users with < ``min_user`` and items with < ``min_item`` events until stable."""
    f = frame
    while True:
        item_counts = f[ITEM].map(f[ITEM].value_counts())
        user_counts = f[USER].map(f[USER].value_counts())
        keep = (item_counts >= min_item) & (user_counts >= min_user)
        if keep.all():
            return f
        f = f[keep.to_numpy()]


def apply_filters(data: Interactions, config: ProtocolConfig | None = None) -> Interactions:
    """Steps 1-3 of the protocol. Returns a new :class:`Interactions`; ``data`` is not modified."""
    config = config or ProtocolConfig()
    f = data.frame
    if config.min_rating is not None and "rating" in f:
        f = f[f["rating"] >= config.min_rating]
    if config.drop_untitled and data.items is not None:
        titled = data.items.loc[data.items["title"].fillna("").astype(str).str.strip() != "", ITEM]
        f = f[f[ITEM].isin(titled)]
    f = k_core(f, config.min_user_interactions, config.min_item_interactions)
    if len(f) == 0:
        raise DataValidationError(
            f"{data.name}: no events survive the {config.min_user_interactions}/"
            f"{config.min_item_interactions}-core filter; lower min_user_interactions/min_item_interactions"
        )
    return data.with_frame(f.copy())


@dataclass
class EvalCases:
    """Evaluation cases: a target item and the history (item ids, oldest first) a model may read for it.

    Attributes:
        users: ``(n,)`` the user id of each case (a user may have several cases; they are sorted by user,
            then time).
        targets: ``(n,)`` the held-out item id of each case.
        histories: per case, the visible item ids in time order (what is masked as seen).
        stage: ``"val"`` or ``"test"``.
        protocol: the split kind the cases come from (``"leave_one_out"``, ``"last_n"``...).
    """

    users: np.ndarray
    targets: np.ndarray
    histories: list[np.ndarray]
    stage: str = "test"
    protocol: str = "leave_one_out"

    def __len__(self) -> int:
        return int(self.targets.size)

    @property
    def relevant(self) -> list[np.ndarray]:
        """One relevant set per case (its target), as :func:`data.metrics.evaluate_rankings` takes it."""
        return [np.array([t], dtype=np.int64) for t in self.targets.tolist()]

    @property
    def one_per_user(self) -> bool:
        return np.unique(self.users).size == self.users.size

    def subset(self, index: np.ndarray) -> EvalCases:
        index = np.asarray(index, dtype=np.int64)
        return EvalCases(self.users[index], self.targets[index], [self.histories[i] for i in index.tolist()],
                         self.stage, self.protocol)


@dataclass
class Split:
    """Train events plus held-out validation and test events, over fixed user and item vocabularies.

    Attributes:
        train: training events.
        val: held-out validation events (one per user for leave-one-out).
        test: held-out test events.
        users: every user of the filtered dataset.
        items: the catalogue: every item of the filtered dataset.
        kind: ``"leave_one_out"``, ``"last_n"`` or ``"temporal"``.
    """

    train: Interactions
    val: pd.DataFrame
    test: pd.DataFrame
    users: IdVocab
    items: IdVocab
    kind: str

    def history(self, stage: str) -> Interactions:
        """What a model may see when predicting ``stage``: train for ``"val"``, train + val for ``"test"``."""
        _check_stage(stage)
        if stage == "val":
            return self.train
        frame = pd.concat([self.train.frame, self.val], ignore_index=True)
        return self.train.with_frame(frame, name=f"{self.train.name}+val")

    def targets(self, stage: str) -> pd.DataFrame:
        """The held-out events of ``stage`` (``user_id``, ``item_id``, ``timestamp``)."""
        _check_stage(stage)
        return self.val if stage == "val" else self.test

    def cases(self, stage: str) -> EvalCases:
        """The evaluation cases of ``stage``, each with the history a model may read for it.

        Validation (every kind) and leave-one-out test: one case per held-out event, the history being
        ``history(stage)``'s events of that user. ``last_n`` test: one case per test event, its history being
        every earlier event of the user (train, validation and earlier test events). A temporal split's
        test cases all read ``history("test")`` (their user's events before the test period).
        """
        _check_stage(stage)
        targets = self.targets(stage).sort_values([USER, TIME, ITEM], kind="stable").reset_index(drop=True)
        visible = self.history(stage).sorted_frame()
        base = {int(u): g.to_numpy(dtype=np.int64) for u, g in visible.groupby(USER, sort=False)[ITEM]}
        empty = np.empty(0, dtype=np.int64)
        histories: list[np.ndarray] = []
        users = targets[USER].to_numpy(dtype=np.int64)
        items = targets[ITEM].to_numpy(dtype=np.int64)
        grow = stage == "test" and self.kind == "last_n"
        previous, extra = None, []
        for u, i in zip(users.tolist(), items.tolist()):
            if u != previous:
                previous, extra = u, []
            prefix = base.get(u, empty)
            histories.append(np.concatenate([prefix, np.asarray(extra, dtype=np.int64)]) if extra else prefix)
            if grow:
                extra.append(i)
        return EvalCases(users=users, targets=items, histories=histories, stage=stage, protocol=self.kind)

    def stats(self) -> dict[str, int | float | str]:
        n = len(self.train) + len(self.val) + len(self.test)
        return {
            "split": self.kind,
            "users": len(self.users),
            "items": len(self.items),
            "interactions": n,
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "density": n / (len(self.users) * len(self.items)),
        }


def leave_one_out(data: Interactions) -> Split:
    """Step 4: per user, last event -> test, second-last -> validation, the rest -> train.

    Users need at least 3 events (the 5-core filter guarantees 5).
    """
    f = data.sorted_frame()
    counts = f.groupby(USER)[ITEM].transform("size").to_numpy()
    if (counts < 3).any():
        short = f.loc[counts < 3, USER].unique()[:5].tolist()
        raise DataValidationError(
            f"leave_one_out: users {short} have fewer than 3 events; apply the k-core filter first"
        )
    return _tail_split(data, f, np.ones(len(f), dtype=np.int64), "leave_one_out")


def last_n(data: Interactions, n: int = 5) -> Split:
    """The ``last-n`` protocol: per user (events ordered by time, then item id), the last ``n`` events are
    test cases, the one before them is the validation target, the rest is training.

    A user with fewer than ``n + 3`` events keeps at least two training events and one validation event,
    so gives ``len - 3`` test cases (the 5-core filter guarantees 5 events, so at least 2). Each test case is
    scored from its own prefix (:meth:`Split.cases`); ``history("test")`` is train + validation, the
    history before a user's first test case.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataValidationError(f"last_n: n must be an integer >= 1, got {n!r}")
    f = data.sorted_frame()
    counts = f.groupby(USER)[ITEM].transform("size").to_numpy()
    if (counts < 4).any():
        short = f.loc[counts < 4, USER].unique()[:5].tolist()
        raise DataValidationError(
            f"last_n: users {short} have fewer than 4 events (2 to train on, 1 to validate, 1 to test); apply "
            "the k-core filter first"
        )
    return _tail_split(data, f, np.minimum(int(n), counts - 3), "last_n")


def _tail_split(data: Interactions, f: pd.DataFrame, n_test: np.ndarray, kind: str) -> Split:
    """Per user of the sorted events ``f``: the last ``n_test`` (per event row, its user's count) are test,
    the one before them validation, the rest training."""
    position_from_end = f.groupby(USER).cumcount(ascending=False).to_numpy()
    return Split(
        train=data.with_frame(f[position_from_end > n_test], name=f"{data.name}:train"),
        val=f[position_from_end == n_test].reset_index(drop=True),
        test=f[position_from_end < n_test].reset_index(drop=True),
        users=data.user_vocab(),
        items=data.item_vocab(),
        kind=kind,
    )


def make_split(data: Interactions, protocol: str = "leave_one_out", n: int = 5) -> Split:
    """Step 4 under ``protocol``: ``"leave_one_out"`` (LlamaRec's, the headline) or ``"last_n"``."""
    if protocol == "leave_one_out":
        return leave_one_out(data)
    if protocol == "last_n":
        return last_n(data, n)
    raise DataValidationError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")


def temporal_split(data: Interactions, val_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    """Global temporal split: the last ``test_fraction`` of events by time is test, the slice before it
    of size ``val_fraction`` is validation. Held-out events of users or items unseen in train are dropped
    (they cannot be scored by a model that never saw them)."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataValidationError(
            "temporal_split: val_fraction and test_fraction must be in (0, 1) and sum to less than 1"
        )
    f = data.frame.sort_values([TIME, USER, ITEM], kind="stable").reset_index(drop=True)
    n = len(f)
    t_val = int(np.floor(n * (1 - val_fraction - test_fraction)))
    t_test = int(np.floor(n * (1 - test_fraction)))
    train, val, test = f.iloc[:t_val], f.iloc[t_val:t_test], f.iloc[t_test:]
    known_users, known_items = set(train[USER]), set(train[ITEM])
    val = val[val[USER].isin(known_users) & val[ITEM].isin(known_items)]
    seen_test = known_users | set(val[USER])
    test = test[test[USER].isin(seen_test) & test[ITEM].isin(known_items | set(val[ITEM]))]
    return Split(
        train=data.with_frame(train, name=f"{data.name}:train"),
        val=val.reset_index(drop=True),
        test=test.reset_index(drop=True),
        users=data.user_vocab(),
        items=data.item_vocab(),
        kind="temporal",
    )


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise DataValidationError(f"stage must be one of {STAGES}, got {stage!r}")
