"""A clock stepped backwards: a worker restarted under the same hostname after its pod's clock was put right.

The first worker and the exporter run an hour ahead (Debian's libfaketime),
then the pod's clock is put right: the worker and the exporter restart on the
true time. Everything the first worker wrote is stamped an hour into the new
clock's future; none of it may beat what the live worker writes now.

(Stepping a running process's clock through FAKETIME_TIMESTAMP_FILE made
libfaketime's sleeps fail with EINVAL in about one run in three, so each
process keeps one clock for its life, as a restarted pod's do.)
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.harness import env_for, exporter, produce, value, wait_until, worker

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def _faked(env: dict[str, str], offset: str) -> dict[str, str]:
    """`env` for a process whose wall clock runs `offset` ("+1h") from the true time."""
    if not os.path.exists(LIBFAKETIME):
        pytest.fail(f"{LIBFAKETIME} is missing: install Debian's faketime (apt-get install faketime)", pytrace=False)
    return {**env, "LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def test_a_live_worker_beats_what_it_wrote_before_its_clock_was_stepped_back(redis_url: str, tmp_path: Any) -> None:
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    hostname = "stepped@test"
    with exporter(str(tmp_path), "--metrics-dir", metrics_dir, "--worker-timeout", "5",
                  env=_faked(env, "+1h")) as ex, worker(_faked(env, "+1h"), str(tmp_path), hostname=hostname):
        produce(env, "many", 5)
        first = wait_until(lambda: (s := ex.scrape()) and value(s, "celery_task_succeeded_total") == 5 and s,
                           60, "5 successes an hour ahead")
    before = value(first, "celery_task_last_success_timestamp_seconds", name="t.ok")
    # The pod's clock is put right, an hour back; its worker and exporter start again.
    with exporter(str(tmp_path), "--metrics-dir", metrics_dir, "--worker-timeout", "5", env=env) as ex, \
            worker(env, str(tmp_path), hostname=hostname):
        seen: list[float] = []
        for batch in range(1, 11):
            produce(env, "many", 1)
            want = 5 + batch
            s = wait_until(lambda want=want: (r := ex.scrape())  # type: ignore[misc]
                           and value(r, "celery_task_succeeded_total") == want and r, 60, f"success {want}")
            assert value(s, "celery_worker_up", hostname=hostname) == 1, f"live worker read down, batch {batch}"
            seen.append(value(s, "celery_task_last_success_timestamp_seconds", name="t.ok"))
    assert before > seen[0] + 3000, "the first worker's successes were not stamped an hour ahead"
    assert seen == sorted(seen) and len(set(seen)) >= 8, f"last success froze instead of following: {seen}"
