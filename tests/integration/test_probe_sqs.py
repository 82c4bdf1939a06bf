"""SQS probe against moto in server mode: real Celery producers and real `celery worker`s on kombu's
SQS transport, the real exporter process; every count exact. Each test has a queue-name prefix of
its own on the session's moto (tests/conftest.py), or a moto server of its own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest

from celery_signal_exporter import catalogue
from celery_signal_exporter.probes import ProbeOptions, probe_for_url
from celery_signal_exporter.probes.base import BrokerSnapshot, ProbeError, QueueStats
from celery_signal_exporter.probes.sqs import SQSProbe, entity_name
from celery_signal_exporter.server.config import ServeConfig
from celery_signal_exporter.server.probe_loop import ProbeLoop
from tests.conftest import MotoServer
from tests.harness import (
    KEY,
    PYTHONPATH,
    REGION,
    ROOT,
    SECRET,
    ExporterProcess,
    Samples,
    broker_url,
    env_for,
    exporter,
    free_port,
    has,
    sqs_client,
    value,
    wait_until,
    worker,
)


def transport(prefix: str, **extra: Any) -> dict[str, Any]:
    # Short long-polls keep the tests quick; the probe reads only region and prefix.
    return {"region": REGION, "queue_name_prefix": prefix, "wait_time_seconds": 1, "polling_interval": 0.2,
            "visibility_timeout": 60, **extra}


def produce(env: dict[str, str], scenario: str, *args: str | int) -> Any:
    out = subprocess.run([sys.executable, "-m", "tests.sqs_app", scenario, *map(str, args)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise AssertionError(f"producer {scenario} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_dead_letter_pair(endpoint: str, prefix: str, name: str, max_receives: int) -> None:
    """`name` with a redrive policy to `name-dlq`; a 1 s visibility timeout so a rejected message
    comes back at once."""
    client = sqs_client(endpoint)
    dlq = client.create_queue(QueueName=f"{prefix}{name}-dlq")["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": str(max_receives)})
    client.create_queue(QueueName=f"{prefix}{name}", Attributes={"RedrivePolicy": policy, "VisibilityTimeout": "1"})
    client.close()


def measure(queue: QueueStats, spec: Any) -> float | None:
    """A queue's figure of the SQS probe's own (delayed, dead letters), None where it reported none."""
    found = [value for s, value in queue.measures if s is spec]
    return found[0] if found else None


def requests_of(snapshot: BrokerSnapshot) -> int:
    """The API requests the SQS probe counted, from its snapshot's own counters."""
    (total,) = [value for spec, value in snapshot.counters if spec is catalogue.PROBE_REQUESTS]
    return int(total)


def scrape_when(ex: ExporterProcess, ready: Callable[[Samples], bool]) -> Callable[[], Samples | None]:
    """A check for wait_until: the scrape once `ready` holds for it."""
    def check() -> Samples | None:
        s = ex.scrape()
        return s if ready(s) else None
    return check


def serve_args(url: str, prefix: str, metrics_dir: str, *extra: str) -> list[str]:
    return ["--metrics-dir", metrics_dir, "--broker-url", url, "--transport-options", json.dumps(transport(prefix)),
            "--probe-interval", "1", "--probe-timeout", "1", *extra]


