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
import subprocess
import sys
import tempfile
import threading

import click
import uvicorn

from celery_signal_exporter._http import server_options
from celery_signal_exporter.probes.loop import LoopOptions, ProbeGroup, build_probe_loops
from celery_signal_exporter.redact import redact_url
from celery_signal_exporter.service import Exporter, ServiceConfig, create_app


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


def run_demo(broker_url: str | None, host: str, port: int, duration: float) -> None:
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
    log_path = os.path.join(workdir, "worker.log")
    worker_log = open(log_path, "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_signal_exporter.demo_app", "worker", "-P", "prefork", "-c", "2",
         "-Q", "fast,slow", "-n", "demo@%h", "--loglevel", "WARNING", "--max-tasks-per-child", "50"],
        env=env, start_new_session=True, stdout=worker_log, stderr=subprocess.STDOUT,
    )
    stop = threading.Event()
    server: uvicorn.Server | None = None
    sources: list[ProbeGroup] = []
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
        if broker_url:  # a real broker: show its queue depth and memory too
            probes = ProbeGroup(build_probe_loops([broker_url], interval=5, timeout=4,
                                                  loop_options=LoopOptions(queues=("fast", "slow"))))
            sources.append(probes)
        exporter = Exporter(ServiceConfig(metrics_dir=metrics_dir, sources=sources))
        for source in sources:
            source.known_queues = exporter.queues_seen
            source.start()
        config = uvicorn.Config(create_app(exporter), host=host, port=port, log_level="warning", **server_options())
        server = uvicorn.Server(config)
        where = redact_url(broker_url) if broker_url else f"kombu filesystem transport in {workdir}"
        click.echo(f"demo: worker and producer running on {where}; worker log: {log_path}")
        click.echo(f"demo: metrics at http://{host}:{port}/metrics  (Ctrl-C stops everything)")
        if duration > 0:
            threading.Timer(duration, lambda: setattr(server, "should_exit", True)).start()
        try:
            server.run()
        except KeyboardInterrupt:
            pass  # uvicorn re-raises Ctrl-C after its own shutdown: ours is the normal stop
    finally:
        for source in sources:
            source.stop()
        stop.set()
        _stop_worker(worker)
        worker_log.close()
        if worker.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            with open(log_path, "rb") as f:
                tail = f.read()[-2000:].decode(errors="replace")
            click.echo(f"demo: the worker exited with {worker.returncode}; its last output:\n{tail}", err=True)
        shutil.rmtree(workdir, ignore_errors=True)
        click.echo("demo: stopped, temporary files removed")
    if server is not None and not server.started:
        raise click.ClickException(f"could not listen on {host}:{port}")
