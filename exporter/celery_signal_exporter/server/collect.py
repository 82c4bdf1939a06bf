"""Merge every process's metric files into one set of metric families.

Merge rules are prometheus-client's multiprocess rules (counters and
histograms add up, gauges follow their mode), with these differences: a
damaged file is skipped and counted instead of failing the scrape; the
heartbeat gauges become `celery_worker_up` and `celery_beat_up` (a worker that shut down gracefully,
its heartbeat at 0, is left out: retired, not down); a beat entry gauge at 0 (an entry
that left the schedule) is left out; live gauges of a worker whose heartbeat is stale
are left out; the queue names seen are remembered for the broker probes; and for
gauges that pick one writer's value (mostrecent, max, min) a value stamped in our
future (a clock since stepped back) loses to any other, so a restart after a clock
step never freezes a series, and for mostrecent a live writer beats a dead or
archived one.

As in prometheus-client's multiprocess.py, a merge reads the files
(`_read_files`), then accumulates their values into one slot per series
(`_accumulate`: `_add_up`, `_pick_one`), then lays the slots out as
families, each by its rule (`_as_is`, `_up`, `_gone_at_zero`, `_per_worker`,
`_histogram`). The layout of files and families is parsed once and kept, so
a scrape only unpacks and adds up numbers.

Every cache here is bounded by what is in the directory now, not by history:
a sidecar runs for months while children recycle and names come and go.

Foreign files cost a scrape nothing: the directory is listed again only when
its mtime changes (names are parsed once each), and a file under our names
that cannot be read is not opened again while it keeps its inode, for
`UNREADABLE_RECHECK` seconds (it is still counted and reported). Read at
every scrape, 50 000 junk files would take a scrape from 23 to 247 ms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import NamedTuple, TypeVar

from prometheus_client.core import Metric
from prometheus_client.samples import Sample

from celery_signal_exporter.catalogue import (
    BEAT_ENTRY_INTERVAL,
    BEAT_ENTRY_LAST_DISPATCH,
    BEAT_ENTRY_NEXT_DUE,
    BEAT_HEARTBEAT,
    BEAT_UP,
    CONSUMING,
    CPU,
    HEARTBEAT,
    POOL_PROCESS_MAX_MEMORY,
    POOL_PROCESSES,
    QUEUE_NAMES_FOLDED,
    RECEIVED,
    RESIDENT_MEMORY,
    RETRIES_EXHAUSTED,
    REVOKED,
    SENT,
    STARTED,
    TASK_NAMES_FOLDED,
    TASKS_ACTIVE,
    TASKS_RESERVED,
    TASKS_SCHEDULED,
    WORKER_UP,
    Spec,
)
from celery_signal_exporter.compact import FUTURE_SLACK, LISTING_SETTLE_NS
from celery_signal_exporter.directory import (
    archive_kind,
    directory_lock,
    format_le,
    held_by_a_live_writer,
    is_ours,
    kind_of,
    lock_path,
    open_to_read,
    padded_length,
    parse_name,
    read_generation,
    read_prefix,
    staging_dirs,
    walk_entries,
)
from celery_signal_exporter.labels import OVERFLOW, cut
from celery_signal_exporter.server.exposition import line_prefix

log = logging.getLogger("celery_signal_exporter")

#: Distinct task names the exporter shows across the whole directory; the rest
#: become `__overflow__`. Each process already caps its own (`max_task_names`,
#: 500), but many processes with different names would add up.
DEFAULT_MAX_TASK_NAMES = 2000
#: The same for queue names: a producer that publishes to made-up routing keys must not add a series each.
DEFAULT_MAX_QUEUE_NAMES = 1000
#: Parsed series and keys kept beyond those in the directory now before every cache is rebuilt.
_CACHE_SLACK = 4096
#: Seconds an unreadable file (keeping its inode) is left unopened; then every such file is read once more.
UNREADABLE_RECHECK = 300.0
#: A file this young when it failed is read again next scrape: it may be a foreign writer's, mid-creation.
_YOUNG_NS = 2_000_000_000

#: Heartbeat gauges and the `up` gauge each becomes at scrape: 1 while the heartbeat is fresher than the timeout.
_UP: dict[str, Spec] = {HEARTBEAT.name: WORKER_UP, BEAT_HEARTBEAT.name: BEAT_UP}
#: Beat entry gauges a beat writes 0 when the entry leaves the schedule: a 0 is left out, so the series goes.
_GONE_AT_ZERO = frozenset({BEAT_ENTRY_INTERVAL.name, BEAT_ENTRY_NEXT_DUE.name, BEAT_ENTRY_LAST_DISPATCH.name})
#: Counters whose increments are not whole numbers, so their merged total can wobble in the last bits.
_FLOAT_COUNTERS = frozenset({CPU.name})
#: Live gauges labelled by worker hostname: dropped once that worker's heartbeat is stale.
_PER_WORKER_LIVE = frozenset({
    POOL_PROCESSES.name, TASKS_ACTIVE.name, TASKS_RESERVED.name, TASKS_SCHEDULED.name, CONSUMING.name,
    RESIDENT_MEMORY.name, POOL_PROCESS_MAX_MEMORY.name,
})
#: Rare-event counters served at 0 beside the (name, queue_name) series of their peers, so that
#: `increase()` sees the first event (a series born at 1 reads 0): the counter, its fixed labels, the peers.
_FIRST_EVENTS: tuple[tuple[Spec, dict[str, str], frozenset[str]], ...] = (
    (REVOKED, {"reason": "expired"}, frozenset({SENT.name, RECEIVED.name, STARTED.name})),
    (RETRIES_EXHAUSTED, {}, frozenset({STARTED.name})),
)
#: Gauge modes whose merge picks one writer's value, so the writer's liveness can matter.
_PICK_ONE = frozenset({"mostrecent", "max", "min"})
#: Gauge modes added up like counters; the per-process ones keep each process apart under a `pid` label.
_SUMMED_MODES = frozenset({"sum", "livesum", "all", "liveall"})
_PER_PROCESS_MODES = frozenset({"all", "liveall"})
#: Pick-one modes where the newest timestamp wins; in the others the largest value (or the smallest, for min).
_MOST_RECENT_MODES = frozenset({"mostrecent", "livemostrecent"})
_MIN_MODES = frozenset({"min", "livemin"})


class _Listed(NamedTuple):
    """A listed file with a metrics file's name."""

    filename: str
    kind: str
    mode: str
    pid: str
    inode: int