def test_serve_reports_ready_in_flight_delayed_and_dead_letters_exactly(
        moto_server: MotoServer, sqs_prefix: str, tmp_path: Path) -> None:
    started = time.monotonic()
    url = broker_url(moto_server.endpoint)
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(url, metrics_dir, CSX_TEST_TRANSPORT=json.dumps(transport(sqs_prefix)))
    make_dead_letter_pair(moto_server.endpoint, sqs_prefix, "gamma", max_receives=2)
    produce(env, "ready", "beta", 5)       # nobody consumes beta: 5 waiting
    produce(env, "delayed", "beta", 2, 300)  # SQS holds these 5 minutes: delayed, not waiting
    with exporter(str(tmp_path), *serve_args(url, sqs_prefix, metrics_dir)) as ex:
        def probed(**want: tuple[str, float]) -> Any:
            """A check for wait_until: the scrape once every metric has its (queue, value)."""
            def check() -> Samples | None:
                s = ex.scrape()
                return s if all(value(s, metric, queue_name=q) == v for metric, (q, v) in want.items()) else None
            return check

        s = wait_until(probed(celery_queue_length=("beta", 5), celery_queue_delayed=("beta", 2)), 30, "beta")
        assert value(s, "celery_queue_unacked", queue_name="beta") == 0
        assert value(s, "celery_broker_up", broker=f"sqs://{moto_server.endpoint[7:]}") == 1
        # SQS cannot say these: absent, never 0.
        assert not has(s, "celery_queue_consumers") and not has(s, "celery_queue_oldest_message_age_seconds")
        # The redrive source reports its DLQ's depth (0 now); the DLQ is a queue of its own too.
        assert value(s, "celery_queue_dead_letter_length", queue_name="gamma") == 0
        assert has(s, "celery_queue_length", queue_name="gamma-dlq")
        assert not has(s, "celery_queue_dead_letter_length", queue_name="beta"), "no redrive policy, no series"

        with worker(env, str(tmp_path), queues="alpha", concurrency=1, app="tests.sqs_app") as w_alpha, \
                worker(env, str(tmp_path), queues="gamma", concurrency=1, app="tests.sqs_app") as w_gamma:
            # One acks_late run at a time: the running message is in flight, the other two wait.
            produce(env, "long_runs", "alpha", 3, 20)
            s = wait_until(probed(celery_queue_unacked=("alpha", 1), celery_queue_length=("alpha", 2),
                                  celery_task_started_total=("alpha", 1)), 60, "one alpha run in flight")
            assert value(s, "celery_task_in_progress", queue_name="alpha") == 1
            # Rejected twice each (maxReceiveCount 2), then SQS moves them to gamma-dlq.
            produce(env, "rejects", "gamma", 3)
            s = wait_until(probed(celery_queue_dead_letter_length=("gamma", 3), celery_queue_length=("gamma", 0),
                                  celery_queue_unacked=("gamma", 0)), 90, "3 messages in gamma's DLQ")
            assert value(s, "celery_queue_length", queue_name="gamma-dlq") == 3
            # Each message was delivered and run maxReceiveCount times before SQS moved it.
            runs = {k: v for k, v in s.items() if ("name", "t.dead_letter") in k[1]}
            assert value(s, "celery_task_received_total", name="t.dead_letter", queue_name="gamma") == 6, runs
            assert value(s, "celery_task_started_total", name="t.dead_letter", queue_name="gamma") == 6, runs
            assert value(s, "celery_queue_length", queue_name="beta") == 5, "still nobody on beta"
            assert value(s, "celery_queue_delayed", queue_name="beta") == 2
            logs = w_alpha.log() + w_gamma.log()
        requests = value(s, "celery_exporter_probe_requests_total")
        assert requests > 0
        assert value(s, "celery_exporter_probe_errors_total") == 0
        assert value(s, "celery_exporter_handler_errors_total") == 0, logs
        text = ex.get("/metrics").text + ex.log()
    for secret in (SECRET, KEY, "s3cr%2Ft"):
        assert secret not in text
    print(f"sqs serve test: {time.monotonic() - started:.1f}s, {requests:.0f} requests")


