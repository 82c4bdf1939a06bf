"""Idle or slow clients cannot starve real ones (issue 27, items 3 and 5).

Against the real `serve` process: idle sockets do not count against
`--max-connections` (only responses that may hold a /metrics body do), a
request beyond that many waits for a slot instead of being refused, /healthz
and /readyz never wait, and the memory held for slow readers stays within
`--max-connections` x the size of /metrics and is given back once they are gone.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import exporter
from tests.http_support import closed_by_server, connect, fill, rss_mb

#: Timing-sensitive: .ci/run runs it alone, after the parallel tests.
pytestmark = pytest.mark.serial

GET_METRICS = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def read_status(s: socket.socket, timeout: float) -> int:
    """The status code of the response on `s` (read to the end), or 0 if none came."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (OSError, TimeoutError):
        pass
    return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else 0


def test_idle_sockets_and_a_crowd_do_not_starve_scrapes_or_health(tmp_path: Path,
                                                                  opened: list[socket.socket]) -> None:
    """100 sockets that never send a byte, then 500 clients at once, with the default --max-connections 100.

    Before: every request answered 503 while the idle sockets were open, and
    the crowd got 1 answer and 499 x 503.
    """
    fill(tmp_path / "metrics", 3)
    with exporter(str(tmp_path), "--metrics-dir", str(tmp_path / "metrics"), "--header-timeout", "60") as ex:
        opened += connect(ex, 100)
        time.sleep(0.5)
        for path in ("/healthz", "/readyz", "/metrics"):
            r = httpx.get(ex.url + path, timeout=10, headers={"Connection": "close"})
            assert r.status_code == 200, f"{path} with 100 idle sockets: {r.status_code}"
        crowd = connect(ex, 500, GET_METRICS)
        opened += crowd
        r = httpx.get(ex.url + "/metrics", timeout=30)
        assert r.status_code == 200, f"a scrape among 100 idle sockets and 500 clients: {r.status_code}"
        assert httpx.get(ex.url + "/healthz", timeout=10).status_code == 200
        statuses = [read_status(s, 30) for s in crowd]
        answered = statuses.count(200)
        print(f"\n500 clients beside 100 idle sockets: {answered} x 200, "
              f"{statuses.count(503)} x 503, {statuses.count(0)} unanswered")
        assert answered == 500, f"{answered} of 500 answered 200"


def test_health_answers_while_every_slot_is_held_by_a_slow_reader(tmp_path: Path,
                                                                   opened: list[socket.socket]) -> None:
    """--max-connections 2 held by two clients that never read an 8.5 MB body: /healthz and /readyz
    answer at once; a scrape waits for a slot, and gets one as soon as a reader goes."""
    fill(tmp_path / "metrics", 1500)
    with exporter(str(tmp_path), "--metrics-dir", str(tmp_path / "metrics"), "--compact-interval", "0",
                  "--max-connections", "2", "--send-timeout", "60", "--header-timeout", "30") as ex:
        assert httpx.get(ex.url + "/metrics", timeout=120).status_code == 200
        slow = connect(ex, 2, GET_METRICS, rcvbuf=4096)
        opened += slow
        time.sleep(2)
        for path in ("/healthz", "/readyz"):
            assert httpx.get(ex.url + path, timeout=5).status_code == 200, path
        with httpx.Client(timeout=30) as client:
            pending = connect(ex, 1, GET_METRICS)[0]
            opened.append(pending)
            time.sleep(1)
            assert not select.select([pending], [], [], 0)[0], "a third /metrics answered while both slots held"
            slow[0].close()
            assert read_status(pending, 30) == 200
            assert client.get(ex.url + "/healthz").status_code == 200


