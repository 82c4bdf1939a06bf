"""The limits uvicorn's HTTP/1.1 server lacks, and content-coding negotiation.

uvicorn (0.54, h11) arms its keep-alive timer only after a response, and any
byte received disarms it. A connection that never sends a byte, or trickles
a request head, stays open for ever. A response is also handed to the
transport whole, so a client that never reads pins the whole body in
memory, and the keep-alive `close()` waits for a drain that never comes.
`LimitedH11Protocol` adds the two missing clocks.

uvicorn's own `limit_concurrency` counts open connections, so sockets that
send nothing refused every request, /healthz included. `Gate` counts
responses instead: a /metrics response holds a slot from admission until
its body has left the write buffer (or the connection is gone), a request
beyond `max_connections` waits for a slot (refused with 503 only after the
head timeout), and idle connections past the same number are closed oldest
first. /healthz, /readyz and every small answer never wait.
"""

from __future__ import annotations

import asyncio
import ctypes
import re
import socket
import struct
import time
from collections import deque
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_SEND_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 100
#: Where a request's scope carries the coroutine function that waits for a response slot.
ADMIT_KEY = "celery_signal_exporter.admit"
#: An idle connection younger than this is never evicted: a client that just connected sends its head next.
IDLE_GRACE = 1.0
#: Requests waiting for a slot, per slot, before more are refused at once.
WAITING_PER_SLOT = 10


class Gate:
    """The response slots of one server, the queue for them, and its idle connections.

    A slot bounds the memory held for clients: an unread /metrics body stays
    in the transport's buffer until the client reads it or the send timeout
    resets the connection, so it is held from admission until the buffer is
    back under its high-water mark. Waiting costs only a request head.
    """

    def __init__(self, slots: int, wait: float) -> None:
        self.slots = slots
        self.wait = wait
        self.holders: set[LimitedH11Protocol] = set()
        self.waiters: deque[tuple[asyncio.Future[None], LimitedH11Protocol]] = deque()
        self.idle: dict[LimitedH11Protocol, float] = {}  # insertion order: longest idle first

    async def admit(self, conn: LimitedH11Protocol) -> bool:
        """Wait for a slot for `conn` (at most `wait` seconds); False means answer 503."""
        if conn in self.holders:
            return True
        self._hand_over()  # the longest waiters first; those that went away leave the queue
        if len(self.holders) < self.slots:
            self.holders.add(conn)
            return True
        if len(self.waiters) >= self.slots * WAITING_PER_SLOT:
            return False
        entry: tuple[asyncio.Future[None], LimitedH11Protocol] = (asyncio.get_running_loop().create_future(), conn)
        self.waiters.append(entry)
        try:
            await asyncio.wait_for(entry[0], self.wait)
        except asyncio.TimeoutError:
            return False
        except asyncio.CancelledError:
            self.release(conn)  # granted just as the wait was cancelled
            raise
        finally:
            try:
                self.waiters.remove(entry)
            except ValueError:
                pass
        return True

    def release(self, conn: LimitedH11Protocol) -> None:
        """Free `conn`'s slot, if it holds one, and hand it to the longest waiter."""
        if conn not in self.holders:
            return
        self.holders.discard(conn)
        self._hand_over()

    def _hand_over(self) -> None:
        while self.waiters and len(self.holders) < self.slots:
            future, waiter = self.waiters.popleft()
            if not future.done() and not waiter.transport.is_closing():
                self.holders.add(waiter)
                future.set_result(None)

    def set_idle(self, conn: LimitedH11Protocol) -> None:
        """`conn` waits for a request head; past `slots` idle connections, close the longest idle."""
        self.idle.pop(conn, None)
        now = time.monotonic()
        self.idle[conn] = now
        while len(self.idle) > self.slots:
            oldest, since = next(iter(self.idle.items()))
            if now - since < IDLE_GRACE:
                break
            del self.idle[oldest]
            oldest.evict()

    def set_busy(self, conn: LimitedH11Protocol) -> None:
        self.idle.pop(conn, None)

    def forget(self, conn: LimitedH11Protocol) -> None:
        self.idle.pop(conn, None)
        self.release(conn)


async def admitted(scope: Scope) -> bool:
    """Wait for a response slot for this request; False: answer 503. Always True off our server."""
    admit = scope.get("extensions", {}).get(ADMIT_KEY)
    return True if admit is None else bool(await admit())


