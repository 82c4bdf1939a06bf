"""Hostile input: floods of task names, names that need escaping, junk on the queues, bad options."""

from __future__ import annotations

import json
import math
import subprocess
import time
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

import celery_signal_exporter
from celery_signal_exporter.labels import cut
from tests.harness import Samples, env_for, parse, produce, value, wait_until, worker
from tests.harness import exporter as exporter_process
from tests.hostile_names import HOSTILE

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def test_100k_task_names_stay_bounded_per_process_and_across_the_directory(tmp_path: Any) -> None:
    """Five producers publish 20 000 distinct names each: 100 000 names, at most 2 001 series of them."""
    metrics_dir = str(tmp_path / "metrics")
    env = env_for("memory://", metrics_dir)  # publishing through kombu's in-process transport: no broker load
    for p in range(5):
        produce(env, "names_from", p * 20_000, 20_000)
    with exporter_process(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        text = ex.get("/metrics").text
    s = parse(text)
    sent = {dict(labels)["name"]: v for (name, labels), v in s.items() if name == "celery_task_sent_total"}
    # Each process keeps its first 500 names and folds the rest, counting every fold...
    assert value(s, "celery_exporter_dropped_label_values_total", label="name") == 5 * 19_500
    # ...and the exporter keeps the first 2 000 of the 2 500 names left, folding 500 more.
    assert value(s, "celery_exporter_task_names_folded") == 500
    assert len(sent) == 2_001
    assert sent["__overflow__"] == 5 * 19_500 + 500
    assert sum(sent.values()) == 100_000, "no publish is lost to folding"
    # Each of the 2 001 names: its sent counter and its publish-time histogram (9 buckets, +Inf, sum, count).
    assert len(text) < 3_000_000, len(text)


def test_hostile_names_are_escaped_for_promtool_and_both_parsers(redis_url: str, tmp_path: Any) -> None:
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    with worker(env, str(tmp_path), concurrency=2), exporter_process(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        produce(env, "hostile")

        def done() -> Samples | None:
            r = ex.scrape()
            finished = value(r, "celery_task_succeeded_total") + value(r, "celery_task_failed_total")
            return r if finished == 2 * len(HOSTILE) else None

        s = wait_until(done, 60, "the hostile tasks to finish")
        text = ex.get("/metrics").text
        om = ex.get("/metrics", headers={"Accept": OPENMETRICS})
    for name in map(cut, HOSTILE):  # the 10 KB name is cut to 200 characters
        assert value(s, "celery_task_sent_total", name=name, queue_name="alpha") == 1, name[:40]
        assert value(s, "celery_task_succeeded_total", name=name, queue_name="alpha") == 1, name[:40]
        assert value(s, "celery_task_failed_total", name="t.raise_hostile", exception=name) == 1, name[:40]
    assert value(s, "celery_task_failed_total") == len(HOSTILE)
    assert value(s, "celery_exporter_handler_errors_total") == 0

    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    assert om.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(om.text)}
    exceptions = {sample.labels["exception"] for sample in families["celery_task_failed"].samples}
    assert exceptions == set(map(cut, HOSTILE))
    names = {sample.labels["name"] for sample in families["celery_task_succeeded"].samples}
    assert names == set(map(cut, HOSTILE))
    # promtool 2.42 lints OpenMetrics as if it were the classic format, where a counter's HELP names the
    # sample (`_total`): it parses every line, and its only complaint is that missing HELP.
    om_lint = subprocess.run(["promtool", "check", "metrics"], input=om.text, capture_output=True, text=True)
    complaints = [line for line in (om_lint.stdout + om_lint.stderr).splitlines() if line.strip()]
    assert complaints and all(c.endswith("_total no help text") for c in complaints), complaints


def _redis_message(headers: dict[str, Any] | None, body: str = "e30=") -> bytes:
    message: dict[str, Any] = {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
                               "properties": {"delivery_tag": "x"}}
    if headers is not None:
        message["headers"] = headers
    return json.dumps(message).encode()


def test_junk_on_redis_queues_does_not_break_the_probe(redis_url: str, tmp_path: Any) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    due = time.time() - 30
    junk = [
        b"\xff\xfe\x00 not json, not even utf-8",
        b"{ truncated json",
        b"[1, 2, 3]",
        b'"a string"',
        json.dumps({"no": "headers"}).encode(),
        _redis_message({"csx_due": "yesterday"}),
        _redis_message({"csx_due": None}),
        _redis_message({"csx_due": True}),
        b'{"body": "\\"csx_due\\": 5, in a body, not a header", "headers": {}}',
        b'{"headers": {"csx_due": 1e999}}',
        _redis_message({"task": "t.ok"}, body="A" * (8 << 20)),  # 8 MB
    ]
    # kombu pushes on the left and pops on the right: the first pushed (index -1) is the oldest.
    client.lpush("junk", *junk)  # junk[0] is the head
    client.lpush("huge_head", _redis_message({"task": "t.ok"}, body="B" * (16 << 20)))
    client.lpush("mixed", _redis_message({"csx_due": due}), *junk[:5])  # a real head, junk behind it
    for i, item in enumerate(junk):  # each kind of junk at the head of its own queue
        client.lpush(f"head_{i}", item, _redis_message({"csx_due": due}))
    client.set("not_a_list", "a string where a queue should be")
    queues = ["junk", "huge_head", "mixed", "not_a_list", *(f"head_{i}" for i in range(len(junk)))]
    args = ["--broker-url", redis_url, "--probe-interval", "1", "--probe-timeout", "1"]
    for q in queues:
        args += ["--queue", q]
    with exporter_process(str(tmp_path), *args) as ex:
        def probed() -> Samples | None:
            r = ex.scrape()
            return r if value(r, "celery_broker_up") == 1 and value(r, "celery_exporter_probe_duration_seconds") > 0 \
                and value(r, "celery_queue_length", queue_name="mixed") == 6 else None

        s = wait_until(probed, 30, "a probe cycle over the junk")
        for _ in range(3):  # and it stays so, cycle after cycle
            time.sleep(1.1)
            s = ex.scrape()
            assert value(s, "celery_broker_up") == 1
    assert value(s, "celery_queue_length", queue_name="junk") == len(junk)
    assert value(s, "celery_queue_length", queue_name="huge_head") == 1
    assert value(s, "celery_queue_length", queue_name="mixed") == 6
    assert value(s, "celery_queue_length", queue_name="not_a_list") == 0
    assert value(s, "celery_exporter_probe_errors_total") == 0
    age = value(s, "celery_queue_oldest_message_age_seconds", queue_name="mixed")
    assert 30 <= age < 600, age
    for i in range(len(junk)):
        assert value(s, "celery_queue_length", queue_name=f"head_{i}") == 2
    for q in ("junk", "huge_head", "not_a_list", *(f"head_{i}" for i in range(len(junk)))):
        assert not [k for k in s if k[0] == "celery_queue_oldest_message_age_seconds"
                    and ("queue_name", q) in k[1]], f"no age from junk in {q}"


def test_foreign_messages_on_rabbitmq_do_not_break_the_probe(amqp_url: str, tmp_path: Any) -> None:
    from kombu import Connection, Exchange, Producer, Queue

    queue = Queue("foreign", Exchange("foreign", type="direct"), routing_key="foreign")
    bodies: list[tuple[bytes, str, dict[str, Any]]] = [
        (b"plain text, no headers", "text/plain", {}),
        (b"\x00\x01\x02\xff binary", "application/octet-stream", {}),
        (b'{"not": "celery"}', "application/json", {"x-odd": [1, {"nested": None}]}),
        (b"<xml/>", "application/xml", {"csx_due": "not a number"}),
        (b"Z" * (4 << 20), "application/octet-stream", {}),  # 4 MB
    ]
    with Connection(amqp_url) as conn:
        producer = Producer(conn.channel())
        queue(producer.channel).declare()
        for body, content_type, headers in bodies:
            producer.publish(body, exchange=queue.exchange, routing_key="foreign", content_type=content_type,
                             content_encoding="binary", headers=headers, serializer=None)
    args = ["--broker-url", amqp_url, "--queue", "foreign", "--probe-interval", "1", "--probe-timeout", "1"]
    with exporter_process(str(tmp_path), *args) as ex:
        # The management API refreshes its statistics every 5 s.
        s = wait_until(lambda: (r := ex.scrape()) and value(r, "celery_queue_length", queue_name="foreign")
                       == len(bodies) and r, 60, "the probe to see the foreign messages")
    assert value(s, "celery_broker_up") == 1
    assert value(s, "celery_exporter_probe_errors_total") == 0
    assert value(s, "celery_queue_consumers", queue_name="foreign") == 0


@pytest.mark.parametrize("option", ["runtime_buckets", "queue_wait_buckets"])
@pytest.mark.parametrize("bad", [[], [1, 0.5], [-1, 1], [0.1, math.nan], ["0.1", 1], [0.1, None], "0.1,,1", 7,
                                 [True, 2]])
def test_bad_buckets_fail_instrument_with_one_line_naming_the_option(option: str, bad: Any,
                                                                     tmp_path: Any) -> None:
    from celery import Celery

    app = Celery("bad-buckets", broker="memory://", set_as_current=False)
    with pytest.raises(ValueError) as info:
        celery_signal_exporter.instrument(app, metrics_dir=str(tmp_path), **{option: bad})
    message = str(info.value)
    assert message.startswith(f"{option}: ") and "\n" not in message, message
    assert not any(f.endswith(".db") for f in tmp_path.iterdir() if f.is_file()), "nothing was set up"