class _Planned(NamedTuple):
    """A file to merge this scrape."""

    path: str
    name: str  # as reported when unreadable: the file name, or `staging folder/file name`
    kind: str
    mode: str
    pid: str
    settled: bool  # an archive or a staged file: its writers are gone, nobody to ask whether they live


#: Labels as the merge keys them: (name, value) pairs, sorted.
_Labels = tuple[tuple[str, str], ...]
#: One series across every file, (metric, sample name, labels): every file's value of it is added or
#: picked into one slot. Plain tuples, not named ones: a first scrape makes one per series in the directory.
_Series = tuple[str, str, _Labels]
#: A file key, parsed: its series (label values cut and capped) and its family's help text.
_Key = tuple[str, str, _Labels, str]


@dataclass
class MergeStats:
    """What one merge read, skipped and saw, for the exporter's own gauges and logs."""

    files_read: int = 0
    files_unreadable: int = 0
    files_dead: int = 0  # live-gauge files whose writer is gone, not merged
    queues_seen: set[str] = field(default_factory=set)
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> why, read and failed this scrape
    #: file -> (inode, why): found unreadable before and not opened again (shared, never copied)
    judged: dict[str, tuple[int, str]] = field(default_factory=dict)


class _Layout:
    """Where each value of one file sits, and which series it belongs to."""

    __slots__ = ("ctime", "digest", "group", "ident", "mode", "present", "queues", "slots", "spans", "summed",
                 "unpack")

    def __init__(self, ident: tuple[int, int, int], unpack: struct.Struct, slots: list[int], queues: set[str],
                 summed: bool, mode: str) -> None:
        self.ident = ident
        self.ctime = 0
        self.spans: list[tuple[int, int]] = []
        self.digest = b""
        self.group = b""  # equal for files laid out alike: the same series in the same order
        self.unpack = unpack
        self.slots = slots
        self.present = frozenset(slots)
        self.queues = frozenset(queues)
        self.summed = summed
        self.mode = mode


class _Loaded(NamedTuple):
    """A file read this scrape."""

    layout: _Layout
    values: tuple[float, ...]  # (value, timestamp) pairs unless the layout is summed
    alive: bool  # whether its writer lives: judged only where a merge rule picks one writer's value


#: A sample as served: (sample name, labels, its text up to the value, or None when it needs escaping).
_Shown = tuple[str, dict[str, str], str | None]


def _shown(name: str, labels: dict[str, str]) -> _Shown:
    return name, labels, line_prefix(name, labels)


class _Row(NamedTuple):
    """One sample of a counter or gauge family: the series behind it."""

    sample: str
    labels: dict[str, str]
    series_index: int


class _Bucket(NamedTuple):
    """One bound of a histogram: its labels (with `le`) and its series, one per way files write the bound."""

    labels: dict[str, str]
    indices: list[int]


class _HistogramRow(NamedTuple):
    """One labelled histogram: its buckets by bound, ascending, and its sum's series (None if no file has it)."""

    labels: dict[str, str]
    buckets: list[_Bucket]
    sum_index: int | None


class _Moment(NamedTuple):
    """What every family's rule needs to know of the scrape."""

    now: float
    worker_timeout: float
    stale: frozenset[str]  # hostnames of the workers whose heartbeat is stale, or 0 (retired)


#: How a family's merged values become the samples it shows this scrape: (samples, values).
_Rule = Callable[["_Family", list[float], _Moment], tuple[list[_Shown], list[float]]]


