"""Basic auth takes as long whether or not the user exists, whatever the password's length (issue 27, item 4).

In-process, through the middleware's own check (`BasicAuth._allowed`), so that
the HTTP stack's noise stays out of the comparison. Users' hashes have cost 11,
above the old dummy hash's 10, as an operator's `htpasswd -nBC 11` would give.
Each kind of failure is timed 7 times, the kinds in turn, and compared by its
median: a ratio, never an absolute time. The time is the process's CPU time
(the work a failure costs, which is what tells a guesser apart), since other
load on a shared machine inflates wall time at random; wall time tracks it
on an idle machine.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time

import bcrypt
import pytest

from celery_signal_exporter.server.webconfig import BasicAuth

#: Timing-sensitive: .ci/run runs it alone, after the parallel tests.
pytestmark = pytest.mark.serial

RIGHT = "correct horse"


def header(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


async def _noop(scope: object, receive: object, send: object) -> None:
    return None


def middleware() -> BasicAuth:
    users = {"alice": bcrypt.hashpw(RIGHT.encode(), bcrypt.gensalt(11)),
             "bob": bcrypt.hashpw(RIGHT.encode(), bcrypt.gensalt(11))}
    return BasicAuth(_noop, users)


def medians(auth: BasicAuth, cases: dict[str, bytes], runs: int = 7) -> dict[str, float]:
    """Each case's median CPU time to fail, the cases taken in turn."""

    async def timed() -> dict[str, list[float]]:
        took: dict[str, list[float]] = {what: [] for what in cases}
        for _ in range(runs):
            for what, value in cases.items():
                start = time.process_time()
                assert not await auth._allowed(value)
                took[what].append(time.process_time() - start)
        return took

    return {what: statistics.median(times) for what, times in asyncio.run(timed()).items()}


def test_a_failure_costs_the_same_for_known_and_unknown_users_and_any_length() -> None:
    """Before (CPU time): known user 119 ms (cost 11), unknown user 60 ms (the dummy's cost 10), a known
    user's password over 72 bytes 0.2 ms (bcrypt skipped). After: 118-123 ms each."""
    auth = middleware()
    cases = {
        "known user, wrong password": header("alice", "wrong"),
        "unknown user": header("mallory", "wrong"),
        "another unknown user": header("eve" * 30, "wrong"),
        "known user, 100-byte password": header("alice", "x" * 100),
        "unknown user, 100-byte password": header("mallory", "x" * 100),
        "known user, a NUL in the password": header("bob", "wr\0ng"),
    }
    found = medians(auth, cases)
    print("\n" + "\n".join(f"{what}: {1000 * took:.1f} ms" for what, took in found.items()))
    slowest, fastest = max(found.values()), min(found.values())
    assert slowest <= 1.4 * fastest, f"failures from {1000 * fastest:.1f} to {1000 * slowest:.1f} ms: {found}"


def test_success_is_cached_and_a_wrong_password_never_is() -> None:
    auth = middleware()

    async def run() -> None:
        assert not await auth._allowed(header("alice", "wrong"))
        assert not await auth._allowed(header("alice", RIGHT + "x" * 80))  # bcrypt would see only 72 bytes
        assert not auth._verified, "a failure was cached"
        assert await auth._allowed(header("alice", RIGHT))
        start = time.perf_counter()
        assert await auth._allowed(header("alice", RIGHT))
        cached = time.perf_counter() - start
        assert not await auth._allowed(header("alice", "wrong"))
        assert cached < median_bcrypt / 10, "a successful pair is checked again"

    start = time.perf_counter()
    bcrypt.checkpw(b"x", auth.users["alice"])
    median_bcrypt = time.perf_counter() - start
    asyncio.run(run())
    assert len(auth._verified) <= len(auth.users)
