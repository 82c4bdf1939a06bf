"""One scraper of the soak test, as a process of its own: `python -m tests.soak_scraper URL OUT STOP`.

It GETs URL/metrics every second with `Accept-Encoding: gzip`, as Prometheus
does, on one keep-alive client (a new one after any failure), until the file
STOP exists. It keeps every parsed scrape's counter samples (``*_total``,
``*_count``, ``*_bucket``, ``*_sum`` of the ``celery_*`` families) in memory,
one array of values per scrape, and at the end writes OUT (JSON): every
failed attempt, every latency, every counter that went down (or vanished)
between two consecutive scrapes, the unreadable-file readings, and the last
scrape's counters.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import time
from array import array
from collections.abc import Iterator
from typing import Any

import httpx

COUNTER_SUFFIXES = ("_total", "_count", "_bucket", "_sum")
INTERVAL = 1.0
TIMEOUT = 10.0


#: One sample line of the text format: name, the label text between the braces, value.
LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[^"}]|"(?:[^"\\]|\\.)*")*)\})? (\S+)')


def samples(text: str) -> Iterator[tuple[str, str, float]]:
    """(name, label text, value) of every sample line: a plain parser, several times faster than
    prometheus-client's, so five scrapers leave the CPU to the processes under test."""
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = LINE.match(line)
        if m is None:
            raise ValueError(f"unparsable line in /metrics: {line[:300]!r}")
        yield m.group(1), m.group(2) or "", float(m.group(3))


def scrape_loop(url: str, stop: str) -> dict[str, Any]:
    index: dict[str, int] = {}
    names: list[str] = []
    scrapes: list[tuple[int, float, array[float]]] = []  # (attempt number, time, values by series index)
    failures: list[dict[str, Any]] = []
    latencies: list[float] = []
    unreadable: list[tuple[int, float]] = []
    encodings: dict[str, int] = {}
    attempt = 0
    client = httpx.Client(timeout=TIMEOUT, headers={"Accept-Encoding": "gzip"})
    next_at = time.monotonic()
    while not os.path.exists(stop):
        attempt += 1
        t0 = time.time()
        m0 = time.monotonic()
        try:
            response = client.get(url + "/metrics")
        except httpx.HTTPError as exc:
            failures.append({"attempt": attempt, "t0": t0, "t1": time.time(), "error": f"{type(exc).__name__}: {exc}"})
            client.close()
            client = httpx.Client(timeout=TIMEOUT, headers={"Accept-Encoding": "gzip"})
        else:
            took = time.monotonic() - m0
            if response.status_code != 200:
                failures.append({"attempt": attempt, "t0": t0, "t1": time.time(), "status": response.status_code,
                                 "body": response.text[:500]})
            else:
                latencies.append(took)
                enc = response.headers.get("content-encoding", "identity")
                encodings[enc] = encodings.get(enc, 0) + 1
                values = array("d", [math.nan]) * len(names)
                files_unreadable = 0.0
                for name, labels, v in samples(response.text):
                    if name == "celery_exporter_metrics_files" and 'state="unreadable"' in labels:
                        files_unreadable += v
                    if not (name.startswith("celery_") and name.endswith(COUNTER_SUFFIXES)):
                        continue
                    key = f"{name}{{{labels}}}"
                    i = index.get(key)
                    if i is None:
                        i = index[key] = len(names)
                        names.append(key)
                        values.append(math.nan)
                    values[i] = v
                scrapes.append((attempt, t0, values))
                if files_unreadable:
                    unreadable.append((attempt, files_unreadable))
        next_at += INTERVAL
        now = time.monotonic()
        if next_at > now:
            time.sleep(next_at - now)
        else:
            next_at = now
    client.close()

    decreases: list[dict[str, Any]] = []
    for (_, t_before, before), (n, t, after) in itertools.pairwise(scrapes):
        for i, old in enumerate(before):
            if math.isnan(old):
                continue
            new = after[i] if i < len(after) else math.nan
            key = names[i]
            # Strict for float sums too: the exporter absorbs their last-bit rounding (collect._settle).
            if math.isnan(new) or new < old:
                decreases.append({"series": key, "before": old, "after": None if math.isnan(new) else new,
                                  "attempt": n, "time": t, "time_before": t_before})
    last = {names[i]: v for i, v in enumerate(scrapes[-1][2]) if not math.isnan(v)} if scrapes else {}
    return {"attempts": attempt, "scrapes": len(scrapes), "failures": failures, "latencies": latencies,
            "decreases": decreases, "unreadable": unreadable, "encodings": encodings, "series": len(names),
            "last": last}


def main() -> None:
    url, out, stop = sys.argv[1:4]
    result = scrape_loop(url, stop)
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
