# ruff: noqa: RUF001, RUF003 - the tables print × – ≤ ≥ on purpose
"""Run every benchmark, print the results table and write benchmarks/results.md.

    .venv/bin/python -m benchmarks            # full size, writes benchmarks/results.md
    .venv/bin/python -m benchmarks --tiny     # every benchmark at toy size (the smoke test)
    .venv/bin/python -m benchmarks --only scrape,probes --out /tmp/r.md

Needs Redis (db 10-15) and RabbitMQ with its management plugin on this
machine (TEST_REDIS_HOST/PORT, TEST_AMQP_HOST/PORT, TEST_RABBIT_MGMT_PORT),
and PyPI for the event-based exporter's own virtualenv.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable

from benchmarks import (
    bench_exporter_cost,
    bench_hooks,
    bench_probes,
    bench_publish,
    bench_scrape,
    bench_worker,
)
from benchmarks.common import BENCH_DIR, FULL, TINY, Section, Size, Target, machine

BENCHMARKS: dict[str, Callable[[Size], Section]] = {
    "publish": bench_publish.run,
    "worker": bench_worker.run,
    "cost": bench_exporter_cost.run,
    "scrape": bench_scrape.run,
    "probes": bench_probes.section,
    "hooks": bench_hooks.run,
}
BUSY_LOAD = 1.0  # load per core above which the report says the machine was shared


def table(columns: list[str], rows: list[list[str]]) -> str:
    """A markdown table, padded so it also reads as plain text."""
    cells = [columns, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def targets_table(targets: list[Target]) -> str:
    return table(["target", "limit", "measured", "result"],
                 [[t.what, t.limit, t.measured, "pass" if t.ok else "**miss**"] for t in targets])


def report(size: Size, facts: dict[str, str], sections: list[Section], failures: list[str], seconds: float,
           load_end: str) -> str:
    targets = [t for s in sections for t in s.targets]
    out = ["# Benchmark results", "",
           f"Written by `.venv/bin/python -m benchmarks{' --tiny' if size is TINY else ''}` in {seconds / 60:.1f} "
           "minutes. Figures are medians over alternating runs with their (min–max, n); every ratio is taken "
           "between runs of the same round.", ""]
    load = [float(x) for x in facts["load average (1/5/15 min) at start"].split()]
    cores = int(facts["cores"] or 1)
    if max(load[0], float(load_end.split()[0])) > BUSY_LOAD * cores * 0.5:
        at_start = facts["load average (1/5/15 min) at start"]
        out += [f"**The machine was shared with other work while this ran** (load average {at_start} "
                f"at the start, {load_end} at the end, on {cores} cores): absolute figures are lower and noisier "
                "than on an idle machine; same-round ratios are the figures to trust.", ""]
    out += ["## Machine", "", table(["", ""], [[k, v] for k, v in facts.items()] +
                                    [["load average (1/5/15 min) at end", load_end]]), ""]
    out += ["## Targets", "", targets_table(targets) if targets else "(no target measured)", ""]
    if failures:
        out += ["## Benchmarks that failed", ""] + [f"- {f}" for f in failures] + [""]
    for s in sections:
        out += [f"## {s.title}", "", table(s.columns, s.rows), ""]
        out += [f"- {n}" for n in s.notes] + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmark; print and write the results table.")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks that every benchmark runs")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--out", default=None, help="where to write the report (default benchmarks/results.md; "
                                                    "with --tiny, nowhere unless given)")
    args = parser.parse_args(argv)
    size = TINY if args.tiny else FULL
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    out_path = args.out or (None if args.tiny else os.path.join(BENCH_DIR, "results.md"))
    start = time.monotonic()
    facts = machine()
    print(f"machine: {facts}", flush=True)
    sections: list[Section] = []
    failures: list[str] = []
    for name in names:
        t0 = time.monotonic()
        print(f"== {name} ...", flush=True)
        try:
            section = BENCHMARKS[name](size)
        except Exception as exc:  # noqa: BLE001 - report it, run the others, exit non-zero
            traceback.print_exc()
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        sections.append(section)
        print(f"## {section.title} ({time.monotonic() - t0:.0f} s)\n{table(section.columns, section.rows)}\n",
              flush=True)
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = report(size, facts, sections, failures, time.monotonic() - start, load_end)
    targets = [t for s in sections for t in s.targets]
    print("## Targets\n" + (targets_table(targets) if targets else "(none)"), flush=True)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text)
        print(f"wrote {out_path}", flush=True)
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
