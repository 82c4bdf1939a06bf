"""A private RabbitMQ node: its own node name, ports, data, logs, cookie and plugins, so stopping it
or raising its alarms disturbs nobody (the shared broker at 127.0.0.1:5672 serves other tests).

The one way tests start one: the outage test stops and restarts its application, the alarm tests
raise and clear its resource alarms, and the incident suite (which also scales its statistics
interval by K) lets its memory alarm flap.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from tests.harness import free_port, wait_until

RABBIT_BIN = "/usr/lib/rabbitmq/bin"  # the scripts themselves, not /usr/sbin's wrapper that switches user
# The management database samples node stats at the finest interval of its retention policies
# (5 s by default, whole seconds only): 1 s, for a node whose statistics interval is scaled below 5 s.
FINE_SAMPLES = """[{rabbitmq_management_agent, [{sample_retention_policies, [
    {global, [{605, 1}, {3660, 60}]}, {basic, [{605, 1}, {3600, 60}]}, {detailed, [{10, 1}]}]}]}].
"""


@dataclass
class RabbitNode:
    """How to reach the private node: AMQP URL, management URL, node name, and the CLI's environment."""

    amqp_url: str
    management_url: str
    node: str
    env: dict[str, str] = field(repr=False)
    log_dir: str = ""

    @property
    def label(self) -> str:
        """The AMQP URL without credentials, as the exporter names the broker."""
        return "amqp://" + self.amqp_url.split("@", 1)[1]

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """One `rabbitmqctl` command against this node; a failure fails the test with the node's logs."""
        try:
            out = subprocess.run([os.path.join(RABBIT_BIN, "rabbitmqctl"), "-n", self.node, *args],
                                 env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rabbitmqctl {args[0]} did not finish within {timeout:.0f}s on {self.node}", pytrace=False)
        if out.returncode != 0:
            pytest.fail(f"rabbitmqctl {args[0]} failed ({out.returncode}) on {self.node}:\n{out.stdout[-2000:]}\n"
                        f"{out.stderr[-2000:]}\n{self.log()}", pytrace=False)
        return out.stdout.strip()

    def eval(self, erlang: str, timeout: float = 60) -> str:
        """Erlang run inside the node (each call costs about a second: spawn loops, not calls)."""
        return self.ctl("eval", erlang, timeout=timeout)

    def set_alarm(self, resource: str) -> None:
        """Raise the `memory` or `disk` alarm as rabbit_alarm itself does."""
        self.eval(f"rabbit_alarm:set_alarm({{{{resource_limit, {resource}, node()}}, []}}).")

    def clear_alarm(self, resource: str) -> None:
        self.eval(f"rabbit_alarm:clear_alarm({{resource_limit, {resource}, node()}}).")

    def flap_memory_alarm(self, bursts_ms: list[int], gaps_ms: list[int]) -> None:
        """Raise and clear the memory alarm on this schedule from a process inside the node, started
        by ONE eval, so the bursts are as short as asked; it runs on after this returns."""
        steps = ", ".join(f"{{{b}, {g}}}" for b, g in zip(bursts_ms, gaps_ms, strict=True))
        self.eval("Alarm = {resource_limit, memory, node()}, spawn(fun() -> lists:foreach(fun({B, G}) -> "
                  "rabbit_alarm:set_alarm({Alarm, []}), timer:sleep(B), rabbit_alarm:clear_alarm(Alarm), "
                  f"timer:sleep(G) end, [{steps}]) end), ok.")

    def management_answers(self) -> bool:
        try:
            return httpx.get(f"{self.management_url}/api/overview", auth=("guest", "guest"),
                             timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop_app(self) -> None:
        """Stop the broker application, the Erlang node staying up: an outage."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup")
        wait_until(self.management_answers, 60, "the private node's management API after start_app")

    def log(self) -> str:
        parts = []
        for name in sorted(os.listdir(self.log_dir)):
            with open(os.path.join(self.log_dir, name), encoding="utf-8", errors="replace") as f:
                parts.append(f"== {name}\n{f.read()[-3000:]}")
        return "\n".join(parts)


def _require_rabbit() -> None:
    if not os.path.exists(os.path.join(RABBIT_BIN, "rabbitmq-server")):
        pytest.fail(f"{RABBIT_BIN}/rabbitmq-server not found: install Debian's `rabbitmq-server` package "
                    "(bash .ci/services.sh does)", pytrace=False)


@contextmanager
def rabbit_node(tmp: str, stats_interval_ms: int | None = None) -> Iterator[RabbitNode]:
    """Start a RabbitMQ node of our own under `tmp`, ready once its management API answers; SIGKILL
    its process group after (its data is the test's). `stats_interval_ms`: the management
    statistics interval, RabbitMQ's 5 000 ms unless given. Fails loudly when it cannot start."""
    _require_rabbit()
    base = os.path.join(tmp, f"rabbit-{uuid.uuid4().hex[:6]}")
    os.makedirs(os.path.join(base, "home"))
    os.makedirs(os.path.join(base, "log"))
    port, dist_port, mgmt_port = free_port(), free_port(), free_port()
    node = f"csx{uuid.uuid4().hex[:8]}@localhost"
    conf = os.path.join(base, "rabbitmq.conf")
    with open(conf, "w") as f:
        f.write(f"listeners.tcp.1 = 127.0.0.1:{port}\n"
                f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {mgmt_port}\n")
        if stats_interval_ms is not None:
            f.write(f"collect_statistics_interval = {stats_interval_ms}\n")
    with open(os.path.join(base, "advanced.config"), "w") as f:
        f.write(FINE_SAMPLES if stats_interval_ms is not None and stats_interval_ms < 5000 else "[].\n")
    plugins = os.path.join(base, "enabled_plugins")
    with open(plugins, "w") as f:
        f.write("[rabbitmq_management].\n")
    env_file = os.path.join(base, "rabbitmq-env.conf")  # ours, instead of /etc/rabbitmq's (the shared node's)
    with open(env_file, "w") as f:
        f.write("# private node: everything is set in the environment\n")
    env = dict(os.environ)
    env.update({
        "HOME": os.path.join(base, "home"),  # its own Erlang cookie, shared with our rabbitmqctl only
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": conf,
        "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(base, "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": env_file,
        "RABBITMQ_ENABLED_PLUGINS_FILE": plugins,
        "RABBITMQ_MNESIA_BASE": os.path.join(base, "mnesia"),
        "RABBITMQ_LOG_BASE": os.path.join(base, "log"),
        "RABBITMQ_PID_FILE": os.path.join(base, "rabbit.pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    })
    server_log = os.path.join(base, "log", "server-stdout.log")
    with open(server_log, "wb") as log:
        proc = subprocess.Popen([os.path.join(RABBIT_BIN, "rabbitmq-server")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    rabbit = RabbitNode(f"amqp://guest:guest@127.0.0.1:{port}//", f"http://127.0.0.1:{mgmt_port}", node, env,
                        os.path.join(base, "log"))

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the private RabbitMQ node {node} exited {proc.returncode} while starting:\n"
                                 f"{rabbit.log()}")
        return rabbit.management_answers()

    try:
        try:
            wait_until(up, 90, f"the private RabbitMQ node {node} to serve its management API on {mgmt_port}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{rabbit.log()}") from None
        yield rabbit
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
