"""The evaluation protocol: k-core, leave-one-out ordering, the test history and the temporal split."""

import numpy as np
import pandas as pd
import pytest

from data.dataset import Interactions, sequences, to_csr
from data.errors import DataValidationError
from data.protocol import ProtocolConfig, apply_filters, k_core, leave_one_out, temporal_split


def events(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype("int64")


def test_k_core_is_iterative():
    rows = [(1, 1, 0), (1, 2, 1), (2, 1, 2), (2, 2, 3), (3, 9, 4), (3, 1, 5), (4, 9, 6), (4, 2, 7)]
    # with min_item=3 the cascade empties everything: 9 goes, users 3 and 4 go, then items 1 and 2 go
    assert k_core(events(rows), min_user=2, min_item=3).empty
    out = k_core(events(rows), min_user=2, min_item=2)
    assert set(out["user_id"]) == {1, 2, 3, 4}
    assert (out.groupby("user_id").size() >= 2).all() and (out.groupby("item_id").size() >= 2).all()


def test_untitled_items_are_dropped_and_input_untouched():
    frame = events([(u, i, u * 10 + i) for u in range(1, 7) for i in range(1, 7)])
    items = pd.DataFrame({"item_id": range(1, 7), "title": ["a", "b", "c", "d", "e", None]})
    data = Interactions(frame.copy(), items)
    out = apply_filters(data, ProtocolConfig(min_user_interactions=3, min_item_interactions=3))
    assert 6 not in set(out.frame["item_id"])
    pd.testing.assert_frame_equal(data.frame, frame)


def test_empty_after_filter_says_how_to_fix():
    data = Interactions(events([(1, 1, 0), (2, 2, 1)]))
    with pytest.raises(DataValidationError, match="min_user_interactions"):
        apply_filters(data)


def test_leave_one_out_orders_by_timestamp_then_item_id():
    # user 1: item 5 and 3 share the last timestamp -> order (t, item) puts 3 before 5: test = 5, val = 3
    frame = events([(1, 1, 0), (1, 2, 1), (1, 5, 9), (1, 3, 9), (1, 4, 2),
                    (2, 1, 0), (2, 2, 1), (2, 3, 2)])
    split = leave_one_out(Interactions(frame))
    test = dict(zip(split.test["user_id"], split.test["item_id"]))
    val = dict(zip(split.val["user_id"], split.val["item_id"]))
    assert test == {1: 5, 2: 3} and val == {1: 3, 2: 2}
    assert sorted(split.train.frame.query("user_id == 1")["item_id"]) == [1, 2, 4]
    # the validation item joins the test history, the test item never does
    history = split.history("test").frame
    assert {(1, 3), (2, 2)} <= set(zip(history["user_id"], history["item_id"]))
    assert (1, 5) not in set(zip(history["user_id"], history["item_id"]))
    assert split.history("val") is split.train
    with pytest.raises(DataValidationError, match="stage"):
        split.history("train")


def test_leave_one_out_needs_three_events():
    with pytest.raises(DataValidationError, match="fewer than 3"):
        leave_one_out(Interactions(events([(1, 1, 0), (1, 2, 1)])))


def test_temporal_split_is_ordered_in_time():
    rng = np.random.default_rng(0)
    rows = [(int(u), int(i), int(t)) for t, (u, i) in enumerate(zip(rng.integers(1, 20, 500),
                                                                      rng.integers(1, 30, 500)))]
    split = temporal_split(Interactions(events(rows)), 0.1, 0.1)
    assert split.train.frame["timestamp"].max() <= split.val["timestamp"].min()
    assert split.val["timestamp"].max() <= split.test["timestamp"].min()
    assert set(split.val["user_id"]) <= set(split.train.frame["user_id"])
    with pytest.raises(DataValidationError):
        temporal_split(Interactions(events(rows)), 0.6, 0.5)


def test_sequences_and_csr_follow_the_vocabularies():
    frame = events([(7, 30, 2), (7, 10, 1), (9, 20, 0), (7, 30, 3)])
    data = Interactions(frame)
    users, items = data.user_vocab(), data.item_vocab()
    seqs = sequences(frame, users, items)
    assert items.external(seqs[users.row(7)]).tolist() == [10, 30, 30]
    matrix = to_csr(frame, users, items)
    assert matrix[users.row(7), items.row(30)] == 1.0 and matrix.sum() == 3


def test_movielens_protocol_counts(ml_split):
    stats = ml_split.stats()
    assert (stats["users"], stats["items"]) == (610, 3650)
    assert stats["val"] == stats["test"] == 610
    train_pairs = set(zip(ml_split.train.frame["user_id"], ml_split.train.frame["item_id"]))
    test_pairs = set(zip(ml_split.test["user_id"], ml_split.test["item_id"]))
    assert not train_pairs & test_pairs
    # every user and item keeps >= 5 events after filtering
    full = pd.concat([ml_split.train.frame, ml_split.val, ml_split.test])
    assert full.groupby("item_id").size().min() >= 5 and full.groupby("user_id").size().min() >= 5


# ---- the last-n protocol and evaluation cases -----------------------------------------------------
def test_last_n_holds_out_the_last_n_and_each_case_reads_its_own_prefix():
    from data.protocol import last_n

    # user 1: 8 events (items 1..8) -> train 1-2, val 3, test 4-8; user 2: 5 events -> keeps 2 train + 1 val
    rows = [(1, i, i) for i in range(1, 9)] + [(2, 10 + i, i) for i in range(5)]
    split = last_n(Interactions(events(rows)), n=5)
    assert split.kind == "last_n"
    assert sorted(split.train.frame.query("user_id == 1")["item_id"]) == [1, 2]
    assert dict(zip(split.val["user_id"], split.val["item_id"])) == {1: 3, 2: 12}
    assert sorted(split.test.query("user_id == 2")["item_id"]) == [13, 14]
    cases = split.cases("test")
    assert len(cases) == 7 and not cases.one_per_user
    by_target = {int(t): h.tolist() for t, h in zip(cases.targets, cases.histories)}
    assert by_target[4] == [1, 2, 3] and by_target[6] == [1, 2, 3, 4, 5] and by_target[8] == [1, 2, 3, 4, 5, 6, 7]
    assert by_target[14] == [10, 11, 12, 13]
    val = split.cases("val")
    assert val.one_per_user and {int(t): h.tolist() for t, h in zip(val.targets, val.histories)}[3] == [1, 2]
    assert split.history("test").frame.query("user_id == 1")["item_id"].tolist() == [1, 2, 3]


def test_last_n_refuses_short_users_and_bad_n():
    from data.protocol import last_n, make_split

    with pytest.raises(DataValidationError, match="fewer than 4"):
        last_n(Interactions(events([(1, 1, 0), (1, 2, 1), (1, 3, 2)])))
    with pytest.raises(DataValidationError, match="n must be"):
        last_n(Interactions(events([(1, i, i) for i in range(6)])), n=0)
    with pytest.raises(DataValidationError, match="protocol"):
        make_split(Interactions(events([(1, i, i) for i in range(6)])), "random")


def test_leave_one_out_cases_are_one_per_user_with_the_stage_history():
    frame = events([(1, 1, 0), (1, 2, 1), (1, 3, 2), (1, 4, 3), (2, 1, 0), (2, 2, 1), (2, 3, 2)])
    split = leave_one_out(Interactions(frame))
    test = split.cases("test")
    assert test.one_per_user and test.targets.tolist() == [4, 3]
    assert [h.tolist() for h in test.histories] == [[1, 2, 3], [1, 2]]
    assert [h.tolist() for h in split.cases("val").histories] == [[1, 2], [1]]


def test_movielens_last_n_counts(ml_path):
    from data.protocol import apply_filters, last_n
    from pipeline.train import load_dataset

    split = last_n(apply_filters(load_dataset("ml-latest-small", str(ml_path))), 5)
    stats = split.stats()
    assert (stats["users"], stats["val"], stats["test"]) == (610, 610, 3050)
    assert len(split.cases("test")) == 3050
