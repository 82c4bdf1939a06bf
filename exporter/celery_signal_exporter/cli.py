"""The `celery-signal-exporter` command: `serve`, `check` and `demo`.

Every option is also an environment variable (shown in --help). A bad option
or value exits 2 with one line, never a usage dump or a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from celery_signal_exporter._version import __version__
from celery_signal_exporter.options import metrics_dir_or_env

if TYPE_CHECKING:
    from celery_signal_exporter.probes import ProbeKind
    from celery_signal_exporter.server.config import ServeConfig
    from celery_signal_exporter.server.probe_loop import ProbeGroup
    from celery_signal_exporter.server.webconfig import WebConfig

ENV = "CELERY_EXPORTER_"
F = TypeVar("F", bound=Callable[..., Any])


def _env(name: str) -> str:
    return ENV + name.upper().replace("-", "_")


def _option(*decls: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option that is also an environment variable, shown in --help."""
    name = decls[0].split("/")[0].lstrip("-")  # a flag pair "--x/--no-x" is one variable, X
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


def _registered() -> list[ProbeKind]:
    """The probe registry, read while this module is imported (for options and help);
    a probe file that cannot load is a one-line error here, before click could report it."""
    from celery_signal_exporter.probes import ProbeLoadError, kinds

    try:
        return kinds()
    except ProbeLoadError as exc:
        click.echo(f"celery-signal-exporter: error: {exc}", err=True)
        sys.exit(2)


def _probe_options(f: F) -> F:
    """Every registered probe's own options (see celery_signal_exporter.probes),
    each with its flag, environment variable, default and help as it declares them."""
    seen: set[str] = set()
    for kind in reversed(_registered()):
        for option in reversed(kind.options):
            if option.key in seen:
                continue  # one option shared by several probes is offered once
            seen.add(option.key)
            f = _option(option.flag, option.key, default=option.default, multiple=option.multiple,
                        type=option.type, help=option.help)(f)
    return f


def _broker_schemes() -> str:
    return ", ".join(f"{s}://" for kind in _registered() for s in kind.schemes)


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
         help=f"Broker to probe for queue depth and memory ({_broker_schemes()}); "
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
@_probe_options
@_option("--web-config-file", "--web.config.file", "web_config_file", default=None,
         help="exporter-toolkit web-config YAML: tls_server_config (cert_file, key_file, client_ca_file, "
              "client_auth_type) and basic_auth_users (bcrypt hashes). Protects every endpoint but /healthz.")
@_option("--max-task-names", type=click.IntRange(min=1), default=2000,
         help="Distinct task names shown across the whole metrics directory; the rest are summed under "
              "name=\"__overflow__\" and counted in celery_exporter_task_names_folded.")
@_option("--max-queue-names", type=click.IntRange(min=1), default=1000,
         help="Distinct queue names shown across the whole metrics directory; the rest are summed under "
              "queue_name=\"__overflow__\" and counted in celery_exporter_queue_names_folded.")
@_option("--compact-interval", type=click.FloatRange(min=0), default=30.0,
         help="Seconds between compactions of dead processes' files by the exporter itself, for pods whose "
              "processes recycle without a Celery worker to compact (web servers that publish); 0 disables.")
@_option("--header-timeout", type=click.FloatRange(min=0.1), default=10.0,
         help="Seconds a connection has to send a complete request head, from connect or from the end of the "
              "previous response, before it is closed.")
@_option("--send-timeout", type=click.FloatRange(min=0.1), default=30.0,
         help="Seconds a client may leave a response unread (the send buffer above its high-water mark) "
              "before its connection is dropped.")
@_option("--max-connections", type=click.IntRange(min=1), default=100,
         help="Responses served at once (memory for unread ones is at most this x the size of /metrics); a "
              "/metrics request beyond them waits for a slot, 503 after --header-timeout, and idle connections "
              "past this number are closed oldest first. /healthz and /readyz never wait.")
@_option("--exclude-metrics", default=None,
         help="Regex of metric families not to serve (matched in full, with or without _total); "
              "the workers' CELERY_EXPORTER_EXCLUDE_METRICS stops recording them too.")
@_option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
         default="info", help="Log level.")
