# ruff: noqa: RUF001, RUF003 - the tables print × – ≤ ≥ on purpose
"""Run every benchmark, print the results table and write benchmarks/results.md.

    .venv/bin/python -m benchmarks            # full size, writes benchmarks/results.md
    .venv/bin/python -m benchmarks --readme   # … and README.md's "## Performance" section
    .venv/bin/python -m benchmarks --tiny     # every benchmark at toy size (the smoke test)
    .venv/bin/python -m benchmarks --only scrape,probes --out /tmp/r.md
    .venv/bin/python -m benchmarks cost       # names as arguments, as --only; a subset run without --out
                                              # replaces its sections and targets in benchmarks/results.md

Needs valgrind (the instruction counts), Redis (db 10-15) and RabbitMQ with its management plugin on this
machine (TEST_REDIS_HOST/PORT, TEST_AMQP_HOST/PORT, TEST_RABBIT_MGMT_PORT),
and PyPI for the event-based exporter's own virtualenv.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
import time
import traceback
from collections.abc import Callable

from benchmarks import (
    bench_exporter_cost,
    bench_hooks,
    bench_instructions,
    bench_probes,
    bench_publish,
    bench_recycle,
    bench_scrape,
    bench_tick,
    bench_worker,
)
from benchmarks.common import BENCH_DIR, FULL, TINY, Section, Size, Target, machine

BENCHMARKS: dict[str, Callable[[Size], Section]] = {
    "publish": bench_publish.run,
    "worker": bench_worker.run,
    "cost": bench_instructions.run,
    "exporter": bench_exporter_cost.run,
    "scrape": bench_scrape.run,
    "probes": bench_probes.section,
    "hooks": bench_hooks.run,
    "tick": bench_tick.run,
    "recycle": bench_recycle.run,
}
#: What profiling found behind each target that can miss, shown under "Where targets are missed" when it does.
#: The causes sit in files the benchmarks do not own; the fixes are described for their owners.
MISS_NOTES = {
    "publish throughput": (
        "In brackets, the floor: the same two signals connected to receivers that do nothing, in the same "
        "rounds (publish table). Celery's own dispatch is most of our cost: see the CPU split under the publish "
        "table. In-process, with receivers switched on and off block by block (300 publishes a block, 40 "
        "blocks), our two receivers with the due header cost ~9-14 µs per publish and a no-op pair ~5-7 µs, "
        "of Celery's ~250-380 µs; run to run, the floor itself has measured 0.95-1.01 of plain. What would still "
        "help is one publish-side signal instead of two, but counting "
        "`sent` in before_task_publish would count publishes that then fail, which the outage test forbids."
    ),
    "worker throughput": (
        "In brackets, the floor: task_received, task_prerun and task_postrun connected to receivers that do "
        "nothing, in the same rounds (worker table). The floor alone has measured 0.92-1.01 of plain across "
        "runs on this machine: Celery's dispatch to no-op receivers uses most or all of the 3% budget of a "
        "trivial task (~0.4 ms of worker CPU on RabbitMQ). The main-process / pool split under the worker table "
        "shows where ours adds to it: on RabbitMQ almost all in the pool children (prerun and postrun, ~10-20 µs "
        "a task above the floor there), next to nothing in the main process (task_received). A tight loop puts "
        "the same two bodies at ~4 µs (~1.2 of them the file writes): between tasks the children run every "
        "Python line 3-5× slower, Celery's own lines included, with caches cold after the main process and the "
        "broker ran. py-spy on the worker main process found our code in 2 of 1 449 samples. Reaching 0.97 "
        "needs a hook other than per-task signals (a task base class timing `run`), a design decision for the "
        "project."
    ),
    "/metrics p95": (
        "Not the dead processes: compaction (`celery_signal_exporter.compact`) folds 10 000 dead processes "
        "(30 000 files) into three archives once, and the scrape then costs what it costs with none (compare "
        "the 0, 1000 and 10 000 dead rows). The cost is per value: 200 × 4 pairs written by each of 8 live "
        "processes is 37 000 output samples from ~290 000 file values, and /metrics grows linearly with them "
        "(see the names, queues and live rows). Profiled in-process, about three quarters of it is "
        "exporter/celery_signal_exporter/server/collect.py's merge: "
        "reading each live file whole (keys included: a histogram file is ~7 MB at this point), unpacking its "
        "values and adding them up; the text (exporter/celery_signal_exporter/server/exposition.py) and gzip are the "
        "rest. Reading only the "
        "values would need a file format other than prometheus-client's, which the stock collector and the "
        "compatibility tests rely on."
    ),
    "stock collector": (
        "The stock collector reads all 30 000 uncompacted files (~5 s); ours reads 3 archives plus the live "
        "files, so the ratio is bounded by the per-sample cost above, which both pay: it grows with the dead "
        "count and shrinks as the live series grow (57× with names routed to one queue each)."
    ),
    "CPU per 1000 tasks": (
        "Our service's CPU is per scrape and per probe cycle, not per task, so its share falls as the task "
        "rate rises; the window also includes the time the event-based exporter needed to catch up."
    ),
    "Redis probe": "See the probe table: the script runs LLEN and LINDEX for every list and decodes each head.",
    "publish-side receivers": "See the hook table.",
    "instructions per task, instrumented over plain": (
        "Deterministic (callgrind; see the instructions table and docs/design.md, *Overhead in instructions*, "
        "second follow-up). Celery's dispatch to a receiver that does nothing is ~16 000 instructions a signal "
        "even with the receiver cache ours turns on (~21 000 without): on RabbitMQ, whose tasks cost Celery "
        "only 0.9 M (worker) and 1.5 M (publish) instructions, the floor alone takes most or more of the "
        "budget. Tried and measured: the receiver cache as a bounded dict (-5 300 a signal, kept), the "
        "timestamp property only on AMQP (kept), the run's record on a thread-local stack (-5 800 a run, "
        "kept), the request read straight from Celery's Local, whose `__getattr__` costs a formatted "
        "AttributeError a read (-4 800 a run, kept); per-run CPU, memory and publish timing are opt-in "
        "(on here). Left: every per-task signal still does work nothing else can do exactly."
    ),
    "instructions per task, our receivers' bodies": (
        "Loop (benchmarks.bench_bodies, every switch on): prerun + postrun ~39 600 instructions a run "
        "(in-progress, runtime, queue wait, CPU, memory growth, beat entry, success; 6 200 of it CPU and "
        "memory), task_received ~13 000, the publish pair ~20 000 with the due header; the whole runs add "
        "what kombu does with the due header (~9 000 a Redis worker task). The C-level profile is the "
        "interpreter spread thin (frames, dict lookups, keyword binding, allocation), no single line."
    ),
}
#: The same, in a line each, under README's targets table.
MISS_SHORT = {
    "throughput": "wall clock moves 5-20% run to run on this shared machine; judged in instructions below.",
    "/metrics p95": "about three quarters is collect.py's merge reading every live file whole "
                    "(prometheus-client's format, keys included); the machine was shared during the run.",
    "stock collector": "bounded by the per-sample cost both collectors pay.",
    "instructions per task, instrumented over plain": "Celery's dispatch costs ~16 000 instructions a signal "
                                                      "even with the receiver cache; on Redis the rest (our "
                                                      "bodies, the due header in kombu) ends within a run's "
                                                      "±0.2% of the target, on RabbitMQ that floor alone "
                                                      "takes most or more of the budget.",
    "instructions per task, our receivers' bodies": "the interpreter spread thin over our bodies (~40 000 "
                                                    "instructions a run in the pool with CPU and memory on); "
                                                    "no hot spot left after the AttributeError in Celery's "
                                                    "Local and the dispatch lookups were cut.",
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
    missed = [t for t in targets if not t.ok]
    if missed:
        out += ["## Where targets are missed", ""]
        for t in missed:
            note = next((v for k, v in MISS_NOTES.items() if k in t.what), "")
            out += [f"- **{t.what}** ({t.measured}, target {t.limit}). {note}"]
        out += [""]
    if failures:
        out += ["## Benchmarks that failed", ""] + [f"- {f}" for f in failures] + [""]
    for s in sections:
        out += [f"## {s.title}", "", table(s.columns, s.rows), ""]
        out += [f"- {n}" for n in s.notes] + [""]
    return "\n".join(out)


def _blocks(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """A report split at its "## " headings: the lines before the first, and each section's lines by heading."""
    head: list[str] = []
    blocks: dict[str, list[str]] = {}
    current = head
    for line in text.split("\n"):
        if line.startswith("## "):
            current = blocks.setdefault(line[3:].strip(), [])
        else:
            current.append(line)
    return head, blocks