def test_worker_side_counts_are_exact_on_sqs(moto_server: MotoServer, sqs_prefix: str, tmp_path: Path) -> None:
    """tests/integration/test_worker_counts.py's workload (without remote control, which SQS lacks without SNS)."""
    url = broker_url(moto_server.endpoint)
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(url, metrics_dir, CSX_TEST_TRANSPORT=json.dumps(transport(sqs_prefix)))
    with worker(env, str(tmp_path), concurrency=2, app="tests.sqs_app") as w, \
            exporter(str(tmp_path), *serve_args(url, sqs_prefix, metrics_dir)) as ex:
        produce(env, "counts")

        def settled() -> Samples | None:
            s = ex.scrape()
            done = value(s, "celery_task_succeeded_total") + value(s, "celery_task_failed_total")
            drained = value(s, "celery_queue_length", queue_name="alpha") == 0 \
                and value(s, "celery_queue_unacked", queue_name="alpha") == 0 \
                and value(s, "celery_queue_unacked", queue_name="beta") == 0
            return s if done >= 20 + 10 + 10 + 5 and value(s, "celery_task_rejected_total") >= 1 and drained else None

        s = wait_until(settled, 120, "the workload to finish")
        log = w.log()

    def v(metric: str, /, **labels: str) -> float:
        return value(s, metric, **labels)

    assert v("celery_task_sent_total", name="t.ok", queue_name="alpha") == 20
    assert v("celery_task_sent_total", name="t.ok", queue_name="beta") == 10
    assert v("celery_task_sent_total", name="t.retry_twice", queue_name="beta") == 5 * 3
    assert v("celery_task_received_total", name="t.ok", queue_name="alpha") == 20
    assert v("celery_task_received_total", name="t.ok", queue_name="beta") == 10
    assert v("celery_task_received_total", name="t.fail", queue_name="alpha") == 10
    assert v("celery_task_received_total", name="t.retry_twice", queue_name="beta") == 15
    assert v("celery_task_succeeded_total", name="t.ok", queue_name="alpha") == 20
    assert v("celery_task_succeeded_total", name="t.ok", queue_name="beta") == 10
    assert v("celery_task_succeeded_total", name="t.retry_twice", queue_name="beta") == 5
    assert v("celery_task_failed_total", name="t.fail", queue_name="alpha", exception="ValueError") == 6
    assert v("celery_task_failed_total", name="t.fail", queue_name="alpha", exception="KeyError") == 4
    assert v("celery_task_retried_total", name="t.retry_twice", queue_name="beta") == 10
    assert v("celery_task_rejected_total", queue_name="alpha") == 1
    assert v("celery_task_redelivered_total") == 0
    assert v("celery_task_runtime_seconds_count") == 30 + 10 + 15
    assert v("celery_task_queue_wait_seconds_count") == 30 + 10 + 15
    assert v("celery_task_in_progress") == 0
    assert v("celery_worker_up", hostname=w.hostname) == 1
    assert v("celery_exporter_handler_errors_total") == 0, log


def test_fifo_queue_depth_then_drained_by_a_worker(moto_server: MotoServer, sqs_prefix: str, tmp_path: Path) -> None:
    url = broker_url(moto_server.endpoint)
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(url, metrics_dir, CSX_TEST_TRANSPORT=json.dumps(transport(sqs_prefix)))
    produce(env, "ready", "orders.fifo", 4)
    assert entity_name(f"{sqs_prefix}orders.fifo") == f"{sqs_prefix}orders.fifo"
    probe = probe_for_url(url, ProbeOptions(timeout=5, transport_options=transport(sqs_prefix)))
    try:
        assert probe.discover() == {"orders.fifo"}
        (stats,) = probe.snapshot({"orders.fifo"}).queues
        assert (stats.name, stats.length, stats.unacked, measure(stats, catalogue.QUEUE_DELAYED)) == \
            ("orders.fifo", 4, 0, 0)
        with worker(env, str(tmp_path), queues="orders.fifo", concurrency=1, app="tests.sqs_app"):
            def drained() -> bool:
                (q,) = probe.snapshot({"orders.fifo"}).queues
                return q.length == 0 and q.unacked == 0
            wait_until(drained, 60, "the worker to drain the FIFO queue")
    finally:
        probe.close()


