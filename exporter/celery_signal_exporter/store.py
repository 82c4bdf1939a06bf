"""Per-process metric files in prometheus-client's multiprocess format.

Why our own writer rather than prometheus-client's multiprocess values: those
are switched on globally through an environment variable read at import time,
which would silently change every metric in our users' processes. This writer
touches only our metrics, reopens its files after fork without a per-write
pid check, and grows files with posix_fallocate so a full disk raises ENOSPC
instead of killing the worker with SIGBUS. The file format is unchanged, so
prometheus-client's own MultiProcessCollector can still read the directory.

File names, the header, the writer's lock and what it says about liveness are
the directory's contract, written down in directory.py; this module writes by
it. In short: ``counter_<pid>.db``, ``histogram_<pid>.db`` and
``gauge_<mode>_<pid>.db`` (``counter_<pid>-<n>.db`` when a live process in
another pid namespace holds the name); the writer holds an exclusive flock(2)
on its file for as long as it lives, so whoever can take the lock knows the
writer is gone; our files carry ``MAGIC`` in the four header bytes
prometheus-client leaves unused, so files written by anything else are never
judged by the lock.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
import sys
import threading
from typing import Protocol

# The file format's names live in directory.py; they stay importable from here.
from celery_signal_exporter.directory import (
    MAGIC,
    TAG_OFFSET,
    encode_entries,
    encode_entry,
    encode_used,
    held_by_a_live_writer,
    is_live_kind,
    is_ours,
    lock_as_writer,
    new_header,
    padded_length,
    read_entries,
    same_file,
    tmp_file,
    used_size,
    walk_entries,
    writer_file,
)

__all__ = [
    "INITIAL_SIZE", "MAGIC", "Doubles", "MetricFile", "Store", "as_doubles", "encode_entries",
    "held_by_a_live_writer", "open_owned", "padded_length", "read_entries", "series_key", "walk_entries",
    "write_gauge",
]

INITIAL_SIZE = 1 << 16
_DOUBLE = struct.Struct("<d")


def series_key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    """The mmap key prometheus-client uses for one series of one sample."""
    return json.dumps([metric, sample, labels, help_text], sort_keys=True)


class Doubles(Protocol):
    """A file's bytes seen as an array of doubles, indexed by byte offset // 8."""

    def __getitem__(self, index: int, /) -> float: ...
    def __setitem__(self, index: int, value: float, /) -> None: ...
    def release(self) -> None: ...


class _PackedDoubles:
    """Doubles through struct, for big-endian machines, where the file's little-endian values are not native."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self._buffer = buffer

    def __getitem__(self, index: int) -> float:
        value: float = _DOUBLE.unpack_from(self._buffer, index * 8)[0]
        return value

    def __setitem__(self, index: int, value: float) -> None:
        _DOUBLE.pack_into(self._buffer, index * 8, value)

    def release(self) -> None:
        pass


def as_doubles(buffer: mmap.mmap) -> Doubles:
    """Why a view: `values[i] += 1` on a cast memoryview is ~7x cheaper than a struct round trip,
    and this runs on every task inside our users' workers."""
    if sys.byteorder == "little":
        return memoryview(buffer).cast("d")
    return _PackedDoubles(buffer)


def write_gauge(values: Doubles, index: int, value: float, timestamp: float = 0.0) -> None:
    """A slot's value and its timestamp, which sits in the double after it."""
    values[index] = value
    values[index + 1] = timestamp