def serve(metrics_dir: str | None, host: str, port: int, worker_timeout: float, app_name: str | None,
          broker_urls: tuple[str, ...], probe_interval: float, probe_timeout: float, queues: tuple[str, ...],
          queue_include: tuple[str, ...], queue_exclude: tuple[str, ...], max_queues: int,
          transport_options: str | None, web_config_file: str | None, max_task_names: int, max_queue_names: int,
          compact_interval: float, header_timeout: float, send_timeout: float, max_connections: int,
          exclude_metrics: str | None, log_level: str, **probe_values: Any) -> None:
    """Serve /metrics: the merged metrics directory plus broker probes.

    An unreachable broker is not a startup error (brokers come and go): it is
    logged once and shows as celery_broker_up 0. Use `check` to fail on it.
    """
    from celery_signal_exporter.server.config import DEFAULT_EXCLUDE, ServeConfig
    from celery_signal_exporter.server.serving import run

    _setup_logging(log_level)
    exclude = _exclude(exclude_metrics, "--exclude-metrics")
    web = _web_config(web_config_file)
    metrics_dir = metrics_dir_or_env(metrics_dir)
    options: dict[str, Any] = {}
    if app_name:
        broker_urls, queues, options = _from_app(app_name, broker_urls, queues)
    if transport_options:
        options = _json_option(transport_options, "--transport-options")
    if metrics_dir is None and not broker_urls:
        raise click.UsageError("nothing to export: give --metrics-dir, --broker-url or both")
    if metrics_dir is not None and os.path.exists(metrics_dir):
        if not os.path.isdir(metrics_dir):
            raise click.BadParameter(f"{metrics_dir} is not a directory", param_hint="--metrics-dir")
        if not os.access(metrics_dir, os.R_OK | os.X_OK):
            raise click.BadParameter(f"{metrics_dir} is not readable", param_hint="--metrics-dir")
    if probe_timeout > probe_interval:
        raise click.BadParameter("must not exceed --probe-interval", param_hint="--probe-timeout")
    config = ServeConfig(
        metrics_dir=metrics_dir, worker_timeout=worker_timeout, max_task_names=max_task_names,
        max_queue_names=max_queue_names, compact_interval=compact_interval, exclude_metrics=exclude,
        broker_urls=broker_urls, probe_interval=probe_interval, probe_timeout=probe_timeout, queues=queues,
        queue_include=queue_include, queue_exclude=queue_exclude or DEFAULT_EXCLUDE, max_queues=max_queues,
        transport_options=options, probe_values=probe_values,
        host=host, port=port, web_config=web, header_timeout=header_timeout, send_timeout=send_timeout,
        max_connections=max_connections, log_level=log_level,
    )
    run(config, _build_probes(config), _listen(host, port))


def _exclude(text: str | None, option: str) -> re.Pattern[str] | None:
    """The --exclude-metrics regex, or exit 2 with one line."""
    from celery_signal_exporter.options import parse_exclude

    try:
        return parse_exclude(text, option)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"{option}: "), param_hint=option) from None


def _build_probes(config: ServeConfig) -> list[ProbeGroup]:
    """The probe loops, or exit 2 with one line naming the option at fault."""
    from celery_signal_exporter.probes import OptionError
    from celery_signal_exporter.server.serving import build_probes

    try:
        return build_probes(config)
    except OptionError as exc:
        raise click.BadParameter(exc.message, param_hint=exc.option) from None


def _web_config(path: str | None) -> WebConfig:
    """The parsed web-config file (an empty one when unset); exit 2 on any problem."""
    from celery_signal_exporter.server.webconfig import WebConfig, WebConfigError, load_web_config

    if not path:
        return WebConfig()
    try:
        return load_web_config(path)
    except WebConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--web-config-file") from None


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket before anything starts, so that a bad
    --host (a name that does not resolve, an address not on this machine, an
    IPv6 address without IPv6) or a busy port is one line and exit 2, not a
    uvicorn traceback. `::1` and `[::1]` both mean IPv6 loopback."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    shown = f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
        raise click.BadParameter(f"cannot resolve {bare!r}: {reason}", param_hint="--host") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise click.BadParameter(f"cannot listen on {shown}: {exc.strerror or exc}", param_hint="--host/--port") \
            from None
    sock.set_inheritable(True)
    return sock


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


