"""The `celery-signal-exporter` command: `serve` and `demo`.

Every option is also an environment variable (shown in --help). A bad option
or value exits 2 with one line, never a usage dump or a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from . import __version__

ENV = "CELERY_EXPORTER_"


def _env(name: str) -> str:
    return ENV + name.upper().replace("-", "_")


def _option(*decls: str, **kwargs: Any) -> Any:
    """A click option that is also an environment variable, shown in --help."""
    name = decls[0].lstrip("-")
    kwargs.setdefault("envvar", _env(name))
    kwargs.setdefault("show_envvar", True)
    kwargs.setdefault("show_default", True)
    return click.option(*decls, **kwargs)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="celery-signal-exporter")
def cli() -> None:
    """Prometheus exporter for Celery, driven by Celery's signals."""


@cli.command()
@_option("--metrics-dir", type=click.Path(file_okay=False), default=None,
         help="Directory the instrumented Celery processes write to (shared emptyDir in a pod). "
              "PROMETHEUS_MULTIPROC_DIR is used when this is unset. Leave unset for a probe-only exporter.")
@_option("--host", default="0.0.0.0", help="Address to listen on.")
@_option("--port", type=click.IntRange(1, 65535), default=9808, help="Port to listen on.")
@_option("--worker-timeout", type=click.FloatRange(min=0.1), default=10.0,
         help="Seconds without a heartbeat after which celery_worker_up reads 0.")
@_option("--broker-url", "broker_urls", multiple=True,
         help="Broker to probe for queue depth and memory; repeat for several. "
              "As an environment variable, separate URLs with spaces.")
@_option("--probe-interval", type=click.FloatRange(min=0.1), default=15.0, help="Seconds between broker probes.")
@_option("--probe-timeout", type=click.FloatRange(min=0.1), default=10.0,
         help="Seconds a broker probe may take before it counts as failed.")
@_option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
         default="info", help="Log level.")
def serve(metrics_dir: str | None, host: str, port: int, worker_timeout: float, broker_urls: tuple[str, ...],
          probe_interval: float, probe_timeout: float, log_level: str) -> None:
    """Serve /metrics: the merged metrics directory plus broker probes."""
    import uvicorn

    from .service import Exporter, ServiceConfig, create_app

    _setup_logging(log_level)
    metrics_dir = metrics_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
    if metrics_dir is None and not broker_urls:
        raise click.UsageError("nothing to export: give --metrics-dir, --broker-url or both")
    if metrics_dir is not None and os.path.exists(metrics_dir) and not os.path.isdir(metrics_dir):
        raise click.BadParameter(f"{metrics_dir} is not a directory", param_hint="--metrics-dir")
    sources = []
    if broker_urls:
        from .probes.setup import build_probe_loops

        sources = build_probe_loops(
            broker_urls, interval=probe_interval, timeout=probe_timeout,
        )
    exporter = Exporter(ServiceConfig(metrics_dir=metrics_dir, worker_timeout=worker_timeout, sources=sources))
    for source in sources:
        source.known_queues = exporter.queues_seen  # type: ignore[attr-defined]
        source.start()  # type: ignore[attr-defined]
    try:
        uvicorn.run(create_app(exporter), host=host, port=port, log_level=log_level.lower(),
                    access_log=log_level.lower() == "debug")
    finally:
        for source in sources:
            source.stop()  # type: ignore[attr-defined]


@cli.command()
@_option("--broker-url", default=None,
         help="Run the demo on this Redis or RabbitMQ broker instead of the built-in filesystem transport.")
@_option("--host", default="127.0.0.1", help="Address the demo's exporter listens on.")
@_option("--port", type=click.IntRange(1, 65535), default=9808, help="Port the demo's exporter listens on.")
@_option("--duration", type=click.FloatRange(min=0), default=0.0, help="Stop after this many seconds (0: run until Ctrl-C).")
def demo(broker_url: str | None, host: str, port: int, duration: float) -> None:
    """Run a real prefork worker, a producer and the exporter; needs no server."""
    from .demo import run_demo

    if broker_url and not broker_url.split("://", 1)[0] in ("redis", "rediss", "amqp", "amqps", "pyamqp"):
        raise click.BadParameter("must be a redis:// or amqp:// URL", param_hint="--broker-url")
    _setup_logging("warning")
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    run_demo(broker_url, host, port, duration)


def main(argv: list[str] | None = None) -> None:
    """Entry point: click without its usage dump, so errors are one line."""
    try:
        cli.main(args=argv, prog_name="celery-signal-exporter", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"celery-signal-exporter: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
