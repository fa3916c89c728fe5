"""MovieLens layouts, folder resolution, the verified download, the generic loader and the item table.

Everything runs offline on tiny files written in the real formats; the one test on the real
ml-latest-small is marked ``movielens`` and skipped when ``SHORTLIST_DATA_DIR`` does not hold it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data import movielens
from data.errors import ChecksumMismatchError, DatasetNotFoundError, DataValidationError
from data.generic import load_interactions
from data.items import build_item_table
from data.movielens import (
    dataset_dir,
    default_data_dir,
    load_ml_1m,
    load_ml_100k,
    load_ml_latest,
    load_movielens,
)

RATINGS_CSV = (
    "userId,movieId,rating,timestamp\n"
    "1,1,4.0,964982703\n"
    "1,2,3.5,964981247\n"
    "2,1,5.0,964982224\n"
    "2,3,0.5,964983815\n"
    "3,2,2.0,964982931\n"
)
MOVIES_CSV = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
    '2,"American President, The (1995) ",Comedy|Drama|Romance\n'
    "3,Babylon 5,(no genres listed)\n"
    "4,Amélie (Fabuleux destin d'Amélie Poulain) (2001),Comedy|Romance\n"
)


def write_ml_latest(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(RATINGS_CSV, encoding="utf-8")
    (folder / "movies.csv").write_text(MOVIES_CSV, encoding="utf-8")
    return folder


def ml_latest_zip(name: str = "ml-latest-small") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{name}/ratings.csv", RATINGS_CSV)
        archive.writestr(f"{name}/movies.csv", MOVIES_CSV)
        archive.writestr(f"{name}/README.txt", "tiny test copy")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ item table


def test_build_item_table_columns_year_genres_text():
    raw = pd.DataFrame(
        {
            "item_id": [1, 2, 3, 4],
            "title": ["Toy Story (1995)", " Heat (1995) ", "Cosmos", "Death Note (2006–2007)"],
            "genres": ["Adventure|Animation", "(no genres listed)", None, ["Anime", " Thriller "]],
        }
    )
    before = raw.copy(deep=True)
    table = build_item_table(raw)
    pd.testing.assert_frame_equal(raw, before)
    assert list(table.columns) == ["item_id", "title", "genres", "year", "text"]
    assert table["item_id"].dtype == np.int64 and str(table["year"].dtype) == "Int64"
    assert table["title"].tolist() == ["Toy Story (1995)", "Heat (1995)", "Cosmos", "Death Note (2006–2007)"]
    assert table["genres"].tolist() == ["Adventure|Animation", "", "", "Anime|Thriller"]
    assert table["year"].tolist() == [1995, 1995, pd.NA, pd.NA]
    assert table["text"].tolist() == [
        "Toy Story (1995) | Adventure, Animation", "Heat (1995)", "Cosmos", "Death Note (2006–2007) | Anime, Thriller",
    ]


def test_build_item_table_text_cols_and_errors():
    raw = pd.DataFrame({"item_id": [5], "title": ["Lamp"], "desc": ["Warm"], "brand": ["Acme"]})
    assert build_item_table(raw, text_cols=["brand", "desc"])["text"].tolist() == ["Acme | Warm"]
    with pytest.raises(DataValidationError, match="'title'"):
        build_item_table(raw.drop(columns="title"))
    with pytest.raises(DataValidationError, match="repeated item ids"):
        build_item_table(pd.concat([raw, raw]))


# ------------------------------------------------------------------------------------ layouts


def test_load_ml_latest_layout(tmp_path):
    data = load_ml_latest(write_ml_latest(tmp_path / "ml-latest-small"))
    assert data.name == "ml-latest-small"
    assert (len(data), data.n_users, data.n_items) == (5, 3, 3)
    assert data.frame["rating"].tolist() == [4.0, 3.5, 5.0, 0.5, 2.0]
    assert data.frame["timestamp"].iloc[0] == 964982703
    items = data.items.set_index("item_id")
    assert len(items) == 4  # the catalogue includes the unrated movie 4
    assert items.loc[2, "title"] == "American President, The (1995)"
    assert items.loc[3, "genres"] == "" and pd.isna(items.loc[3, "year"])
    assert items.loc[4, "title"].startswith("Amélie") and items.loc[4, "year"] == 2001
    assert items.loc[1, "text"] == "Toy Story (1995) | Adventure, Animation, Children, Comedy, Fantasy"


def test_load_ml_1m_layout_latin1(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    (folder / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "3::Misérables, Les (1995)::Drama|Musical\n".encode("latin-1")
    )
    data = load_ml_1m(folder)
    assert data.name == "ml-1m" and data.meta["layout"] == "ml-1m"
    assert data.frame[["user_id", "item_id", "rating", "timestamp"]].values.tolist() == [
        [1, 1193, 5, 978300760], [1, 661, 3, 978302109], [2, 1193, 4, 978298413],
    ]
    items = data.items.set_index("item_id")
    assert items.loc[3, "title"] == "Misérables, Les (1995)"
    assert items.loc[661, "genres"] == "Animation|Children's|Musical"
    assert items.loc[1193, "year"] == 1975


def test_load_ml_100k_layout_genre_flags(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t242\t1\t878887116\n")
    flags_242 = ["0"] * 19
    flags_242[5] = "1"  # Comedy
    flags_242[8] = "1"  # Drama
    flags_302 = ["0"] * 19
    flags_302[16] = "1"  # Thriller
    flags_267 = ["1"] + ["0"] * 18  # only 'unknown'
    lines = [
        "|".join(["242", "Kolya (1996)", "24-Jan-1997", "", "http://us.imdb.com/x", *flags_242]),
        "|".join(["302", "L.A. Confidential (1997)", "01-Jan-1997", "", "http://x", *flags_302]),
        "|".join(["267", "unknown", "", "", "", *flags_267]),
        "|".join(["1", "Misérables, Les (1995)", "01-Jan-1995", "", "http://x", *(["0"] * 8 + ["1"] + ["0"] * 10)]),
    ]
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    data = load_ml_100k(folder)
    assert (len(data), data.n_users, data.n_items) == (3, 3, 2)
    items = data.items.set_index("item_id")
    assert items.loc[242, "genres"] == "Comedy|Drama"
    assert items.loc[302, "genres"] == "Thriller"
    assert items.loc[267, "genres"] == ""
    assert items.loc[1, "title"] == "Misérables, Les (1995)" and items.loc[1, "genres"] == "Drama"
    assert items.loc[242, "text"] == "Kolya (1996) | Comedy, Drama" and items.loc[242, "year"] == 1996


def test_layout_is_detected_from_files_and_nested_folders(tmp_path):
    write_ml_latest(tmp_path / "outer" / "ml-latest-small")  # an unzip that left a nested folder
    data = load_movielens("ml-latest-small", path=tmp_path / "outer")
    assert len(data) == 5 and data.name == "ml-latest-small"
    with pytest.raises(DatasetNotFoundError, match="path="):
        load_movielens("ml-latest-small", path=tmp_path / "nowhere")


def test_unknown_name_lists_supported():
    with pytest.raises(DataValidationError) as err:
        load_movielens("ml-10m")
    assert "ml-latest-small" in str(err.value) and "ml-100k" in str(err.value)


def test_pinned_checksums_are_sha256_hex():
    assert set(movielens.SUPPORTED) == {"ml-latest-small", "ml-latest", "ml-25m", "ml-20m", "ml-1m", "ml-100k"}
    for name, digest in movielens.CHECKSUMS.items():
        assert digest is not None and len(digest) == 64 and int(digest, 16) >= 0, name


# ------------------------------------------------------------------------------------ resolution


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_data_dir_env_is_used_before_the_cache(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("SHORTLIST_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("SHORTLIST_CACHE_DIR", raising=False)
    write_ml_latest(tmp_path / "data" / "ml-latest-small")
    cache = write_ml_latest(tmp_path / "cache" / "ml-latest-small")
    (cache / "ratings.csv").write_text("userId,movieId,rating,timestamp\n9,1,1.0,1\n")
    assert default_data_dir() == tmp_path / "data"
    assert dataset_dir("ml-latest-small") == tmp_path / "data" / "ml-latest-small"
    data = load_movielens("ml-latest-small", cache_dir=tmp_path / "cache")
    assert len(data) == 5 and data.meta["source"] == str(tmp_path / "data" / "ml-latest-small")


def test_cache_dir_env_when_data_dir_lacks_the_dataset(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("SHORTLIST_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("SHORTLIST_CACHE_DIR", str(tmp_path / "cache"))
    write_ml_latest(tmp_path / "cache" / "ml-latest-small")
    assert dataset_dir("ml-latest-small") == tmp_path / "cache" / "ml-latest-small"
    assert len(load_movielens("ml-latest-small")) == 5


def test_not_found_without_download_says_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.delenv("SHORTLIST_DATA_DIR", raising=False)
    assert default_data_dir() is None
    with pytest.raises(DatasetNotFoundError) as err:
        load_movielens("ml-1m", cache_dir=tmp_path / "cache", download=False)
    msg = str(err.value)
    assert "$SHORTLIST_DATA_DIR/ml-1m/" in msg and str(tmp_path / "cache" / "ml-1m") in msg
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in msg and "ratings.dat" in msg


# ------------------------------------------------------------------------------------ download


class FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


@pytest.fixture
def serve(monkeypatch, tmp_path):
    """Serve ``payload`` from a monkeypatched urlopen; record requested URLs."""
    monkeypatch.delenv("SHORTLIST_DATA_DIR", raising=False)
    requested: list[str] = []

    def install(payload: bytes) -> list[str]:
        def urlopen(url, timeout=None):
            requested.append(url)
            return FakeResponse(payload)

        monkeypatch.setattr(urllib.request, "urlopen", urlopen)
        return requested

    return install


def test_download_with_good_checksum_extracts_and_loads(tmp_path, monkeypatch, serve):
    payload = ml_latest_zip()
    monkeypatch.setitem(movielens.CHECKSUMS, "ml-latest-small", hashlib.sha256(payload).hexdigest())
    requested = serve(payload)
    cache = tmp_path / "cache"
    data = load_movielens("ml-latest-small", cache_dir=cache)
    assert requested == ["https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"]
    assert (len(data), len(data.items)) == (5, 4)
    assert sorted(os.listdir(cache)) == ["ml-latest-small"]  # no zip, temp file or staging folder left
    assert (cache / "ml-latest-small" / "README.txt").read_text() == "tiny test copy"
    # a second load reads the cache and does not download again
    assert len(load_movielens("ml-latest-small", cache_dir=cache)) == 5
    assert len(requested) == 1


def test_download_with_bad_checksum_raises_and_leaves_nothing(tmp_path, serve):
    serve(ml_latest_zip())  # its hash is not the pinned one
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatchError) as err:
        load_movielens("ml-latest-small", cache_dir=cache)
    assert movielens.CHECKSUMS["ml-latest-small"] in str(err.value)
    assert os.listdir(cache) == []


def test_download_unreachable_names_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("SHORTLIST_DATA_DIR", raising=False)
    for exc in (urllib.error.URLError("no route to host"), OSError("network down")):
        def urlopen(url, timeout=None, exc=exc):
            raise exc

        monkeypatch.setattr(urllib.request, "urlopen", urlopen)
        with pytest.raises(DatasetNotFoundError) as err:
            load_movielens("ml-100k", cache_dir=tmp_path / "cache")
        msg = str(err.value)
        assert "SHORTLIST_DATA_DIR" in msg and str(tmp_path / "cache" / "ml-100k") in msg
        assert "https://files.grouplens.org/datasets/movielens/ml-100k.zip" in msg
        assert os.listdir(tmp_path / "cache") == []


def test_unpinned_download_records_its_sha256(tmp_path, monkeypatch, serve, caplog):
    payload = ml_latest_zip("ml-latest")
    monkeypatch.setitem(movielens.CHECKSUMS, "ml-latest", None)
    serve(payload)
    with caplog.at_level(logging.WARNING, logger="data.movielens"):
        data = load_movielens("ml-latest", cache_dir=tmp_path)
    assert len(data) == 5
    digest = hashlib.sha256(payload).hexdigest()
    assert (tmp_path / "ml-latest.zip.sha256").read_text().split()[0] == digest
    assert "no pinned SHA-256" in caplog.text


def test_zip_slip_member_is_refused(tmp_path, monkeypatch, serve):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ml-latest-small/ratings.csv", RATINGS_CSV)
        archive.writestr("ml-latest-small/movies.csv", MOVIES_CSV)
        archive.writestr("../escaped.txt", "gotcha")
    payload = buffer.getvalue()
    monkeypatch.setitem(movielens.CHECKSUMS, "ml-latest-small", hashlib.sha256(payload).hexdigest())
    serve(payload)
    cache = tmp_path / "cache"
    with pytest.raises(DataValidationError, match="outside the target folder"):
        load_movielens("ml-latest-small", cache_dir=cache)
    assert not (tmp_path / "escaped.txt").exists()
    assert os.listdir(cache) == []


# ------------------------------------------------------------------------------------ generic loader


EVENTS = pd.DataFrame(
    {"uid": [1, 1, 2, 2], "sku": [10, 11, 10, 12], "when": [3, 1, 2, 2], "stars": [5, 4, 3, 2]}
)
CATALOG = pd.DataFrame(
    {
        "sku": [10, 11, 12],
        "name": ["Lamp", "Desk", "Chair"],
        "desc": ["Warm light", "Oak", ""],
        "cat": ["Home|Light", "Office", ""],
    }
)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".pq"])
def test_generic_loader_formats_and_item_table(tmp_path, suffix):
    events, catalog = tmp_path / f"events{suffix}", tmp_path / f"catalog{suffix}"
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        EVENTS.to_csv(events, sep=sep, index=False)
        CATALOG.to_csv(catalog, sep=sep, index=False)
    else:
        EVENTS.to_parquet(events, index=False)
        CATALOG.to_parquet(catalog, index=False)
    data = load_interactions(
        events, user_col="uid", item_col="sku", time_col="when", rating_col="stars",
        items_path=catalog, title_col="name", genres_col="cat", text_cols=["name", "desc"], name="shop",
    )
    assert data.name == "shop" and data.meta["source"] == str(events)
    assert data.frame.to_dict("list") == {
        "user_id": [1, 1, 2, 2], "item_id": [10, 11, 10, 12], "timestamp": [3, 1, 2, 2],
        "rating": [5.0, 4.0, 3.0, 2.0],
    }
    items = data.items.set_index("item_id")
    assert items.loc[10, "text"] == "Lamp | Warm light" and items.loc[12, "text"] == "Chair"
    assert items.loc[10, "genres"] == "Home|Light" and items.loc[12, "genres"] == ""


def test_generic_loader_default_item_text_and_missing_items_warning(tmp_path, caplog):
    events, catalog = tmp_path / "events.csv", tmp_path / "items.csv"
    EVENTS.to_csv(events, index=False)
    CATALOG.rename(columns={"name": "title"}).iloc[:2].to_csv(catalog, index=False)
    with caplog.at_level(logging.WARNING, logger="data.generic"):
        data = load_interactions(events, user_col="uid", item_col="sku", items_path=catalog, genres_col="cat")
    assert data.name == "events"
    assert data.frame["timestamp"].tolist() == [0, 1, 2, 3]  # no time_col: row order
    assert data.items["text"].tolist() == ["Lamp | Home, Light", "Desk | Office"]
    assert "1 of 4 events are on 1 item ids missing" in caplog.text


def test_generic_loader_duplicates_rule(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("u,i,t\n1,5,10\n1,5,30\n1,5,20\n")
    last = load_interactions(path, user_col="u", item_col="i", time_col="t")
    first = load_interactions(path, user_col="u", item_col="i", time_col="t", duplicates="keep_first")
    every = load_interactions(path, user_col="u", item_col="i", time_col="t", duplicates="keep_all")
    assert last.frame["timestamp"].tolist() == [30]
    assert first.frame["timestamp"].tolist() == [10]
    assert len(every) == 3


def test_generic_loader_path_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"path='.*missing\.csv' does not exist"):
        load_interactions(tmp_path / "missing.csv", user_col="u", item_col="i")
    bad = tmp_path / "events.xlsx"
    bad.write_text("u,i\n1,2\n")
    with pytest.raises(DataValidationError) as err:
        load_interactions(bad, user_col="u", item_col="i")
    assert "events.xlsx" in str(err.value) and "'.parquet'" in str(err.value)
    good = tmp_path / "events.csv"
    good.write_text("u,i\n1,2\n")
    with pytest.raises(DatasetNotFoundError, match="items_path="):
        load_interactions(good, user_col="u", item_col="i", items_path=tmp_path / "items.csv")
    (tmp_path / "items.csv").write_text("id,title\n2,x\n")
    with pytest.raises(DataValidationError, match=r"'i' \(item_id_col\)"):
        load_interactions(good, user_col="u", item_col="i", items_path=tmp_path / "items.csv")


# ------------------------------------------------------------------------------------ real data


@pytest.mark.movielens
def test_real_ml_latest_small():
    root = os.environ.get("SHORTLIST_DATA_DIR")
    if not root:
        pytest.skip("SHORTLIST_DATA_DIR is not set; point it at the folder that holds ml-latest-small/")
    if not (Path(root) / "ml-latest-small" / "ratings.csv").is_file():
        pytest.skip(f"{root}/ml-latest-small/ratings.csv not found; unzip ml-latest-small.zip there")
    from data.protocol import apply_filters, leave_one_out

    data = load_movielens("ml-latest-small", download=False)
    assert (len(data), data.n_users, len(data.items)) == (100_836, 610, 9_742)
    split = leave_one_out(apply_filters(data))
    assert (len(split.users), len(split.items)) == (610, 3_650)
    train_pairs = set(zip(split.train.frame["user_id"], split.train.frame["item_id"]))
    test_pairs = set(zip(split.test["user_id"], split.test["item_id"]))
    assert len(test_pairs) == 610 and not (test_pairs & train_pairs)
