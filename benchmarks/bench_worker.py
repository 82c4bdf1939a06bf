# ruff: noqa: RUF001, RUF003 - the tables print × – ≤ ≥ on purpose
"""Worker overhead: a real prefork worker (-c 2) drains N trivial tasks: plain, instrumented, -E.

The queue is filled before the worker starts, by a producer of the same
variant (so instrumented tasks carry the due header the worker reads). Each
task appends a byte to a file; the clock runs from the 10% mark to the last
task, so worker start-up and child warm-up are outside it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from benchmarks.bench_publish import LABEL, VARIANTS, broker, cost_split, purge
from benchmarks.common import (
    ROOT,
    SHM,
    Section,
    Size,
    Target,
    alternate,
    child_env,
    cpu_seconds,
    median,
    ratios,
    run_json,
    spread,
)


def _tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of a worker main process and of its pool children together.

    Apart, because they tell different stories: the main process is the serial
    part (it reads every message and hands it to the pool), the children run
    prerun, the task and postrun.
    """
    main, pool = cpu_seconds(pid), 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid == pid:
                pool += cpu_seconds(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return main, pool


def drain(url: str, variant: str, n: int, tmp: str) -> tuple[float, float, float]:
    """(tasks per second, CPU µs per task of the worker main process, of its pool) of one run on a pre-filled queue."""
    queue = "bench-worker"
    done = os.path.join(tmp, f"done-{uuid.uuid4().hex[:6]}")
    metrics = os.path.join(tmp, "metrics")
    env = child_env(CSX_BENCH_BROKER=url, CSX_BENCH_VARIANT=variant, CSX_BENCH_QUEUE=queue,
                    CSX_BENCH_METRICS_DIR=metrics, CSX_BENCH_DONE_FILE=done)
    filled = run_json(["-m", "benchmarks.apps", "publish", str(n)], env)
    total = int(filled["n"]) + int(filled["warm"])
    start_mark = total // 10
    args = [sys.executable, "-m", "celery", "-A", "benchmarks.apps", "worker", "-P", "prefork", "-c", "2",
            "-Q", queue, "-n", f"bench-{uuid.uuid4().hex[:6]}@%h", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "WARNING"]
    if variant == "events":
        args.append("-E")
    log = open(os.path.join(tmp, f"worker-{variant}.log"), "wb")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = t1 = 0.0
        c0 = c1 = (0.0, 0.0)
        deadline = time.monotonic() + 60 + n / 50
        while True:
            size = os.path.getsize(done) if os.path.exists(done) else 0
            now = time.perf_counter()
            if not t0 and size >= start_mark:
                t0, c0 = now, _tree_cpu(proc.pid)
            if size >= total:
                t1, c1 = now, _tree_cpu(proc.pid)
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker ({variant}) finished {size}/{total} tasks; see {log.name}")
            time.sleep(0.005)
        done_n = total - start_mark
        return done_n / (t1 - t0), (c1[0] - c0[0]) / done_n * 1e6, (c1[1] - c0[1]) / done_n * 1e6
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
        purge(url, queue)


def run(size: Size) -> Section:
    section = Section(
        "Worker overhead (prefork -c 2 draining a full queue)",
        ["broker", "variant", "tasks/s median (min–max, n)", "ratio to plain, same round",
         "worker CPU ms/task", "of which main process / pool µs/task", "CPU ratio plain / variant"],
        notes=[f"{size.worker_n} tasks (+ warm-up) per run, timed from the 10% mark to the last one; "
               f"{size.rounds} alternating rounds. CPU is the worker main process and its pool children "
               "(their CPU clocks, user + system), the steadier figure on a shared machine."],
    )
    for kind in ("redis", "rabbitmq"):
        with broker(kind) as url, tempfile.TemporaryDirectory(prefix="csx-bench-worker-", dir=SHM) as tmp:
            measured = alternate(VARIANTS, size.rounds, lambda v, _r: drain(url, v, size.worker_n, tmp))
        rates = {v: [r for r, _, _ in m] for v, m in measured.items()}
        main = {v: [c for _, c, _ in m] for v, m in measured.items()}
        pool = {v: [c for _, _, c in m] for v, m in measured.items()}
        cpu = {v: [a + b for a, b in zip(main[v], pool[v], strict=True)] for v in measured}  # µs per task
        for variant in VARIANTS:
            rel = ratios(rates[variant], rates["plain"])
            cpu_rel = ratios(cpu["plain"], cpu[variant])
            section.rows.append([kind, LABEL[variant].replace("task_send_sent_event=True", "worker -E"),
                                 spread(rates[variant], "{:.0f}"),
                                 "1" if variant == "plain" else spread(rel, "{:.3f}"),
                                 spread([c / 1e3 for c in cpu[variant]], "{:.2f}"),
                                 f"{median(main[variant]):.0f} / {median(pool[variant]):.0f}",
                                 "1" if variant == "plain" else spread(cpu_rel, "{:.3f}")])
        ours = median(ratios(rates["ours"], rates["plain"]))
        for who, us in (("worker (main process and pool)", cpu), ("worker main process", main),
                        ("pool children", pool)):
            section.notes.append(cost_split(kind, who, us, "task"))
        section.data[f"{kind}_ours_ratio"] = ours
        section.data[f"{kind}_floor_ratio"] = median(ratios(rates["floor"], rates["plain"]))
        floor = section.data[f"{kind}_floor_ratio"]
        section.targets.append(Target(f"worker throughput (wall clock, noisy), instrumented / plain, {kind}", "≥ 0.97",
                                      f"{ours:.3f} (floor {floor:.3f})", ours >= 0.97))
    return section
