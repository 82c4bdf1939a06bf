# ruff: noqa: RUF001, RUF003 - the tables print × – ≤ ≥ on purpose
"""Overhead in instructions: callgrind counts what publishing and running a task costs, per task.

Why instructions: wall-clock ratios on a shared 2-core machine move by 5-20%
from run to run, more than the whole budget; callgrind counts the same work
twice within a fraction of a percent, whatever else the machine runs.

Each figure is two runs of a fresh process under callgrind with the same
start-up and warm-up, one with N more tasks than the other; their difference
over N is the cost of one task, start-up subtracted. Three variants: plain
Celery, the floor (the signals ours connects, to receivers that do nothing:
Celery's own dispatch) and ours with every opt-in switch on
(`benchmarks.apps.feature_switches`).

- publish: a producer calling `apply_async` W + N times.
- worker: a solo-pool worker (main and pool in one process) draining a queue
  pre-filled with W + N noops and a stop task that shuts it down.
- prefork child: the same with `-P prefork -c 1`; the child's own output file
  (callgrind follows forks) gives the pool process's share.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from benchmarks.bench_publish import broker, purge
from benchmarks.common import ROOT, SHM, Section, Size, Target, child_env, run_json

VARIANTS = ("plain", "floor", "ours")
LABEL = {"plain": "plain Celery", "floor": "floor: same signals, receivers that do nothing",
         "ours": "instrumented, every per-task switch on"}
#: Instructions per task, instrumented over plain (%), and ours over the floor (%): the issue's targets.
LIMIT_OVER_PLAIN = {"publish": 2.0, "worker": 2.5}
LIMIT_OVER_FLOOR = 0.5
#: The heartbeat tick runs every 2 s of wall time, not per task; under callgrind a run lasts ~50 times longer,
#: which would charge each task ~50 times its real share of ticks (~0.2% of a Redis task, measured). So the
#: tick is kept out of the runs (its first call, at start-up, cancels out) and measured alone (benchmarks.bench_tick).
NO_TICK = {"CSX_BENCH_INSTRUMENT": '{"heartbeat_interval": 86400}'}
WARM = 20  # tasks in both runs: first-use costs (connections, series binding, trace building) cancel out
_SUMMARY = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def instructions(path: str) -> int:
    """Total instructions (Ir) in one callgrind output file."""
    with open(path, "rb") as f:
        found = _SUMMARY.findall(f.read())
    if not found:
        raise RuntimeError(f"{path}: no summary line")
    return int(found[-1])


def valgrind() -> list[str]:
    binary = shutil.which("valgrind")
    if binary is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    # No cache simulation: instruction counts only, the cheapest callgrind mode.
    return [binary, "--tool=callgrind", "--cache-sim=no", "--branch-sim=no"]


@dataclass
class Run:
    """Instructions of one run: the process started and, for prefork, its pool child (0 for solo)."""

    main: int
    child: int
    seconds: float


def under_callgrind(args: list[str], env: dict[str, str], out_dir: str, timeout: float) -> Run:
    """Run `python args…` under callgrind; read the main process's file and any forked child's."""
    os.makedirs(out_dir, exist_ok=True)
    start = time.monotonic()
    proc = subprocess.run([*valgrind(), f"--callgrind-out-file={out_dir}/cg.%p", sys.executable, *args],
                          cwd=ROOT, env=env, capture_output=True, timeout=timeout, check=False)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} under callgrind failed ({proc.returncode}):\n"
                           f"{proc.stderr.decode(errors='replace')[-3000:]}")
    files = glob.glob(os.path.join(out_dir, "cg.*"))
    main = os.path.join(out_dir, f"cg.{_pid(proc.stderr)}")
    children = [instructions(f) for f in files if f != main]
    return Run(instructions(main), sum(children), seconds)


def _pid(stderr: bytes) -> int:
    """The pid valgrind ran the program as (its `==PID==` prefix)."""
    m = re.search(rb"^==(\d+)== Callgrind", stderr, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no valgrind pid in:\n{stderr.decode(errors='replace')[-2000:]}")
    return int(m.group(1))


def publish_run(url: str, variant: str, n: int, tmp: str, **extra: str) -> Run:
    tag = uuid.uuid4().hex[:8]
    queue = f"cost-pub-{tag}"
    env = child_env(CSX_BENCH_BROKER=url, CSX_BENCH_VARIANT=variant, CSX_BENCH_QUEUE=queue,
                    CSX_BENCH_METRICS_DIR=os.path.join(tmp, f"metrics-{tag}"), PYTHONHASHSEED="0",
                    **{**NO_TICK, **extra})
    os.makedirs(env["CSX_BENCH_METRICS_DIR"])
    try:
        return under_callgrind(["-m", "benchmarks.apps", "publish-fixed", str(WARM), str(n)], env,
                               os.path.join(tmp, f"cg-{tag}"), timeout=300 + n)
    finally:
        with contextlib.suppress(Exception):
            purge(url, queue)


def worker_run(url: str, variant: str, n: int, tmp: str, pool: str, **extra: str) -> Run:
    """A worker started under callgrind on a queue of W + N noops and a stop task; it exits at the stop."""
    tag = uuid.uuid4().hex[:8]
    queue = f"cost-worker-{tag}"
    env = child_env(CSX_BENCH_BROKER=url, CSX_BENCH_VARIANT=variant, CSX_BENCH_QUEUE=queue,
                    CSX_BENCH_METRICS_DIR=os.path.join(tmp, f"metrics-{tag}"),
                    CSX_BENCH_DONE_FILE=os.path.join(tmp, f"done-{tag}"),
                    CSX_BENCH_STOP_PARENT="1" if pool == "prefork" else "0", PYTHONHASHSEED="0",
                    **{**NO_TICK, **extra})
    os.makedirs(env["CSX_BENCH_METRICS_DIR"])
    run_json(["-m", "benchmarks.apps", "fill", str(WARM), str(n)], env)  # outside callgrind
    args = ["-m", "celery", "-A", "benchmarks.apps", "worker", "-P", pool, "-c", "1", "-Q", queue,
            "-n", f"cost-{tag}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]
    try:
        run = under_callgrind(args, env, os.path.join(tmp, f"cg-{tag}"), timeout=600 + 2 * n)
    finally:
        with contextlib.suppress(Exception):
            purge(url, queue)
    with open(env["CSX_BENCH_DONE_FILE"], "rb") as f:
        done = len(f.read())
    if done != WARM + n:
        raise RuntimeError(f"worker ({variant}, {pool}) ran {done} of {WARM + n} tasks")
    return run


@dataclass
class PerTask:
    """Instructions per task of one variant: N run minus 0 run, over N."""

    main: float
    child: float
    seconds: float  # wall time of the N run under callgrind, for the record


def per_task(one: Callable[[int], Run], n: int) -> PerTask:
    """The N run and the 0 run side by side (instruction counts do not care what else runs)."""
    with ThreadPoolExecutor(2) as ex:
        big, zero = ex.submit(one, n), ex.submit(one, 0)
        b, z = big.result(), zero.result()
    return PerTask((b.main - z.main) / n, (b.child - z.child) / n, b.seconds)


def pct(a: float, b: float) -> float:
    return (a / b - 1) * 100


def run(size: Size) -> Section:
    n, n_prefork = size.instr_n, size.instr_prefork_n
    section = Section(
        "Overhead in instructions (callgrind, per task)",
        ["broker", "side", "variant", "instructions per task", "over plain", "over floor"],
        notes=[f"Instructions (callgrind's Ir) of a run with {WARM} + {n} tasks minus a run with {WARM} + 0, over "
               f"{n}: start-up, warm-up and first-use costs cancel out. Deterministic: the same work counts the "
               "same within a fraction of a percent, whatever else runs on the machine, unlike wall-clock time.",
               "publish: one producer calling `apply_async`. worker: `-P solo -c 1` draining a pre-filled queue "
               "(main and pool in one process; the queue was filled by a producer of the same variant, so "
               f"instrumented tasks carry the due header). prefork child: `-P prefork -c 1`, {n_prefork} tasks, "
               "the pool child's own callgrind file (callgrind follows the fork).",
               "Instrumented: `instrument(app)` defaults plus every opt-in switch of `instrument()` on "
               "(`benchmarks.apps.feature_switches`). Floor: Celery dispatching the signals ours connects "
               "(`Instrumentation.receivers()`) to receivers that do nothing, with the receiver cache on as "
               "`instrument()` turns it on (`receivers.cache_receivers`).",
               "The worker main's heartbeat tick runs every 2 s of wall time, not per task: under callgrind a run "
               "lasts ~50× longer and would be charged ~50× its real share of ticks, so it is kept out of these "
               "runs (`heartbeat_interval` of a day) and measured alone in the tick table (~0.06 ms of CPU per "
               "tick). Measured with it in, on the Redis solo worker: +0.18 points over plain."],
    )
    tiny = size.name == "tiny"
    if tiny:
        section.notes.append("Tiny size (the smoke test): Redis only; publish plain and instrumented, the worker "
                             "instrumented only. It proves the benchmark runs; its figures mean nothing.")
    for kind in ("redis",) if tiny else ("redis", "rabbitmq"):
        with broker(kind) as url, tempfile.TemporaryDirectory(prefix="csx-bench-instr-", dir=SHM) as tmp:
            sides: list[tuple[str, Callable[[str], Callable[[int], Run]], int]] = [
                ("publish", lambda v: lambda k: publish_run(url, v, k, tmp), n),
                ("worker", lambda v: lambda k: worker_run(url, v, k, tmp, "solo"), n),
            ]
            if n_prefork:
                sides.append(("prefork", lambda v: lambda k: worker_run(url, v, k, tmp, "prefork"), n_prefork))
            for side, make, count in sides:
                variants = VARIANTS if not tiny else ("plain", "ours") if side == "publish" else ("ours",)
                got = {v: per_task(make(v), count) for v in variants}
                if side == "prefork":
                    rows = [("prefork main", {v: g.main for v, g in got.items()}),
                            ("prefork child", {v: g.child for v, g in got.items()})]
                else:
                    rows = [(side, {v: g.main for v, g in got.items()})]
                for label, per in rows:
                    for v in per:
                        section.rows.append([
                            kind, label, LABEL[v], f"{per[v] / 1e6:.3f} M",
                            f"{pct(per[v], per['plain']):+.2f}%" if v != "plain" and "plain" in per else "",
                            f"{pct(per[v], per['floor']):+.2f}%" if v == "ours" and "floor" in per else "",
                        ])
                    section.data[f"{kind}_{label}"] = per
                per = {v: g.main for v, g in got.items()}
                if side in LIMIT_OVER_PLAIN and {"plain", "ours"} <= set(per):
                    over, limit = pct(per["ours"], per["plain"]), LIMIT_OVER_PLAIN[side]
                    floor = f" (floor {pct(per['floor'], per['plain']):+.2f}%)" if "floor" in per else ""
                    section.targets.append(Target(
                        f"{side} instructions per task, instrumented over plain, {kind}", f"≤ +{limit:.1f}%",
                        f"{over:+.2f}%{floor}", over <= limit))
                if side in LIMIT_OVER_PLAIN and {"floor", "ours"} <= set(per):
                    body = pct(per["ours"], per["floor"])
                    section.targets.append(Target(
                        f"{side} instructions per task, our receivers' bodies (instrumented over floor), {kind}",
                        f"≤ +{LIMIT_OVER_FLOOR:.1f}%", f"{body:+.2f}%", body <= LIMIT_OVER_FLOOR))
                section.notes.append(f"{kind} {side}: wall time of the {count}-task runs under callgrind: "
                                     + ", ".join(f"{v} {g.seconds:.0f} s" for v, g in got.items()) + ".")
    return section


#: Attempts at lowering the floor or isolating parts of ours, on the Redis solo worker (docs/design.md).
EXPERIMENTS: dict[str, tuple[str, dict[str, str]]] = {
    "floor, messages with the due header": ("floor", {"CSX_BENCH_DUE_HEADER": "1"}),
    "floor, Celery's default dispatch (receiver cache off)": ("floor", {"CSX_BENCH_SIGNAL_CACHE": "0"}),
    "instrumented, Celery's default dispatch (receiver cache off)": ("ours", {"CSX_BENCH_SIGNAL_CACHE": "0"}),
    "instrumented, heartbeat tick every 2 s in the run": ("ours", {"CSX_BENCH_INSTRUMENT": "{}"}),
}


def experiments(n: int) -> None:
    """`python -m benchmarks.bench_instructions experiments [N]`: plain, floor, ours and each experiment."""
    with broker("redis") as url, tempfile.TemporaryDirectory(prefix="csx-bench-instr-", dir=SHM) as tmp:
        base = {v: per_task(lambda k, v=v: worker_run(url, v, k, tmp, "solo"), n).main for v in VARIANTS}
        for v in VARIANTS:
            print(f"{LABEL[v]}: {base[v] / 1e6:.4f} M, over plain {pct(base[v], base['plain']):+.2f}%", flush=True)
        for what, (variant, extra) in EXPERIMENTS.items():
            got = per_task(lambda k, v=variant, e=extra: worker_run(url, v, k, tmp, "solo", **e), n).main
            print(f"{what}: {got / 1e6:.4f} M, over plain {pct(got, base['plain']):+.2f}%, over floor "
                  f"{pct(got, base['floor']):+.2f}%", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["experiments"]:
        experiments(int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
    else:
        raise SystemExit("usage: python -m benchmarks.bench_instructions experiments [N]")