@cli.command()
@_option("--metrics-dir", default=None,
         help="The directory instrumented processes write to: must exist and be writable by this user "
              "(PROMETHEUS_MULTIPROC_DIR is used when this is unset).")
@_option("--runtime-buckets", default=None,
         help="Histogram bounds in seconds for celery_task_runtime_seconds, comma-separated, e.g. 0.1,1,10.")
@_option("--queue-wait-buckets", default=None,
         help="Histogram bounds in seconds for celery_task_queue_wait_seconds, comma-separated.")
@_option("--memory-growth-buckets", default=None,
         help="Histogram bounds in bytes for celery_task_memory_growth_bytes, comma-separated.")
@_option("--publish-buckets", default=None,
         help="Histogram bounds in seconds for celery_task_publish_seconds, comma-separated.")
@_option("--broker-url", "broker_urls", multiple=True,
         help="Broker(s) to probe once: unlike serve, an unreachable broker is an error here.")
@_option("--probe-timeout", type=click.FloatRange(min=0.1), default=5.0, help="Seconds one broker probe may take.")
@_option("--exclude-metrics", default=None,
         help="Regex of metric families switched off: validated, and every alert left blind is named.")
@_option("--web-config-file", "--web.config.file", "web_config_file", default=None,
         help="Web-config file to validate, as serve would load it.")
@click.pass_context
def check(ctx: click.Context, metrics_dir: str | None, runtime_buckets: str | None, queue_wait_buckets: str | None,
          memory_growth_buckets: str | None, publish_buckets: str | None, broker_urls: tuple[str, ...],
          probe_timeout: float, exclude_metrics: str | None, web_config_file: str | None) -> None:
    """Validate configuration, print one line, exit 0 (ok) or 2 (the first problem).

    Reads the same environment variables the instrumented workers use
    (CELERY_EXPORTER_METRICS_DIR, CELERY_EXPORTER_RUNTIME_BUCKETS,
    CELERY_EXPORTER_QUEUE_WAIT_BUCKETS, CELERY_EXPORTER_MEMORY_GROWTH_BUCKETS,
    CELERY_EXPORTER_PUBLISH_BUCKETS, and the opt-in switches CELERY_EXPORTER_TASK_RESOURCES and
    CELERY_EXPORTER_PUBLISH_TIMING), so it can run as an init container
    in the worker's pod before a bad value costs a silent histogram.
    """
    from celery_signal_exporter.options import OPT_IN_SWITCHES, parse_buckets, switch

    metrics_dir = metrics_dir_or_env(metrics_dir)
    buckets = {"runtime_buckets": runtime_buckets, "queue_wait_buckets": queue_wait_buckets,
               "memory_growth_buckets": memory_growth_buckets, "publish_buckets": publish_buckets}
    switches = [name for name in OPT_IN_SWITCHES if os.environ.get(f"CELERY_EXPORTER_{name}") is not None]
    given = (*buckets.values(), web_config_file, exclude_metrics)
    if not metrics_dir and not broker_urls and not switches and all(v is None for v in given):
        raise click.UsageError("nothing to check: set CELERY_EXPORTER_METRICS_DIR or give --metrics-dir, "
                               "--broker-url or --web-config-file")
    done: list[str] = []
    for name, text in buckets.items():
        if text is None:
            continue
        source = ctx.get_parameter_source(name)
        option = _env(name) if source == click.core.ParameterSource.ENVIRONMENT else "--" + name.replace("_", "-")
        try:
            count = len(parse_buckets(text, option, "bytes" if name == "memory_growth_buckets" else "seconds"))
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        done.append(f"{count} {name.replace('_', ' ')}")
    if exclude_metrics is not None:
        done.append(_check_exclude(ctx, exclude_metrics))
    for name in switches:
        try:
            on = switch(False, name)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        done.append(f"{name.lower().replace('_', ' ')} {'on' if on else 'off'}")
    if metrics_dir:
        _check_writable(metrics_dir)
        done.append(f"metrics directory {metrics_dir} writable")
    if web_config_file:
        _web_config(web_config_file)
        done.append("web config valid")
    for url in broker_urls:
        done.append(_check_broker(url, probe_timeout))
    click.echo("ok: " + "; ".join(done))


