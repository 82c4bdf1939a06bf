# mypy: disable-error-code="no-untyped-call,untyped-decorator"
# ruff: noqa: RUF001, RUF003 - the tables print × – ≤ ≥ on purpose
"""How much one probe cycle costs at scale, against the real brokers.

Redis: 1000 queues x 4 priority lists, each list holding messages with the
due header, in db 15 under a private key prefix (deleted after). Reports the
time of one snapshot and proves it is one network round trip by counting
the command packets redis-py sends.

RabbitMQ: 500 queues in a temporary vhost (deleted after). Reports the time
of one snapshot and the number of management API requests it made.

    .venv/bin/python benchmarks/bench_probes.py [--small]

`run(small)` returns the rows for a global benchmark runner.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from kombu.connection import Connection
from pyrabbit2.api import Client

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from celery_signal_exporter.probes import ProbeOptions, probe_for_url
from celery_signal_exporter.probes.rabbitmq import RabbitMQProbe, RabbitMQSettings
from celery_signal_exporter.probes.redis import DUE_HEADER, RedisProbe, RedisSettings

REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
AMQP_HOST = os.environ.get("TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("TEST_AMQP_PORT", "5672"))
MGMT_PORT = int(os.environ.get("TEST_RABBIT_MGMT_PORT", "15672"))
STEPS = [0, 3, 6, 9]


def _timed(fn: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _row(broker: str, queues: int, lists: int, calls: int, unit: str, times: list[float], note: str) -> dict[str, Any]:
    ordered = sorted(times)
    return {
        "benchmark": "probe_snapshot",
        "broker": broker,
        "queues": queues,
        "lists": lists,
        "calls_per_cycle": calls,
        "call_unit": unit,
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(ordered[max(0, int(len(ordered) * 0.95) - 1)] * 1000, 2),
        "runs": len(ordered),
        "note": note,
    }


class _CountSends:
    """Counts command packets sent: a pipeline is one packet, one round trip."""

    def __init__(self) -> None:
        self.sends = 0
        self._orig = redis.connection.AbstractConnection.send_packed_command

    def __enter__(self) -> _CountSends:
        counter, orig = self, self._orig

        def counting(conn: Any, command: Any, check_health: bool = True) -> None:
            counter.sends += 1
            orig(conn, command, check_health)

        redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        redis.connection.AbstractConnection.send_packed_command = self._orig  # type: ignore[method-assign]


def _message(due: float) -> bytes:
    """A kombu/Celery protocol-2 message as the Redis transport stores it."""
    body = base64.b64encode(json.dumps([[], {}, {}]).encode()).decode()
    return json.dumps(
        {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": "bench.task", "id": str(uuid.uuid4()), DUE_HEADER: due},
            "properties": {"delivery_info": {"exchange": "", "routing_key": "q"}, "body_encoding": "base64"},
        }
    ).encode()


#: (label, read ages, scripted): the script is the probe's hot path; the plain
#: pipeline is its fallback where scripting is refused, and was the hot path
#: before the script, so its row is the "before" of that change.
REDIS_MODES = (
    ("script, ages on", True, True),
    ("script, ages off", False, True),
    ("plain pipeline (fallback; before), ages on", True, False),
    ("plain pipeline (fallback; before), ages off", False, False),
)


def bench_redis(small: bool, n_queues: int | None = None, repeat: int | None = None) -> list[dict[str, Any]]:
    from benchmarks.common import redis_db

    n_queues = n_queues or (100 if small else 1000)
    repeat = repeat or (5 if small else 20)
    with redis_db() as db:
        return _bench_redis(db, n_queues, repeat)


def _bench_redis(db: int, n_queues: int, repeat: int) -> list[dict[str, Any]]:
    prefix = f"csx-bench-{uuid.uuid4().hex[:8]}:"
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    client = redis.Redis.from_url(url)
    names = {f"bench-q{i}" for i in range(n_queues)}
    sep = "\x06\x16"
    now = time.time()
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            for step in STEPS:
                key = prefix + (f"{name}{sep}{step}" if step else name)
                pipe.lpush(key, *[_message(now - 60 + i) for i in range(3)])
        pipe.execute()
    rows = []
    try:
        probes = {}
        sends = {}
        for label, read_age, scripted in REDIS_MODES:
            transport = {"priority_steps": STEPS, "global_keyprefix": prefix}
            probe = probe_for_url(url, ProbeOptions(transport_options=transport,
                                                    settings=(RedisSettings(read_oldest_age=read_age),)))
            assert isinstance(probe, RedisProbe)
            probe._scripted = scripted
            snap = probe.snapshot(names)  # connect (and load the script) outside the measurement
            assert sum(q.length for q in snap.queues) == n_queues * len(STEPS) * 3, "wrong depth"
            ages = [q.oldest_message_age_seconds for q in snap.queues]
            if read_age:
                assert all(a is not None and 60 <= a < 120 for a in ages), "wrong oldest age"
            else:
                assert all(a is None for a in ages)
            with _CountSends() as counted:
                probe.snapshot(names)
            assert probe._scripted == scripted
            probes[label], sends[label] = probe, counted.sends
        times: dict[str, list[float]] = {label: [] for label, _, _ in REDIS_MODES}
        for _ in range(repeat):  # alternating: every mode once per round
            for label, _, _ in REDIS_MODES:
                times[label] += _timed(functools.partial(probes[label].snapshot, names), 1)
        for label, read_age, scripted in REDIS_MODES:
            probes[label].close()
            what = ("EVALSHA (LLEN" + ("+LINDEX" if read_age else "") + " per list in Lua), HLEN, INFO") if scripted \
                else ("LLEN" + ("+LINDEX" if read_age else "") + " per list, HLEN, INFO")
            row = _row("redis", n_queues, n_queues * len(STEPS), sends[label], "round trip(s)", times[label], what)
            row["mode"] = label
            row["times"] = times[label]
            rows.append(row)
    finally:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        client.close()
    return rows


def bench_rabbitmq(small: bool, n_queues: int | None = None, repeat: int | None = None) -> list[dict[str, Any]]:
    n_queues = n_queues or (50 if small else 500)
    admin = Client(f"{AMQP_HOST}:{MGMT_PORT}", "guest", "guest")
    vhost = f"csx-bench-{uuid.uuid4().hex[:8]}"
    admin.create_vhost(vhost)
    admin.set_vhost_permissions(vhost, "guest", ".*", ".*", ".*")
    url = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{vhost}"
    try:
        with Connection(url) as conn:
            channel = conn.channel()
            for i in range(n_queues):
                channel.queue_declare(f"bench-q{i}", durable=False, auto_delete=False)
        probe = probe_for_url(url, ProbeOptions(settings=(RabbitMQSettings(mgmt_port=MGMT_PORT),)))
        assert isinstance(probe, RabbitMQProbe)
        deadline = time.monotonic() + 60
        while len(probe.snapshot(set()).queues) < n_queues:
            if time.monotonic() > deadline:
                raise RuntimeError("the management API never listed every benchmark queue")
            time.sleep(0.5)
        requests: list[str] = []
        http = probe._client.http
        original = http.do_call

        def counting(path: str, method: str, *args: Any, **kwargs: Any) -> Any:
            requests.append(path)
            return original(path, method, *args, **kwargs)

        http.do_call = counting
        probe.snapshot(set())
        calls = len(requests)
        times = _timed(lambda: probe.snapshot(set()), repeat or (5 if small else 10))
        note = f"{calls - 1} GET /api/queues page(s) of {probe.page_size} + 1 GET /api/nodes"
        return [_row("rabbitmq", n_queues, n_queues, calls, "HTTP requests", times, note)]
    finally:
        admin.delete_vhost(vhost)


def run(small: bool) -> list[dict[str, Any]]:
    """Every probe benchmark; `small` shrinks it for a quick CI smoke run."""
    return bench_redis(small) + bench_rabbitmq(small)


def section(size: Any) -> Any:
    """The probe results as a section of the global results table."""
    from benchmarks.common import Section, Target, median, ratios, spread

    redis_rows = bench_redis(False, size.probe_redis_queues, size.probe_repeat)
    rabbit_rows = bench_rabbitmq(False, size.probe_rabbit_queues, max(3, size.probe_repeat // 2))
    sec = Section(
        "Probe cost (one snapshot, against the real brokers)",
        ["broker", "queues (lists)", "mode", "calls per cycle", "median ms (min–max, n)", "what one cycle sends"],
        notes=["Redis: every list holds 3 messages with the due header; the modes alternate run by run. "
               "RabbitMQ: queues in a private vhost, read through the management API."],
    )
    for r in redis_rows + rabbit_rows:
        times = r.get("times") or []
        sec.rows.append([r["broker"], f"{r['queues']} ({r['lists']})", r.get("mode", "management API"),
                         f"{r['calls_per_cycle']} {r['call_unit']}",
                         spread([t * 1e3 for t in times], "{:.1f}") if times else f"{r['median_ms']:.1f}", r["note"]])
    by_mode = {r["mode"]: r["times"] for r in redis_rows}
    on = median(by_mode["script, ages on"]) * 1e3
    before = ratios(by_mode["plain pipeline (fallback; before), ages on"], by_mode["script, ages on"])
    sec.notes.append(f"Script vs plain pipeline with ages on, same rounds: {median(before):.2f}× faster "
                     f"({spread(before, '{:.2f}')}).")
    sec.data = {"redis_ms": on, "speedup": median(before)}
    sec.targets.append(Target(f"Redis probe, {size.probe_redis_queues} queues × 4 priority steps, ages on",
                              "≤ 50 ms", f"{on:.1f} ms", on <= 50))
    return sec


def _print(rows: list[dict[str, Any]]) -> None:
    head = ("broker", "queues", "lists", "calls/cycle", "median ms", "p95 ms", "what one cycle sends")
    lines = [
        (
            r["broker"],
            str(r["queues"]),
            str(r["lists"]),
            f"{r['calls_per_cycle']} {r['call_unit']}",
            f"{r['median_ms']:.2f}",
            f"{r['p95_ms']:.2f}",
            r["note"],
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for line in lines:
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--small", action="store_true", help="100 Redis / 50 RabbitMQ queues")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args()
    rows = run(args.small)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print(rows)


if __name__ == "__main__":
    main()
