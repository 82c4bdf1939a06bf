"""What the exporter costs in Prometheus series, measured on a real worker: writes docs/cardinality.md.

`python -m tests.cardinality` starts a private redis-server, runs a real prefork
worker on tests/cardinality_app.py (names over two queues, one pair each) for
each configuration, publishes one run of 10, then 50, then 200 names from a
producer with a metrics directory of its own, and after each step counts the
series on the real exporters' /metrics: the worker pod's, the producer's and a
broker probe's. It writes the figures into docs/cardinality.md, whose prose and
tables are rendered from them; the figures travel in the page as a JSON
comment, so `--check` re-renders without measuring and
tests/integration/test_cardinality.py re-measures 10 and 50 names and compares.

The event-based exporter's figures are not measured against a running copy of
it: they are counted from the families its source builds (the metric names,
labels and buckets cited in the page) with this machine's prometheus-client.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from celery_signal_exporter import catalogue
from tests.harness import ROOT, ExporterProcess, RedisServer, env_for, exporter, wait_until, worker

DOC_PATH = Path(ROOT) / "docs" / "cardinality.md"
DATA_MARK = "<!-- cardinality-data "
STEPS: tuple[int, ...] = (10, 50, 200)
#: The bucket lever: six bounds instead of eighteen, for both worker histograms.
SIX_BUCKETS = "0.1,1,10,60,300,1800"


@dataclass(frozen=True)
class Config:
    """One way of running the worker and producer: the environment both get."""

    key: str
    title: str
    env: tuple[tuple[str, str], ...]


CONFIGS: tuple[Config, ...] = (
    Config("defaults", "defaults (opt-ins off)", (("CELERY_EXPORTER_TASK_RESOURCES", "0"),
                                                   ("CELERY_EXPORTER_PUBLISH_TIMING", "0"))),
    Config("opt_ins", "all opt-ins on", (("CELERY_EXPORTER_TASK_RESOURCES", "1"),
                                        ("CELERY_EXPORTER_PUBLISH_TIMING", "1"))),
    Config("six_buckets", "defaults, 6 runtime and queue-wait buckets",
           (("CELERY_EXPORTER_TASK_RESOURCES", "0"), ("CELERY_EXPORTER_PUBLISH_TIMING", "0"),
            ("CELERY_EXPORTER_RUNTIME_BUCKETS", SIX_BUCKETS), ("CELERY_EXPORTER_QUEUE_WAIT_BUCKETS", SIX_BUCKETS))),
)
CONFIG_BY_KEY = {c.key: c for c in CONFIGS}

#: sample name -> catalogue family name, for every sample the exporter can serve.
_FAMILY_OF: dict[str, str] = {}
for _spec in catalogue.SERVED:
    if _spec.kind == "counter":
        _FAMILY_OF[_spec.name + "_total"] = _spec.name
    elif _spec.kind == "histogram":
        for _suffix in ("_bucket", "_sum", "_count"):
            _FAMILY_OF[_spec.name + _suffix] = _spec.name
    else:
        _FAMILY_OF[_spec.name] = _spec.name
KIND = {spec.name: spec.kind for spec in catalogue.SERVED}
#: Families on by an opt-in switch, and which.
OPT_IN = {catalogue.CPU.name: "CELERY_EXPORTER_TASK_RESOURCES", catalogue.MEMORY_GROWTH.name:
          "CELERY_EXPORTER_TASK_RESOURCES", catalogue.PUBLISH.name: "CELERY_EXPORTER_PUBLISH_TIMING"}

Series = set[tuple[str, frozenset[tuple[str, str]]]]


def series(text: str) -> Series:
    """Every series on a /metrics page: (sample name, labels)."""
    return {(s.name, frozenset(s.labels.items())) for f in text_string_to_metric_families(text) for s in f.samples}


def family_of(sample: str) -> str:
    if sample not in _FAMILY_OF:
        raise AssertionError(f"{sample} is served but not in the catalogue")
    return _FAMILY_OF[sample]


def breakdown(found: Series, names: int) -> dict[str, Any]:
    """Split a page into per-(task, queue) series by family (checked to be the same for every pair) and the
    series that carry no task name, by family. Histograms also report their bucket series per pair."""
    per_pair: dict[str, Counter[str]] = {}
    buckets: dict[str, Counter[str]] = {}
    fixed: Counter[str] = Counter()
    for sample, labels in found:
        fam = family_of(sample)
        label_map = dict(labels)
        if "name" not in label_map:
            fixed[fam] += 1
            continue
        # A name runs on one queue only (tests/cardinality_app.py), so the name alone says the pair.
        per_pair.setdefault(fam, Counter())[label_map["name"]] += 1
        if sample.endswith("_bucket"):
            buckets.setdefault(fam, Counter())[label_map["name"]] += 1
    pairs: dict[str, int] = {}
    for fam, by_name in per_pair.items():
        counts = set(by_name.values())
        if len(by_name) != names or len(counts) != 1:
            raise AssertionError(f"{fam}: not one count for each of the {names} pairs: {sorted(by_name.items())[:5]}")
        pairs[fam] = counts.pop()
    bucket_pairs = {fam: next(iter(set(c.values()))) for fam, c in buckets.items()}
    return {"per_pair": dict(sorted(pairs.items())), "buckets": dict(sorted(bucket_pairs.items())),
            "fixed": dict(sorted(fixed.items())), "total": len(found)}


def _settled(ex: ExporterProcess, check: Any, what: str) -> Series:
    """The page once `check(page)` holds and two scrapes a heartbeat and a half apart show the same series."""
    def stable() -> Series:
        """The second page if it settled, else the empty set (falsy: poll again)."""
        first = ex.get("/metrics").text
        if not check(first):
            return set()
        time.sleep(1.2)
        second = ex.get("/metrics").text
        s1, s2 = series(first), series(second)
        return s2 if s1 == s2 and check(second) else set()

    return wait_until(stable, 90, what, interval=0.3)


def _succeeded(text: str, want: int) -> bool:
    total = 0.0
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name in ("celery_task_succeeded_total", "celery_task_runtime_seconds_count"):
                total += s.value
    return total == 2 * want


def measure_config(broker_url: str, tmp: Path, config: Config, steps: Sequence[int] = STEPS,
                   events: bool = False) -> dict[str, Any]:
    """One worker start-up for `config`; after each step of names, the worker pod's and the producer's pages;
    with `events`, then what two failures and a retry that fails for good add to the worker pod's page."""
    tmp.mkdir(parents=True, exist_ok=True)
    worker_dir, producer_dir = tmp / "worker-metrics", tmp / "producer-metrics"
    extra = dict(config.env, CSX_CARD_NAMES=str(max(steps)))
    wenv = env_for(broker_url, str(worker_dir), **extra)
    penv = env_for(broker_url, str(producer_dir), **extra)
    result: dict[str, Any] = {"worker": {}, "producer": {}}
    worker_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        stack.enter_context(worker(wenv, str(tmp), app="tests.cardinality_app", queues="q1,q2", concurrency=4))
        wex = stack.enter_context(exporter(str(tmp), "--metrics-dir", str(worker_dir)))
        producer_dir.mkdir(parents=True, exist_ok=True)
        pex = stack.enter_context(exporter(str(tmp), "--metrics-dir", str(producer_dir)))
        done = 0
        for step in steps:
            _produce(penv, "publish", str(done), str(step))
            done = step
            page = _settled(wex, lambda text, n=step: _succeeded(text, n), f"{step} names to run")
            result["worker"][str(step)] = breakdown(page, step)
            ppage = _settled(pex, lambda text, n=step: f'name="card.t{n - 1:03d}"' in text,
                             f"the producer's {step} names")
            result["producer"][str(step)] = breakdown(ppage, step)
        if events:
            _produce(penv, "events")
            after = _settled(wex, lambda text: _sample_sum(text, "celery_task_failed_total") == 3,
                             "the failing and retrying runs")
            result["events"] = added(page, after)
    return result