def test_waves_of_slow_readers_stay_within_the_bound_and_memory_comes_back(
        tmp_path: Path, opened: list[socket.socket]) -> None:
    """Eight waves of 40 clients (5 every 0.2 s) that ask for an 8.5 MB /metrics and never read.

    At most --max-connections 10 hold a body at once (the rest wait for a slot,
    and get 503 after --header-timeout), each is reset after --send-timeout, so
    RSS stays within 10 x body over the start (with room for one body being
    rendered and one being compressed), and comes back once the waves are gone.
    Before: ten such waves took the process 162 -> 497 MiB and it never came back.
    """
    fill(tmp_path / "metrics", 1500)
    with exporter(str(tmp_path), "--metrics-dir", str(tmp_path / "metrics"), "--compact-interval", "0",
                  "--max-connections", "10", "--send-timeout", "2", "--header-timeout", "3") as ex:
        body = len(httpx.get(ex.url + "/metrics", timeout=120).content)
        assert body > 8_000_000
        body_mb = body / 2 ** 20
        httpx.get(ex.url + "/metrics", timeout=120)
        start = peak = rss_mb(ex.proc.pid)
        served = refused = 0
        for wave in range(8):
            socks = []
            for _ in range(8):  # 5 every 0.2 s
                socks += connect(ex, 5, GET_METRICS, rcvbuf=4096)
                opened += socks[-5:]
                peak = max(peak, rss_mb(ex.proc.pid))
                time.sleep(0.2)
            deadline = time.monotonic() + 60
            while closed_by_server(socks) < len(socks):
                assert time.monotonic() < deadline, f"wave {wave}: {closed_by_server(socks)} of 40 closed"
                peak = max(peak, rss_mb(ex.proc.pid))
                time.sleep(0.1)
            reset = closed_by_server(socks, select.POLLERR)
            served += reset
            refused += sum(1 for s in socks if read_status(s, 1) == 503)
            for s in socks:
                s.close()
        time.sleep(1)
        end = rss_mb(ex.proc.pid)
        print(f"\nbody {body_mb:.1f} MiB; RSS {start:.0f} MiB at start, peak {peak:.0f} (+{peak - start:.0f}), "
              f"{end:.0f} after (+{end - start:.0f}); {served} slow readers served and reset, {refused} x 503")
        assert served >= 10, "too few slow readers were served for this test to mean anything"
        assert served + refused == 8 * 40, "every slow reader is either served (then reset) or refused"
        assert peak - start <= (10 + 3) * body_mb, f"RSS grew {peak - start:.0f} MiB"
        assert end - start <= 2 * body_mb, f"RSS stayed {end - start:.0f} MiB above the start"
        assert ex.get("/healthz").status_code == 200
        assert ex.get("/metrics").status_code == 200


class _Conn:
    """Just what the gate asks of a connection."""

    def __init__(self) -> None:
        self.closing = False
        self.evicted = False
        self.transport = self

    def is_closing(self) -> bool:
        return self.closing

    def evict(self) -> None:
        self.evicted = True


def test_the_gate_hands_slots_over_in_order_and_skips_those_gone() -> None:
    import asyncio

    from celery_signal_exporter.server._http import Gate

    async def run() -> None:
        gate = Gate(slots=2, wait=5.0)
        a, b, c, d, e = (_Conn() for _ in range(5))
        assert await gate.admit(a) and await gate.admit(b)  # type: ignore[arg-type]
        waiting = [asyncio.ensure_future(gate.admit(x)) for x in (c, d, e)]  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in waiting)
        d.closing = True  # gave up while waiting
        gate.release(a)  # type: ignore[arg-type]
        gate.forget(b)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert waiting[0].result() is True and waiting[2].result() is True, "c and e got the slots, in order"
        assert not waiting[1].done(), "d left the queue unserved"
        gate.release(c)  # type: ignore[arg-type]
        assert await gate.admit(_Conn()), "a free slot is taken at once, not queued behind a gone waiter"  # type: ignore[arg-type]
        waiting[1].cancel()

    asyncio.run(run())


def test_idle_connections_past_the_limit_go_oldest_first_never_the_young(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_signal_exporter.server import _http

    now = [1000.0]
    monkeypatch.setattr(_http.time, "monotonic", lambda: now[0])
    gate = _http.Gate(slots=2, wait=1.0)
    old, older_still, young = _Conn(), _Conn(), _Conn()
    gate.set_idle(older_still)  # type: ignore[arg-type]
    gate.set_idle(old)  # type: ignore[arg-type]
    now[0] += 5
    gate.set_idle(young)  # type: ignore[arg-type]
    assert older_still.evicted and not old.evicted and not young.evicted
    gate.set_idle(_Conn())  # type: ignore[arg-type]
    assert old.evicted, "the longest idle goes"
    gate.set_idle(_Conn())  # type: ignore[arg-type]
    assert not young.evicted, "a connection idle under a second is never evicted"
