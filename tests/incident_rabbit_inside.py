"""A private RabbitMQ node for one incident: its own node name, ports, data, logs, cookie and
plugins, so raising its memory alarm blocks nobody else's publishers (the shared broker at
127.0.0.1:5672 serves other tests).

Its management statistics are emitted every 5 s / K (the default `collect_statistics_interval`
scaled like every other cadence of the suite), so `mem_alarm` in /api/nodes lags the alarm as
much, relatively, as it does in production.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from tests.harness import free_port, wait_until
from tests.incident_stack import K

RABBIT_BIN = "/usr/lib/rabbitmq/bin"  # the scripts themselves, not /usr/sbin's wrapper that switches user
PRODUCTION_STATS_INTERVAL_MS = 5000  # RabbitMQ's default collect_statistics_interval
# The management database samples node stats at the finest interval of its retention policies
# (5 s by default, whole seconds only): 1 s is the closest to 5 s / K it accepts.
ADVANCED = """[{rabbitmq_management_agent, [{sample_retention_policies, [
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

    def eval(self, erlang: str, timeout: float = 60) -> str:
        """One `rabbitmqctl eval` inside the node (each costs about a second: spawn loops, not calls)."""
        out = subprocess.run([os.path.join(RABBIT_BIN, "rabbitmqctl"), "-n", self.node, "eval", erlang],
                             env=self.env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"rabbitmqctl eval failed on {self.node}:\n{out.stdout}\n{out.stderr}"
        return out.stdout.strip()

    def log(self) -> str:
        parts = []
        for name in sorted(os.listdir(self.log_dir)):
            with open(os.path.join(self.log_dir, name), encoding="utf-8", errors="replace") as f:
                parts.append(f"== {name}\n{f.read()[-3000:]}")
        return "\n".join(parts)


def _require_rabbit() -> None:
    if not os.path.exists(os.path.join(RABBIT_BIN, "rabbitmq-server")):
        pytest.fail(f"{RABBIT_BIN}/rabbitmq-server not found: install Debian's `rabbitmq-server` package",
                    pytrace=False)


@contextmanager
def rabbit_node(tmp: str) -> Iterator[RabbitNode]:
    """Start a RabbitMQ node of our own under `tmp` and stop it after; fail loudly when it cannot start."""
    _require_rabbit()
    base = os.path.join(tmp, f"rabbit-{uuid.uuid4().hex[:6]}")
    os.makedirs(os.path.join(base, "home"))
    os.makedirs(os.path.join(base, "log"))
    port, dist_port, mgmt_port = free_port(), free_port(), free_port()
    node = f"csx{uuid.uuid4().hex[:8]}@localhost"
    conf = os.path.join(base, "rabbitmq.conf")
    with open(conf, "w") as f:
        f.write(f"listeners.tcp.1 = 127.0.0.1:{port}\n"
                f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {mgmt_port}\n"
                f"collect_statistics_interval = {PRODUCTION_STATS_INTERVAL_MS // K}\n")
    plugins = os.path.join(base, "enabled_plugins")
    with open(plugins, "w") as f:
        f.write("[rabbitmq_management].\n")
    env_file = os.path.join(base, "rabbitmq-env.conf")  # ours, instead of /etc/rabbitmq's (the shared node's)
    with open(env_file, "w") as f:
        f.write("# private incident node: everything is set in the environment\n")
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
    with open(os.path.join(base, "advanced.config"), "w") as f:
        f.write(ADVANCED)
    server_log = os.path.join(base, "log", "server-stdout.log")
    with open(server_log, "wb") as log:
        proc = subprocess.Popen([os.path.join(RABBIT_BIN, "rabbitmq-server")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    mgmt = f"http://127.0.0.1:{mgmt_port}"
    rabbit = RabbitNode(f"amqp://guest:guest@127.0.0.1:{port}//", mgmt, node, env, os.path.join(base, "log"))

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the private RabbitMQ node {node} exited {proc.returncode} while starting:\n"
                                 f"{rabbit.log()}")
        try:
            return httpx.get(f"{mgmt}/api/overview", auth=("guest", "guest"), timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        try:
            wait_until(up, 90, f"the private RabbitMQ node {node} to serve its management API on {mgmt_port}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{rabbit.log()}") from None
        yield rabbit
    finally:
        subprocess.run([os.path.join(RABBIT_BIN, "rabbitmqctl"), "-n", node, "stop"], env=env,
                       capture_output=True, timeout=60)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