def _produce(env: dict[str, str], *args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "tests.cardinality_app", *args],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"producer failed ({out.returncode}):\n{out.stderr[-3000:]}")


def _sample_sum(text: str, sample: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == sample)


def added(before: Series, after: Series) -> dict[str, Any]:
    """What the event runs changed on the page: series added, by sample name and the labels that say why
    (task name, exception, reason), and how many went away (none should)."""
    new = sorted(after - before, key=lambda s: (s[0], sorted(s[1])))
    rows = []
    for sample, labels in new:
        label_map = dict(labels)
        rows.append({"sample": sample, "labels": {k: v for k, v in sorted(label_map.items()) if k != "hostname"}})
    return {"added": rows, "removed": len(before - after)}


def measure_probe(broker_url: str, tmp: Path) -> dict[str, Any]:
    """The broker probe deployment on the two queues: series that do not scale with tasks or pods."""
    tmp.mkdir(parents=True, exist_ok=True)
    with exporter(str(tmp), "--broker-url", broker_url, "--queue", "q1", "--queue", "q2",
                  "--probe-interval", "1", "--probe-timeout", "1") as ex:
        page = _settled(ex, lambda text: 'celery_queue_length{' in text and 'queue_name="q2"' in text
                        and "celery_exporter_probe_last_success" in text, "the probe's first cycle")
    return breakdown(page, 0)