def test_requests_per_cycle_are_bounded_by_the_selection_and_counted(
        moto_server: MotoServer, sqs_prefix: str) -> None:
    """One GetQueueAttributes per selected queue (capped by max_queues), one per DLQ outside the selection;
    ListQueues only when discovering; GetQueueUrl once per unknown name, a miss remembered."""
    client = sqs_client(moto_server.endpoint)
    for name in ("a1", "a2", "a3", "a4", "a5"):
        url = client.create_queue(QueueName=f"{sqs_prefix}{name}")["QueueUrl"]
        for _ in range(int(name[1])):
            client.send_message(QueueUrl=url, MessageBody="x")
    make_dead_letter_pair(moto_server.endpoint, sqs_prefix, "src", max_receives=3)
    url = broker_url(moto_server.endpoint)
    probe = probe_for_url(url, ProbeOptions(timeout=5, transport_options=transport(sqs_prefix)))
    assert isinstance(probe, SQSProbe)
    loop = ProbeLoop(probe, url, ServeConfig(max_queues=2, queues=("src",)), discover_every=3)

    def requests() -> int:
        snap = loop._snapshot
        assert snap is not None
        return requests_of(snap)

    try:
        assert loop.probe_once()  # discovery (1 ListQueues) + src and a1 (2) + src's DLQ, not selected (1)
        assert requests() == 4
        assert {q.name: (q.length, measure(q, catalogue.QUEUE_DEAD_LETTER))
                for q in loop._snapshot.queues} == {  # type: ignore[union-attr]
            "src": (0, 0), "a1": (1, None)}
        assert loop.probe_once()
        assert requests() == 4 + 3, "no ListQueues between discoveries"
        assert loop.probe_once()
        assert requests() == 7 + 3
        assert loop.probe_once()  # the 3rd cycle after the first discovers again
        assert requests() == 10 + 4
        # A queue named by the instrumentation but not listed: one GetQueueUrl, its miss remembered.
        loop.config = ServeConfig(max_queues=3, queues=("src", "zz-missing"))
        loop.discover_every = 100
        assert loop.probe_once()  # GetQueueUrl zz-missing (1), src and a1 (2), the DLQ (1)
        assert requests() == 14 + 4
        assert loop.probe_once()
        assert requests() == 18 + 3, "the missing name is not asked for again before the next discovery"
        assert "zz-missing" not in {q.name for q in loop._snapshot.queues}  # type: ignore[union-attr]
    finally:
        loop.stop()
        client.close()


def test_predefined_queues_are_read_without_listing(moto_server: MotoServer, sqs_prefix: str) -> None:
    client = sqs_client(moto_server.endpoint)
    work = client.create_queue(QueueName=f"{sqs_prefix}work")["QueueUrl"]
    other = client.create_queue(QueueName=f"{sqs_prefix}not-predefined")["QueueUrl"]
    for _ in range(3):
        client.send_message(QueueUrl=work, MessageBody="x")
    client.send_message(QueueUrl=other, MessageBody="x")
    options = {"region": REGION, "predefined_queues": {"work": {"url": work, "access_key_id": "AKIDQUEUE",
                                                                "secret_access_key": "queue-secret"}}}
    probe = probe_for_url(broker_url(moto_server.endpoint), ProbeOptions(timeout=5, transport_options=options))
    try:
        assert probe.discover() == {"work"}
        snap = probe.snapshot({"work", "not-predefined"})
        assert [(q.name, q.length) for q in snap.queues] == [("work", 3)]
        assert requests_of(snap) == 1, "one GetQueueAttributes, no ListQueues, no GetQueueUrl"
    finally:
        probe.close()
        client.close()