def _check_exclude(ctx: click.Context, text: str) -> str:
    """Validate the exclusion regex (exit 2 with one line), and warn, one line each, about the rules
    it leaves blind: they read a family nobody records any more."""
    from celery_signal_exporter import catalogue
    from celery_signal_exporter.mixin.usage import blind_rules
    from celery_signal_exporter.options import excluded

    source = ctx.get_parameter_source("exclude_metrics")
    option = _env("exclude_metrics") if source == click.core.ParameterSource.ENVIRONMENT else "--exclude-metrics"
    pattern = _exclude(text, option)
    if pattern is None:
        return "no metrics excluded"
    families = [spec.name for spec in catalogue.SERVED if excluded(pattern, spec.name)]
    if not families:
        click.echo(f"celery-signal-exporter: warning: {option} matches no metric family", err=True)
    for rule, reads in blind_rules(lambda name: excluded(pattern, name)):
        click.echo(f"celery-signal-exporter: warning: {rule} goes blind: it reads {', '.join(reads)}", err=True)
    return f"{len(families)} metric families excluded"


def _check_writable(path: str) -> None:
    """Exit 2 unless `path` is a directory this user can create files in,
    tried for real: permission bits lie for root and read-only mounts."""
    hint = "--metrics-dir"
    if not os.path.exists(path):
        raise click.BadParameter(f"{path} does not exist", param_hint=hint)
    if not os.path.isdir(path):
        raise click.BadParameter(f"{path} is not a directory", param_hint=hint)
    try:
        fd, probe = tempfile.mkstemp(prefix=".csx-check-", dir=path)
    except OSError as exc:
        raise click.BadParameter(f"{path} is not writable: {exc.strerror or type(exc).__name__}",
                                 param_hint=hint) from None
    os.close(fd)
    os.unlink(probe)


def _check_broker(url: str, timeout: float) -> str:
    """Probe one broker once; exit 2 with the classified reason if it fails."""
    from celery_signal_exporter.probes import probe_for_url
    from celery_signal_exporter.probes.base import ProbeError, ProbeOptions
    from celery_signal_exporter.redact import redact_url, scrub

    label = redact_url(url)
    try:
        probe = probe_for_url(url, ProbeOptions(timeout=timeout))
    except ValueError as exc:
        raise click.BadParameter(scrub(str(exc), url), param_hint="--broker-url") from None
    try:
        snapshot = probe.snapshot(set())
    except ProbeError as exc:
        raise click.ClickException(f"broker {label} probe failed ({exc.reason}): {exc.cause}"
                                   + (f": {exc.message}" if exc.message else "")) from None
    except Exception as exc:  # noqa: BLE001 - a probe bug is still one line, scrubbed
        raise click.ClickException(f"broker {label} probe failed: {type(exc).__name__}: "
                                   f"{scrub(str(exc), url)}") from None
    finally:
        try:
            probe.close()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
    return f"broker {label} up ({len(snapshot.queues)} queues)"


@cli.command()
@_option("--broker-url", default=None,
         help="Run the demo on this Redis or RabbitMQ broker instead of the built-in filesystem transport.")
@_option("--host", default="127.0.0.1", help="Address the demo's exporter listens on.")
@_option("--port", type=click.IntRange(1, 65535), default=9808, help="Port the demo's exporter listens on.")
@_option("--duration", type=click.FloatRange(min=0), default=0.0,
         help="Stop after this many seconds (0: run until Ctrl-C).")
def demo(broker_url: str | None, host: str, port: int, duration: float) -> None:
    """Run a real prefork worker, a producer and the exporter; needs no server."""
    from celery_signal_exporter.demo import run_demo
    from celery_signal_exporter.probes import OptionError

    _setup_logging("warning")
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    try:
        run_demo(broker_url, host, port, duration, _listen(host, port))
    except OptionError as exc:
        raise click.BadParameter(exc.message, param_hint=exc.option) from None


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
