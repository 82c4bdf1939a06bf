"""A broker password never shows up anywhere the exporter writes.

The password holds every character that breaks naive URL handling
(`@ : / % # ?`, a space, unicode) and is percent-encoded into the URLs, as
kombu expects. A private redis-server requires it, and a RabbitMQ user made
for this test (on the shared node, deleted afterwards) has it. Every output
is captured and searched: /metrics, /readyz, /, /openapi.json and a 404 of
real `serve` processes logging at debug level through a good broker, a
broker that goes away and comes back, a wrong password and an unreachable
host; `check`'s one line for each; the one-line errors of bad URLs; and
the demo's output on a broker that refuses the password; and `--help` of
every command with the URL in the environment.

What is searched for: the password raw, percent-encoded (every common
flavour), its `user:password` and basic-auth (base64) forms, and each of
its alphanumeric fragments alone, so that half a password (urllib splitting
at `#`, say) is caught too. Failures name the output and the fragment's
index, never the secret itself.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest

from tests.conftest import AMQP_HOST, AMQP_PORT, RABBIT_MGMT_PORT
from tests.harness import ROOT, ExporterProcess, RedisServer, exporter_env, free_port, parse, value, wait_until

#: Fragments chosen not to occur in normal output; the separators are the
#: characters that break URL parsing.
FRAGMENTS = ["q7Zx", "K4pW", "M9wv", "T2rj", "Y8sQ", "H3uk", "L6dz", "N5cX", "B1fy"]
SEPARATORS = ["@", ":", "/", "%", "#", "?", " ", "\u00e9\u2603", ";"]
PASSWORD = "".join(f + s for f, s in zip(FRAGMENTS, SEPARATORS, strict=True)) + "R0gm"
RABBIT_USER = f"csx-cred-{uuid.uuid4().hex[:6]}"


def spellings(user: str | None) -> list[str]:
    """Every way the password could be written out whole."""
    out = {PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD), quote_plus(PASSWORD), PASSWORD.encode().hex(),
           quote(PASSWORD, safe="@:/"), repr(PASSWORD)[1:-1], PASSWORD.encode("unicode_escape").decode()}
    if user is not None:
        pair = f"{user}:{PASSWORD}"
        out |= {pair, f"{user}:{quote(PASSWORD, safe='')}", base64.b64encode(pair.encode()).decode()}
    out |= {f":{PASSWORD}", f":{quote(PASSWORD, safe='')}", base64.b64encode(f":{PASSWORD}".encode()).decode()}
    return sorted(out)


SECRETS = spellings(RABBIT_USER) + spellings(None) + [*FRAGMENTS, "R0gm"]


def leaks(text: str) -> list[str]:
    """Which secrets (by index, never by value) occur in `text`, case-insensitively for fragments."""
    found = []
    lowered = text.lower()
    for i, secret in enumerate(SECRETS):
        if secret in text or (len(secret) <= 4 and secret.lower() in lowered):
            found.append(f"secret #{i} (length {len(secret)})")
    return found


class Outputs:
    """Everything captured, by where it came from; checked all at once at the end."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def add(self, where: str, text: str) -> None:
        self.texts[where] = self.texts.get(where, "") + text

    def assert_clean(self) -> None:
        assert self.texts, "nothing was captured"
        problems = [f"{where}: {', '.join(found)}" for where, text in self.texts.items() if (found := leaks(text))]
        # Only names and indices here: the failure message itself must not leak.
        assert not problems, "the broker password leaked into:\n" + "\n".join(problems)


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-m", "celery_signal_exporter.cli",
                          *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env=env or exporter_env())
    return out.returncode, out.stdout + out.stderr


class Serve(ExporterProcess):
    """`serve --log-level debug` whose every byte of output is kept: each response, and its log at the
    end. Its log is never shown on failure: it may hold the very leak under test."""

    def __init__(self, tmp: Path, outputs: Outputs, name: str, *args: str) -> None:
        super().__init__(tmp, "--log-level", "debug", "--metrics-dir", str(tmp), *args, show_log=False)
        self.outputs, self.name = outputs, name

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        response = super().get(path, **kwargs)
        self.outputs.add(f"{self.name} {path}", response.text + str(dict(response.headers)))
        return response

    def all_endpoints(self) -> None:
        for path in ("/metrics", "/readyz", "/", "/openapi.json", "/healthz", "/no-such-page"):
            self.get(path)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.outputs.add(f"{self.name} log", self.log())


@pytest.fixture
def rabbit_user(amqp_vhost: str) -> Iterator[str]:
    """A monitoring user with the awkward password on a fresh vhost."""
    from pyrabbit2.api import Client

    admin = Client(f"{AMQP_HOST}:{RABBIT_MGMT_PORT}", "guest", "guest")
    admin.create_user(RABBIT_USER, PASSWORD, tags="monitoring")
    admin.set_vhost_permissions(amqp_vhost, RABBIT_USER, ".*", ".*", ".*")
    try:
        yield f"amqp://{RABBIT_USER}:{quote(PASSWORD, safe='')}@{AMQP_HOST}:{AMQP_PORT}/{amqp_vhost}"
    finally:
        admin.delete_user(RABBIT_USER)


def broker_up(s: Serve, label: str) -> float:
    return value(parse(s.get("/metrics").text), "celery_broker_up", broker=label)


