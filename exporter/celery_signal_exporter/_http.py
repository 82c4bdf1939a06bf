"""The limits uvicorn's HTTP/1.1 server lacks, and content-coding negotiation.

uvicorn (0.54, h11) arms its keep-alive timer only after a response, and any
byte received disarms it. A connection that never sends a byte, or trickles
a request head, stays open for ever. A response is also handed to the
transport whole, so a client that never reads pins the whole body in
memory, and the keep-alive `close()` waits for a drain that never comes.
`LimitedH11Protocol` adds the two missing clocks; uvicorn's own
`limit_concurrency` bounds how many such connections there can be.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_SEND_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 100


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

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._cancel_head()
        self._cancel_send()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._cancel_head()  # a request head is complete and being answered

    def on_response_complete(self) -> None:
        # Armed before uvicorn looks at pipelined requests, whose handle_events disarms it again.
        if not self.transport.is_closing():
            self._await_head()
        super().on_response_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_send()

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

    uvicorn answers 503 to a request once `limit_concurrency` connections
    are open, the asking one included: hence the + 1, so that
    `max_connections` connections are all served. Idle keep-alive
    connections close after uvicorn's own 5 s `timeout_keep_alive`, or the
    head deadline when that is shorter.
    """
    protocol = type("LimitedH11Protocol", (LimitedH11Protocol,),
                    {"header_timeout": header_timeout, "send_timeout": send_timeout})
    return {"http": protocol, "limit_concurrency": max_connections + 1}


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
