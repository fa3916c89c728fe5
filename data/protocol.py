"""The evaluation protocol (LlamaRec, arXiv 2311.02089, on MovieLens ml-latest-small).

1. Every rating is an implicit interaction (no rating threshold).
2. Items without a title are dropped.
3. Iterative 5-core filtering: drop users and items with fewer than 5 events until none remain.
4. Leave-one-out per user, events ordered by (timestamp, item id): the last item is the test target, the
   second-last the validation target, the rest is training. When scoring the test target the validation
   item joins the user's history (``Split.history("test")``).

On ml-latest-small this yields 610 users and 3,650 items, the counts the paper reports.
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
class Split:
    """Train events plus held-out validation and test events, over fixed user and item vocabularies.

    Attributes:
        train: training events.
        val: held-out validation events (one per user for leave-one-out).
        test: held-out test events.
        users: every user of the filtered dataset.
        items: the catalogue: every item of the filtered dataset.
        kind: ``"leave_one_out"`` or ``"temporal"``.
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
    position_from_end = f.groupby(USER).cumcount(ascending=False).to_numpy()
    test = f[position_from_end == 0]
    val = f[position_from_end == 1]
    train = f[position_from_end >= 2]
    return Split(
        train=data.with_frame(train, name=f"{data.name}:train"),
        val=val.reset_index(drop=True),
        test=test.reset_index(drop=True),
        users=data.user_vocab(),
        items=data.item_vocab(),
        kind="leave_one_out",
    )


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