@dataclass(slots=True)
class _Family:
    """One family's layout: which series, in which order, under which labels, and its rule.

    `entries` are the samples it shows, in the order its rule computes their
    values, so each scrape only fills in numbers. `name`, `help` and `kind`
    are as served: a heartbeat's family is served as its `up` gauge.
    """

    metric: str
    name: str
    help: str
    kind: str
    rule: _Rule
    entries: list[_Shown]
    rows: list[_Row] = field(default_factory=list)  # counters and gauges
    indices: list[int] = field(default_factory=list)  # the rows' series, in order
    histograms: list[_HistogramRow] = field(default_factory=list)
    # Per histogram row, its buckets' series when every bound is one series (the usual case): summed in one C call.
    single: list[tuple[int, ...] | None] = field(default_factory=list)
    # Samples served at 0 after the rows' own: series no file holds yet (see _first_event_zeros).
    zeros: list[_Shown] = field(default_factory=list)


_T = TypeVar("_T")


def _kept(items: Sequence[_T], keep: Iterable[bool]) -> list[_T]:
    return [item for item, k in zip(items, keep, strict=True) if k]


def _fresh(stamp: float, moment: _Moment) -> bool:
    return stamp > 0 and moment.now - stamp <= moment.worker_timeout


def _as_is(family: _Family, values: list[float], moment: _Moment) -> tuple[list[_Shown], list[float]]:
    """Counters and most gauges: every series, at its merged value."""
    return family.entries, [values[i] for i in family.indices]


def _up(family: _Family, values: list[float], moment: _Moment) -> tuple[list[_Shown], list[float]]:
    """A heartbeat gauge becomes its `up` gauge: 1 while the heartbeat is fresher than the worker timeout.

    A worker that shut down gracefully wrote 0 (its stopped mark): it is
    retired, not down, so it is not served at all. One that vanished keeps its
    last stamp, and reads 0.
    """
    stamps = [values[i] for i in family.indices]
    entries = family.entries
    if family.metric == HEARTBEAT.name:
        keep = [stamp != 0.0 for stamp in stamps]
        entries, stamps = _kept(entries, keep), _kept(stamps, keep)
    return entries, [1.0 if _fresh(stamp, moment) else 0.0 for stamp in stamps]


def _gone_at_zero(family: _Family, values: list[float], moment: _Moment) -> tuple[list[_Shown], list[float]]:
    """Beat entry gauges: beat writes 0 when an entry leaves the schedule, so a 0 is left out and the series goes."""
    shown = [values[i] for i in family.indices]
    keep = [value != 0.0 for value in shown]
    return _kept(family.entries, keep), _kept(shown, keep)


def _per_worker(family: _Family, values: list[float], moment: _Moment) -> tuple[list[_Shown], list[float]]:
    """Live gauges of a worker's pool: a worker that stopped beating says nothing about its pool, so its
    series are left out rather than echo its last word."""
    if not moment.stale:
        return _as_is(family, values, moment)
    keep = [row.labels.get("hostname") not in moment.stale for row in family.rows]
    return _kept(family.entries, keep), _kept([values[i] for i in family.indices], keep)


def _histogram(family: _Family, values: list[float], moment: _Moment) -> tuple[list[_Shown], list[float]]:
    """Histograms: files hold each bucket's own count; served cumulative, then `_count` (the +Inf bucket's
    total) and `_sum`."""
    shown: list[float] = []
    for row, single in zip(family.histograms, family.single, strict=True):
        if single is not None:
            counts = list(accumulate(map(values.__getitem__, single), initial=0.0))
        else:
            counts = list(accumulate((sum(values[i] for i in b.indices) for b in row.buckets), initial=0.0))
        shown += counts[1:]
        shown.append(counts[-1])
        shown.append(values[row.sum_index] if row.sum_index is not None else 0.0)
    return family.entries, shown


def _family(metric: str, help_text: str, kind: str, rows: list[_Row]) -> _Family:
    """A counter or gauge family, with the rule its metric takes."""
    up = _UP.get(metric)
    if up is not None:
        entries = [_shown(up.name, row.labels) for row in rows]
        return _Family(metric, up.name, up.help, up.kind, _up, entries, rows, [row.series_index for row in rows])
    rule: _Rule = _as_is
    if metric in _GONE_AT_ZERO:
        rule = _gone_at_zero
    elif metric in _PER_WORKER_LIVE:
        rule = _per_worker
    entries = [_shown(row.sample, row.labels) for row in rows]
    return _Family(metric, metric, help_text, kind, rule, entries, rows, [row.series_index for row in rows])


def _histogram_family(metric: str, help_text: str, rows: list[_HistogramRow]) -> _Family:
    entries: list[_Shown] = []
    for row in rows:
        entries += [_shown(metric + "_bucket", bucket.labels) for bucket in row.buckets]
        entries += [_shown(metric + "_count", row.labels), _shown(metric + "_sum", row.labels)]
    single = [tuple(b.indices[0] for b in row.buckets) if all(len(b.indices) == 1 for b in row.buckets) else None
              for row in rows]
    return _Family(metric, metric, help_text, "histogram", _histogram, entries, histograms=rows, single=single)


