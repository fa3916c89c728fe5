"""Shared fixtures: offline Hugging Face, tiny synthetic events, and the real ml-latest-small split."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pandas as pd
import pytest

from data.dataset import Interactions


def movielens_dir() -> Path | None:
    """ml-latest-small from SHORTLIST_DATA_DIR, or the ../shared copy beside the checkout."""
    candidates = []
    if os.environ.get("SHORTLIST_DATA_DIR"):
        candidates.append(Path(os.environ["SHORTLIST_DATA_DIR"]) / "ml-latest-small")
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-latest-small")
    for path in candidates:
        if (path / "ratings.csv").is_file():
            return path
    return None


@pytest.fixture(scope="session")
def ml_path() -> Path:
    path = movielens_dir()
    if path is None:
        pytest.skip("ml-latest-small not found: set SHORTLIST_DATA_DIR to the folder holding ml-latest-small/")
    return path


@pytest.fixture(scope="session")
def ml_split(ml_path):
    from pipeline.train import load_dataset, prepare_split

    return prepare_split(load_dataset("ml-latest-small", str(ml_path)))


@pytest.fixture
def block_events() -> Interactions:
    """Two taste blocks with known answers: users 1-20 like items 100-109, users 21-40 like 200-209.

    Each user saw 6 of their block's 10 items (a rotating window), so the unseen in-block items are the
    right answer for every model that learns co-occurrence; item 100 and 200 are the most popular.
    """
    rows = []
    t = 0
    for u in range(1, 41):
        base = 100 if u <= 20 else 200
        offset = (u - 1) % 10
        chosen = [base] + [base + (offset + j) % 10 for j in range(1, 6)]
        for item in dict.fromkeys(chosen):
            rows.append((u, item, t))
            t += 1
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype("int64")
    items = pd.DataFrame({"item_id": np.r_[100:110, 200:210], "title": [f"Item {i}" for i in range(20)],
                          "genres": ["A"] * 10 + ["B"] * 10, "year": pd.array([2000] * 20, dtype="Int64"),
                          "text": [f"Item {i}" for i in range(20)]})
    return Interactions(frame, items, name="blocks")
