"""The per-process store and the directory merge, on real files written by real (forked, some then
dead) processes, read by the exporter's own DirectoryCollector:

- the store's files: prometheus-client compatible, one per forked child, growing, damaged, capped;
- the merge's part in issue 17's targets: `celery_task_revoked_total{reason="expired"}` (and exhausted
  retries) served at 0 beside each task's counters until a real one takes over, never twice, never
  going back, and only where a task counter exists; a worker's stopped mark (heartbeat 0, written at
  graceful shutdown) ends its `celery_worker_up` series, through compaction and against older or newer
  words of the same hostname;
- a file growing while it is read is never damaged and never goes backwards (children recycling for
  hours: tests/integration/test_merge_trust.py).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from celery_signal_exporter import catalogue as c
from celery_signal_exporter import compact as compaction
from celery_signal_exporter.directory import read_entries, series_key
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import MetricFile, Store
from celery_signal_exporter.server.collect import DirectoryCollector
from tests.harness import write_as_dead_process
from tests.recorded import merged_samples, observe


def test_files_are_prometheus_client_compatible(tmp_path: pytest.TempPathFactory) -> None:
    store = Store(str(tmp_path))
    m.Recorder(store, c.SENT).labels("a", "q").inc(3)
    observe(store, m.Recorder(store, c.RUNTIME, (0.1, 1)).labels("a", "q"), 0.5)
    m.Recorder(store, c.IN_PROGRESS).labels("a", "q").inc(2)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    stock = generate_latest(registry).decode()
    assert 'celery_task_sent_total{name="a",queue_name="q"} 3.0' in stock
    assert 'celery_task_runtime_seconds_bucket{le="1.0",name="a",queue_name="q"} 1.0' in stock
    ours = merged_samples(DirectoryCollector(str(tmp_path)))
    assert ours['celery_task_sent_total{name="a",queue_name="q"}'] == 3
    assert ours['celery_task_runtime_seconds_bucket{le="0.1",name="a",queue_name="q"}'] == 0
    assert ours['celery_task_runtime_seconds_bucket{le="1",name="a",queue_name="q"}'] == 1
    assert ours['celery_task_runtime_seconds_count{name="a",queue_name="q"}'] == 1
    assert ours['celery_task_runtime_seconds_sum{name="a",queue_name="q"}'] == 0.5
    assert ours['celery_task_in_progress{name="a",queue_name="q"}'] == 2


def test_forked_children_write_their_own_files_and_sum(tmp_path: pytest.TempPathFactory) -> None:
    store = Store(str(tmp_path))
    sent = m.Recorder(store, c.SENT)
    sent.labels("a", "q").inc()
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # child: the cached series must rebind to the child's own file
            sent.labels("a", "q").inc(10)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    files = sorted(f for f in os.listdir(tmp_path) if f.startswith("counter_"))
    assert len(files) == 4
    assert merged_samples(DirectoryCollector(str(tmp_path)))['celery_task_sent_total{name="a",queue_name="q"}'] == 31


def test_reopened_file_keeps_counting_from_its_values(tmp_path: pytest.TempPathFactory) -> None:
    path = str(tmp_path / "counter_1.db")
    f = MetricFile(path)
    f.add(f.slot("k1"), 2)
    f.add(f.slot("k2"), 5)
    f.close()
    again = MetricFile(path)  # pid reuse: same file, values carry on
    again.add(again.slot("k2"), 1)
    with open(path, "rb") as raw:
        assert [(k, v) for k, v, _ in read_entries(raw.read())] == [("k1", 2.0), ("k2", 6.0)]


def test_file_grows_past_its_first_size(tmp_path: pytest.TempPathFactory) -> None:
    store = Store(str(tmp_path))
    sent = m.Recorder(store, c.SENT)
    for i in range(3000):  # ~300 KB of keys, several doublings
        sent.labels(f"task-{i}", "q").inc(i)
    ours = merged_samples(DirectoryCollector(str(tmp_path), max_task_names=3000))
    assert ours['celery_task_sent_total{name="task-2999",queue_name="q"}'] == 2999
    assert len([k for k in ours if k.startswith("celery_task_sent_total")]) == 3000


def test_damaged_files_are_skipped_and_counted(tmp_path: pytest.TempPathFactory) -> None:
    store = Store(str(tmp_path))
    m.Recorder(store, c.SENT).labels("a", "q").inc(7)
    (tmp_path / "counter_999.db").write_bytes(b"")  # 0-byte: fails prometheus-client's whole scrape
    (tmp_path / "counter_998.db").write_bytes(b"\xff" * 100)  # garbage
    good = next(p for p in os.listdir(tmp_path) if p.startswith("counter_") and p not in
                ("counter_999.db", "counter_998.db"))
    data = (tmp_path / good).read_bytes()
    (tmp_path / "counter_997.db").write_bytes(data[:20])  # truncated
    (tmp_path / "notes.txt").write_text("not ours")
    collector = DirectoryCollector(str(tmp_path))
    ours = merged_samples(collector)
    assert ours['celery_task_sent_total{name="a",queue_name="q"}'] == 7
    assert collector.last.files_unreadable == 3
    assert collector.last.files_read == 1
    assert sorted(os.listdir(tmp_path)) == sorted(["counter_997.db", "counter_998.db", "counter_999.db",
                                                   good, "notes.txt"]), "nothing is deleted"


def test_missing_directory_is_an_empty_merge(tmp_path: pytest.TempPathFactory) -> None:
    collector = DirectoryCollector(str(tmp_path / "absent"))
    assert merged_samples(collector) == {"celery_exporter_task_names_folded{}": 0,
                                         "celery_exporter_queue_names_folded{}": 0}


def test_heartbeat_becomes_worker_up(tmp_path: pytest.TempPathFactory) -> None:
    import time

    store = Store(str(tmp_path))
    beat = m.Recorder(store, c.HEARTBEAT)
    now = time.time()
    beat.labels("fresh@h").set(now, now)
    beat.labels("stale@h").set(now - 60, now - 60)
    beat.labels("stopped@h").set(0.0, now)
    ours = merged_samples(DirectoryCollector(str(tmp_path), worker_timeout=10))
    # A worker that stopped gracefully wrote 0: its series ends instead of reading 0 (no page).
    assert ours == {'celery_worker_up{hostname="fresh@h"}': 1, 'celery_worker_up{hostname="stale@h"}': 0,
                    "celery_exporter_task_names_folded{}": 0,
                    "celery_exporter_queue_names_folded{}": 0}


def test_live_gauge_of_a_previous_process_with_our_pid_is_not_inherited(tmp_path: pytest.TempPathFactory) -> None:
    first = Store(str(tmp_path))
    m.Recorder(first, c.IN_PROGRESS).labels("a", "q").inc(4)
    m.Recorder(first, c.SENT).labels("a", "q").inc(4)
    first.close()
    second = Store(str(tmp_path))  # same pid, new process life
    m.Recorder(second, c.IN_PROGRESS).labels("a", "q").inc(1)
    m.Recorder(second, c.SENT).labels("a", "q").inc(1)
    ours = merged_samples(DirectoryCollector(str(tmp_path)))
    assert ours['celery_task_in_progress{name="a",queue_name="q"}'] == 1
    assert ours['celery_task_sent_total{name="a",queue_name="q"}'] == 5


def test_hostile_label_values_round_trip(tmp_path: pytest.TempPathFactory) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from celery_signal_exporter.labels import MAX_LABEL_LENGTH, cut
    from celery_signal_exporter.server.config import ServeConfig
    from celery_signal_exporter.server.service import Exporter

    hostile = ['quote " back \\ slash', "new\nline", "unicodé ✓", "x" * 10_000]
    store = Store(str(tmp_path))
    for name in hostile:
        m.Recorder(store, c.FAILED).labels(name, "q", name).inc()
    body, _ = Exporter(ServeConfig(metrics_dir=str(tmp_path))).render(None)
    names = {s.labels["name"] for f in text_string_to_metric_families(body.decode())
             for s in f.samples if s.name == "celery_task_failed_total"}
    assert names == {*hostile[:3], cut(hostile[3])}, "short values round trip; a long one is cut, as writers cut it"
    assert max(map(len, names)) == MAX_LABEL_LENGTH


def test_pool_gauges_of_a_worker_with_a_stale_heartbeat_are_dropped(tmp_path: pytest.TempPathFactory) -> None:
    """A hung worker main (SIGSTOP, a stuck timer) stops vouching for its pool after the timeout."""
    import time

    store = Store(str(tmp_path))
    now = time.time()
    for host, stamp in (("fresh@h", now), ("stale@h", now - 60)):
        m.Recorder(store, c.HEARTBEAT).labels(host).set(stamp, stamp)
        m.Recorder(store, c.POOL_PROCESSES).labels(host).set(4)
        m.Recorder(store, c.TASKS_ACTIVE).labels(host).set(3)
        m.Recorder(store, c.RESIDENT_MEMORY).labels(host).set(5e8)
        m.Recorder(store, c.POOL_PROCESS_MAX_MEMORY).labels(host).set(1e8)
        for spec in (c.TASKS_RESERVED, c.TASKS_SCHEDULED, c.CONSUMING):  # per (hostname, queue)
            m.Recorder(store, spec).labels(host, "q").set(2)
    ours = merged_samples(DirectoryCollector(str(tmp_path), worker_timeout=10))
    assert {k: v for k, v in ours.items() if k.startswith("celery_worker_")} == {
        'celery_worker_up{hostname="fresh@h"}': 1, 'celery_worker_up{hostname="stale@h"}': 0,
        'celery_worker_pool_processes{hostname="fresh@h"}': 4, 'celery_worker_tasks_active{hostname="fresh@h"}': 3,
        'celery_worker_resident_memory_bytes{hostname="fresh@h"}': 5e8,
        'celery_worker_pool_process_max_resident_memory_bytes{hostname="fresh@h"}': 1e8,
        'celery_worker_tasks_reserved{hostname="fresh@h",queue_name="q"}': 2,
        'celery_worker_tasks_scheduled{hostname="fresh@h",queue_name="q"}': 2,
        'celery_worker_consuming{hostname="fresh@h",queue_name="q"}': 2,
    }


def test_task_names_are_capped_across_the_whole_directory(tmp_path: pytest.TempPathFactory) -> None:
    """Each process caps its own names; the exporter caps the sum of all of them, sticky and exact."""
    for proc in range(4):  # four processes, 30 names each, 120 in all
        pid = os.fork()
        if pid == 0:
            store = Store(str(tmp_path))
            for i in range(30):
                m.Recorder(store, c.SENT).labels(f"p{proc}-t{i}", "q").inc(2)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
    collector = DirectoryCollector(str(tmp_path), max_task_names=50)
    first = merged_samples(collector)
    sent = {k: v for k, v in first.items() if k.startswith("celery_task_sent_total")}
    assert len(sent) == 51
    assert sent['celery_task_sent_total{name="__overflow__",queue_name="q"}'] == 70 * 2
    assert sum(sent.values()) == 240, "folding keeps every count"
    assert first["celery_exporter_task_names_folded{}"] == 70
    assert merged_samples(collector) == first, "the same names stay admitted scrape after scrape"


def test_a_file_rewritten_on_the_same_inode_with_other_keys_is_not_misread(tmp_path: pytest.TempPathFactory) -> None:
    """The merge caches each file's layout; a new file on a recycled inode with keys of the same size
    (pid reuse after compaction, on a disk that reuses inode numbers) must not inherit it."""
    from celery_signal_exporter.directory import encode_entries, series_key
    from celery_signal_exporter.recording.store import MAGIC

    path = os.path.join(str(tmp_path), "counter_5.db")

    def write(name: str, value: float) -> None:
        key = series_key("celery_task_sent", "celery_task_sent_total", {"name": name, "queue_name": "q"}, "h")
        with open(path, "r+b" if os.path.exists(path) else "wb") as f:  # same inode, same size
            f.write(encode_entries([(key, value, 0.0)], MAGIC))

    collector = DirectoryCollector(str(tmp_path))
    write("task_a", 1)
    assert merged_samples(collector)['celery_task_sent_total{name="task_a",queue_name="q"}'] == 1
    import time

    time.sleep(0.05)  # past the kernel's timestamp granularity, so the rewrite gets a new ctime
    write("task_b", 2)
    ours = merged_samples(collector)
    assert ours['celery_task_sent_total{name="task_b",queue_name="q"}'] == 2
    assert 'celery_task_sent_total{name="task_a",queue_name="q"}' not in ours


def test_series_bound_before_a_file_grows_keep_writing_into_the_new_map(tmp_path: pytest.TempPathFactory) -> None:
    """Growing remaps the file and replaces its view of doubles; a series bound earlier must follow."""
    store = Store(str(tmp_path))
    sent = m.Recorder(store, c.SENT)
    first = sent.labels("first", "q")
    first.inc()
    size_before = os.path.getsize(next(tmp_path.glob("counter_*.db")))  # type: ignore[attr-defined]
    for i in range(1500):  # enough keys to outgrow the first 64 KiB, under the 2000-name cap of the merge
        sent.labels(f"name-{i}", "q").inc(i)
    assert os.path.getsize(next(tmp_path.glob("counter_*.db"))) > size_before  # type: ignore[attr-defined]
    first.inc(2)
    samples = merged_samples(DirectoryCollector(str(tmp_path)))
    assert samples['celery_task_sent_total{name="first",queue_name="q"}'] == 3
    assert samples['celery_task_sent_total{name="name-1499",queue_name="q"}'] == 1499


def test_struct_fallback_writes_the_same_bytes_as_the_view(tmp_path: pytest.TempPathFactory) -> None:
    """Big-endian machines write through struct; the file must be byte for byte what the view writes."""
    from celery_signal_exporter.recording.store import _PackedDoubles

    paths = [str(tmp_path / "counter_1.db"), str(tmp_path / "counter_2.db")]
    files = [MetricFile(p) for p in paths]
    files[1].values.release()
    files[1].values = _PackedDoubles(files[1]._map)
    for f in files:
        f.add(f.slot("a"), 2.5)
        f.add(f.slot("a"), 1)
        f.set(f.slot("b"), 7, 1234.5)
        assert f.values[f.slot("a") >> 3] == 3.5
        f.close()
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() == b.read()
    with open(paths[0], "rb") as a:
        assert sorted(read_entries(a.read())) == [("a", 3.5, 0.0), ("b", 7.0, 1234.5)]


def test_a_bound_spelled_two_ways_and_a_garbage_key_still_add_up(tmp_path: pytest.TempPathFactory) -> None:
    """Two series for one bucket bound (our `1`, prometheus-client's `1.0`) fall back to the slow histogram
    path, and a garbage key in the middle of a file leaves the series around it intact."""
    d = str(tmp_path)
    store = Store(d)
    observe(store, m.Recorder(store, c.RUNTIME, (0.1, 1)).labels("a", "q"), 0.5)
    m.Recorder(store, c.SENT).labels("a", "q").inc(2)
    labels = {"name": "a", "queue_name": "q"}
    other = MetricFile(os.path.join(d, "histogram_77.db"))  # a foreign writer: prometheus-client spellings
    for sample, extra, value in (("_bucket", {"le": "0.1"}, 1.0), ("_bucket", {"le": "1.0"}, 2.0),
                                 ("_bucket", {"le": "+Inf"}, 0.0), ("_sum", {}, 0.75)):
        name = "celery_task_runtime_seconds"
        other.add(other.slot(series_key(name, name + sample, {**labels, **extra}, "h")), value)
    other.close()
    mixed = MetricFile(os.path.join(d, "counter_99999999.db"))  # sorts last: merged after the store's file
    mixed.add(mixed.slot(series_key("celery_task_sent", "celery_task_sent_total", labels, "h")), 3)
    mixed.add(mixed.slot("not json"), 5)
    mixed.add(mixed.slot(series_key("celery_task_sent", "celery_task_sent_total", {**labels, "name": "b"}, "h")), 7)
    mixed.close()
    collector = DirectoryCollector(d)
    for _ in range(2):  # the first merge parses the layouts, the second reuses them
        s = merged_samples(collector)
        assert s['celery_task_runtime_seconds_bucket{le="0.1",name="a",queue_name="q"}'] == 1
        assert s['celery_task_runtime_seconds_bucket{le="1",name="a",queue_name="q"}'] == 4
        assert s['celery_task_runtime_seconds_bucket{le="+Inf",name="a",queue_name="q"}'] == 4
        assert s['celery_task_runtime_seconds_count{name="a",queue_name="q"}'] == 4
        assert s['celery_task_runtime_seconds_sum{name="a",queue_name="q"}'] == 1.25
        assert s['celery_task_sent_total{name="a",queue_name="q"}'] == 5
        assert s['celery_task_sent_total{name="b",queue_name="q"}'] == 7


def test_a_merge_that_raises_still_answers_the_scrape(tmp_path: pytest.TempPathFactory,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever goes wrong inside the merge (here: libfaketime once made time.sleep raise EINVAL in
    it), the scrape answers with everything else and counts the failed merge."""
    from celery_signal_exporter.server.config import ServeConfig
    from celery_signal_exporter.server.service import Exporter

    m.Recorder(Store(str(tmp_path)), c.SENT).labels("a", "q").inc()
    ex = Exporter(ServeConfig(metrics_dir=str(tmp_path)))
    assert b'celery_task_sent_total{name="a",queue_name="q"} 1.0' in ex.render(None)[0]

    def broken(self: DirectoryCollector) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(DirectoryCollector, "merge", broken)
    body = ex.render(None)[0].decode()
    assert "celery_exporter_merge_errors_total 1.0" in body
    assert "celery_exporter_build_info" in body and "celery_task_sent_total" not in body


def test_queue_names_are_capped_across_the_directory(tmp_path: pytest.TempPathFactory) -> None:
    """Each process caps its own queue names; many processes with different ones must still not add a
    series each: past the directory-wide cap they fold into __overflow__, counted, totals kept."""
    store = Store(str(tmp_path))
    sent = m.Recorder(store, c.SENT)
    for i in range(1500):
        sent.labels("a", f"queue-{i}").inc()
    merged = merged_samples(DirectoryCollector(str(tmp_path), max_queue_names=1000))
    queues = {k for k in merged if k.startswith("celery_task_sent_total")}
    assert len(queues) == 1001
    assert merged['celery_task_sent_total{name="a",queue_name="__overflow__"}'] == 500
    assert sum(merged[k] for k in queues) == 1500
    assert merged["celery_exporter_queue_names_folded{}"] == 500


def test_float_sums_never_step_back_by_a_rounding_error(tmp_path: pytest.TempPathFactory) -> None:
    """Compaction adds the same float observations in another grouping, and (0.1 + 0.2) + 0.3 is not
    0.1 + (0.2 + 0.3): a total a few last bits lower must be served as before (Prometheus would read a
    counter reset), while a real drop still shows."""
    store = Store(str(tmp_path))
    runtime = m.Recorder(store, c.RUNTIME, (1.0,)).labels("a", "q")
    cpu = m.Recorder(store, c.CPU).labels("a", "q")
    observe(store, runtime, 0.6)
    cpu.inc(0.5)
    collector = DirectoryCollector(str(tmp_path))
    key_sum, key_cpu = 'celery_task_runtime_seconds_sum{name="a",queue_name="q"}', \
        'celery_task_cpu_seconds_total{name="a",queue_name="q"}'
    first = merged_samples(collector)
    assert (first[key_sum], first[key_cpu]) == (0.6, 0.5)
    observe(store, runtime, -1e-12)  # the stand-in for a rounding wobble: the stored total is now a hair lower
    cpu.inc(-1e-12)
    wobbled = merged_samples(collector)
    assert (wobbled[key_sum], wobbled[key_cpu]) == (0.6, 0.5)
    observe(store, runtime, -0.1)  # a real drop (lost data) is not hidden
    cpu.inc(-0.1)
    dropped = merged_samples(collector)
    assert dropped[key_sum] < 0.5 + 1e-9 and dropped[key_cpu] < 0.4 + 1e-9


# --- Issue 17's targets: made-up zeros beside real counters, and a worker's stopped mark -------------------

EXPIRED = 'celery_task_revoked_total{name="%s",queue_name="%s",reason="expired"}'


def revoked(samples: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in samples.items() if k.startswith("celery_task_revoked_total")}


def test_expired_is_served_at_zero_beside_task_counters_until_a_real_expiry(tmp_path: Path) -> None:
    d = str(tmp_path)
    collector = DirectoryCollector(d)
    assert revoked(merged_samples(collector)) == {}, "no task counter, no made-up series"
    write_as_dead_process(d, lambda s: m.Recorder(s, c.SENT).labels("a", "q").inc())
    write_as_dead_process(d, lambda s: m.Recorder(s, c.RECEIVED).labels("b", "q").inc())
    write_as_dead_process(d, lambda s: m.Recorder(s, c.STARTED).labels("b", "r").inc())
    # A revoke for another reason is no expiry: the 0 stays beside it.
    write_as_dead_process(d, lambda s: m.Recorder(s, c.REVOKED).labels("b", "q", "revoked").inc())
    # Other task metrics (failures, runtime) do not add a pair of their own.
    write_as_dead_process(d, lambda s: m.Recorder(s, c.FAILED).labels("c", "q", "ValueError").inc())
    first = revoked(merged_samples(collector))
    assert first == {
        EXPIRED % ("a", "q"): 0, EXPIRED % ("b", "q"): 0, EXPIRED % ("b", "r"): 0,
        'celery_task_revoked_total{name="b",queue_name="q",reason="revoked"}': 1,
    }
    write_as_dead_process(d, lambda s: m.Recorder(s, c.REVOKED).labels("a", "q", "expired").inc())
    second = revoked(merged_samples(collector))
    assert second[EXPIRED % ("a", "q")] == 1, "the real series takes over, once"
    assert set(second) == set(first)
    compaction.compact(d)
    assert revoked(merged_samples(collector)) == second, "compaction changes nothing"


def test_expired_zero_is_rendered_on_the_metrics_page(tmp_path: Path) -> None:
    from celery_signal_exporter.server.config import ServeConfig
    from celery_signal_exporter.server.service import Exporter

    write_as_dead_process(str(tmp_path), lambda s: m.Recorder(s, c.RECEIVED).labels("a", "q").inc())
    body, _ = Exporter(ServeConfig(metrics_dir=str(tmp_path))).render(None)
    text = body.decode()
    assert 'celery_task_revoked_total{name="a",queue_name="q",reason="expired"} 0.0\n' in text
    assert text.count("# TYPE celery_task_revoked") == 1, "one family, whoever made it"


def test_retries_exhausted_is_served_at_zero_beside_started_until_a_run_gives_up(tmp_path: Path) -> None:
    """A task's first exhausted retries must be an increase: 0 beside every started (name, queue)."""
    d = str(tmp_path)
    collector = DirectoryCollector(d)

    def exhausted() -> dict[str, float]:
        return {k: v for k, v in merged_samples(collector).items()
                if k.startswith("celery_task_retries_exhausted_total")}

    write_as_dead_process(d, lambda s: m.Recorder(s, c.SENT).labels("only-sent", "q").inc())
    write_as_dead_process(d, lambda s: m.Recorder(s, c.STARTED).labels("a", "q").inc())
    write_as_dead_process(d, lambda s: m.Recorder(s, c.STARTED).labels("b", "q").inc())
    key = 'celery_task_retries_exhausted_total{name="%s",queue_name="q"}'
    assert exhausted() == {key % "a": 0, key % "b": 0}, "a started task only; a sent one has no runs"
    write_as_dead_process(d, lambda s: m.Recorder(s, c.RETRIES_EXHAUSTED).labels("a", "q").inc())
    assert exhausted() == {key % "a": 1, key % "b": 0}, "the real series takes over, once"
    compaction.compact(d)
    assert exhausted() == {key % "a": 1, key % "b": 0}, "compaction changes nothing"


def test_a_stopped_mark_ends_the_up_series_and_a_vanished_worker_reads_0(tmp_path: Path) -> None:
    d = str(tmp_path)
    now = time.time()

    def beat(host: str, value: float, stamp: float) -> None:
        write_as_dead_process(d, lambda s: (m.Recorder(s, c.HEARTBEAT).labels(host).set(value, stamp),
                                            m.Recorder(s, c.POOL_PROCESSES).labels(host).set(2)))

    beat("retired@h", now - 30, now - 30)  # its last beat, then its graceful stop
    beat("retired@h", 0.0, now - 29)
    beat("killed@h", now - 30, now - 30)  # SIGKILL: the last beat is all there is
    beat("back@h", 0.0, now - 60)  # stopped once, then came back and vanished
    beat("back@h", now - 30, now - 30)
    store = Store(d)
    m.Recorder(store, c.HEARTBEAT).labels("live@h").set(now, now)
    collector = DirectoryCollector(d, worker_timeout=10)
    for when in ("before compaction", "after compaction"):
        ours = {k: v for k, v in merged_samples(collector).items() if k.startswith("celery_worker_")}
        assert ours == {
            'celery_worker_up{hostname="killed@h"}': 0, 'celery_worker_up{hostname="back@h"}': 0,
            'celery_worker_up{hostname="live@h"}': 1,
        }, when
        compaction.compact(d)
    store.close()


# --- A file growing under the reader ------------------------------------------------------------------------

STARTED = 'celery_task_started_total{name="steady",queue_name="q"}'


def _grow(directory: str, ready: Any, done: Any) -> None:
    """Count 1000 starts of one task, then add 4000 new histogram series: the file grows (past the
    reader's first 4 KB read and past its 64 KB preallocation) while the reader reads it."""
    store = Store(directory)
    m.Recorder(store, c.STARTED).labels("steady", "q").inc(1000)
    runtime = m.Recorder(store, c.RUNTIME, m.DEFAULT_RUNTIME_BUCKETS)
    ready.set()
    for n in range(4000):
        observe(store, runtime.labels(f"young-{n}", "q"), 0.1)
    done.set()
    time.sleep(60)  # stay alive (the file stays live) until the test is done


def test_a_file_growing_under_the_reader_is_never_damaged_and_never_goes_backwards(tmp_path: Any) -> None:
    directory = str(tmp_path)
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_grow, args=(directory, ready, done))
    writer.start()
    try:
        assert ready.wait(30), "the writer did not start"
        collector = DirectoryCollector(directory)
        counts: list[int] = []
        while not done.is_set() or len(counts) < 5:
            samples = merged_samples(collector)
            assert collector.last.files_unreadable == 0, collector.last.unreadable
            assert samples.get(STARTED) == 1000, "the whole file was dropped from this scrape"
            counts.append(int(sum(v for k, v in samples.items()
                                  if k.startswith("celery_task_runtime_seconds_count"))))
        samples = merged_samples(collector)  # one more, after the writer is done
        counts.append(int(sum(v for k, v in samples.items() if k.startswith("celery_task_runtime_seconds_count"))))
        assert counts == sorted(counts), "a counter went backwards between two scrapes"
        assert len(set(counts)) >= 3, f"too few scrapes caught the file growing: {counts}"
        assert counts[-1] == 4000
        assert os.path.getsize(os.path.join(directory, f"histogram_{writer.pid}.db")) > 1 << 16
    finally:
        writer.kill()
        writer.join(30)