def _stale_workers(skeleton: list[_Family], values: list[float], moment: _Moment) -> frozenset[str]:
    """Hostnames whose worker heartbeat is not fresh: only a worker's heartbeat speaks for its pool."""
    for family in skeleton:
        if family.metric == HEARTBEAT.name:
            return frozenset(row.labels.get("hostname", "") for row in family.rows
                             if not _fresh(values[row.series_index], moment))
    return frozenset()


#: Which writer's value a pick-one gauge shows, highest first: (live writer, mostrecent only; not stamped in
#: our future; the mode's own order: the newest timestamp, the largest value, or the smallest for min).
_Rank = tuple[bool, bool, float]


def _pick_one(best: dict[int, tuple[_Rank, float]], loaded: _Loaded, horizon: float) -> None:
    """Gauges that pick one writer's value (mostrecent, max, min and their live modes): each series keeps the
    value of its best-ranked writer. A live writer beats a gone one only for mostrecent (the newest word of a
    live process is its word now); a value stamped in our future (a clock since stepped back) loses to any
    other, so a restart after a clock step never freezes a series."""
    layout, raw = loaded.layout, loaded.values
    values, stamps = raw[0::2], raw[1::2]
    if layout.mode in _MOST_RECENT_MODES:
        ranks = [(loaded.alive, t <= horizon, t) for t in stamps]
    else:
        sign = -1.0 if layout.mode in _MIN_MODES else 1.0
        ranks = [(False, t <= horizon, sign * v) for v, t in zip(values, stamps, strict=True)]
    for i, v, rank in zip(layout.slots, values, ranks, strict=True):
        old = best.get(i)
        if old is None or rank > old[0]:
            best[i] = (rank, v)


def _add_up(groups: Iterable[tuple[list[int], list[tuple[float, ...]]]], totals: list[float]) -> None:
    """Counters, histograms and summed gauge modes: the files of each group (laid out alike, so the same series
    in the same order) are added column by column, in C, then placed into their series once."""
    for slots, columns in groups:
        if not columns:
            continue
        summed = columns[0] if len(columns) == 1 else map(sum, zip(*columns, strict=True))
        for i, v in zip(slots, summed, strict=True):
            totals[i] += v


def _accumulate(loaded: list[_Loaded], size: int, stats: MergeStats) -> tuple[frozenset[int], list[float]]:
    """The series present in any file, and each of the `size` series' merged value by its mode's rule."""
    present: set[int] = set()
    groups: dict[bytes, tuple[list[int], list[tuple[float, ...]]]] = {}
    best: dict[int, tuple[_Rank, float]] = {}
    horizon = time.time() + FUTURE_SLACK
    for one in loaded:
        layout = one.layout
        group = groups.get(layout.group)
        if group is None:  # files laid out alike hold the same series: take them in once
            group = groups[layout.group] = (layout.slots, [])
            present.update(layout.present)
            stats.queues_seen.update(layout.queues)
        if layout.summed:
            group[1].append(one.values)
        else:
            _pick_one(best, one, horizon)
    totals = [0.0] * size
    _add_up(groups.values(), totals)
    for i, (_, v) in best.items():
        totals[i] = v
    present.discard(0)
    return frozenset(present), totals


class LaidOut(Metric):
    """A family whose samples' names and labels are laid out once; a scrape brings only the values.

    The encoder (celery_signal_exporter.server.exposition) writes these without building a Sample
    per value; anyone else reading `.samples` gets ordinary Samples.
    """

    def __init__(self, name: str, documentation: str, typ: str,
                 entries: list[tuple[str, dict[str, str], str | None]], values: list[float]) -> None:
        super().__init__(name, documentation, typ)
        self.entries = entries
        self.values = values

    @property  # type: ignore[override]
    def samples(self) -> list[Sample]:
        return [Sample(n, labels, v) for (n, labels, _), v in zip(self.entries, self.values, strict=True)]

    @samples.setter
    def samples(self, value: list[Sample]) -> None:  # Metric.__init__ assigns []
        if value:
            raise AttributeError("a LaidOut family's samples come from its entries and values")


