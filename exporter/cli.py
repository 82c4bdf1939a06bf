"""The `celery-signal-exporter` command: `serve` and `demo`.

Every option is also an environment variable (shown in --help). A bad option
or value exits 2 with one line, never a usage dump or a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import __version__

ENV = "CELERY_EXPORTER_"
F = TypeVar("F", bound=Callable[..., Any])


def _env(name: str) -> str:
    return ENV + name.upper().replace("-", "_")


def _option(*decls: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option that is also an environment variable, shown in --help."""
    name = decls[0].lstrip("-")
    kwargs.setdefault("envvar", _env(name))
    kwargs.setdefault("show_envvar", True)
    kwargs.setdefault("show_default", True)
    decorator: Callable[[F], F] = click.option(*decls, **kwargs)
    return decorator


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
@_option("--app", "app_name", default=None,
         help="Celery app (module:attribute) to read the broker URL, queues and transport options from.")
@_option("--broker-url", "broker_urls", multiple=True,
         help="Broker to probe for queue depth and memory (redis://, rediss://, sentinel://, amqp://, amqps://); "
              "repeat for several. As an environment variable, separate URLs with spaces.")
@_option("--probe-interval", type=click.FloatRange(min=0.1), default=15.0, help="Seconds between broker probes.")
@_option("--probe-timeout", type=click.FloatRange(min=0.1), default=10.0,
         help="Seconds a broker probe may take before it counts as failed; at most the interval.")
@_option("--queue", "queues", multiple=True, help="Queue to always report, besides those discovered; repeatable.")
@_option("--queue-include", multiple=True, help="Regex: report only queues matching one of these; repeatable.")
@_option("--queue-exclude", multiple=True,
         help="Regex: never report matching queues; repeatable. Replaces the default, which hides Celery's "
              "pidbox, event and anonymous AMQP queues.")
@_option("--max-queues", type=click.IntRange(min=1), default=1000, help="Most queues reported per broker.")
@_option("--transport-options", default=None,
         help='JSON of kombu broker_transport_options, e.g. \'{"priority_steps": [0, 5, 9]}\'; '
              "defaults to the --app's.")
@_option("--oldest-age/--no-oldest-age", default=True,
         help="Redis: read the head message of each queue for celery_queue_oldest_message_age_seconds.")
@_option("--rabbitmq-management-url", default=None,
         help="RabbitMQ management API, e.g. https://rabbit:15671; derived from the broker URL when unset.")
@_option("--rabbitmq-management-user", default=None, help="Management API user, when not the broker's.")
@_option("--rabbitmq-management-password", default=None, help="Management API password, when not the broker's.")
@_option("--rabbitmq-vhost", "rabbitmq_vhosts", multiple=True, help="Extra RabbitMQ vhost to report; repeatable.")
@_option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
         default="info", help="Log level.")
def serve(metrics_dir: str | None, host: str, port: int, worker_timeout: float, app_name: str | None,
          broker_urls: tuple[str, ...], probe_interval: float, probe_timeout: float, queues: tuple[str, ...],
          queue_include: tuple[str, ...], queue_exclude: tuple[str, ...], max_queues: int,
          transport_options: str | None, oldest_age: bool, rabbitmq_management_url: str | None,
          rabbitmq_management_user: str | None, rabbitmq_management_password: str | None,
          rabbitmq_vhosts: tuple[str, ...], log_level: str) -> None:
    """Serve /metrics: the merged metrics directory plus broker probes."""
    import uvicorn

    from .service import Exporter, ServiceConfig, create_app

    _setup_logging(log_level)
    metrics_dir = metrics_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
    options: dict[str, Any] = {}
    if app_name:
        broker_urls, queues, options = _from_app(app_name, broker_urls, queues)
    if transport_options:
        options = _json_option(transport_options, "--transport-options")
    if metrics_dir is None and not broker_urls:
        raise click.UsageError("nothing to export: give --metrics-dir, --broker-url or both")
    if metrics_dir is not None and os.path.exists(metrics_dir) and not os.path.isdir(metrics_dir):
        raise click.BadParameter(f"{metrics_dir} is not a directory", param_hint="--metrics-dir")
    if probe_timeout > probe_interval:
        raise click.BadParameter("must not exceed --probe-interval", param_hint="--probe-timeout")
    sources: list[Any] = []
    if broker_urls:
        sources = [_probe_group(
            broker_urls, probe_interval, probe_timeout, queues, queue_include, queue_exclude, max_queues, options,
            oldest_age, rabbitmq_management_url, rabbitmq_management_user, rabbitmq_management_password,
            rabbitmq_vhosts,
        )]
    exporter = Exporter(ServiceConfig(metrics_dir=metrics_dir, worker_timeout=worker_timeout, sources=sources))
    for source in sources:
        source.known_queues = exporter.queues_seen
        source.start()
    try:
        uvicorn.run(create_app(exporter), host=host, port=port, log_level=log_level.lower(),
                    access_log=log_level.lower() == "debug")
    finally:
        for source in sources:
            source.stop()


