"""The durable event log: ``POST /events`` writes here before it answers, start-up replays it, and
``shortlist train --events`` folds it into the next training run.

**Format**: a text file, a header line then one event per line, ``user<TAB>item<TAB>timestamp<TAB>crc32``
(the CRC of the first three fields, 8 hex digits). Appends go through one ``O_APPEND`` file descriptor.

**Durability** (:class:`EventLogConfig`.``fsync``): every policy writes the event to the file (the kernel's
page cache) before the request is answered, so an acknowledged event survives ``kill -9`` of the server
in every policy. ``fsync`` decides what survives a power loss or kernel crash:

* ``"batch"`` (default): group commit: the answer waits for an ``fsync`` that covers its event; requests
  arriving while one ``fsync`` runs share the next one (one ``fsync`` per batch of concurrent requests);
* ``"interval"``: a background thread fsyncs every ``fsync_interval_ms`` (100 ms); answers do not wait, so
  up to that much can be lost to a power cut;
* ``"always"``: one ``fsync`` per event, under the write lock (slowest);
* ``"never"``: the OS writes back when it likes.

**Recovery**: a last line cut short by a crash (no newline, or a CRC that does not match) is dropped and
the file truncated to the last whole event before appending; a damaged line anywhere else is refused with
an error naming the file and line (move the file aside to start afresh). The log grows without bound;
rotate it after a training run folded it in (``shortlist train --events`` records how much it folded).

**Folding** (:func:`fold_events`): the events become rows of the training interactions; the artifact's
manifest records ``{"bytes", "sha256", "events"}`` of the folded prefix, and a server replaying the log over
that artifact skips exactly that prefix (:func:`folded_offset`), so no event is counted twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.config import JsonConfig, require
from data.errors import DataValidationError

log = logging.getLogger(__name__)

HEADER = b"# shortlist event log v1: user_id\titem_id\ttimestamp\tcrc32\n"
POLICIES = ("batch", "interval", "always", "never")


@dataclass
class EventLogConfig(JsonConfig):
    """The durable event log of the service.

    Attributes:
        path: the log file; ``None`` keeps events in memory only (lost on restart).
        fsync: ``"batch"`` (group commit, the default), ``"interval"``, ``"always"`` or ``"never"``
            (see the module docstring).
        fsync_interval_ms: the ``"interval"`` policy's period.
        replay: replay the log into the recommender at start-up (and into a hot-swapped one).
    """

    path: str | None = None
    fsync: str = "batch"
    fsync_interval_ms: float = 100.0
    replay: bool = True

    def __post_init__(self) -> None:
        require(self.fsync in POLICIES, f"EventLogConfig.fsync must be one of {POLICIES}, got {self.fsync!r}")
        require(0 < self.fsync_interval_ms <= 60_000,
                f"EventLogConfig.fsync_interval_ms must be in (0, 60000], got {self.fsync_interval_ms}")


def encode(user_id: int, item_id: int, timestamp: int) -> bytes:
    """One log line."""
    body = f"{int(user_id)}\t{int(item_id)}\t{int(timestamp)}".encode()
    return body + b"\t%08x\n" % zlib.crc32(body)


def _decode(line: bytes) -> tuple[int, int, int] | None:
    """``(user, item, timestamp)`` of a whole line, or ``None`` when it is damaged."""
    if not line.endswith(b"\n"):
        return None
    body, _, crc = line[:-1].rpartition(b"\t")
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        user, item, stamp = (int(v) for v in body.split(b"\t"))
    except ValueError:
        return None
    return user, item, stamp


def read_events(path: str | Path, start: int = 0) -> Iterator[tuple[int, tuple[int, int, int]]]:
    """``(offset after the line, (user, item, timestamp))`` for each whole event from byte ``start`` on.

    A damaged last line is skipped (a crash cut it short); a damaged line before the end raises
    :class:`~data.errors.DataValidationError` naming the file and line."""
    path = Path(path)
    with open(path, "rb") as handle:
        header = handle.readline()
        if header != HEADER:
            raise DataValidationError(f"{path}: not a shortlist event log (first line {header[:60]!r}); pass the "
                                      "file `shortlist serve --event-log` wrote")
        offset = max(start, len(header))
        handle.seek(offset)
        number = 1
        for line in handle:
            number += 1
            event = _decode(line)
            if event is None:
                if handle.read(1):
                    raise DataValidationError(
                        f"{path}: line {number} (byte {offset}) is damaged; the events after it cannot be trusted: "
                        "move the file aside (the server then starts a new log) or cut it at that line")
                log.warning("%s: dropped a last line cut short by a crash (byte %d)", path, offset)
                return
            offset += len(line)
            yield offset, event


def _valid_end(path: Path) -> int:
    """The byte offset after the last whole event (the header's end for an empty log)."""
    end = len(HEADER)
    for end, _ in read_events(path):
        pass
    return end


class EventLog:
    """An open, append-only event log (see the module docstring). Thread-safe.

    Args:
        path: the file; created (with its folder) when missing, recovered when a crash cut its end.
        config: the fsync policy.
    """

    def __init__(self, path: str | Path, config: EventLogConfig | None = None) -> None:
        self.path = Path(path)
        self.config = config or EventLogConfig(path=str(path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists() or self.path.stat().st_size == 0
        if created:
            with open(self.path, "wb") as handle:
                handle.write(HEADER)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(self.path.parent)
        else:
            end = _valid_end(self.path)
            if end < self.path.stat().st_size:
                os.truncate(self.path, end)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._write_lock = threading.Lock()
        self._cond = threading.Condition()
        self._written = 0  # events written (sequence numbers)
        self._synced = 0  # events known durable
        self._syncing = False
        self.fsyncs = 0
        self.fsync_seconds = 0.0
        self.size = os.fstat(self._fd).st_size
        self._closed = False
        self._ticker: threading.Thread | None = None
        if self.config.fsync == "interval":
            self._ticker = threading.Thread(target=self._tick, name="event-log-fsync", daemon=True)
            self._ticker.start()

    # ---- writing --------------------------------------------------------------------------------
    def append(self, user_id: int, item_id: int, timestamp: int) -> int:
        """Write one event and make it as durable as the policy says before returning its offset."""
        line = encode(user_id, item_id, timestamp)
        with self._write_lock:
            if self._closed:
                raise DataValidationError(f"{self.path}: the event log is closed (the server is stopping); retry")
            written = os.write(self._fd, line)
            if written != len(line):  # a short write on a regular file: disk full; undo the partial line
                os.ftruncate(self._fd, self.size)
                raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes); is the disk full?")
            self.size += written
            self._written += 1
            seq, offset = self._written, self.size
            if self.config.fsync == "always":
                self._fsync()
                self._synced = seq
        if self.config.fsync == "batch":
            self._group_commit(seq)
        return offset

    def _group_commit(self, seq: int) -> None:
        """Return once an fsync that started after event ``seq`` was written has finished."""
        with self._cond:
            while self._synced < seq:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                target = self._written
                self._cond.release()
                try:
                    self._fsync()
                    self._cond.acquire()
                    self._synced = max(self._synced, target)
                except BaseException:
                    self._cond.acquire()
                    raise
                finally:
                    self._syncing = False
                    self._cond.notify_all()

    def _fsync(self) -> None:
        started = time.perf_counter()
        os.fsync(self._fd)
        self.fsyncs += 1
        self.fsync_seconds += time.perf_counter() - started

    def _tick(self) -> None:
        period = self.config.fsync_interval_ms / 1000.0
        while not self._closed:
            time.sleep(period)
            if self._written > self._synced and not self._closed:
                target = self._written
                try:
                    self._fsync()
                except OSError:
                    log.exception("%s: fsync failed", self.path)
                    continue
                self._synced = target

    def sync(self) -> None:
        """Flush everything written so far to disk."""
        with self._write_lock:
            self._fsync()
            self._synced = self._written

    def close(self) -> None:
        """fsync and close (later appends raise)."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)

    # ---- reading --------------------------------------------------------------------------------
    def events(self, start: int = 0) -> Iterator[tuple[int, tuple[int, int, int]]]:
        """The events from byte ``start`` (see :func:`read_events`)."""
        return read_events(self.path, start)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prefix_sha256(path: str | Path, size: int) -> str:
    """SHA-256 of the first ``size`` bytes of ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        left = size
        while left > 0:
            block = handle.read(min(left, 1 << 20))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def folded_offset(path: str | Path, folded: dict[str, Any] | None) -> int:
    """Where replay starts: after the prefix an artifact's training folded in (``folded`` is its manifest's
    ``data.events``), when this log still begins with exactly those bytes; else at the start."""
    if not folded:
        return 0
    size = int(folded.get("bytes", 0))
    path = Path(path)
    if size <= 0 or not path.is_file() or path.stat().st_size < size:
        return 0
    if prefix_sha256(path, size) != folded.get("sha256"):
        log.warning("%s: does not begin with the events the model was trained on; replaying all of it", path)
        return 0
    return size


def fold_events(data: Any, path: str | Path, *, upto: int | None = None, sha256: str | None = None) -> Any:
    """``data`` (an :class:`~data.dataset.Interactions`) with the log's events appended as rows (events for
    items outside its catalogue are dropped and counted); ``meta["events"]`` records what was folded
    (``log``, ``path``, ``bytes``, ``sha256``, ``events``, ``dropped``) for the artifact's manifest.

    ``upto``/``sha256`` (what a manifest recorded) fold exactly that prefix of the log again, as the
    artifact was trained on it (events the server appended since are left out); a log that does not begin
    with those bytes is refused."""
    import dataclasses

    import numpy as np
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"--events {path}: no such file; pass the log `shortlist serve --event-log` "
                                  "writes")
    if upto is not None and (path.stat().st_size < upto or prefix_sha256(path, upto) != sha256):
        raise DataValidationError(
            f"--events {path}: does not begin with the {upto} bytes of events the model was trained on (their "
            "SHA-256 differs); pass the log the artifact was trained with, or retrain")
    rows, end = [], len(HEADER)
    for end, event in read_events(path):
        if upto is not None and end > upto:
            break
        rows.append(event)
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"], dtype="int64")
    known = np.isin(frame["item_id"].to_numpy(), data.frame["item_id"].unique())
    if data.items is not None:
        known |= np.isin(frame["item_id"].to_numpy(), data.items["item_id"].to_numpy())
    extra = frame[known].reindex(columns=data.frame.columns)  # other columns (a rating): NaN
    merged = pd.concat([data.frame, extra], ignore_index=True)
    merged = merged.astype({c: data.frame[c].dtype for c in ("user_id", "item_id", "timestamp")})
    end = end if upto is None else upto
    info = {"log": path.name, "path": str(path.resolve()), "bytes": end, "sha256": prefix_sha256(path, end),
            "events": int(known.sum()), "dropped": int((~known).sum())}
    log.info("folded %d events from %s (%d for unknown items dropped)", info["events"], path, info["dropped"])
    return dataclasses.replace(data, frame=merged, meta={**data.meta, "events": info})


__all__ = ["HEADER", "POLICIES", "EventLog", "EventLogConfig", "encode", "fold_events", "folded_offset",
           "prefix_sha256", "read_events"]
