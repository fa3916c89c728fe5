"""The per-user LRU cache of encoded histories that both rerankers share.

A request's history is encoded once (its per-layer keys/values, what every candidate attends to) and kept
under the request's key (a user id, or the digest of an explicit history) with the digest of the history
it was computed from, so a changed history is recomputed, never served stale.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any


def cached_history(cache: OrderedDict, capacity: int, key: Any, digest: bytes,
                   compute: Callable[[], Any]) -> tuple[Any, bool]:
    """``(state, hit)``: the state cached under ``key`` when its ``digest`` matches, else ``compute()``
    (stored, evicting the least recently used beyond ``capacity``; ``capacity`` 0 caches nothing)."""
    if capacity:
        hit = cache.get(key)
        if hit is not None and hit[0] == digest:
            cache.move_to_end(key)
            return hit[1], True
    state = compute()
    if capacity:
        cache[key] = (digest, state)
        cache.move_to_end(key)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return state, False


__all__ = ["cached_history"]