def _targets_from(block: list[str]) -> list[Target]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block if line.startswith("| ")]
    return [Target(r[0], r[1], r[2], r[3] == "pass") for r in rows[1:] if len(r) == 4 and not set(r[0]) <= {"-"}]


def merge_report(old: str, new: str, names: list[str]) -> str:
    """A partial run folded into the full report: its sections and target rows replace theirs, the rest stays.

    Why: `python -m benchmarks cost` must update its table in results.md without
    throwing away the other benchmarks' figures, which take twenty minutes more.
    """
    old_head, old_blocks = _blocks(old)
    _, new_blocks = _blocks(new)
    targets = _targets_from(old_blocks.get("Targets", []))
    for t in _targets_from(new_blocks.get("Targets", [])):
        i = next((k for k, o in enumerate(targets) if o.what == t.what), None)
        if i is None:
            targets.append(t)
        else:
            targets[i] = t
    date = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    earlier = [line for line in old_head if line.startswith("Updated ")]
    found = re.search(r"benchmarks ([\w ]+)`", earlier[0]) if earlier else None
    done = [*(found.group(1).split() if found else []), *names]
    stamp = (f"Updated {date} UTC by `.venv/bin/python -m benchmarks {' '.join(dict.fromkeys(done))}`: those "
             "sections and their target rows replace the earlier ones; every other figure is from the run above.")
    head: list[str] = []
    for line in (line for line in old_head if not line.startswith("Updated ")):
        if line or (head and head[-1]):
            head.append(line)
    at = next((i + 1 for i, line in enumerate(head) if line.startswith("Written by")), len(head))
    head[at:at] = ["", stamp]
    generated = {"Targets", "Where targets are missed", "Benchmarks that failed"}
    out = list(head)
    order = [k for k in old_blocks if k not in generated]
    order += [k for k in new_blocks if k not in generated and k not in old_blocks]
    # The machine table stays the full run's: the stamp above says when the partial run was made.
    sections = {**old_blocks, **{k: v for k, v in new_blocks.items() if k not in generated and k != "Machine"}}
    for k in order:
        if k == "Machine":
            out += ["## Machine", *sections[k]]
            out += ["## Targets", "", targets_table(targets), ""]
            missed = [t for t in targets if not t.ok]
            if missed:
                out += ["## Where targets are missed", ""]
                for t in missed:
                    note = next((v for key, v in MISS_NOTES.items() if key in t.what), "")
                    out += [f"- **{t.what}** ({t.measured}, target {t.limit}). {note}"]
                out += [""]
            if "Benchmarks that failed" in new_blocks:
                out += ["## Benchmarks that failed", *new_blocks["Benchmarks that failed"]]
        else:
            out += [f"## {k}", *sections[k]]
    return "\n".join(out)


