"""Filesystem probe against kombu's real filesystem transport: real producers, a real worker, the
real exporter and the demo; every count exact. Each test's folders are its own tmp_path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_signal_exporter.probes import ProbeOptions, probe_for_url
from celery_signal_exporter.probes.base import ProbeError
from celery_signal_exporter.probes.filesystem import FilesystemProbe, FilesystemSettings
from tests.harness import (
    PYTHONPATH,
    ROOT,
    Samples,
    env_for,
    exporter,
    free_port,
    has,
    parse,
    value,
    wait_until,
    worker,
)


def transport(tmp: Path) -> dict[str, Any]:
    """One folder both ways (as the demo does), so the worker's data_folder_in is where producers write."""
    folder = tmp / "broker"
    folder.mkdir(exist_ok=True)
    return {"data_folder_in": str(folder), "data_folder_out": str(folder), "control_folder": str(tmp / "control"),
            "polling_interval": 0.1, "store_processed": False}


def producer(options: dict[str, Any]) -> Celery:
    app = Celery("fs-probe-test", broker="filesystem://", set_as_current=False)
    app.conf.broker_transport_options = options
    return app


def fs_probe(options: dict[str, Any], **settings: Any) -> FilesystemProbe:
    p = probe_for_url("filesystem://", ProbeOptions(transport_options=options,
                                                    settings=(FilesystemSettings(**settings),)))
    assert isinstance(p, FilesystemProbe)
    return p


def by_name(p: FilesystemProbe, queues: set[str]) -> dict[str, Any]:
    return {q.name: q for q in p.snapshot(queues).queues}


def test_depth_and_head_age_per_queue_exact(tmp_path: Path) -> None:
    options = transport(tmp_path)
    app = producer(options)
    first = time.time()
    for _ in range(3):
        app.send_task("t.ok", queue="alpha")
    time.sleep(1.2)
    for _ in range(2):
        app.send_task("t.ok", queue="beta")
    app.send_task("t.ok", queue="dotted.name.q")
    p = fs_probe(options)
    seen = by_name(p, {"alpha", "beta", "never.used"})
    assert {n: q.length for n, q in seen.items()} == {"alpha": 3, "beta": 2, "dotted.name.q": 1, "never.used": 0}
    assert {q.vhost for q in seen.values()} == {"/"}
    assert seen["never.used"].oldest_message_age_seconds is None, "no file, no age"
    now = time.time()
    alpha_age = seen["alpha"].oldest_message_age_seconds
    assert alpha_age is not None and 1.2 <= alpha_age <= now - first + 0.05, alpha_age
    beta_age = seen["beta"].oldest_message_age_seconds
    assert beta_age is not None and beta_age < 1.0, "beta's oldest file is newer than alpha's"
    # Unacked and consumers live in the worker's memory: absent, never 0.
    assert all(q.unacked is None and q.consumers is None for q in seen.values())
    # kombu's exchange table names every bound queue, empty or not.
    assert {"alpha", "beta", "dotted.name.q"} <= p.discover()
    # Foreign files in the folder are not messages.
    (Path(options["data_folder_in"]) / "notes.txt").write_text("x")
    (Path(options["data_folder_in"]) / "1_abc.msg.tmp").write_text("x")
    assert by_name(p, set())["alpha"].length == 3
    # --no-oldest-age: counts only, no stat per file.
    assert by_name(fs_probe(options, read_oldest_age=False), set())["alpha"].oldest_message_age_seconds is None


def test_missing_or_unreadable_folder_is_a_classified_error(tmp_path: Path) -> None:
    gone = fs_probe({"data_folder_in": str(tmp_path / "absent")})
    with pytest.raises(ProbeError) as err:
        gone.snapshot({"alpha"})
    assert err.value.reason == "connection" and err.value.cause == "FileNotFoundError"
    if os.geteuid() != 0:  # root reads a 000 directory anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0)
        try:
            with pytest.raises(ProbeError) as err:
                fs_probe({"data_folder_in": str(locked)}).snapshot(set())
            assert err.value.reason == "auth"
        finally:
            locked.chmod(0o700)


