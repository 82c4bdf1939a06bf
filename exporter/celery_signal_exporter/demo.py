"""`celery-signal-exporter demo`: a real worker, a producer and the exporter.

With no broker URL it needs no server at all: kombu's filesystem transport
carries the messages through a temporary directory (under TMPDIR), which is
removed on exit together with the metrics directory and the worker, however
the demo is stopped: Ctrl-C, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from typing import BinaryIO

import click

from celery_signal_exporter.redact import redact_url
from celery_signal_exporter.server.config import ServeConfig
from celery_signal_exporter.server.serving import build_probes, run

#: Ctrl-C, a process manager or `timeout`, a closed terminal: each stops the demo and its cleanup.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: How long the worker's warm shutdown may let running tasks finish (the demo's take at most 1.5 s)
#: before its process group is killed: a stop takes seconds even when a task runs long.
WORKER_GRACE = 5.0


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown, bounded; then kill what is left of the worker's session (its prefork children
    too, even if the worker itself died before them)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=WORKER_GRACE)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _as_ctrl_c(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP stop the demo the way Ctrl-C does, through its cleanup: while uvicorn serves,
    its SIGINT handler shuts it down gracefully and then raises KeyboardInterrupt; otherwise SIGINT is
    KeyboardInterrupt. (uvicorn handles SIGTERM itself, then re-raises it here once it has stopped.)"""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a shell's background job ignores Ctrl-C
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)


def _say(message: str, err: bool = False) -> None:
    """click.echo that a closed terminal (SIGHUP) or a closed pipe cannot turn into an error."""
    try:
        click.echo(message, err=err)
    except OSError:
        pass


def run_demo(broker_url: str | None, host: str, port: int, duration: float, listener: socket.socket) -> None:
    """Run the demo until Ctrl-C, SIGTERM, SIGHUP or `duration` seconds, on `listener`; then stop
    everything it started and remove everything it made.

    The exporter is wired exactly as `serve` wires it (`serving`); a real
    broker is probed for its queue depth and memory too. Raises
    `OptionError` for a broker URL no probe can use, before anything starts.
    """
    # Before the temporary directory exists: a stop at any moment takes a way out that removes it.
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if previous[signum] is not signal.SIG_IGN:  # under nohup a hang-up stays ignored
            signal.signal(signum, _as_ctrl_c)
    try:
        _run_demo(broker_url, host, port, duration, listener)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_demo(broker_url: str | None, host: str, port: int, duration: float, listener: socket.socket) -> None:
    """The demo itself, inside run_demo's signal handlers: every stop ends in the cleanup below."""
    workdir = tempfile.mkdtemp(prefix="celery-exporter-demo-")
    try:
        metrics_dir = os.path.join(workdir, "metrics")
        os.makedirs(metrics_dir)
        # The worker's own temporary files (billiard's pymp-*) go inside the demo's directory: a worker
        # killed before it could remove them leaves nothing in the user's TMPDIR.
        worker_tmp = os.path.join(workdir, "tmp")
        os.makedirs(worker_tmp)
        env = dict(os.environ)
        env.update({
            "CELERY_EXPORTER_METRICS_DIR": metrics_dir,
            "CELERY_EXPORTER_DEMO_DIR": workdir,
            "CELERY_EXPORTER_DEMO_BROKER": broker_url or "",
            "TMPDIR": worker_tmp,
        })
        os.environ.update({k: env[k] for k in ("CELERY_EXPORTER_METRICS_DIR", "CELERY_EXPORTER_DEMO_DIR",
                                             "CELERY_EXPORTER_DEMO_BROKER")})
        # Without a broker URL the demo's own filesystem transport is probed like any broker: the
        # filesystem probe counts the files waiting in the worker's data_folder_in.
        from celery_signal_exporter.demo_app import filesystem_transport

        urls, transport = ((broker_url,), {}) if broker_url else (("filesystem://",), filesystem_transport(workdir))
        config = ServeConfig(metrics_dir=metrics_dir, compact_interval=0, broker_urls=urls, probe_interval=5,
                             probe_timeout=4, queues=("fast", "slow"), transport_options=transport,
                             host=host, port=port, log_level="warning")
        probes = build_probes(config)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    log_path = os.path.join(workdir, "worker.log")
    worker_log: BinaryIO | None = None
    worker: subprocess.Popen[bytes] | None = None
    producer: threading.Thread | None = None
    stop = threading.Event()
    started = True
    try:
        worker_log = open(log_path, "wb")
        # A session of its own: Ctrl-C and a hang-up reach the worker only through _stop_worker.
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_signal_exporter.demo_app", "worker", "-P", "prefork",
             "-c", "2", "-Q", "fast,slow", "-n", "demo@%h", "--loglevel", "WARNING", "--max-tasks-per-child", "50"],
            env=env, start_new_session=True, stdout=worker_log, stderr=subprocess.STDOUT,
        )
        from celery_signal_exporter import demo_app  # imports instrument the producer: this process

        def produce() -> None:
            rng = random.Random(7)
            while not stop.is_set():
                try:
                    demo_app.send_mixed_batch(rng)
                except Exception as exc:  # noqa: BLE001 - keep the demo going
                    click.echo(f"demo: publishing failed: {type(exc).__name__}: {exc}", err=True)
                stop.wait(1.0)

        producer = threading.Thread(target=produce, name="demo-producer", daemon=True)
        producer.start()
        where = redact_url(broker_url) if broker_url else f"kombu filesystem transport in {workdir}"
        click.echo(f"demo: worker and producer running on {where}; worker log: {log_path}")
        click.echo(f"demo: metrics at http://{host}:{port}/metrics  (Ctrl-C stops everything)")
        try:
            started = run(config, probes, listener, duration)
        except KeyboardInterrupt:
            pass  # uvicorn re-raises Ctrl-C after its own shutdown: ours is the normal stop
    finally:
        # A second signal (Ctrl-C again, SIGHUP after SIGTERM) must not cut the cleanup short: it is
        # bounded. run_demo restores the handlers.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        listener.close()
        stop.set()
        if producer is not None:
            producer.join(timeout=5)  # it must not write into the directories removed below
        tail = ""
        if worker is not None:
            _stop_worker(worker)
            if worker.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
                with open(log_path, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                tail = f"demo: the worker exited with {worker.returncode}; its last output:\n{tail}"
        if worker_log is not None:
            worker_log.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if tail:
            _say(tail, err=True)
        _say("demo: stopped, temporary files removed")
    if not started:
        raise click.ClickException(f"the exporter did not start on {host}:{port}")
