"""The HTTP service: /metrics, /healthz, /readyz and a small index page.

The merge reads files and the probes' cached results only, never a broker, and
runs in a worker thread so a slow disk cannot stall the event loop.
"""

from __future__ import annotations

import gzip
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Header, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from prometheus_client.core import Metric
from starlette.concurrency import run_in_threadpool

from celery_signal_exporter import catalogue as c
from celery_signal_exporter._version import __version__
from celery_signal_exporter.compact import compact
from celery_signal_exporter.options import excluded
from celery_signal_exporter.server._http import admitted, choose_encoding
from celery_signal_exporter.server.collect import DirectoryCollector, MergeStats
from celery_signal_exporter.server.config import ServeConfig
from celery_signal_exporter.server.exposition import Encoder

log = logging.getLogger("celery_signal_exporter")
F = TypeVar("F", bound=Callable[..., Any])


class Source(Protocol):
    """Anything that adds metrics to a scrape and may hold readiness back (a probe loop)."""

    def collect(self) -> Iterator[Metric]: ...

    def ready(self) -> tuple[bool, str]: ...


class Exporter:
    """Everything one scrape returns, gathered behind one lock-free call."""

    def __init__(self, config: ServeConfig, sources: Sequence[Source] = ()) -> None:
        self.config = config
        #: What adds to the directory's metrics and may hold readiness back: the probe loops.
        self.sources = list(sources)
        self.directory = (
            DirectoryCollector(config.metrics_dir, config.worker_timeout, config.max_task_names,
                               config.max_queue_names)
            if config.metrics_dir
            else None
        )
        self._last_duration = 0.0
        self._merge_errors = 0
        self._lock = threading.Lock()
        self._encoder = Encoder()
        # Scrapes that arrive while a render runs share the next one (see render).
        self._queue_lock = threading.Lock()
        self._queued = 0
        self._renders = 0
        self._shared: dict[tuple[str | None, bool], tuple[int, bytes, str]] = {}

    def collect(self) -> Iterator[Metric]:
        start = time.perf_counter()
        if self.directory is not None:
            try:
                families, stats = self.directory.merge()
            except Exception as exc:  # a scrape always answers, even if the merge has a bug
                self._merge_errors += 1
                if self._merge_errors == 1 or self._merge_errors % 100 == 0:
                    log.exception("merging %s failed (%d so far); serving the rest: %s",
                                  self.directory.directory, self._merge_errors, exc)
                families, stats = [], MergeStats()
            yield from families
            merge_errors = c.family(c.MERGE_ERRORS)
            merge_errors.add_metric([], self._merge_errors)
            yield merge_errors
            files = c.family(c.METRICS_FILES)
            files.add_metric(["read"], stats.files_read)
            files.add_metric(["unreadable"], stats.files_unreadable)
            files.add_metric(["dead"], stats.files_dead)
            yield files
        for source in self.sources:
            yield from source.collect()
        info = c.family(c.BUILD_INFO)
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        duration = c.family(c.SCRAPE_DURATION)
        duration.add_metric([], self._last_duration)
        yield duration
        self._last_duration = time.perf_counter() - start

    def _served(self) -> Iterator[Metric]:
        """The families a scrape returns: all of them, less those `exclude_metrics` switches off."""
        pattern = self.config.exclude_metrics
        if pattern is None:
            return self.collect()
        return (family for family in self.collect() if not excluded(pattern, family.name))

    def render(self, accept: str | None, compress: bool = False) -> tuple[bytes, str]:
        """The body (gzip level 1 when `compress`) and its content type.

        A scrape that arrives while another renders waits for the lock, then
        takes the body of a render that started after it arrived, if one did:
        500 clients at once cost a few renders, and share the bodies they hold.
        A body is kept only while someone still waits for it.
        """
        key = (accept, compress)
        with self._queue_lock:
            self._queued += 1
            ticket = self._renders
        try:
            with self._lock:
                shared = self._shared.get(key)
                if shared is not None and shared[0] > ticket:
                    return shared[1], shared[2]
                with self._queue_lock:
                    self._renders += 1
                    number = self._renders
                body, content_type = self._encoder.render(self._served(), accept)
                if compress:
                    body = gzip.compress(body, 1)  # fastest level: 3x quicker than 6, 30% larger
                self._shared[key] = (number, body, content_type)
                return body, content_type
        finally:
            with self._queue_lock:
                self._queued -= 1
                if not self._queued:
                    self._shared.clear()

    def start_compaction(self, interval: float) -> threading.Thread:
        """Compact dead processes' files every `interval` seconds, beside whatever worker does too.

        A Celery worker compacts on its own tick; this covers directories no
        worker tends, such as a web pod whose gunicorn workers publish tasks and
        recycle. Compaction takes its own lock, so several compactors are safe.
        """
        directory = self.config.metrics_dir
        assert directory is not None

        def run() -> None:
            failing = False
            while True:
                try:
                    time.sleep(interval)
                    result = compact(directory)
                    if result.errors:
                        raise OSError(f"{len(result.errors)} archive(s) not written, first: {result.errors[0]}")
                    failing = False
                except Exception as exc:  # noqa: BLE001 - a read-only mount must not stop the service
                    if not failing:
                        log.warning("compaction of %s failed, will retry: %s", directory, exc)
                    failing = True

        thread = threading.Thread(target=run, name="compaction", daemon=True)
        thread.start()
        return thread

    def ready(self) -> tuple[bool, str]:
        if self.directory is not None and not os.path.isdir(self.directory.directory):
            return False, f"metrics directory {self.directory.directory} does not exist"
        for source in self.sources:
            ok, reason = source.ready()
            if not ok:
                return False, reason
        return True, "ready"

    def queues_seen(self) -> set[str]:
        return set(self.directory.last.queues_seen) if self.directory is not None else set()