def test_password_never_appears_in_any_output(tmp_path: Path, rabbit_user: str, amqp_vhost: str) -> None:
    outputs = Outputs()
    with RedisServer(tmp_path, password=PASSWORD) as redis:
        redis_url = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{redis.port}/0"
        redis_label = f"redis://127.0.0.1:{redis.port}/0"
        rabbit_label = f"amqp://{AMQP_HOST}:{AMQP_PORT}/{amqp_vhost}"
        closed = free_port()

        # Good credentials, then the Redis server goes away and comes back.
        with Serve(tmp_path, outputs, "good", "--broker-url", redis_url, "--broker-url", rabbit_user,
                   "--probe-interval", "0.5", "--probe-timeout", "0.5") as s:
            wait_until(lambda: broker_up(s, redis_label) == 1 and broker_up(s, rabbit_label) == 1, 30,
                       "both brokers up with the awkward password")
            s.all_endpoints()
            redis.kill()
            wait_until(lambda: broker_up(s, redis_label) == 0, 10, "Redis down")
            s.all_endpoints()
            redis.start()
            wait_until(lambda: broker_up(s, redis_label) == 1, 15, "Redis back")
            s.all_endpoints()

        # Wrong passwords (auth errors) and an unreachable host (connection errors).
        wrong_redis = redis_url.replace("R0gm", "R0gn")
        wrong_rabbit = rabbit_user.replace("R0gm", "R0gn")
        unreachable = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{closed}/0"
        unreachable_rabbit = f"amqp://{RABBIT_USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{closed}//"
        with Serve(tmp_path, outputs, "bad", "--broker-url", wrong_redis, "--broker-url", wrong_rabbit,
                   "--broker-url", unreachable, "--probe-interval", "0.5", "--probe-timeout", "0.5") as s, \
             Serve(tmp_path, outputs, "bad-mgmt", "--broker-url", unreachable_rabbit,
                   "--rabbitmq-management-url", f"http://127.0.0.1:{closed}", "--probe-interval", "0.5",
                   "--probe-timeout", "0.5") as s2:
            def failing() -> bool:
                errors = parse(s.get("/metrics").text)
                return all(value(errors, "celery_exporter_probe_errors_total", broker=b) >= 2 for b in
                           (redis_label, rabbit_label, f"redis://127.0.0.1:{closed}/0"))

            wait_until(failing, 30, "two failed cycles for every bad broker")
            s.all_endpoints()
            s2.all_endpoints()
            samples = parse(s.get("/metrics").text)
            assert value(samples, "celery_exporter_probe_errors_total", broker=redis_label, reason="auth") >= 1
            assert value(samples, "celery_exporter_probe_errors_total", broker=rabbit_label, reason="auth") >= 1

        # The demo on a broker that refuses the password: its errors are kombu's and Celery's.
        code, text = cli("demo", "--broker-url", wrong_redis, "--port", str(free_port()), "--duration", "4")
        outputs.add("demo", text)
        assert code == 0, f"demo exited {code}"
        refused = "invalid username-password pair" in text
        assert refused, "the demo did not report the refused password"

        # check: one line each, exit 0 for good and 2 for bad.
        for url, expected in [(redis_url, 0), (rabbit_user, 0), (wrong_redis, 2), (wrong_rabbit, 2),
                              (unreachable, 2)]:
            code, text = cli("check", "--broker-url", url)
            outputs.add(f"check #{len(outputs.texts)}", text)
            assert code == expected, f"check exited {code}, not {expected}"
            assert len(text.strip().splitlines()) == 1, "check printed more than one line"

    # One-line startup errors that involve the URL.
    for url in (f"kafka://u:{quote(PASSWORD, safe='')}@h:9092",
                f"redis://:{quote(PASSWORD, safe='')}@h:99999/0",
                f"redis://:{quote(PASSWORD, safe='')}@h/zero",
                f"amqp://u:{quote(PASSWORD, safe='')}@h:port//",
                f"redis://:{PASSWORD}@h:6379/0x"):  # not encoded at all, as users do
        code, text = cli("serve", "--broker-url", url)
        outputs.add(f"serve error #{len(outputs.texts)}", text)
        assert code == 2 and len(text.strip().splitlines()) == 1, f"exit {code} with {len(text.splitlines())} lines"

    # --help, with the URL where an operator would put it.
    env = {**exporter_env(), "CELERY_EXPORTER_BROKER_URL": redis_url,
           "CELERY_EXPORTER_RABBITMQ_MANAGEMENT_PASSWORD": PASSWORD}
    for args in (["--help"], ["serve", "--help"], ["check", "--help"], ["demo", "--help"]):
        code, text = cli(*args, env=env)
        assert code == 0
        outputs.add(" ".join(args), text)

    outputs.assert_clean()
    assert len(outputs.texts) > 30
    # The logs really hold the failures (booleans only: never print a log here).
    outage_logged = f"broker {redis_label} probe failed (connection)" in outputs.texts["good log"]
    auth_logged = f"broker {redis_label} probe failed (auth)" in outputs.texts["bad log"]
    debug_logged = " DEBUG " in outputs.texts["good log"] + outputs.texts["bad log"]
    assert outage_logged and auth_logged and debug_logged, (outage_logged, auth_logged, debug_logged)


def test_the_leak_detector_detects() -> None:
    """The search itself: each spelling and a lone fragment are found, unrelated text is not."""
    for text in (f"x {PASSWORD} y", quote(PASSWORD, safe=""), f"half: {PASSWORD[:12]}",
                 f"Basic {base64.b64encode(f'{RABBIT_USER}:{PASSWORD}'.encode()).decode()}"):
        assert leaks(text), "a spelling of the password went unnoticed"
    clean = f"broker redis://127.0.0.1:6379/0 probe failed at {time.time()} {uuid.uuid4()}"
    assert not leaks(clean)
    assert not re.search("|".join(FRAGMENTS), "celery_exporter_probe_errors_total")
