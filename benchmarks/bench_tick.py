# ruff: noqa: RUF001, RUF003 - the tables print × – ≤ ≥ on purpose
"""The worker main's heartbeat tick: CPU per tick in a clean metrics directory and in one with foreign files.

Why: the tick runs in users' workers every 2 s and lists the directory
(compaction, reaping); a directory shared with other software, or left full
of someone else's files, must not make every tick expensive.

Each run is a fresh interpreter that builds the real instrumentation on a
directory, writes a pool child's worth of series, then times the real tick
(`WorkerMetrics.tick`, the consumer bootstep's callback) on its own CPU
clock. Clean and foreign directories alternate run by run.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

from benchmarks.common import SHM, Section, Size, Target, alternate, child_env, median, ratios, run_json, spread
from celery_signal_exporter.compact import LISTING_SETTLE_NS

LIMIT = 1.10  # foreign / clean CPU per tick


def _tick_cpu(directory: str, ticks: int, changing: bool) -> dict[str, float]:
    """CPU seconds per tick of the real tick on `directory`, after a few warm ticks.

    Steady (`changing` false): the directory's mtime is older than compaction's settle time, as between
    two ticks 2 s apart when no process came or went. Changing: a file is created and removed before every tick
    and removed (untimed), as when a pool child is replaced every tick, so every tick lists the directory.
    """
    from celery import Celery

    from celery_signal_exporter import catalogue
    from celery_signal_exporter.recording.receivers import Instrumentation, Options
    from celery_signal_exporter.recording.worker import WorkerMetrics

    app = Celery("bench-tick", broker="memory://", set_as_current=False)
    inst = Instrumentation(app, Options(directory))
    for i in range(30):  # what a worker that ran 30 task names has written
        inst.sent.labels(f"bench.t{i:02d}", *["bench"] * (len(catalogue.SENT.labels) - 1)).inc()
    metrics = WorkerMetrics(inst)
    metrics.initialise()
    consumer = SimpleNamespace(hostname="bench@tick", pool=SimpleNamespace(num_processes=2))
    for _ in range(3):
        metrics.tick(consumer)
    if not changing:
        time.sleep(LISTING_SETTLE_NS / 1e9 + 0.2)
        metrics.tick(consumer)  # the one listing the settled directory is trusted from
    cpu = 0.0
    for i in range(ticks):
        if changing:
            path = os.path.join(directory, f"other-app-new-{i}.json")
            with open(path, "w"):
                pass
            os.unlink(path)
        start = time.process_time()
        metrics.tick(consumer)
        cpu += time.process_time() - start
    return {"cpu_per_tick_s": cpu / ticks, "files": float(len(os.listdir(directory)))}


def foreign(directory: str, n: int) -> None:
    """n files that are not ours: names no writer of ours would make, a few bytes each."""
    for i in range(n):
        name = f"other-app-{i}.json" if i % 2 else f"cache_{i}.tmp"
        with open(os.path.join(directory, name), "w") as f:
            f.write("{}")


def run(size: Size) -> Section:
    n_foreign = 50_000 if size.name == "full" else 2_000
    ticks = 30 if size.name == "full" else 3
    rounds = 5 if size.name == "full" else 1
    with tempfile.TemporaryDirectory(prefix="csx-bench-tick-", dir=SHM) as tmp:
        dirs = {"clean": os.path.join(tmp, "clean"), "foreign": os.path.join(tmp, "foreign")}
        for d in dirs.values():
            os.makedirs(d)
        foreign(dirs["foreign"], n_foreign)

        def one(variant: str, _round: int) -> float:
            where, mode = variant.split()
            out = run_json(["-m", "benchmarks.bench_tick", dirs[where], str(ticks), mode], child_env())
            return float(out["cpu_per_tick_s"]) * 1e3

        ms = alternate(("clean steady", "foreign steady", "clean changing", "foreign changing"), rounds, one)
    section = Section(
        "Worker main tick (heartbeat and compaction)",
        ["metrics directory", "between ticks", "CPU ms per tick median (min–max, n)", "ratio to clean, same round"],
        notes=[f"The real `WorkerMetrics.tick` in a fresh interpreter, {ticks} timed ticks per run after 3 warm "
               f"ones, {rounds} alternating rounds; CPU is the process's own clock, ticks only. Foreign files: "
               "names no writer of ours makes (`other-app-N.json`, `cache_N.tmp`), left in the directory.",
               "Steady: nothing created or removed since the last listing settled (compaction lists the directory "
               "again only when its mtime moves); the target is judged here. Changed: one file created and "
               "removed before every tick (untimed), as when pool children come and go every tick, so every "
               "tick lists the whole directory again."],
    )
    for mode, label in (("steady", "nothing changed"), ("changing", "a file created and removed")):
        ratio = ratios(ms[f"foreign {mode}"], ms[f"clean {mode}"])
        section.rows += [["clean (this worker's files only)", label, spread(ms[f"clean {mode}"], "{:.3f}"), "1"],
                         [f"+ {n_foreign} foreign files", label, spread(ms[f"foreign {mode}"], "{:.3f}"),
                          spread(ratio, "{:.3f}")]]
        section.data[mode] = median(ratio)
    ratio = ratios(ms["foreign steady"], ms["clean steady"])
    section.targets.append(Target(f"worker main CPU per tick, {n_foreign} foreign files / clean directory",
                                  f"≤ {LIMIT:.2f}", f"{median(ratio):.3f}", median(ratio) <= LIMIT))
    return section


if __name__ == "__main__":
    print(json.dumps(_tick_cpu(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "changing")))