@contextmanager
def switchable_proxy(target_port: int) -> Iterator[tuple[int, threading.Event]]:
    """A TCP proxy on loopback in front of moto; clearing the event refuses and cuts every connection
    (the endpoint gone), setting it again serves (the endpoint back), on the same port."""
    port = free_port()
    up = threading.Event()
    up.set()
    stop = threading.Event()
    live: list[socket.socket] = []

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve() -> None:
        listener: socket.socket | None = None
        while not stop.is_set():
            if not up.is_set():
                if listener is not None:
                    listener.close()
                    listener = None
                for s in live:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                live.clear()
                time.sleep(0.05)
                continue
            if listener is None:
                listener = socket.socket()
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", port))
                listener.listen(64)
                listener.settimeout(0.1)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", target_port))
            live.extend((conn, upstream))
            threading.Thread(target=pump, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        if listener is not None:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, up
    finally:
        stop.set()
        up.set()
        thread.join(5)


def test_endpoint_going_away_and_coming_back(moto_server: MotoServer, sqs_prefix: str, tmp_path: Path) -> None:
    client = sqs_client(moto_server.endpoint)
    url_q = client.create_queue(QueueName=f"{sqs_prefix}alpha")["QueueUrl"]
    for _ in range(4):
        client.send_message(QueueUrl=url_q, MessageBody="x")
    with switchable_proxy(moto_server.port) as (port, up):
        url = broker_url(f"http://127.0.0.1:{port}")
        broker = f"sqs://127.0.0.1:{port}"
        with exporter(str(tmp_path), "--broker-url", url, "--transport-options", json.dumps(transport(sqs_prefix)),
                      "--probe-interval", "1", "--probe-timeout", "1") as ex:
            wait_until(lambda: value(ex.scrape(), "celery_queue_length", queue_name="alpha") == 4, 20, "alpha at 4")
            up.clear()
            s = wait_until(scrape_when(ex, lambda r: value(r, "celery_broker_up", broker=broker) == 0),
                           20, "the broker down")
            assert not has(s, "celery_queue_length"), "no stale depth while down"
            assert has(s, "celery_exporter_probe_requests_total"), "the request counter survives the outage"
            wait_until(lambda: value(ex.scrape(), "celery_exporter_probe_errors_total", reason="connection") >= 2,
                       20, "connection errors counted")
            assert ex.get("/readyz").status_code == 200
            client.send_message(QueueUrl=url_q, MessageBody="x")
            up.set()
            s = wait_until(scrape_when(ex, lambda r: value(r, "celery_broker_up", broker=broker) == 1),
                           20, "the broker back")
            assert value(s, "celery_queue_length", queue_name="alpha") == 5
            errors = {r: value(s, "celery_exporter_probe_errors_total", reason=r)
                      for r in ("auth", "protocol", "other")}
            assert errors == {"auth": 0, "protocol": 0, "other": 0}
            log = ex.log()
    assert log.count("probe failed") == 1, log
    client.close()


def test_wrong_credentials_are_one_auth_error_and_never_leak(tmp_path: Path) -> None:
    """moto with IAM checks on: a real user and key made through moto's IAM API; a wrong secret and an
    unknown key are `auth` errors, and no spelling of either leaks into /metrics, the log or `check`."""
    server = MotoServer(tmp_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    server.start()
    try:
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name=REGION,
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="celery")
        key = iam.create_access_key(UserName="celery")["AccessKey"]
        iam.put_user_policy(UserName="celery", PolicyName="sqs", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sqs:*", "Resource": "*"}]}))
        good = boto3.client("sqs", endpoint_url=server.endpoint, region_name=REGION,
                            aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        good.create_queue(QueueName="authq")
        ok = probe_for_url(broker_url(server.endpoint, key["AccessKeyId"], key["SecretAccessKey"]),
                           ProbeOptions(timeout=5, transport_options={"region": REGION}))
        assert [(q.name, q.length) for q in ok.snapshot({"authq"}).queues] == [("authq", 0)]
        ok.close()
        wrong_secret = "wr0ng/s3cret+x"
        for bad_key, bad_secret in ((key["AccessKeyId"], wrong_secret), ("AKIDUNKNOWN0001", wrong_secret)):
            bad = probe_for_url(broker_url(server.endpoint, bad_key, bad_secret),
                                ProbeOptions(timeout=5, transport_options={"region": REGION}))
            with pytest.raises(ProbeError) as err:
                bad.snapshot({"authq"})
            bad.close()
            assert err.value.reason == "auth", err.value
            assert bad_secret not in str(err.value) and bad_key not in str(err.value)
        url = broker_url(server.endpoint, "AKIDUNKNOWN0001", wrong_secret)
        with exporter(str(tmp_path), "--broker-url", url, "--transport-options", json.dumps({"region": REGION}),
                      "--queue", "authq", "--probe-interval", "1", "--probe-timeout", "1") as ex:
            auth = "celery_exporter_probe_errors_total"
            s = wait_until(scrape_when(ex, lambda r: value(r, auth, reason="auth") >= 2),
                           20, "auth errors counted")
            assert value(s, "celery_broker_up") == 0
            assert {r: value(s, "celery_exporter_probe_errors_total", reason=r)
                    for r in ("connection", "timeout", "protocol", "other")} == dict.fromkeys(
                        ("connection", "timeout", "protocol", "other"), 0)
            assert ex.get("/readyz").status_code == 503
            text = ex.get("/metrics").text + ex.get("/readyz").text + ex.log()
        assert ex.log().count("probe failed (auth)") == 1
        check = subprocess.run([sys.executable, "-m", "celery_signal_exporter.cli", "check", "--broker-url", url],
                               cwd=ROOT, capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": PYTHONPATH, "AWS_DEFAULT_REGION": REGION})
        assert check.returncode == 2 and "(auth)" in check.stderr, check.stderr
        text += check.stdout + check.stderr
        for leaked in (wrong_secret, "AKIDUNKNOWN0001", "wr0ng%2Fs3cret"):
            assert leaked not in text, leaked
    finally:
        server.stop()


def test_check_probes_an_sqs_url_once(moto_server: MotoServer, sqs_prefix: str) -> None:
    client = sqs_client(moto_server.endpoint)
    client.create_queue(QueueName=f"{sqs_prefix}one")
    check = subprocess.run([sys.executable, "-m", "celery_signal_exporter.cli", "check", "--broker-url",
                            broker_url(moto_server.endpoint)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": PYTHONPATH, "AWS_DEFAULT_REGION": REGION})
    assert check.returncode == 0, check.stderr
    assert f"broker sqs://{moto_server.endpoint[7:]} up" in check.stdout
    assert SECRET not in check.stdout + check.stderr
    client.close()


def test_credentials_from_the_aws_chain_web_identity_as_irsa_gives_them(tmp_path: Path) -> None:
    """No key in the URL: the exporter gets a role's temporary credentials the way IRSA hands them to a
    pod (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE, STS AssumeRoleWithWebIdentity), from moto with IAM
    checks on, so only those credentials can read the queue."""
    # Unchecked: the role, its policy, the queue, 2 messages, then the exporter's AssumeRoleWithWebIdentity.
    server = MotoServer(tmp_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": "6"})
    server.start()
    try:
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name=REGION,
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "sts:AssumeRoleWithWebIdentity",
            "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/oidc.eks.example"}}]}
        role = iam.create_role(RoleName="celery-sqs", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        iam.put_role_policy(RoleName="celery-sqs", PolicyName="sqs", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sqs:*", "Resource": "*"}]}))
        setup = boto3.client("sqs", endpoint_url=server.endpoint, region_name=REGION,
                             aws_access_key_id="setup", aws_secret_access_key="setup")
        queue = setup.create_queue(QueueName="irsa-work")["QueueUrl"]
        for _ in range(2):
            setup.send_message(QueueUrl=queue, MessageBody="x")
        token = tmp_path / "token"
        token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6Y2VsZXJ5In0.c2ln")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({"PYTHONPATH": PYTHONPATH, "AWS_ROLE_ARN": role, "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
                    "AWS_ENDPOINT_URL_STS": server.endpoint, "AWS_DEFAULT_REGION": REGION,
                    "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
        with exporter(str(tmp_path), "--broker-url", f"sqs://127.0.0.1:{server.port}", "--probe-interval", "5",
                      "--probe-timeout", "5", env=env) as ex:  # STS then SQS on a busy machine: no timeout
            s = wait_until(scrape_when(ex, lambda r: has(r, "celery_queue_length", queue_name="irsa-work")),
                           30, "the queue read with the role's credentials")
            assert value(s, "celery_queue_length", queue_name="irsa-work") == 2
            assert value(s, "celery_exporter_probe_errors_total") == 0
        # And the checks are on: a key moto never issued is refused.
        bad = boto3.client("sqs", endpoint_url=server.endpoint, region_name=REGION,
                           aws_access_key_id="AKIDNEVERISSUED", aws_secret_access_key="x")
        with pytest.raises(Exception, match="InvalidClientTokenId"):
            bad.list_queues()
    finally:
        server.stop()


@contextmanager
def fake_sqs(answer: str) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP endpoint on loopback that answers every SQS call the same way: `throttled` (HTTP 400,
    SQS's RequestThrottled in the JSON protocol) or `hang` (reads the request, never answers).
    Yields its address and the operations it was asked for."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls: list[str] = []
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            calls.append(str(self.headers.get("X-Amz-Target", "")).rsplit(".", 1)[-1])
            if answer == "hang":
                release.wait(10)
                return
            body = json.dumps({"__type": "com.amazonaws.sqs#RequestThrottled", "message": "Rate exceeded"}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/x-amz-json-1.0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", calls
    finally:
        release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("answer, reason, cause", [("throttled", "protocol", "RequestThrottled"),
                                                   ("hang", "timeout", "ReadTimeoutError")])
def test_throttled_and_hung_endpoints_are_classified_and_retried_once(answer: str, reason: str, cause: str) -> None:
    with fake_sqs(answer) as (host, calls):
        probe = probe_for_url(f"sqs://{KEY}:{SECRET}@{host}", ProbeOptions(timeout=0.5,
                                                                          transport_options={"region": REGION}))
        assert isinstance(probe, SQSProbe)
        started = time.monotonic()
        with pytest.raises(ProbeError) as err:
            probe.snapshot({"alpha"})
        took = time.monotonic() - started
        requests = probe._requests
        probe.close()
    assert (err.value.reason, err.value.cause) == (reason, cause), err.value
    assert calls == ["ListQueues", "ListQueues"], "one retry (botocore standard mode, 2 attempts), then the error"
    assert requests == 2, "every attempt is counted"
    assert SECRET not in str(err.value) and KEY not in str(err.value)
    print(f"{answer}: {took:.2f}s")


def test_a_missing_predefined_queue_is_an_error_a_listed_one_deleted_is_not(
        moto_server: MotoServer, sqs_prefix: str) -> None:
    client = sqs_client(moto_server.endpoint)
    gone = client.create_queue(QueueName=f"{sqs_prefix}gone")["QueueUrl"]
    kept = client.create_queue(QueueName=f"{sqs_prefix}kept")["QueueUrl"]
    url = broker_url(moto_server.endpoint)
    listed = probe_for_url(url, ProbeOptions(timeout=5, transport_options=transport(sqs_prefix)))
    predefined = probe_for_url(url, ProbeOptions(timeout=5, transport_options={
        "region": REGION, "predefined_queues": {"gone": {"url": gone}, "kept": {"url": kept}}}))
    try:
        assert listed.discover() == {"gone", "kept"}
        client.delete_queue(QueueUrl=gone)
        assert [q.name for q in listed.snapshot({"gone", "kept"}).queues] == ["kept"]
        with pytest.raises(ProbeError) as err:
            predefined.snapshot({"gone", "kept"})
        assert err.value.reason == "protocol" and "NonExistentQueue" in err.value.cause, err.value
    finally:
        listed.close()
        predefined.close()
        client.close()


@pytest.mark.parametrize("url, endpoint, key", [
    ("sqs://", None, None),
    ("sqs://@localhost:4566", "http://localhost:4566", None),
    ("sqs://localhost:4566/", "http://localhost:4566", None),
    ("sqs://AKID:se%2Fcr%40t@", None, "AKID"),
    ("sqs://AKID:se/cr@t@[::1]:4566", "http://[::1]:4566", "AKID"),
])
def test_urls_as_kombu_reads_them(url: str, endpoint: str | None, key: str | None) -> None:
    """No network here: the endpoint and the credentials each URL gives (kombu: http unless is_secure)."""
    probe = probe_for_url(url)
    assert isinstance(probe, SQSProbe)
    assert probe.endpoint == endpoint
    assert probe._credentials[probe._default_key][0] == key
    if key:
        assert probe._credentials[probe._default_key][1] == "se/cr@t"
    secure = probe_for_url("sqs://h:1", ProbeOptions(transport_options={"is_secure": True}))
    assert isinstance(secure, SQSProbe) and secure.endpoint == "https://h:1"
