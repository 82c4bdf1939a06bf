"""Per-process metric files in prometheus-client's multiprocess format.

Why our own writer rather than prometheus-client's multiprocess values: those
are switched on globally through an environment variable read at import time,
which would silently change every metric in our users' processes. This writer
touches only our metrics, reopens its files after fork without a per-write
pid check, and grows files with posix_fallocate so a full disk raises ENOSPC
instead of killing the worker with SIGBUS. The file format is unchanged, so
prometheus-client's own MultiProcessCollector can still read the directory.

File names follow prometheus-client: ``counter_<pid>.db``,
``histogram_<pid>.db`` and ``gauge_<mode>_<pid>.db``.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from collections.abc import Iterator

INITIAL_SIZE = 1 << 16
_INT = struct.Struct("<i")
_DOUBLE = struct.Struct("<d")
_TWO_DOUBLES = struct.Struct("<dd")


def series_key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    """The mmap key prometheus-client uses for one series of one sample."""
    return json.dumps([metric, sample, labels, help_text], sort_keys=True)


def read_entries(data: bytes) -> Iterator[tuple[str, float, float]]:
    """Yield (key, value, timestamp) from one file's bytes.

    Raises ValueError on anything that is not a well-formed file, so the
    reader can count the file as damaged instead of failing the scrape.
    """
    if len(data) < 8:
        raise ValueError("shorter than its 8-byte header")
    used = _INT.unpack_from(data, 0)[0]
    if used < 8 or used > len(data):
        raise ValueError(f"header says {used} bytes used of {len(data)}")
    pos = 8
    while pos < used:
        if pos + 4 > used:
            raise ValueError("truncated entry length")
        length = _INT.unpack_from(data, pos)[0]
        padded = length + (8 - (length + 4) % 8)
        if length <= 0 or pos + 4 + padded + 16 > used:
            raise ValueError("entry runs past the used size")
        key = data[pos + 4 : pos + 4 + length].decode("utf-8")
        value, timestamp = _TWO_DOUBLES.unpack_from(data, pos + 4 + padded)
        yield key, value, timestamp
        pos += 4 + padded + 16


class MetricFile:
    """One process's file of (key -> value, timestamp) slots. Not thread safe."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size == 0:
            os.posix_fallocate(self._fd, 0, INITIAL_SIZE)
            size = INITIAL_SIZE
        self._size: int = size
        self._map = mmap.mmap(self._fd, size)
        self._slots: dict[str, int] = {}
        used = _INT.unpack_from(self._map, 0)[0]
        if used == 0:
            used = 8
            self._map[0:4] = _INT.pack(used)
        else:
            # A file left by an earlier process with the same pid: keep its
            # values (counters carry on from where they were, nothing is lost).
            pos = 8
            for key, _, _ in read_entries(self._map[:used]):
                length = len(key.encode("utf-8"))
                pos += 4 + length + (8 - (length + 4) % 8)
                self._slots[key] = pos
                pos += 16
        self._used: int = used

    def slot(self, key: str) -> int:
        """Offset of the key's value, appending a zeroed entry if it is new."""
        known = self._slots.get(key)
        if known is not None:
            return known
        encoded = key.encode("utf-8")
        padding = 8 - (len(encoded) + 4) % 8
        entry = _INT.pack(len(encoded)) + encoded + b" " * padding + _TWO_DOUBLES.pack(0.0, 0.0)
        while self._used + len(entry) > self._size:
            self._grow()
        self._map[self._used : self._used + len(entry)] = entry
        self._used += len(entry)
        self._map[0:4] = _INT.pack(self._used)
        pos = self._used - 16
        self._slots[key] = pos
        return pos

    def _grow(self) -> None:
        new_size = self._size * 2
        os.posix_fallocate(self._fd, 0, new_size)  # ENOSPC here, not SIGBUS later
        self._map.close()
        self._map = mmap.mmap(self._fd, new_size)
        self._size = new_size

    def add(self, pos: int, amount: float) -> None:
        value = _DOUBLE.unpack_from(self._map, pos)[0] + amount
        self._map[pos : pos + 16] = _TWO_DOUBLES.pack(value, 0.0)

    def set(self, pos: int, value: float, timestamp: float = 0.0) -> None:
        self._map[pos : pos + 16] = _TWO_DOUBLES.pack(value, timestamp)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class Store:
    """All of this process's metric files in one directory.

    After a fork the child starts with no open files and a new lock, so it
    writes under its own pid and never into its parent's mapping.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.generation = 0
        self._files: dict[str, MetricFile] = {}
        self.lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._files = {}
        self.lock = threading.Lock()
        self.generation += 1

    def file(self, prefix: str) -> MetricFile:
        """The file for a kind such as 'counter' or 'gauge_livesum'. Lock held by caller."""
        f = self._files.get(prefix)
        if f is None:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"{prefix}_{os.getpid()}.db")
            if prefix.startswith("gauge_live") and os.path.exists(path):
                # Left by a dead process that had our pid: its live values are not ours.
                os.unlink(path)
            f = MetricFile(path)
            self._files[prefix] = f
        return f

    def close(self) -> None:
        with self.lock:
            for f in self._files.values():
                f.close()
            self._files = {}
            self.generation += 1
