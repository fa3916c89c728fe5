"""The explorer: a small web page at ``GET /`` to look at recommendations, and the lookups it needs.

The page (``pipeline/static/explorer.html``, ``explorer.js``, ``explorer.css``: plain HTML and JavaScript,
no build step, nothing from other hosts) is served by :func:`pipeline.service.create_app`. It holds no
data: every user, item and list it shows comes from the HTTP API with the same bearer token and the same
validation as any other client (``POST /recommend`` with ``include_retrieval``, ``POST /events``,
``GET /users/{id}/history``, ``GET /items/search``). So the page and its assets (:data:`PUBLIC_PATHS`) are
served without the key, and the page asks for the key when a call answers 401, keeping it in memory only.

:class:`ItemCatalogue` answers the two lookups: a user's recent history with titles and genres, and a
title search over the retriever's catalogue (ids only when the recommender has no item table).
"""

from __future__ import annotations

import threading
from importlib import resources
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

#: The page, served at ``/``.
PAGE = "explorer.html"
#: The assets served at ``/static/<name>``, with their media types.
ASSETS = {"explorer.js": "text/javascript; charset=utf-8", "explorer.css": "text/css; charset=utf-8"}
#: Paths served without the API key: the page and its assets (they hold no data).
PUBLIC_PATHS = frozenset({"/", *(f"/static/{name}" for name in ASSETS)})
#: The page's Content-Security-Policy: its own scripts, styles and API only.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def asset(name: str) -> bytes:
    """The bytes of the page or one of its :data:`ASSETS` (shipped in the package, ``pipeline/static``)."""
    if name != PAGE and name not in ASSETS:
        raise KeyError(f"{name!r} is not an explorer asset; choose one of {[PAGE, *ASSETS]}")
    return (resources.files("pipeline") / "static" / name).read_bytes()


class ItemInfo(BaseModel):
    """An item as the explorer shows it."""

    item_id: int
    title: str | None = Field(None, description="null when the artifact has no item table")
    genres: list[str] = Field(default_factory=list)


class UserHistory(BaseModel):
    """``GET /users/{user_id}/history``: the user's most recent items, newest first."""

    user_id: int
    known: bool = Field(description="the retriever knows the user, or the user has real-time events")
    history_length: int = Field(description="items in the whole history (stored plus real-time events)")
    items: list[ItemInfo] = Field(description="the last `limit` items, newest first")


class ItemSearch(BaseModel):
    """``GET /items/search``: catalogue items whose title contains the query (or whose id it is)."""

    query: str
    items: list[ItemInfo]


class ItemCatalogue:
    """Titles, genres and title search over a recommender's catalogue (``recommender.retriever.items``),
    from its item table (``recommender.items``, indexed by ``item_id``; ``None`` gives ids only).

    The lower-cased titles for search are built once, on the first search.
    """

    def __init__(self, recommender: Any) -> None:
        self.recommender = recommender
        table = recommender.items
        self.table = table if table is not None and "title" in getattr(table, "columns", ()) else None
        self._search: tuple[np.ndarray, np.ndarray, list[str]] | None = None
        self._lock = threading.Lock()

    def info(self, item_id: int) -> ItemInfo:
        """The title and genres of ``item_id`` (``None`` and ``[]`` when unknown or without a table)."""
        if self.table is None or int(item_id) not in self.table.index:
            return ItemInfo(item_id=int(item_id))
        row = self.table.loc[int(item_id)]
        genres = row["genres"] if "genres" in self.table.columns else ""
        return ItemInfo(item_id=int(item_id), title=str(row["title"]),
                        genres=[g for g in genres.split("|") if g] if isinstance(genres, str) else [])

    def history(self, user_id: int, limit: int) -> UserHistory:
        """The last ``limit`` items of the user's current history (stored plus real-time events), newest
        first; an unknown user has an empty one."""
        rec = self.recommender
        history = rec.history(int(user_id))
        recent = history[::-1][:limit]
        known = int(user_id) in rec.retriever.users or rec.observed(int(user_id))
        return UserHistory(user_id=int(user_id), known=bool(known), history_length=int(history.size),
                           items=[self.info(int(i)) for i in recent])

    def search(self, query: str, limit: int) -> ItemSearch:
        """Up to ``limit`` catalogue items: the item whose id is ``query`` (when it is one), then the titles
        containing it (case-insensitive), those that start with it first, then by match position and title."""
        text = query.strip()
        found: list[int] = []
        if text.lstrip("-").isdigit() and len(text) <= 20 and int(text) in self.recommender.retriever.items:
            found.append(int(text))
        if self.table is not None and text:
            ids, folded, titles = self._titles()
            needle = text.casefold()
            position = np.char.find(folded, needle)
            hits = np.flatnonzero(position >= 0)
            order = sorted(hits.tolist(), key=lambda j: (int(position[j]), titles[j], int(ids[j])))
            found += [int(ids[j]) for j in order[: limit + 1]]
        unique = list(dict.fromkeys(found))[:limit]
        return ItemSearch(query=query, items=[self.info(i) for i in unique])

    def _titles(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(item ids, lower-cased titles, titles)`` of the catalogue items in the item table (built once)."""
        with self._lock:
            if self._search is None:
                catalogue = self.recommender.retriever.items.ids
                table = self.table[self.table.index.isin(catalogue)]
                titles = [str(t) for t in table["title"].tolist()]
                self._search = (table.index.to_numpy(dtype=np.int64),
                                np.array([t.casefold() for t in titles], dtype=str), titles)
            return self._search


__all__ = ["ASSETS", "CSP", "PAGE", "PUBLIC_PATHS", "ItemCatalogue", "ItemInfo", "ItemSearch", "UserHistory",
           "asset"]