def test_serve_reports_exact_depth_while_a_real_worker_drains(tmp_path: Path) -> None:
    """A real worker on the filesystem transport drains alpha; beta has no consumer and keeps its 7."""
    options = transport(tmp_path)
    metrics_dir = str(tmp_path / "metrics")
    env = env_for("filesystem://", metrics_dir, CSX_TEST_TRANSPORT=json.dumps(options))
    app = producer(options)
    for i in range(7):
        app.send_task("t.ok", args=(i,), queue="beta")
    args = ["--metrics-dir", metrics_dir, "--broker-url", "filesystem://", "--transport-options",
            json.dumps(options), "--queue", "alpha", "--probe-interval", "0.5", "--probe-timeout", "0.5"]
    started = time.monotonic()
    with exporter(str(tmp_path), *args) as ex:
        def first() -> Samples | None:
            r = ex.scrape()
            return r if has(r, "celery_queue_length", queue_name="beta") else None

        s = wait_until(first, 20, "the first probe")
        assert value(s, "celery_queue_length", queue_name="beta") == 7
        assert value(s, "celery_queue_length", queue_name="alpha") == 0
        assert value(s, "celery_broker_up", broker="filesystem://") == 1
        assert value(s, "celery_queue_oldest_message_age_seconds", queue_name="beta") > 0
        assert not has(s, "celery_queue_oldest_message_age_seconds", queue_name="alpha")
        with worker(env, str(tmp_path), queues="alpha", concurrency=1) as w:
            for i in range(12):
                app.send_task("t.ok", args=(i,), queue="alpha")

            def drained() -> Samples | None:
                r = ex.scrape()
                done = value(r, "celery_task_succeeded_total", queue_name="alpha") == 12
                return r if done and value(r, "celery_queue_length", queue_name="alpha") == 0 else None

            s = wait_until(drained, 60, "the worker to drain alpha")
            log = w.log()
        assert value(s, "celery_task_received_total", name="t.ok", queue_name="alpha") == 12
        assert value(s, "celery_queue_length", queue_name="beta") == 7, "nobody consumes beta"
        assert value(s, "celery_exporter_probe_errors_total") == 0
        assert value(s, "celery_exporter_handler_errors_total") == 0, log
    print(f"filesystem serve test: {time.monotonic() - started:.1f}s")


def test_demo_serves_queue_length_of_its_own_queues() -> None:
    """`demo` without a broker probes its own filesystem transport: celery_queue_length for fast and slow."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "celery_signal_exporter.cli", "demo", "--port", str(port),
                             "--duration", "60"], cwd=ROOT, env={**os.environ, "PYTHONPATH": PYTHONPATH},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import httpx

    assert proc.stdout is not None
    first = proc.stdout.readline()
    found = re.search(r"in (/\S+);", first)
    assert found, first
    workdir = found.group(1)
    try:
        def probed() -> Samples | None:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                s = parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
            except httpx.HTTPError:
                return None
            both = has(s, "celery_queue_length", queue_name="fast") and has(s, "celery_queue_length", queue_name="slow")
            return s if both and value(s, "celery_task_succeeded_total") > 0 else None

        s = wait_until(probed, 60, "the demo's queue depths")
        assert value(s, "celery_broker_up", broker="filesystem://") == 1
        assert value(s, "celery_exporter_probe_errors_total", broker="filesystem://") == 0
        # The demo's producer sends 9 tasks a second; a queue never holds more than was sent.
        sent = value(s, "celery_task_sent_total", queue_name="fast")
        assert 0 <= value(s, "celery_queue_length", queue_name="fast") <= sent
        # SIGTERM (what Kubernetes and `timeout` send) stops it as cleanly as Ctrl-C.
        proc.terminate()
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0 and "stopped" in rest, rest
        assert not os.path.exists(workdir), "the demo leaves nothing behind"
        leftovers = subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True)
        assert leftovers.stdout == "", "no worker process survives the demo"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
