"""Hot model swap: load a new version in the background, check and warm it, switch atomically.

* :class:`ModelSlot` holds the recommender being served. A request takes a :meth:`~ModelSlot.lease` and
  keeps the recommender it got for its whole life, so an in-flight request finishes on the old model; the
  old model is closed only when its last lease ends.
* :class:`Reloader` runs one reload at a time: ``load()`` (every manifest and checksum is verified),
  ``prepare(new)`` (start the workers, replay the event log, warm up, check a few answers), then
  ``activate(new)`` (the switch: under the event lock, replay the events that arrived meanwhile and put
  the new recommender in the slot). Any failure leaves the old model serving and is reported.
  A watcher thread can poll ``version()`` (what ``LATEST`` names) and reload when it changes.
* :class:`SharedLock`: events hold it shared while they write the log and update memory; the switch holds
  it exclusively, so no event lands between the tail replay and the switch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class SharedLock:
    """A readers-writer lock (writers wait for readers to leave and block new ones)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class ModelSlot:
    """The recommender being served, with leases (see the module docstring).

    Args:
        close_retired: close a replaced recommender once its last lease ends (``False`` for one the
            caller owns).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: Any = None
        self._leases: dict[int, int] = {}
        self._retired: dict[int, Any] = {}
        self._owned: set[int] = set()
        self.generation = 0

    @property
    def current(self) -> Any:
        return self._current

    @contextlib.contextmanager
    def lease(self) -> Iterator[Any]:
        """The current recommender (``None`` before the first install), held until the block ends."""
        with self._lock:
            rec = self._current
            key = id(rec)
            self._leases[key] = self._leases.get(key, 0) + 1
        try:
            yield rec
        finally:
            retire = None
            with self._lock:
                self._leases[key] -= 1
                if self._leases[key] == 0:
                    del self._leases[key]
                    retire = self._retired.pop(key, None)
            if retire is not None:
                self._close(retire)

    def install(self, rec: Any, *, owned: bool = True) -> Any:
        """Serve ``rec`` from now on; returns the replaced recommender (closed once idle when owned)."""
        with self._lock:
            old = self._current
            self._current = rec
            self.generation += 1
            if owned:
                self._owned.add(id(rec))
            idle = None
            if old is not None and old is not rec:
                if self._leases.get(id(old), 0):
                    self._retired[id(old)] = old
                else:
                    idle = old
        if idle is not None:
            self._close(idle)
        return old

    def _close(self, rec: Any) -> None:
        if id(rec) in self._owned:
            self._owned.discard(id(rec))
            try:
                rec.close()
            except Exception:
                log.exception("closing a replaced recommender failed")

    def close(self) -> None:
        """Close the current recommender when the slot owns it."""
        with self._lock:
            rec, self._current = self._current, None
        if rec is not None:
            self._close(rec)


def smoke_check(rec: Any, users: int = 3, k: int = 5) -> dict[str, Any]:
    """A few answers from ``rec``: each must hold ``k`` distinct catalogue items with finite scores; raises
    ``RuntimeError`` otherwise (a version that fails is never switched to)."""
    ids = rec.retriever.users.ids
    picked = [int(u) for u in ids[:: max(1, ids.size // users)][:users]] or [0]
    k = min(k, len(rec.retriever.items))
    for user in picked:
        out = rec.recommend(user, k=k, budget_ms=60_000.0, explain=False)
        items = [item.item_id for item in out.items]
        scores = [item.score for item in out.items]
        if len(set(items)) != k or rec.unknown_items(items) or not all(math.isfinite(s) for s in scores):
            raise RuntimeError(f"check failed for user {user}: {len(set(items))} distinct items of {k}, scores "
                               f"{scores[:3]}...")
    return {"users": len(picked), "k": k}


class Reloader:
    """One reload at a time, and an optional watcher of the served version (see the module docstring).

    Args:
        load: returns a new, verified recommender (raises on a bad version).
        prepare: readies it (start, replay, warm up, check); raises to refuse it.
        activate: switches to it (atomically, for the requests).
        version: what the newest version is called now (``LATEST``'s content), or ``None``.
        on_result: called with each reload's result (metrics).
    """

    def __init__(self, load: Callable[[], Any], prepare: Callable[[Any], None], activate: Callable[[Any], None],
                 *, version: Callable[[], str | None] | None = None,
                 on_result: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.load = load
        self.prepare = prepare
        self.activate = activate
        self.version = version
        self.on_result = on_result
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.last: dict[str, Any] = {"status": "none"}
        self.seen_version = version() if version is not None else None

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    def reload(self, reason: str = "requested") -> dict[str, Any]:
        """Load, prepare and activate a new recommender now; returns ``{"status": "swapped"|"refused"|
        "busy", ...}``. On refusal the old recommender keeps serving."""
        if not self._busy.acquire(blocking=False):
            return {"status": "busy", "detail": "a reload is already running; wait for it"}
        started = time.perf_counter()
        try:
            target = self.version() if self.version is not None else None
            try:
                new = self.load()
            except Exception as exc:  # noqa: BLE001 - any failure refuses the version; the old one serves
                result = self._refused(reason, target, "load", exc, started)
            else:
                try:
                    self.prepare(new)
                    self.activate(new)
                except Exception as exc:  # noqa: BLE001 - any failure refuses the version; the old one serves
                    try:
                        new.close()
                    except Exception:
                        log.exception("closing a refused recommender failed")
                    result = self._refused(reason, target, "check", exc, started)
                else:
                    result = {"status": "swapped", "reason": reason, "version": new.info.get("version"),
                              "seconds": round(time.perf_counter() - started, 3)}
                    log.warning("hot swap (%s): now serving %s", reason, result["version"])
            if target is not None:
                self.seen_version = target  # a bad version is not retried until LATEST changes again
            self.last = result
            if self.on_result is not None:
                self.on_result(result)
            return result
        finally:
            self._busy.release()

    @staticmethod
    def _refused(reason: str, target: str | None, step: str, exc: Exception, started: float) -> dict[str, Any]:
        log.error("hot swap (%s) refused version %s at %s: %s", reason, target, step, exc)
        return {"status": "refused", "reason": reason, "version": target, "step": step,
                "detail": f"{type(exc).__name__}: {exc}", "seconds": round(time.perf_counter() - started, 3)}

    def reload_in_background(self, reason: str = "requested") -> bool:
        """Start :meth:`reload` in a thread; ``False`` when one is already running."""
        if self.busy:
            return False
        threading.Thread(target=self.reload, args=(reason,), name="shortlist-reload", daemon=True).start()
        return True

    def watch(self, interval_s: float) -> None:
        """Poll :attr:`version` every ``interval_s`` seconds and reload when it changes."""
        if self.version is None or interval_s <= 0 or self._watcher is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    now = self.version()
                except Exception:
                    log.exception("reading the served version failed")
                    continue
                if now is not None and now != self.seen_version and not self.busy:
                    self.reload(f"LATEST changed to {now}")

        self._watcher = threading.Thread(target=loop, name="shortlist-latest-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()


__all__ = ["ModelSlot", "Reloader", "SharedLock", "smoke_check"]
