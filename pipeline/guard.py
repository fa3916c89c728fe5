"""The service's front door: a pure ASGI middleware in front of every endpoint.

In order, for each HTTP request:

1. **Probes first**: ``/healthz`` and ``/readyz`` go straight to their (async, in-loop) handlers: no auth,
   no body, no in-flight slot, so they never queue behind requests or slow clients.
2. **Auth**: bearer key (401), except the open paths and the explorer page.
3. **Media type**: a body whose ``Content-Type`` is not JSON gets 415 (a form or text body is not a 422).
4. **Size**: a ``Content-Length`` over ``max_body_bytes`` gets 413 at once; a chunked body is counted while
   it is read.
5. **Read timeout**: the whole body must arrive within ``body_timeout_s`` of the headers, else 408 and the
   connection is closed. The body is read *before* an in-flight slot is taken, so a client that sends
   headers and part of a body holds a socket and a coroutine, never a slot.
6. **In-flight limit**: at most ``max_in_flight`` requests with a complete body are handled at once; more
   are shed with 503 and ``Retry-After``.
7. **Error guard**: any exception that escapes becomes a 503, never a bare 500.

**One reason per 503**: whoever answers 503 records why in the ASGI scope (:func:`mark`); at the end
the response is counted once, either as *shed* (``shortlist_shed_requests{reason}``: ``in_flight``,
``queue_full``, ``rerank_timeout``: overload) or as *unavailable*
(``shortlist_unavailable_responses{reason}``: ``not_ready``, ``no_reranker``, ``reranker_failed``,
``internal_error``, ``event_log``...).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Paths answered before anything else (liveness, readiness).
PROBES = ("/healthz", "/readyz")
#: Paths whose latency is observed per endpoint.
TIMED = ("/recommend", "/rerank", "/events")
#: Reasons counted as shed (overload); every other 503 reason is "unavailable".
SHED_REASONS = ("in_flight", "queue_full", "rerank_timeout")
_SCOPE_KEY = "shortlist.reason"


def mark(scope: dict, reason: str) -> None:
    """Record why this request is answered 503 (the last mark wins; counted once at the end)."""
    scope[_SCOPE_KEY] = reason


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class Guard:
    """See the module docstring.

    Args:
        app: the wrapped ASGI app.
        state: the service state (``config``, ``in_flight``, ``lock``).
        metrics: the :class:`~pipeline.service_metrics.Metrics`.
        api_key: the bearer key ('' turns auth off).
        public: paths that need no key besides ``config.open_paths``.
        endpoint_of: the metrics label of a path.
    """

    def __init__(self, app: Any, *, state: Any, metrics: Any, api_key: str, public: tuple[str, ...] = (),
                 endpoint_of: Callable[[str], str] = lambda path: path) -> None:
        self.app = app
        self.state = state
        self.metrics = metrics
        self.api_key = api_key.encode()
        self.public = public
        self.endpoint_of = endpoint_of

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config = self.state.config
        started = time.perf_counter()
        scope["shortlist.started"] = started
        path = scope.get("path", "")
        if path in PROBES:  # never behind auth, bodies or the in-flight limit
            await self.app(scope, receive, send)
            return
        endpoint = self.endpoint_of(path)
        status_seen: list[int] = []

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(int(message["status"]))
            await send(message)

        async def reply(status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps({"detail": detail}).encode()
            raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
            await send_wrapper({"type": "http.response.start", "status": status, "headers": raw})
            await send_wrapper({"type": "http.response.body", "body": body})

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        retry = {"Retry-After": str(config.retry_after_s)}
        try:
            public = path in config.open_paths or path in self.public
            if self.api_key and not public and not self._authorized(headers):
                await reply(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                            {"WWW-Authenticate": "Bearer"})
                return
            content_type = headers.get("content-type")
            if scope.get("method") in ("POST", "PUT", "PATCH") and content_type and not _is_json(content_type):
                await reply(415, f"unsupported media type {content_type.split(';')[0]!r}; send a JSON body with "
                                 "'Content-Type: application/json'")
                return
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
                await reply(413, f"request body over {config.max_body_bytes} bytes; send fewer items")
                return
            try:
                body = await asyncio.wait_for(self._read_body(receive, config.max_body_bytes),
                                              config.body_timeout_s)
            except asyncio.TimeoutError:
                self.metrics.timeouts.inc()
                await reply(408, f"the request body did not arrive within {config.body_timeout_s:g} s; send "
                                 "it at once", {"Connection": "close"})
                return
            if body is None:
                await reply(413, f"request body over {config.max_body_bytes} bytes; send fewer items")
                return
            with self.state.lock:
                shed = self.state.in_flight >= config.max_in_flight
                if not shed:
                    self.state.in_flight += 1
            if shed:
                mark(scope, "in_flight")
                await reply(503, f"overloaded: {config.max_in_flight} requests in flight; retry later", retry)
                return
            self.metrics.in_flight.set(self.state.in_flight)
            try:
                await self.app(scope, self._replay(body, receive), send_wrapper)
            finally:
                with self.state.lock:
                    self.state.in_flight -= 1
                self.metrics.in_flight.set(self.state.in_flight)
        except Exception:  # never a bare 500
            log.exception("unhandled error on %s", path)
            if not status_seen:
                mark(scope, "internal_error")
                await reply(503, "internal error; the request was not served, retry later", retry)
        finally:
            status = status_seen[0] if status_seen else 0
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if endpoint in TIMED:
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            if status == 503:
                reason = scope.get(_SCOPE_KEY, "unknown")
                counter = self.metrics.shed if reason in SHED_REASONS else self.metrics.unavailable
                counter.labels(reason).inc()

    def _authorized(self, headers: dict[str, str]) -> bool:
        value = headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)

    @staticmethod
    async def _read_body(receive: Callable, limit: int) -> bytes | None:
        """The whole request body, or ``None`` once it passes ``limit`` bytes (a chunked body too)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive: Callable) -> Callable:
        """A ``receive`` that hands the buffered body over once, then waits on the real one (disconnects)."""
        sent = False

        async def wrapped() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return wrapped


__all__ = ["PROBES", "SHED_REASONS", "Guard", "mark"]
