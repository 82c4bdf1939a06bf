"""Merge every process's metric files into one set of metric families.

Merge rules are prometheus-client's multiprocess rules (counters and
histograms add up, gauges follow their mode), with three differences: a
damaged file is skipped and counted instead of failing the scrape, the
heartbeat gauge becomes `celery_worker_up`, and the queue names seen are
remembered for the broker probes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.samples import Sample

from .compact import ARCHIVE_SUFFIX, archive_generation, directory_lock, kind_of, staging_dirs
from .metrics import HEARTBEAT, POOL_PROCESSES, TASKS_ACTIVE, format_le
from .store import MAGIC, held_by_a_live_writer, read_entries

log = logging.getLogger("celery_signal_exporter")

_GAUGE_MODES = {"all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
                "mostrecent", "livemostrecent"}

#: Distinct task names the exporter shows across the whole directory; the rest
#: become `__overflow__`. Each process already caps its own (`max_task_names`,
#: 500), but many processes with different names would add up.
DEFAULT_MAX_TASK_NAMES = 2000
OVERFLOW = "__overflow__"

#: Live gauges labelled by worker hostname: dropped once that worker's heartbeat is stale.
_PER_WORKER_LIVE = frozenset({POOL_PROCESSES.name, TASKS_ACTIVE.name})


@dataclass
class MergeStats:
    files_read: int = 0
    files_unreadable: int = 0
    files_dead: int = 0  # live-gauge files whose writer is gone, not merged
    queues_seen: set[str] = field(default_factory=set)


def _parse_name(filename: str) -> tuple[str, str, str] | None:
    """'gauge_livesum_123.db' -> ('gauge', 'livesum', '123'); None if not ours."""
    if not filename.endswith(".db"):
        return None
    parts = filename[:-3].split("_")
    if parts[0] == "gauge" and len(parts) >= 3 and parts[1] in _GAUGE_MODES:
        return "gauge", parts[1], "_".join(parts[2:])
    if parts[0] in ("counter", "histogram", "summary") and len(parts) >= 2:
        return parts[0], "", "_".join(parts[1:])
    return None


class DirectoryCollector:
    """A prometheus-client collector over one metrics directory.

    Not thread safe on its own: the service serialises scrapes around it.
    """

    def __init__(self, directory: str, worker_timeout: float = 10.0,
                 max_task_names: int = DEFAULT_MAX_TASK_NAMES) -> None:
        self.directory = directory
        self.worker_timeout = worker_timeout
        self.max_task_names = max_task_names
        self.last = MergeStats()
        self._keys: dict[str, tuple[str, str, tuple[tuple[str, str], ...], str]] = {}
        self._names: set[str] = set()  # admitted task names: once in, always in (no flapping series)
        self._folded: set[int] = set()  # hashes of the names beyond the cap, for the count
        self._damaged_logged: set[str] = set()
        self._archives: dict[str, list[tuple[str, float, float]] | Exception] = {}

    def _key(self, key: str) -> tuple[str, str, tuple[tuple[str, str], ...], str]:
        parsed = self._keys.get(key)
        if parsed is None:
            metric, sample, labels, help_text = json.loads(key)
            label_map = {str(k): str(v) for k, v in labels.items()}
            name = label_map.get("name")
            if name is not None and name != OVERFLOW and str(metric).startswith("celery_task_") \
                    and name not in self._names:
                if len(self._names) < self.max_task_names:
                    self._names.add(name)
                else:
                    label_map["name"] = OVERFLOW
                    if len(self._folded) < 10_000_000:
                        self._folded.add(hash(name))
            parsed = (str(metric), str(sample), tuple(sorted(label_map.items())), str(help_text))
            if len(self._keys) < 200_000 and len(key) < 2048:  # hostile 10 KB names are parsed each time
                self._keys[key] = parsed
        return parsed

    @staticmethod
    def _read_bytes(path: str) -> tuple[bytes, int]:
        """The used part of a file, and the open descriptor (the caller closes it)."""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO in a file's place must not hang us
        try:
            data = os.read(fd, 4096)  # files are preallocated: read only the used part
            if len(data) >= 4:
                used = int.from_bytes(data[:4], "little", signed=True)
                while 0 < len(data) < used:
                    more = os.read(fd, used - len(data))
                    if not more:
                        break
                    data += more
        except BaseException:
            os.close(fd)
            raise
        return data, fd

    def _read(self, path: str, live: bool) -> list[tuple[str, float, float]] | None:
        """A file's entries; None for a live-gauge file whose writer is dead.

        The writer's lock (see store.py) says whether it is alive, from any
        container: no pid is compared. Files without our header tag are
        judged by nobody and always read.
        """
        data, fd = self._read_bytes(path)
        try:
            if live and data[4:8] == MAGIC and not held_by_a_live_writer(fd):
                return None
        finally:
            os.close(fd)
        return list(read_entries(data))

    def _plan(self, names: list[str]) -> list[tuple[str, str, str, str, str]]:
        """(path, display name, kind, mode, pid) of every file to merge, archives first.

        Staged files (see compact.py) count only while their staging
        generation is newer than their kind's archive.
        """
        plan: list[tuple[str, str, str, str, str]] = []
        generations: dict[str, int] = {}
        rest: list[tuple[str, str, str, str, str]] = []
        for filename in names:
            parsed = _parse_name(filename)
            if parsed is None:
                continue
            kind, mode, pid = parsed
            entry = (os.path.join(self.directory, filename), filename, kind, mode, pid)
            if filename.endswith(ARCHIVE_SUFFIX):
                prefix = filename[: -len(ARCHIVE_SUFFIX)]
                generations[prefix], self._archives[entry[0]] = self._read_archive(entry[0])
                plan.append(entry)
            else:
                rest.append(entry)
        for gen, sname in sorted(staging_dirs(names).items()):
            sdir = os.path.join(self.directory, sname)
            try:
                staged = sorted(os.listdir(sdir))
            except OSError:
                continue  # finished and removed since the listing
            for filename in staged:
                kind_prefix = kind_of(filename)
                parsed = _parse_name(filename)
                if kind_prefix is None or parsed is None or gen <= generations.get(kind_prefix, 0):
                    continue
                rest.append((os.path.join(sdir, filename), f"{sname}/{filename}", *parsed))
        return plan + rest

    def _read_archive(self, path: str) -> tuple[int, list[tuple[str, float, float]] | Exception]:
        """An archive's generation and entries, read once; a damaged one has generation 0."""
        try:
            data, fd = self._read_bytes(path)
            os.close(fd)
            return archive_generation(data), list(read_entries(data))
        except (OSError, ValueError) as exc:
            return 0, exc

    def merge(self) -> tuple[list[Metric], MergeStats]:
        stats = MergeStats()
        with directory_lock(self.directory, exclusive=False, wait=5.0) as held:
            if not held and "compact-lock" not in self._damaged_logged:
                self._damaged_logged.add("compact-lock")
                log.error("compaction held %s for over 5 s; reading without waiting", self.directory)
            try:
                names = sorted(os.listdir(self.directory))
            except OSError as exc:
                if "missing-dir" not in self._damaged_logged:
                    self._damaged_logged.add("missing-dir")
                    log.error("metrics directory %s unreadable: %s", self.directory, exc.strerror or exc)
                self.last = stats
                return [self._folded_family()], stats
            plan = self._plan(names)
            types, helps, values = self._merge_files(plan, stats)
        families = self._families(types, helps, values)
        families.append(self._folded_family())
        self.last = stats
        return families, stats

    def _folded_family(self) -> Metric:
        folded = Metric("celery_exporter_task_names_folded",
                        "Distinct task names beyond the exporter's cap, shown as __overflow__.", "gauge")
        folded.add_sample("celery_exporter_task_names_folded", {}, float(len(self._folded)))
        return folded

    def _merge_files(
        self, plan: list[tuple[str, str, str, str, str]], stats: MergeStats,
    ) -> tuple[dict[str, str], dict[str, str], dict[tuple[str, str, tuple[tuple[str, str], ...]], float]]:
        # (metric, sample, labels) -> value, per merge rule
        types: dict[str, str] = {}
        helps: dict[str, str] = {}
        modes: dict[str, str] = {}
        values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        stamps: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        archives, self._archives = self._archives, {}
        for path, filename, kind, mode, pid in plan:
            try:
                read = archives.pop(path) if path in archives else self._read(path, live=mode.startswith("live"))
                if isinstance(read, Exception):
                    raise read
            except FileNotFoundError:
                continue  # reaped between listdir and open
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                stats.files_unreadable += 1
                if filename not in self._damaged_logged:
                    self._damaged_logged.add(filename)
                    log.error("skipping damaged metrics file %s: %s", filename, exc)
                continue
            if read is None:
                stats.files_dead += 1
                continue
            stats.files_read += 1
            for raw_key, value, stamp in read:
                try:
                    metric, sample, labels, help_text = self._key(raw_key)
                except (ValueError, TypeError, AttributeError):
                    continue
                types[metric] = kind
                helps.setdefault(metric, help_text)
                if kind == "gauge":
                    modes[metric] = mode
                    if mode in ("all", "liveall"):
                        labels = (*labels, ("pid", pid))
                key = (metric, sample, labels)
                if kind != "gauge" or mode in ("sum", "livesum", "all", "liveall"):
                    values[key] += value
                elif mode in ("min", "livemin"):
                    values[key] = min(values[key], value) if key in values else value
                elif mode in ("max", "livemax"):
                    values[key] = max(values[key], value) if key in values else value
                else:  # mostrecent
                    if key not in stamps or stamp > stamps[key]:
                        stamps[key] = stamp
                        values[key] = value
                if metric.startswith("celery_task_") and kind == "counter":
                    queue = dict(labels).get("queue_name")
                    if queue:
                        stats.queues_seen.add(queue)
        return types, helps, values

    def _families(
        self, types: dict[str, str], helps: dict[str, str],
        values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float],
    ) -> list[Metric]:
        by_metric: dict[str, list[tuple[str, tuple[tuple[str, str], ...], float]]] = defaultdict(list)
        for (metric, sample, labels), value in values.items():
            by_metric[metric].append((sample, labels, value))
        families: list[Metric] = []
        now = time.time()
        stale = {labels for _, labels, stamp in by_metric.get(HEARTBEAT.name, [])
                 if not (stamp > 0 and now - stamp <= self.worker_timeout)}
        for metric in sorted(by_metric):
            samples = by_metric[metric]
            if metric in _PER_WORKER_LIVE:
                # A worker that stopped beating says nothing about its pool: do not echo its last word.
                samples = [s for s in samples if s[1] not in stale]
            if metric == HEARTBEAT.name:
                families.append(self._worker_up(samples, now))
                continue
            kind = types[metric]
            family = Metric(metric, helps[metric], kind)
            if kind == "histogram":
                family.samples = list(_histogram_samples(metric, samples))
            else:
                family.samples = [Sample(s, dict(labels), v) for s, labels, v in sorted(samples)]
            families.append(family)
        return families

    def _worker_up(self, samples: Iterable[tuple[str, tuple[tuple[str, str], ...], float]], now: float) -> Metric:
        family = Metric("celery_worker_up", "1 if the worker's heartbeat is fresher than the timeout.", "gauge")
        for _, labels, stamp in sorted(samples):
            up = 1.0 if stamp > 0 and now - stamp <= self.worker_timeout else 0.0
            family.add_sample("celery_worker_up", dict(labels), up)
        return family

    def collect(self) -> Iterator[Metric]:
        families, _ = self.merge()
        yield from families