INDEX = """<!doctype html><html><head><title>celery-signal-exporter</title></head><body>
<h1>celery-signal-exporter {version}</h1>
<p>A Prometheus exporter for Celery, driven by Celery's signals.</p>
<ul><li><a href="metrics">/metrics</a>: the metrics</li>
<li><a href="healthz">/healthz</a>: liveness</li>
<li><a href="readyz">/readyz</a>: readiness</li></ul>
</body></html>
"""


def create_app(exporter: Exporter, users: dict[str, bytes] | None = None) -> FastAPI:
    """The FastAPI app; with `users` (name -> bcrypt hash) every path but
    /healthz needs HTTP basic auth (see celery_signal_exporter.server.webconfig)."""
    app = FastAPI(title="celery-signal-exporter", version=__version__, docs_url=None, redoc_url=None)
    if users:
        from celery_signal_exporter.server.webconfig import BasicAuth

        app.add_middleware(BasicAuth, users=users)

    def get(path: str, **kwargs: Any) -> Callable[[F], F]:
        """GET, and HEAD answered alike without a body (RFC 9110 9.3.2).

        HEAD stays out of the OpenAPI schema: it documents nothing GET does not.
        """
        def register(endpoint: F) -> F:
            app.get(path, **kwargs)(endpoint)
            app.head(path, include_in_schema=False, **kwargs)(endpoint)
            return endpoint
        return register

    # The two headers are declared so that the OpenAPI schema (and a fuzzer
    # reading it) knows /metrics negotiates on them; Accept-Encoding is read
    # from the request itself, since a client may send it on several lines.
    @get("/metrics", response_class=Response)
    async def metrics(request: Request, accept: str | None = Header(default=None),
                      accept_encoding: str | None = Header(default=None)) -> Response:
        given = request.headers.getlist("accept-encoding")
        encoding = choose_encoding(", ".join(given) if given else None)
        headers = {"Vary": "Accept, Accept-Encoding"}
        if encoding is None:
            return PlainTextResponse("no acceptable content coding: this server offers gzip and identity\n",
                                     status_code=406, headers=headers)
        if not await admitted(request.scope):
            headers["Retry-After"] = "1"
            return PlainTextResponse("busy: every response slot is taken (--max-connections)\n",
                                     status_code=503, headers=headers)
        body, content_type = await run_in_threadpool(exporter.render, accept, encoding == "gzip")
        if encoding == "gzip":
            headers["Content-Encoding"] = "gzip"
        return Response(body, media_type=content_type, headers=headers)

    @get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok\n"

    @get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> Any:
        ok, reason = exporter.ready()
        return PlainTextResponse(reason + "\n", status_code=200 if ok else 503)

    @get("/", response_class=HTMLResponse)
    async def index() -> str:
        return INDEX.format(version=__version__)

    return app