def _key_digest(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    view = memoryview(data)
    digest = hashlib.blake2b(digest_size=16)
    for start, end in spans:
        digest.update(view[start:end])
    return digest.digest()


class DirectoryCollector:
    """A prometheus-client collector over one metrics directory.

    Not thread safe on its own: the service serialises scrapes around it.
    """

    def __init__(self, directory: str, worker_timeout: float = 10.0,
                 max_task_names: int = DEFAULT_MAX_TASK_NAMES,
                 max_queue_names: int = DEFAULT_MAX_QUEUE_NAMES) -> None:
        self.directory = directory
        self.worker_timeout = worker_timeout
        self.max_task_names = max_task_names
        self.max_queue_names = max_queue_names
        self.last = MergeStats()
        # Admitted label values: once in, always in (no flapping series); each bounded by its cap.
        self._names: set[str] = set()
        self._queues: set[str] = set()
        self._logged: set[str] = set()  # one-off conditions already logged: a stuck lock, a missing directory
        self._unreadable_logged: frozenset[str] = frozenset()
        self._archives: dict[str, _Loaded | Exception] = {}
        # The last listing (see _list) and the files found unreadable, by name: both follow the directory.
        self._stamp: tuple[int, int, int] | None = None
        self._parsed: dict[str, tuple[str, str, str] | None] = {}
        self._entries: list[_Listed] = []
        self._staging: dict[int, str] = {}
        self._judged: dict[str, tuple[int, str]] = {}
        self._judged_at = time.monotonic()
        self._to_read: list[_Listed] | None = None  # entries less the judged ones; None: to be worked out
        # Parsed once, kept while the file keeps its identity and size: see _load.
        self._layouts: dict[str, _Layout] = {}
        self._seen_layouts: dict[str, _Layout] = {}
        self._forget()
        self._skeleton: list[_Family] = []
        self._skeleton_of: frozenset[int] = frozenset()

    def _forget(self) -> None:
        """Drop every parsed key and series; the next merge parses the files now present afresh.

        Called when the caches hold far more than the directory does (series of
        processes long gone), so that they stay bounded by what exists now.
        """
        self._keys: dict[str, _Key] = {}
        self._folded: set[int] = set()  # hashes of the names beyond the cap, for the count
        self._folded_queues: set[int] = set()
        self._index: dict[_Series, int] = {}
        self._meta: list[_Series] = [("", "", ())]  # 0: discard
        self._types: dict[str, str] = {}
        self._helps: dict[str, str] = {}
        self._settled: dict[int, float] = {}  # float sums as last served, by index (see _settle)
        self._float_sums: list[int] = []
        self._layouts = {}
        self._skeleton_of = frozenset()

    def _admit(self, value: str, admitted: set[str], cap: int, folded: set[int]) -> str:
        if value in admitted or value == OVERFLOW:
            return value
        if len(admitted) < cap:
            admitted.add(value)
            return value
        folded.add(hash(value))
        return OVERFLOW

    def _key(self, key: str) -> _Key:
        parsed = self._keys.get(key)
        if parsed is None:
            metric, sample, labels, help_text = json.loads(key)
            # Every label value cut to the documented length: writers cut their own, older ones may not have.
            label_map = {str(k): cut(str(v)) for k, v in labels.items()}
            if str(metric).startswith("celery_task_"):
                if "name" in label_map:
                    label_map["name"] = self._admit(label_map["name"], self._names, self.max_task_names,
                                                    self._folded)
                if "queue_name" in label_map:
                    label_map["queue_name"] = self._admit(label_map["queue_name"], self._queues,
                                                          self.max_queue_names, self._folded_queues)
            parsed = (str(metric), str(sample), tuple(sorted(label_map.items())), str(help_text))
            if len(key) < 2048:  # hostile 10 KB names are parsed each time
                self._keys[key] = parsed
        return parsed

    @staticmethod
    def _read_used(path: str) -> tuple[bytes, int, int]:
        """A consistent prefix of a file, its used size, and the open descriptor (the caller closes it).

        Only the used size read first is trusted (see directory.read_prefix), so
        a growing file is never taken for a damaged one.
        """
        fd = open_to_read(path)
        try:
            data, used = read_prefix(fd)
        except BaseException:
            os.close(fd)
            raise
        return data, used, fd

    def _load(self, file: _Planned) -> _Loaded | None:
        """A file's layout, its values now, and whether its writer lives; None for a live-gauge file
        whose writer is dead.

        The writer's lock (see directory.py) says whether it is alive, from any
        container: no pid is compared. It is asked only where it matters: live
        gauges (a dead writer's are left out) and gauges that pick one writer's
        value. Archives and staged files (`settled`) have no writer. Files
        without our header tag are judged by nobody and always read. The layout
        (which series sits where) is parsed once per file and size: files only
        ever grow by appending, so a scrape after the first only unpacks the
        values, in one call.
        """
        data, used, fd = self._read_used(file.path)
        alive = not file.settled
        try:
            if not file.settled and is_ours(data) and (file.mode.startswith("live") or file.mode in _PICK_ONE):
                alive = held_by_a_live_writer(fd)
                if not alive and file.mode.startswith("live"):
                    return None
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if len(data) < 8:
            raise ValueError("shorter than its 8-byte header")
        ident = (st.st_dev, st.st_ino, used)
        layout = self._layouts.get(file.path)
        if layout is not None and layout.ident == ident and layout.ctime != st.st_ctime_ns:
            # Same inode and size, but touched: a write, or a new file on a recycled inode number with
            # keys of the same total length. Only the keys tell; compare them before trusting the layout.
            if _key_digest(data, layout.spans) == layout.digest:
                layout.ctime = st.st_ctime_ns
            else:
                layout = None
        if layout is None or layout.ident != ident:
            layout = self._layout(ident, data, used, file.kind, file.mode, file.pid)
            layout.ctime = st.st_ctime_ns
        self._seen_layouts[file.path] = layout
        return _Loaded(layout, layout.unpack.unpack_from(data), alive)

    def _layout(self, ident: tuple[int, int, int], data: bytes, used: int, kind: str, mode: str,
                pid: str) -> _Layout:
        """Parse a file's keys once: the struct that unpacks its values, and each value's series."""
        # Summed files need only each value; the others also the timestamp after it, to pick a winner.
        # Skipping a timestamp (and joining the gaps) saves making a float object per series per scrape.
        summed = kind != "gauge" or mode in _SUMMED_MODES
        fmt = ["<"]
        gap, wanted = 8, "d" if summed else "dd"  # gap: the file's header, then each skipped timestamp
        slots: list[int] = []
        spans: list[tuple[int, int]] = []
        queues: set[str] = set()
        for raw_key, length, pos in walk_entries(data, used):
            fmt.append(f"{gap + 4 + padded_length(length)}x{wanted}")
            gap = 8 if summed else 0
            spans.append((pos + 4, pos + 4 + length))
            try:
                metric, sample, labels, help_text = self._key(raw_key)
            except (ValueError, TypeError, AttributeError):
                slots.append(0)  # the discard slot: never shown
                continue
            self._types[metric] = kind
            self._helps.setdefault(metric, help_text)
            if kind == "gauge" and mode in _PER_PROCESS_MODES:
                labels = (*labels, ("pid", pid))
            series = (metric, sample, labels)
            index = self._index.get(series)
            if index is None:
                index = len(self._meta)
                self._index[series] = index
                self._meta.append(series)
            slots.append(index)
            if kind == "counter" and metric.startswith("celery_task_"):
                queue = dict(labels).get("queue_name")
                if queue:
                    queues.add(queue)
        layout = _Layout(ident, struct.Struct("".join(fmt)), slots, queues, summed, mode)
        layout.spans = spans
        layout.digest = _key_digest(data, spans)
        # Files laid out alike (the same keys in the same order, so the same slots) are added up together.
        layout.group = layout.digest + mode.encode() + (pid.encode() if mode in _PER_PROCESS_MODES else b"")
        return layout

    def _list(self) -> None:
        """List the directory again, unless its mtime says nothing was added, removed or renamed.

        A listing taken within `LISTING_SETTLE_NS` of the mtime is not
        trusted (a change in the same clock tick would not show), as in the
        worker's tick. Names are parsed once while they stay listed; judged
        files keep their verdict while they keep their inode.
        """
        st = os.stat(self.directory)
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        listed = {entry.name: entry.inode() for entry in os.scandir(self.directory)}
        self._stamp = stamp if time.time_ns() - st.st_mtime_ns >= LISTING_SETTLE_NS else None
        known, parsed = self._parsed, {}
        entries: list[_Listed] = []
        for filename in sorted(listed):
            one = known[filename] if filename in known else parse_name(filename)
            parsed[filename] = one
            if one is not None:
                entries.append(_Listed(filename, *one, listed[filename]))
        self._parsed, self._entries = parsed, entries
        self._staging = staging_dirs(listed)
        self._judged = {name: judged for name, judged in self._judged.items() if listed.get(name) == judged[0]}
        self._to_read = None

    def _plan(self) -> list[_Planned]:
        """Every file to merge, archives first.

        Staged files (see directory.py) count only while their staging
        generation is newer than their kind's archive. Archives and staged
        files are settled: their writers are gone. Judged files are left out.
        """
        if time.monotonic() - self._judged_at > UNREADABLE_RECHECK:
            self._judged, self._judged_at, self._to_read = {}, time.monotonic(), None
        if self._to_read is None:
            judged = self._judged
            self._to_read = [entry for entry in self._entries if entry.filename not in judged]
        plan: list[_Planned] = []
        generations: dict[str, int] = {}
        rest: list[_Planned] = []
        for filename, kind, mode, pid, _ in self._to_read:
            path = os.path.join(self.directory, filename)
            archived = archive_kind(filename)
            if archived is not None:
                archive = _Planned(path, filename, kind, mode, pid, True)
                generations[archived], self._archives[path] = self._read_archive(archive)
                plan.append(archive)
            else:
                rest.append(_Planned(path, filename, kind, mode, pid, False))
        for gen, sname in sorted(self._staging.items()):
            sdir = os.path.join(self.directory, sname)
            try:
                staged = sorted(os.listdir(sdir))
            except OSError:
                continue  # finished and removed since the listing
            for filename in staged:
                kind_prefix = kind_of(filename)
                parsed = parse_name(filename)
                if kind_prefix is None or parsed is None or gen <= generations.get(kind_prefix, 0):
                    continue
                rest.append(_Planned(os.path.join(sdir, filename), f"{sname}/{filename}", *parsed, True))
        return plan + rest

    def _judge(self, path: str, filename: str, why: str) -> None:
        """Leave an unreadable file unopened while it keeps its inode: not a young one (a foreign writer may be
        making it) and never one a live writer holds (whatever failed, its counts are read every scrape)."""
        try:
            st = os.stat(path)
            if time.time_ns() - st.st_ctime_ns < _YOUNG_NS:
                return
            fd = open_to_read(path)
        except FileNotFoundError:
            return
        except OSError:
            fd = -1  # cannot even be opened: no writer's file
        if fd >= 0:
            try:
                if held_by_a_live_writer(fd):
                    return
            finally:
                os.close(fd)
        self._judged[filename] = (st.st_ino, why)
        self._to_read = None

    def _read_archive(self, archive: _Planned) -> tuple[int, _Loaded | Exception]:
        """An archive's generation and contents, read once; a damaged one has generation 0."""
        try:
            loaded = self._load(archive)
            assert loaded is not None
            return read_generation(archive.path), loaded
        except (OSError, ValueError) as exc:
            return 0, exc

    def merge(self) -> tuple[list[Metric], MergeStats]:
        if len(self._meta) > 2 * len(self._skeleton_of) + _CACHE_SLACK \
                or len(self._keys) > 2 * len(self._skeleton_of) + _CACHE_SLACK:
            self._forget()
        lock_file = lock_path(self.directory)
        while True:
            stats = MergeStats()
            locked_before = os.path.exists(lock_file)
            with directory_lock(self.directory, exclusive=False, wait=5.0) as held:
                if not held:
                    self._log_once("compact-lock", "compaction held %s for over 5 s; reading without waiting")
                try:
                    self._list()
                except OSError as exc:
                    self._stamp = None
                    self._log_once("missing-dir", "metrics directory %s unreadable: " + str(exc.strerror or exc))
                    self.last = stats
                    return self._folded_families(), stats
                plan = self._plan()
                judged = len(self._judged)
                present, values = self._merge_files(plan, stats)
                stats.judged = self._judged
                stats.files_unreadable += judged
            if locked_before or not os.path.exists(lock_file):
                break
            # The first compaction in this directory began while we read without its lock: read again.
        self._log_unreadable(stats)
        if present != self._skeleton_of:
            self._skeleton = self._build_skeleton(present)
            self._skeleton_of = present
        self._settle(values)
        families = self._families(self._skeleton, values)
        families += self._folded_families()
        self.last = stats
        return families, stats

    def _log_once(self, what: str, message: str) -> None:
        if what not in self._logged:
            self._logged.add(what)
            log.error(message, self.directory)

    def _log_unreadable(self, stats: MergeStats) -> None:
        """One summary line whenever the set of unreadable files changes, never one line per file per scrape,
        which a directory of junk files would flood the log with. The gauge counts them on every scrape."""
        if not stats.unreadable and len(stats.judged) == len(self._unreadable_logged):
            return  # judged files are a subset of what was logged: nothing new (the cheap, usual case)
        why = {name: judged[1] for name, judged in stats.judged.items()} | stats.unreadable
        names = frozenset(why)
        if names and names != self._unreadable_logged:
            shown = sorted(why.items())[:10]
            more = f"; and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
            log.error("skipping %d unreadable metrics file(s) in %s: %s%s", len(names), self.directory,
                      "; ".join(f"{name}: {why}" for name, why in shown), more)
        self._unreadable_logged = names

    def _folded_families(self) -> list[Metric]:
        families = []
        for spec, folded in ((TASK_NAMES_FOLDED, self._folded), (QUEUE_NAMES_FOLDED, self._folded_queues)):
            family = Metric(spec.name, spec.help, spec.kind)
            family.add_sample(spec.name, {}, float(len(folded)))
            families.append(family)
        return families

    def _merge_files(self, plan: list[_Planned], stats: MergeStats) -> tuple[frozenset[int], list[float]]:
        """The series present in any file, and every series' value by its kind's merge rule."""
        loaded = self._read_files(plan, stats)
        return _accumulate(loaded, len(self._meta), stats)

    def _read_files(self, plan: list[_Planned], stats: MergeStats) -> list[_Loaded]:
        """Every planned file's layout and values. An unreadable file is counted and skipped (and judged, unless
        settled); a live-gauge file whose writer is dead is counted and left out."""
        archives, self._archives = self._archives, {}
        loaded: list[_Loaded] = []
        for file in plan:
            try:
                read = archives.pop(file.path) if file.path in archives else self._load(file)
                if isinstance(read, Exception):
                    raise read
            except FileNotFoundError:
                continue  # reaped between listdir and open
            except (OSError, ValueError, UnicodeDecodeError, struct.error) as exc:
                stats.files_unreadable += 1
                stats.unreadable[file.name] = str(exc)
                if not file.settled:
                    self._judge(file.path, file.name, str(exc))
                continue
            if read is None:
                stats.files_dead += 1
                continue
            stats.files_read += 1
            loaded.append(read)
        self._layouts, self._seen_layouts = self._seen_layouts, {}
        return loaded

    def _settle(self, values: list[float]) -> None:
        """Keep float sums from stepping back by a rounding error.

        A histogram's `_sum` (and a float counter such as CPU seconds) adds float
        observations; when compaction moves a dead process's share into the archive,
        the same numbers are added in another grouping and the total can come out
        a few last bits lower. Prometheus reads any decrease of a counter as a
        reset, so rate() would spike. A drop smaller than one part in 10^9 is
        served as the previous value; a larger one (a real loss) is served as is.
        """
        settled = self._settled
        for i in self._float_sums:
            value, before = values[i], settled.get(i)
            if before is not None and before - 1e-9 * abs(before) <= value < before:
                values[i] = before
            else:
                settled[i] = value

    def _build_skeleton(self, present: frozenset[int]) -> list[_Family]:
        """How to lay the present series out as families; rebuilt only when the set of series changes."""
        meta = self._meta
        self._float_sums = [i for i in present
                            if meta[i][1].endswith("_sum") or meta[i][0] in _FLOAT_COUNTERS]
        self._settled = {i: self._settled[i] for i in self._float_sums if i in self._settled}
        by_metric: dict[str, list[int]] = defaultdict(list)
        for i in present:
            by_metric[meta[i][0]].append(i)
        skeleton: list[_Family] = []
        for metric in sorted(by_metric):
            help_text = self._helps.get(metric, "")
            if metric not in _UP and self._types[metric] == "histogram":
                skeleton.append(_histogram_family(metric, help_text, self._histogram_rows(by_metric[metric])))
            else:
                kind = "gauge" if metric in _UP else self._types[metric]
                skeleton.append(_family(metric, help_text, kind, self._rows(by_metric[metric])))
        return self._first_event_zeros(skeleton, present)

    def _rows(self, indices: list[int]) -> list[_Row]:
        """A counter's or gauge's series, by sample name and labels."""
        meta = self._meta
        rows = []
        for i in sorted(indices, key=lambda i: meta[i][1:]):
            _, sample, labels = meta[i]
            rows.append(_Row(sample, dict(labels), i))
        return rows

    def _histogram_rows(self, indices: list[int]) -> list[_HistogramRow]:
        """A histogram's series by label set: each bound's series and the sum's. Bucket series whose `le`
        is no number are left out."""
        buckets: dict[_Labels, dict[float, list[int]]] = defaultdict(dict)
        sums: dict[_Labels, int] = {}
        for i in indices:
            _, sample, labels = self._meta[i]
            if sample.endswith("_sum"):
                sums[labels] = i
            elif sample.endswith("_bucket"):
                label_map = dict(labels)
                try:
                    bound = float(label_map.pop("le"))
                except (KeyError, ValueError):
                    continue
                buckets[tuple(sorted(label_map.items()))].setdefault(bound, []).append(i)
        rows: list[_HistogramRow] = []
        for labels in sorted(set(buckets) | set(sums)):
            by_bound = buckets.get(labels, {})
            rows.append(_HistogramRow(dict(labels), [_Bucket({**dict(labels), "le": format_le(b)}, by_bound[b])
                                                     for b in sorted(by_bound)], sums.get(labels)))
        return rows

    def _first_event_zeros(self, skeleton: list[_Family], present: frozenset[int]) -> list[_Family]:
        """Counters of rare events served at 0 for every (name, queue_name) served a peer counter,
        unless a file holds them already: `celery_task_revoked_total{reason="expired"}` and
        `celery_task_retries_exhausted_total`.

        Celery reports such an event only when it happens, so its series is born at 1, and `increase()`
        of a series born at 1 reads 0: a task's first expiry or first exhausted retries would never page.
        Serving 0 before it is what the worker would write, at no cost in the worker. Derived from the
        series present now, so it is bounded by them, and the real series (at least 1) takes over from
        the 0: it never goes back.
        """
        for spec, extra, peers in _FIRST_EVENTS:
            pairs: set[tuple[str, str]] = set()
            have: set[tuple[str, str]] = set()
            for i in present:
                metric, _, labels = self._meta[i]
                if metric in peers or metric == spec.name:
                    label_map = dict(labels)
                    pair = (label_map.get("name", ""), label_map.get("queue_name", ""))
                    if metric != spec.name:
                        pairs.add(pair)
                    elif all(label_map.get(k) == v for k, v in extra.items()):
                        have.add(pair)
            missing = sorted(pairs - have)
            if not missing:
                continue
            family = next((f for f in skeleton if f.metric == spec.name), None)
            if family is None:
                family = _family(spec.name, self._helps.get(spec.name, spec.help), spec.kind, [])
                skeleton = sorted([*skeleton, family], key=lambda f: f.metric)
            sample = spec.sample_name
            for name, queue in missing:
                family.zeros.append(_shown(sample, {"name": name, "queue_name": queue, **extra}))
        return skeleton

    def _families(self, skeleton: list[_Family], values: list[float]) -> list[Metric]:
        """Every family's samples and values now, each by its own rule (`_as_is`, `_up`, `_histogram`...)."""
        moment = _Moment(time.time(), self.worker_timeout, frozenset())
        moment = moment._replace(stale=_stale_workers(skeleton, values, moment))
        families: list[Metric] = []
        for family in skeleton:
            entries, shown = family.rule(family, values, moment)
            if family.zeros:
                entries = entries + family.zeros
                shown = shown + [0.0] * len(family.zeros)
            families.append(LaidOut(family.name, family.help, family.kind, entries, shown))
        return families

    def collect(self) -> Iterator[Metric]:
        families, _ = self.merge()
        yield from families