def measure(broker_url: str, tmp: Path, configs: Sequence[str] = tuple(CONFIG_BY_KEY),
            steps: Sequence[int] = STEPS) -> dict[str, Any]:
    """Every figure the page shows, measured."""
    data: dict[str, Any] = {"steps": list(steps), "configs": {}}
    for key in configs:
        data["configs"][key] = measure_config(broker_url, tmp / key, CONFIG_BY_KEY[key], steps,
                                              events=key == "defaults")
    data["probe"] = measure_probe(broker_url, tmp / "probe")
    data["event_exporter"] = event_exporter_series()
    return data


# -- the event-based exporter: its families as its source builds them ------------------------------------------


def event_exporter_series() -> dict[str, Any]:
    """Series per (task, queue, worker host) of danihodovic/celery-exporter at its defaults, counted from a
    registry shaped like its own: eight counters labelled name, hostname, queue_name (failed adds exception),
    seven of them set to 0 beside any task event but task-sent, and one runtime histogram on
    prometheus-client's default buckets. `_created` series are counted apart, since prometheus-client
    serves one per counter and histogram child unless told not to."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from prometheus_client import Counter as PCounter

    registry = CollectorRegistry()
    labels = ["name", "hostname", "queue_name"]
    states = ("received", "started", "succeeded", "failed", "rejected", "revoked", "retried")
    counters = {s: PCounter(f"celery_task_{s}", s, labels + (["exception"] if s == "failed" else []),
                            registry=registry) for s in states}
    runtime = Histogram("celery_task_runtime", "runtime", labels, registry=registry, buckets=Histogram.DEFAULT_BUCKETS)
    # One task-succeeded event for one (name, host, queue): the others are touched with inc(0).
    for state, counter in counters.items():
        extra = {"exception": ""} if state == "failed" else {}
        counter.labels(name="t", hostname="h", queue_name="q", **extra).inc(1 if state == "succeeded" else 0)
    runtime.labels(name="t", hostname="h", queue_name="q").observe(0.1)
    found = series(generate_latest(registry).decode())
    created = sum(1 for sample, _ in found if sample.endswith("_created"))
    bucket = sum(1 for sample, _ in found if sample.endswith("_bucket"))
    return {"per_triple": len(found) - created, "created": created, "buckets": bucket,
            "default_buckets": len(Histogram.DEFAULT_BUCKETS)}


# -- docs/cardinality.md ---------------------------------------------------------------------------------------


def render(data: dict[str, Any]) -> str:
    """The page from the measured figures."""
    from tests.cardinality_doc import render_page

    return render_page(data) + DATA_MARK + json.dumps(data, sort_keys=True) + " -->\n"


def recorded(text: str) -> dict[str, Any]:
    """The figures a page was rendered from."""
    start = text.rindex(DATA_MARK) + len(DATA_MARK)
    return dict(json.loads(text[start:text.rindex(" -->")]))


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and write docs/cardinality.md, or with --check re-render it from its own figures."""
    parser = argparse.ArgumentParser(prog="python -m tests.cardinality", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOC_PATH)
    parser.add_argument("--check", action="store_true", help="measure nothing; exit 1 if the page's text is not "
                        "what its own figures render")
    args = parser.parse_args(argv)
    out: Path = args.out
    if args.check:
        text = out.read_text(encoding="utf-8")
        if render(recorded(text)) != text:
            print(f"{out} is stale: run python -m tests.cardinality", file=sys.stderr)
            return 1
        return 0
    with tempfile.TemporaryDirectory(prefix="cardinality-") as tmp, RedisServer(tmp) as redis:
        data = measure(f"{redis.url}/1", Path(tmp) / "runs")
    out.write_text(render(data), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