def release_freed_memory() -> bool:
    """Keep glibc from holding on to freed response bodies; call it before any thread starts.

    glibc raises its mmap threshold to the size of each large block freed (up
    to 32 MiB), after which multi-megabyte bodies come from the heap, and
    memory freed there is rarely returned. A fixed threshold (which also stops
    that adjustment) keeps every large block in its own mapping, unmapped on
    free. And every thread that renders would get a heap of its own (up to 8
    per core), each keeping what it freed: two are enough for a scrape, the
    probes and compaction. Returns whether the settings took (False off glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold, m_arena_max = -3, -8
    return bool(mallopt(m_mmap_threshold, 256 * 1024)) and bool(mallopt(m_arena_max, 2))


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a send timeout.

    - Head deadline: whenever no request is being answered (from connect, and
      from the end of each response) the client has `header_timeout` seconds
      to complete a request head. Bytes arriving do not reset the clock, so
      trickling one byte at a time does not keep a connection.
    - Send timeout: a connection whose write buffer stays above the
      transport's high-water mark (the client is not reading) for
      `send_timeout` seconds is reset, which frees the buffered body;
      `close()` would wait for the buffer to drain.
    """

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    gate: Gate = Gate(DEFAULT_MAX_CONNECTIONS, DEFAULT_HEADER_TIMEOUT)

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        inner: ASGIApp = self.app

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            scope.setdefault("extensions", {})[ADMIT_KEY] = self._admit
            await inner(scope, receive, send)

        self.app = app

    async def _admit(self) -> bool:
        return await self.gate.admit(self)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()
        self.gate.set_idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._cancel_head()
        self._cancel_send()
        self.gate.forget(self)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._cancel_head()  # a request head is complete and being answered
            self.gate.set_busy(self)

    def on_response_complete(self) -> None:
        # Armed before uvicorn looks at pipelined requests, whose handle_events disarms it again.
        if not self.transport.is_closing():
            self._await_head()
            self.gate.set_idle(self)
        if not self.flow.write_paused:
            self.gate.release(self)  # else once the client has read the body (resume_writing) or is gone
        super().on_response_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_send()
        if self.cycle is None or self.cycle.response_complete:
            self.gate.release(self)

    def evict(self) -> None:
        """Close an idle connection to make room (it has no response in flight)."""
        self._cancel_head()
        if not self.transport.is_closing():
            self.transport.close()

    def _await_head(self) -> None:
        self._cancel_head()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()
        if self.transport.get_write_buffer_size() and self._send_timer is None:
            # close() waits for the rest of a response to drain: give that the send timeout too.
            self._send_timer = self.loop.call_later(self.send_timeout, self._send_timed_out)

    def _send_timed_out(self) -> None:
        """Drop the connection with a reset: the kernel frees what it still holds for the client too,
        where a plain close would keep sending it (and the FIN behind it) to a zero window."""
        self._send_timer = None
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _cancel_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_send(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None


def server_options(header_timeout: float = DEFAULT_HEADER_TIMEOUT, send_timeout: float = DEFAULT_SEND_TIMEOUT,
                   max_connections: int = DEFAULT_MAX_CONNECTIONS) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` that put the limits in place.

    uvicorn's own `limit_concurrency` stays off: it counts open connections,
    so idle sockets could refuse everyone. `max_connections` bounds responses
    in flight instead (`Gate`), and as many idle connections; a request
    waits up to `header_timeout` for a slot. Idle keep-alive connections
    close after uvicorn's own 5 s `timeout_keep_alive`, or the head deadline
    when that is shorter.
    """
    protocol = type("LimitedH11Protocol", (LimitedH11Protocol,),
                    {"header_timeout": header_timeout, "send_timeout": send_timeout,
                     "gate": Gate(max_connections, header_timeout)})
    return {"http": protocol, "limit_concurrency": None}


_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def choose_encoding(header: str | None) -> str | None:
    """The content coding for a response, from Accept-Encoding (RFC 9110 12.5.3).

    Returns "gzip", "identity", or None when the client refuses both (the
    caller answers 406). Codings are case-insensitive, "x-gzip" is gzip, and
    "*" stands for every coding not named. No header at all gets identity:
    the RFC allows any coding then, and a client that can inflate says so.
    gzip wins unless identity is named (or matched by "*") with a higher
    weight; identity, when not mentioned, is acceptable but least preferred.
    An element with a malformed weight is ignored, and a coding named twice
    keeps its higher weight.
    """
    if header is None:
        return "identity"
    weights: dict[str, float] = {}
    for element in header.split(","):
        coding, *params = (part.strip() for part in element.split(";"))
        if not coding:
            continue
        weight = 1.0
        for param in params:
            name, _, text = param.partition("=")
            if name.strip().lower() == "q":
                text = text.strip()
                weight = float(text) if _QVALUE.fullmatch(text) else -1.0
        if weight < 0:
            continue
        coding = coding.lower()
        coding = "gzip" if coding == "x-gzip" else coding
        weights[coding] = max(weight, weights.get(coding, 0.0))
    star = weights.get("*")
    gzip_weight = weights.get("gzip", star if star is not None else 0.0)
    identity_weight = weights.get("identity", star)
    if gzip_weight > 0 and (identity_weight is None or gzip_weight >= identity_weight):
        return "gzip"
    if identity_weight is None or identity_weight > 0:
        return "identity"
    return None