README = os.path.join(os.path.dirname(BENCH_DIR), "README.md")


#: The results.md section README shows in full beside the targets: overhead in instructions, the deterministic one.
README_TABLE = "Overhead in instructions (callgrind, per task)"


def readme_section(facts: dict[str, str], report_text: str) -> str:
    """README's "## Performance": the targets table (and the instructions table) of the report as written."""
    head, blocks = _blocks(report_text)
    targets = _targets_from(blocks.get("Targets", []))
    when = f"on {facts['date (UTC)']} UTC"
    updated = next((re.search(r"Updated (.*?) UTC by (`[^`]*`)", line) for line in head if line.startswith("Updated ")),
                   None)
    full = next((line.split("|")[2].strip() for line in blocks.get("Machine", []) if "| date (UTC)" in line), "")
    if updated and full:
        when = f"on {full} UTC, and {updated.group(2)} again on {updated.group(1)} UTC"
    intro = textwrap.fill(
        f"Measured by `.venv/bin/python -m benchmarks` {when} ({facts['cores']} shared cores, "
        f"{facts['CPU']}; Python {facts['Python']}, Celery {facts['Celery']}, Redis {facts['Redis server']}, "
        f"RabbitMQ {facts['RabbitMQ server'].split()[0]}). Each figure is a median over alternating runs; "
        "[benchmarks/results.md](benchmarks/results.md) has every table, the spreads, the machine and the "
        "method, and, for each target missed, what profiling found and where the fix lies.",
        width=78, break_on_hyphens=False, break_long_words=False)
    out = ["## Performance", "", intro, "", targets_table(targets), ""]
    missed = [(t, next((v for k, v in MISS_SHORT.items() if k in t.what), "")) for t in targets if not t.ok]
    if missed:
        out += ["What profiling found behind each miss (details in results.md):", ""]
        out += [f"- {t.what}: {why}" for t, why in missed if why] + [""]
    if README_TABLE in blocks:
        table_lines = [line for line in blocks[README_TABLE] if line.startswith("|")]
        out += [textwrap.fill(
            "Instructions per task under callgrind (deterministic, unlike wall-clock time on a shared machine; "
            "the throughput rows above are wall clock, secondary and noisy):",
            width=78, break_on_hyphens=False, break_long_words=False), "", *table_lines, ""]
    return "\n".join(out)


def update_readme(section_text: str, path: str = README) -> None:
    """Replace README's "## Performance" section, or add it before "## Not yet here"; nothing else changes."""
    with open(path) as f:
        lines = f.read().split("\n")
    heading = "## Performance"
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    else:
        start = end = next((i for i, line in enumerate(lines) if line == "## Not yet here"), len(lines))
    new = [*section_text.rstrip("\n").split("\n"), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines[:start] + new + lines[end:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmark; print and write the results table.")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {','.join(BENCHMARKS)} (default all)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks that every benchmark runs")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--readme", action="store_true", help="also rewrite README.md's Performance section")
    parser.add_argument("--out", default=None, help="where to write the report (default benchmarks/results.md; "
                                                    "with --tiny, nowhere unless given)")
    args = parser.parse_args(argv)
    size = TINY if args.tiny else FULL
    names = [n for n in [*args.names, *args.only.split(",")] if n] or list(BENCHMARKS)
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
    if out_path and not args.out and not args.tiny and set(names) != set(BENCHMARKS) and os.path.exists(out_path):
        with open(out_path) as f:
            text = merge_report(f.read(), text, names)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text)
        print(f"wrote {out_path}", flush=True)
    if args.readme and sections:
        update_readme(readme_section(facts, text))
        print(f"updated {README}", flush=True)
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