def _json_option(text: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=name) from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint=name)
    return value


def _from_app(name: str, broker_urls: tuple[str, ...], queues: tuple[str, ...]) -> tuple[
        tuple[str, ...], tuple[str, ...], dict[str, Any]]:
    """Broker URL, queue names and transport options from the user's Celery app."""
    from celery.app.utils import find_app

    try:
        app = find_app(name)
    except Exception as exc:  # noqa: BLE001 - any import error is a bad option
        raise click.BadParameter(f"cannot load {name}: {type(exc).__name__}: {exc}", param_hint="--app") from None
    conf = app.conf
    urls = broker_urls or tuple(u for u in [conf.broker_url] if u)
    names = queues + tuple(q.name for q in (conf.task_queues or ())) + ((conf.task_default_queue,)
                                                                        if conf.task_default_queue else ())
    return urls, tuple(dict.fromkeys(names)), dict(conf.broker_transport_options or {})


def _probe_group(urls: tuple[str, ...], interval: float, timeout: float, queues: tuple[str, ...],
                 include: tuple[str, ...], exclude: tuple[str, ...], max_queues: int, transport: dict[str, Any],
                 oldest_age: bool, mgmt_url: str | None, mgmt_user: str | None, mgmt_password: str | None,
                 vhosts: tuple[str, ...]) -> Any:
    from urllib.parse import urlsplit

    from .probes.base import ProbeOptions
    from .probes.loop import DEFAULT_EXCLUDE, LoopOptions, ProbeGroup, build_probe_loops

    mgmt: dict[str, Any] = {}
    if mgmt_url:
        parts = urlsplit(mgmt_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise click.BadParameter("must be http(s)://host[:port]", param_hint="--rabbitmq-management-url")
        mgmt = {"mgmt_host": parts.hostname, "mgmt_port": parts.port, "mgmt_https": parts.scheme == "https"}
    try:
        loop_options = LoopOptions(queues=queues, include=include, exclude=exclude or DEFAULT_EXCLUDE,
                                   max_queues=max_queues)
        probe_options = ProbeOptions(transport_options=transport, read_oldest_age=oldest_age,
                                     mgmt_username=mgmt_user, mgmt_password=mgmt_password,
                                     extra_vhosts=vhosts, **mgmt)
        loops = build_probe_loops(urls, interval=interval, timeout=timeout, probe_options=probe_options,
                                  loop_options=loop_options)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker-url") from None
    return ProbeGroup(loops)


@cli.command()
@_option("--broker-url", default=None,
         help="Run the demo on this Redis or RabbitMQ broker instead of the built-in filesystem transport.")
@_option("--host", default="127.0.0.1", help="Address the demo's exporter listens on.")
@_option("--port", type=click.IntRange(1, 65535), default=9808, help="Port the demo's exporter listens on.")
@_option("--duration", type=click.FloatRange(min=0), default=0.0,
         help="Stop after this many seconds (0: run until Ctrl-C).")
def demo(broker_url: str | None, host: str, port: int, duration: float) -> None:
    """Run a real prefork worker, a producer and the exporter; needs no server."""
    from .demo import run_demo

    if broker_url and broker_url.split("://", 1)[0] not in ("redis", "rediss", "amqp", "amqps", "pyamqp"):
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