def _histogram_samples(
    metric: str, samples: list[tuple[str, tuple[tuple[str, str], ...], float]],
) -> Iterator[Sample]:
    """Turn stored per-bucket counts into cumulative buckets, count and sum."""
    buckets: dict[tuple[tuple[str, str], ...], dict[float, float]] = defaultdict(dict)
    sums: dict[tuple[tuple[str, str], ...], float] = {}
    for sample, labels, value in samples:
        if sample.endswith("_sum"):
            sums[labels] = value
        elif sample.endswith("_bucket"):
            label_map = dict(labels)
            try:
                bound = float(label_map.pop("le"))
            except (KeyError, ValueError):
                continue
            base = tuple(sorted(label_map.items()))
            buckets[base][bound] = buckets[base].get(bound, 0.0) + value
    for labels in sorted(set(buckets) | set(sums)):
        acc = 0.0
        for bound in sorted(buckets.get(labels, {})):
            acc += buckets[labels][bound]
            yield Sample(metric + "_bucket", {**dict(labels), "le": format_le(bound)}, acc)
        yield Sample(metric + "_count", dict(labels), acc)
        yield Sample(metric + "_sum", dict(labels), sums.get(labels, 0.0))


def merged_samples(collector: Any) -> dict[str, float]:
    """Flatten a collector's output to 'name{a="b"}' -> value, for tests and tools."""
    out: dict[str, float] = {}
    for family in collector.collect():
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out
