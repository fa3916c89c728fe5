"""validate_interactions / validate_items: canonical columns, every error message, the duplicates rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data.errors import DataValidationError
from data.generic import load_interactions
from data.validate import drop_duplicate_pairs, validate_interactions, validate_items


def _write(tmp_path, text: str, name: str = "events.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _load(path, **kwargs):
    kwargs.setdefault("user_col", "user")
    kwargs.setdefault("item_col", "item")
    kwargs.setdefault("time_col", "ts")
    return load_interactions(path, **kwargs)


# ------------------------------------------------------------------------------------ happy path


def test_canonical_columns_and_dtypes():
    raw = pd.DataFrame({"u": [3, 1], "i": [10, 20], "t": [5, 6], "r": [4, 5], "extra": ["x", "y"]})
    out = validate_interactions(raw, user_col="u", item_col="i", time_col="t", rating_col="r")
    assert list(out.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert [str(t) for t in out.dtypes] == ["int64", "int64", "int64", "float64"]
    assert out["user_id"].tolist() == [3, 1]
    assert out["rating"].tolist() == [4.0, 5.0]


def test_numeric_strings_and_integral_floats_are_converted():
    raw = pd.DataFrame({"user_id": ["12", " 7"], "item_id": [3.0, 4.0], "timestamp": ["100", "200.9"]})
    out = validate_interactions(raw)
    assert out["user_id"].tolist() == [12, 7]
    assert out["item_id"].tolist() == [3, 4]
    assert out["timestamp"].tolist() == [100, 200]  # fractional seconds are floored
    assert out["user_id"].dtype == np.int64 and out["timestamp"].dtype == np.int64


def test_no_time_column_uses_row_order():
    raw = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 5]})
    out = validate_interactions(raw, time_col=None)
    assert out["timestamp"].tolist() == [0, 1, 2]


def test_datetime_columns_become_utc_seconds():
    naive = pd.to_datetime(["1970-01-01 00:00:10", "2018-09-24 00:00:00"])
    raw = pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "timestamp": naive})
    assert validate_interactions(raw)["timestamp"].tolist() == [10, 1537747200]
    aware = pd.DatetimeIndex(["1970-01-01 02:00:10"]).tz_localize("Europe/Paris")  # UTC+1 in 1970
    raw = pd.DataFrame({"user_id": [1], "item_id": [1], "timestamp": aware})
    assert validate_interactions(raw)["timestamp"].tolist() == [3610]


def test_csv_file_round_trip(tmp_path):
    path = _write(tmp_path, "user,item,ts,score\n1,10,100,4.5\n2,10,50,3\n")
    data = _load(path, rating_col="score")
    assert data.name == "events"
    assert data.frame.to_dict("list") == {
        "user_id": [1, 2], "item_id": [10, 10], "timestamp": [100, 50], "rating": [4.5, 3.0],
    }


# ------------------------------------------------------------------------------------ errors


def test_missing_column_lists_present_columns(tmp_path):
    path = _write(tmp_path, "user,movie,ts\n1,2,3\n")
    with pytest.raises(DataValidationError) as err:
        _load(path)
    msg = str(err.value)
    assert "'item'" in msg and "item_col" in msg
    assert "['user', 'movie', 'ts']" in msg


def test_missing_column_in_frame():
    with pytest.raises(DataValidationError, match=r"'when' \(time_col\)"):
        validate_interactions(pd.DataFrame({"user_id": [1], "item_id": [2]}), time_col="when")


def test_null_id(tmp_path):
    path = _write(tmp_path, "user,item,ts\n1,10,1\n,11,2\n")
    with pytest.raises(DataValidationError, match=r"column 'user' has 1 null id\(s\) \(first at row 1\)"):
        _load(path)


def test_non_numeric_id(tmp_path):
    path = _write(tmp_path, "user,item,ts\n1,10,1\n2,abc,2\n")
    with pytest.raises(DataValidationError) as err:
        _load(path)
    assert "column 'item'" in str(err.value) and "'abc'" in str(err.value)
    assert "map string ids to integers" in str(err.value)


def test_non_integer_id(tmp_path):
    path = _write(tmp_path, "user,item,ts\n1.5,10,1\n2,11,2\n")
    with pytest.raises(DataValidationError, match=r"column 'user' has non-integer ids \(e.g. 1.5\)"):
        _load(path)


def test_non_numeric_timestamp(tmp_path):
    path = _write(tmp_path, "user,item,ts\n1,10,yesterday\n2,11,5\n")
    with pytest.raises(DataValidationError) as err:
        _load(path)
    assert "column 'ts'" in str(err.value) and "'yesterday'" in str(err.value)
    assert "pandas.to_datetime" in str(err.value)


def test_null_timestamp(tmp_path):
    path = _write(tmp_path, "user,item,ts\n1,10,\n2,11,5\n")
    with pytest.raises(DataValidationError, match=r"column 'ts' has 1 null timestamp"):
        _load(path)


def test_header_only_file_has_no_rows(tmp_path):
    path = _write(tmp_path, "user,item,ts\n")
    with pytest.raises(DataValidationError, match="no rows"):
        _load(path)


def test_zero_byte_file(tmp_path):
    path = _write(tmp_path, "")
    with pytest.raises(DataValidationError, match="file is empty"):
        _load(path)


def test_non_numeric_rating():
    raw = pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3], "stars": ["five"]})
    with pytest.raises(DataValidationError, match="column 'stars'"):
        validate_interactions(raw, rating_col="stars")


def test_bad_duplicates_rule_and_non_frame():
    raw = pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3]})
    with pytest.raises(DataValidationError, match="keep_last"):
        validate_interactions(raw, duplicates="newest")
    with pytest.raises(DataValidationError, match="DataFrame"):
        validate_interactions(raw.to_dict())


# ------------------------------------------------------------------------------------ duplicates


@pytest.fixture
def repeated():
    # pair (1, 10): events at t=5 (row 0), t=9 (row 1), t=9 (row 3), t=2 (row 4); pair (2, 10) once.
    return pd.DataFrame(
        {
            "user_id": [1, 1, 2, 1, 1],
            "item_id": [10, 10, 10, 10, 10],
            "timestamp": [5, 9, 7, 9, 2],
            "rating": [1.0, 2.0, 3.0, 4.0, 5.0],
        }
    )


def test_keep_last_keeps_latest_timestamp_then_last_row(repeated):
    out = validate_interactions(repeated, rating_col="rating")
    assert out.to_dict("list") == {
        "user_id": [2, 1], "item_id": [10, 10], "timestamp": [7, 9], "rating": [3.0, 4.0],
    }


def test_keep_first_keeps_earliest_timestamp(repeated):
    out = validate_interactions(repeated, rating_col="rating", duplicates="keep_first")
    assert out.to_dict("list") == {
        "user_id": [2, 1], "item_id": [10, 10], "timestamp": [7, 2], "rating": [3.0, 5.0],
    }


def test_keep_all_keeps_every_event(repeated):
    out = validate_interactions(repeated, rating_col="rating", duplicates="keep_all")
    assert out["timestamp"].tolist() == [5, 9, 7, 9, 2]


def test_timestamp_ties_are_broken_by_row_order_on_many_rows():
    rng = np.random.default_rng(0)
    n = 500  # large enough for an unstable sort to reorder equal keys
    raw = pd.DataFrame(
        {
            "user_id": np.ones(n, dtype=int),
            "item_id": rng.integers(0, 3, n),
            "timestamp": rng.integers(0, 2, n),
            "rating": np.arange(n, dtype=float),  # the row number
        }
    )
    last = validate_interactions(raw, rating_col="rating")
    first = validate_interactions(raw, rating_col="rating", duplicates="keep_first")
    # expected, by the rule: latest timestamp, then the later row / earliest timestamp, then the earlier row
    expect_last, expect_first = {}, {}
    for row in raw.itertuples():
        key_last, key_first = (row.timestamp, row.rating), (-row.timestamp, -row.rating)
        if row.item_id not in expect_last or key_last > expect_last[row.item_id]:
            expect_last[row.item_id] = key_last
        if row.item_id not in expect_first or key_first > expect_first[row.item_id]:
            expect_first[row.item_id] = key_first
    assert dict(zip(last["item_id"], last["rating"])) == {i: k[1] for i, k in expect_last.items()}
    assert dict(zip(first["item_id"], first["rating"])) == {i: -k[1] for i, k in expect_first.items()}


def test_keep_last_without_times_keeps_last_row():
    raw = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [4, 5, 4], "pos": [0, 1, 2]})
    out = validate_interactions(raw, time_col=None)
    assert out[["item_id", "timestamp"]].values.tolist() == [[5, 1], [4, 2]]
    assert drop_duplicate_pairs(out, "keep_all").equals(out)


def test_input_is_not_modified(repeated):
    raw = repeated.assign(user_id=repeated["user_id"].astype(str), when=pd.Timestamp("2020-01-01"))
    before = raw.copy(deep=True)
    validate_interactions(raw, time_col="when", rating_col="rating")
    validate_interactions(raw, time_col="timestamp", duplicates="keep_first")
    pd.testing.assert_frame_equal(raw, before)


# ------------------------------------------------------------------------------------ items


def test_validate_items_renames_and_builds_text():
    raw = pd.DataFrame(
        {"sku": ["7", "3"], "name": ["Lamp", "Desk"], "desc": ["Warm light", None], "cat": ["Home", "Office"]}
    )
    before = raw.copy(deep=True)
    table = validate_items(raw, item_col="sku", title_col="name", genres_col="cat", text_cols=["name", "desc"])
    pd.testing.assert_frame_equal(raw, before)
    assert list(table.columns) == ["item_id", "title", "genres", "year", "text"]
    assert table["item_id"].tolist() == [7, 3]
    assert table["title"].tolist() == ["Lamp", "Desk"]
    assert table["genres"].tolist() == ["Home", "Office"]
    assert table["text"].tolist() == ["Lamp | Warm light", "Desk"]


def test_validate_items_title_falls_back_to_text_cols():
    raw = pd.DataFrame({"item_id": [1], "desc": ["A red chair"]})
    table = validate_items(raw, title_col=None, text_cols=["desc"])
    assert table["title"].tolist() == ["A red chair"] and table["text"].tolist() == ["A red chair"]
    with pytest.raises(DataValidationError, match="title_col="):
        validate_items(raw, title_col=None)


def test_validate_items_errors():
    with pytest.raises(DataValidationError, match=r"'name' \(title_col\)"):
        validate_items(pd.DataFrame({"item_id": [1]}), title_col="name")
    with pytest.raises(DataValidationError, match=r"column 'item_id' has repeated item ids \(e.g. \[4\]\)"):
        validate_items(pd.DataFrame({"item_id": [4, 4], "title": ["a", "b"]}))
    with pytest.raises(DataValidationError, match="no rows"):
        validate_items(pd.DataFrame({"item_id": [], "title": []}))
