"""`celery-signal-exporter demo`: a real worker, a producer and the exporter.

With no broker URL it needs no server at all: kombu's filesystem transport
carries the messages through a temporary directory, which is removed on exit
together with the metrics directory and the worker.
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

import click

from celery_signal_exporter.redact import redact_url
from celery_signal_exporter.server.config import ServeConfig
from celery_signal_exporter.server.serving import build_probes, run


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()  # warm shutdown: the worker stops its own pool
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in the worker's group
    except ProcessLookupError:
        pass
    proc.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(broker_url: str | None, host: str, port: int, duration: float, listener: socket.socket) -> None:
    """Run the demo until Ctrl-C or `duration` seconds, on `listener`; then remove everything it made.

    The exporter is wired exactly as `serve` wires it (`serving`); a real
    broker is probed for its queue depth and memory too. Raises
    `OptionError` for a broker URL no probe can use, before anything starts.
    """
    workdir = tempfile.mkdtemp(prefix="celery-exporter-demo-")
    metrics_dir = os.path.join(workdir, "metrics")
    os.makedirs(metrics_dir)
    env = dict(os.environ)
    env.update({
        "CELERY_EXPORTER_METRICS_DIR": metrics_dir,
        "CELERY_EXPORTER_DEMO_DIR": workdir,
        "CELERY_EXPORTER_DEMO_BROKER": broker_url or "",
    })
    os.environ.update({k: env[k] for k in ("CELERY_EXPORTER_METRICS_DIR", "CELERY_EXPORTER_DEMO_DIR",
                                         "CELERY_EXPORTER_DEMO_BROKER")})
    try:
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
    worker_log = open(log_path, "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_signal_exporter.demo_app", "worker", "-P", "prefork", "-c", "2",
         "-Q", "fast,slow", "-n", "demo@%h", "--loglevel", "WARNING", "--max-tasks-per-child", "50"],
        env=env, start_new_session=True, stdout=worker_log, stderr=subprocess.STDOUT,
    )
    stop = threading.Event()
    started = True
    try:
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
        # uvicorn re-raises the signal that stopped it once it has shut down. SIGTERM's default action
        # would end this process there, before the cleanup below, leaving the worker and the temporary
        # directory behind; as an interrupt it takes the same way out as Ctrl-C.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            started = run(config, probes, listener, duration)
        except KeyboardInterrupt:
            pass  # uvicorn re-raises Ctrl-C after its own shutdown: ours is the normal stop
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        listener.close()
        stop.set()
        _stop_worker(worker)
        worker_log.close()
        if worker.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            with open(log_path, "rb") as f:
                tail = f.read()[-2000:].decode(errors="replace")
            click.echo(f"demo: the worker exited with {worker.returncode}; its last output:\n{tail}", err=True)
        shutil.rmtree(workdir, ignore_errors=True)
        click.echo("demo: stopped, temporary files removed")
    if not started:
        raise click.ClickException(f"the exporter did not start on {host}:{port}")
