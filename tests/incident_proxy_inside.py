"""A TCP proxy on loopback that delays every chunk it forwards, each way: a far broker.

The slow-publisher incident publishes through it. Its delay is a duration like any other of the
suite, so it is divided by K (100 ms in production, 5 ms here): a producer publishing K times as
often through a K times shorter delay spends the same share of its time blocked in publishing as
the production one, where keeping 100 ms would make it K times as busy, a different incident.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    try:
        while True:
            chunk = src.recv(65536)
            if not chunk:
                break
            time.sleep(delay)
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@contextmanager
def delay_proxy(target_port: int, delay: float) -> Iterator[int]:
    """Listen on a free loopback port and forward to 127.0.0.1:`target_port`, each chunk
    `delay` seconds late; yields the port to connect to."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", target_port))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns.extend((client, upstream))
            threading.Thread(target=_pump, args=(client, upstream, delay), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client, delay), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        except OSError:
            pass
        listener.close()
        for s in conns:
            try:
                s.close()
            except OSError:
                pass
