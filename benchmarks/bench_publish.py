# mypy: disable-error-code="no-untyped-call,untyped-decorator"
# ruff: noqa: RUF001, RUF003 - the tables print × – ≤ ≥ on purpose
"""Publish overhead: `apply_async` throughput, plain vs instrumented vs task_send_sent_event.

Each run is a fresh interpreter (instrument() is process-global), timing N
publishes after a warm-up; variants alternate round by round, and the ratio
to plain is taken within each round.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

from benchmarks.common import (
    SHM,
    Section,
    Size,
    Target,
    alternate,
    child_env,
    median,
    rabbit_vhost,
    ratios,
    redis_db,
    redis_url,
    run_json,
    spread,
)

VARIANTS = ("plain", "ours", "floor", "events")
LABEL = {"plain": "plain Celery", "ours": "instrumented (ours)",
         "floor": "same signals, receivers that do nothing", "events": "task_send_sent_event=True"}


@contextlib.contextmanager
def broker(kind: str) -> Iterator[str]:
    """A private Redis db or RabbitMQ vhost for one benchmark, cleaned after."""
    if kind == "redis":
        with redis_db() as db:
            yield redis_url(db)
    else:
        with rabbit_vhost() as url:
            yield url


def purge(url: str, queue: str) -> None:
    """Empty the queue between runs, so every run publishes into the same empty state."""
    from kombu.connection import Connection

    with Connection(url) as conn:
        conn.default_channel.queue_purge(queue)


def measure(kind: str, n: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """(publishes per second, producer CPU µs per publish) of each variant, alternating, on one broker."""
    with broker(kind) as url, tempfile.TemporaryDirectory(prefix="csx-bench-pub-", dir=SHM) as tmp:
        queue = "bench-publish"

        def one(variant: str, _round: int) -> tuple[float, float]:
            env = child_env(CSX_BENCH_BROKER=url, CSX_BENCH_VARIANT=variant, CSX_BENCH_QUEUE=queue,
                            CSX_BENCH_METRICS_DIR=tmp)
            out = run_json(["-m", "benchmarks.apps", "publish", str(n)], env)
            with contextlib.suppress(Exception):
                purge(url, queue)
            return float(out["n"]) / float(out["seconds"]), float(out["cpu_seconds"]) / float(out["n"]) * 1e6

        return alternate(VARIANTS, rounds, one)


def cost_split(kind: str, who: str, cpu_us: dict[str, list[float]], per: str) -> str:
    """Where the instrumented variant's extra CPU goes: Celery's dispatch (the floor) and our code."""

    def extra(a: str, b: str) -> str:
        return spread([x - y for x, y in zip(cpu_us[a], cpu_us[b], strict=True)], "{:.1f}")

    return (f"{kind}: {who} CPU, instrumented minus plain: {extra('ours', 'plain')} µs per {per}; of that, "
            f"Celery dispatching the same signals to receivers that do nothing (floor minus plain): "
            f"{extra('floor', 'plain')} µs, and our receivers' bodies and the due header (instrumented minus "
            f"floor): {extra('ours', 'floor')} µs. Same-round differences.")


def run(size: Size) -> Section:
    section = Section(
        "Publish overhead (apply_async throughput)",
        ["broker", "variant", "tasks/s median (min–max, n)", "ratio to plain, same round",
         "producer CPU µs/task", "CPU ratio plain / variant"],
        notes=[f"{size.publish_n} `apply_async` calls per run after a warm-up, one fresh process per run, "
               f"{size.publish_rounds} alternating rounds; the queue is purged between runs.",
               "The CPU columns (the producer's own process time per publish) are the steadier figure on a "
               "shared machine: throughput also moves with whatever else runs."],
    )
    for kind in ("redis", "rabbitmq"):
        measured = measure(kind, size.publish_n, size.publish_rounds)
        rates = {v: [r for r, _ in m] for v, m in measured.items()}
        cpu = {v: [c for _, c in m] for v, m in measured.items()}
        for variant in VARIANTS:
            rel = ratios(rates[variant], rates["plain"])
            cpu_rel = ratios(cpu["plain"], cpu[variant])
            section.rows.append([kind, LABEL[variant], spread(rates[variant], "{:.0f}"),
                                 "1" if variant == "plain" else spread(rel, "{:.3f}"),
                                 spread(cpu[variant], "{:.0f}"),
                                 "1" if variant == "plain" else spread(cpu_rel, "{:.3f}")])
        ours = median(ratios(rates["ours"], rates["plain"]))
        section.notes.append(cost_split(kind, "producer", cpu, "publish"))
        section.data[f"{kind}_ours_ratio"] = ours
        section.data[f"{kind}_floor_ratio"] = median(ratios(rates["floor"], rates["plain"]))
        section.data[f"{kind}_extra_cpu_us"] = median([a - b for a, b in zip(cpu["ours"], cpu["plain"], strict=True)])
        section.data[f"{kind}_events_ratio"] = median(ratios(rates["events"], rates["plain"]))
        floor = section.data[f"{kind}_floor_ratio"]
        section.targets.append(Target(f"publish throughput (wall clock, noisy), instrumented / plain, {kind}", "≥ 0.97",
                                      f"{ours:.3f} (floor {floor:.3f})", ours >= 0.97))
    return section