class MetricFile:
    """One process's file of (key -> value, timestamp) slots. Not thread safe.

    Values sit at 8-aligned offsets, so `values[offset >> 3]` is a slot's
    value and `values[(offset >> 3) + 1]` its timestamp.
    """

    def __init__(self, path: str, fd: int | None = None) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if fd is None else fd
        size = os.fstat(self._fd).st_size
        if size == 0:
            os.posix_fallocate(self._fd, 0, INITIAL_SIZE)
            size = INITIAL_SIZE
        self._size: int = size
        self._map = mmap.mmap(self._fd, size)
        self.values: Doubles = as_doubles(self._map)
        self._slots: dict[str, int] = {}
        used = used_size(self._map)
        if used == 0:
            header = new_header()
            used = len(header)
            self._map[TAG_OFFSET:used] = header[TAG_OFFSET:]
            self._map[0:TAG_OFFSET] = header[:TAG_OFFSET]
        else:
            # A file left by an earlier process with the same pid: keep its
            # values (counters carry on from where they were, nothing is lost).
            for key, length, pos in walk_entries(self._map[:used]):
                self._slots[key] = pos + 4 + padded_length(length)
        self._used: int = used

    def slot(self, key: str) -> int:
        """Offset of the key's value, appending a zeroed entry if it is new."""
        known = self._slots.get(key)
        if known is not None:
            return known
        entry = encode_entry(key, 0.0, 0.0)
        while self._used + len(entry) > self._size:
            self._grow()
        self._map[self._used : self._used + len(entry)] = entry
        self._used += len(entry)
        self._map[0:TAG_OFFSET] = encode_used(self._used)
        pos = self._used - 16
        self._slots[key] = pos
        return pos

    def _grow(self) -> None:
        new_size = self._size * 2
        os.posix_fallocate(self._fd, 0, new_size)  # ENOSPC here, not SIGBUS later
        bigger = mmap.mmap(self._fd, new_size)
        self.values.release()  # the old map cannot close while a view of it is alive
        self._map.close()
        self._map = bigger
        self.values = as_doubles(bigger)
        self._size = new_size

    def add(self, pos: int, amount: float) -> None:
        self.values[pos >> 3] += amount

    def set(self, pos: int, value: float, timestamp: float = 0.0) -> None:
        write_gauge(self.values, pos >> 3, value, timestamp)

    def close(self) -> None:
        self.values.release()
        self._map.close()
        os.close(self._fd)


def _fresh_file(directory: str, name: str) -> tuple[int, str]:
    """A new, locked, fully initialised file under a temporary name.

    Readers never see a half-made file: the caller links or renames it into
    place only once its header is written and the writer's lock is held.
    """
    tmp = os.path.join(directory, tmp_file(name))
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        lock_as_writer(fd)
        os.posix_fallocate(fd, 0, INITIAL_SIZE)
        os.pwrite(fd, new_header(), 0)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def open_owned(directory: str, prefix: str, pid: int) -> MetricFile:
    """Open this process's file of kind `prefix`, holding the writer's lock.

    An existing file under our name whose lock is free was left by a dead
    process with our pid: counters carry on in it (nothing is lost, nothing
    counted twice); live gauges start afresh, since its values are not ours.
    A file whose lock is held belongs to a live process with the same pid in
    another pid namespace: we take the next name instead.
    """
    live = is_live_kind(prefix)
    for n in range(1000):
        name = writer_file(prefix, pid, n)
        path = os.path.join(directory, name)
        for _ in range(10):  # retried only when a compactor moves the file under us
            fd, tmp = _fresh_file(directory, name)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            else:
                os.unlink(tmp)
                return MetricFile(path, fd)
            os.close(fd)
            os.unlink(tmp)
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
            except FileNotFoundError:
                continue
            except OSError:
                break  # not ours to write (a directory, a FIFO, unreadable): next name
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                break
            try:
                lock_as_writer(fd)
            except BlockingIOError:
                os.close(fd)
                break  # a live writer has this name: try the next one
            if not same_file(fd, path):
                os.close(fd)  # compacted or reaped between open and lock
                continue
            if live:
                fresh, tmp = _fresh_file(directory, name)
                os.rename(tmp, path)  # atomic: readers see the old file or the new one
                os.close(fd)
                return MetricFile(path, fresh)
            try:
                f = MetricFile(path, fd)
            except ValueError:
                # Damaged: keep it for a human (never deleted blindly), write elsewhere.
                os.close(fd)
                break
            if not is_ours(os.pread(fd, 8, 0)):
                os.pwrite(fd, MAGIC, TAG_OFFSET)
            return f
    raise OSError(f"no free metrics file name for {prefix}_{pid} in {directory}")


class Store:
    """All of this process's metric files in one directory.

    After a fork the child starts with no open files and a new lock, so it
    writes under its own pid and never into its parent's mapping. It closes
    its inherited copies too, so that it does not keep its parent's writer
    locks alive after the parent dies.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.generation = 0
        self._files: dict[str, MetricFile] = {}
        self.lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        inherited, self._files = self._files, {}
        self.lock = threading.Lock()
        self.generation += 1
        for f in inherited.values():
            try:
                f.close()  # our copies only: the parent's lock lives on in the parent
            except (OSError, ValueError):
                pass

    def file(self, prefix: str) -> MetricFile:
        """The file for a kind such as 'counter' or 'gauge_livesum'. Lock held by caller."""
        f = self._files.get(prefix)
        if f is None:
            os.makedirs(self.directory, exist_ok=True)
            f = open_owned(self.directory, prefix, os.getpid())
            self._files[prefix] = f
        return f

    def close(self) -> None:
        with self.lock:
            for f in self._files.values():
                f.close()
            self._files = {}
            self.generation += 1
