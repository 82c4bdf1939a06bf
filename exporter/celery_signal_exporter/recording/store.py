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

import fcntl
import mmap
import os
import re
import stat
import struct
import sys
import threading
from typing import Protocol

from celery_signal_exporter.directory import (
    MAGIC,
    TAG_OFFSET,
    encode_entry,
    encode_used,
    is_live_kind,
    is_ours,
    lock_as_writer,
    new_header,
    padded_length,
    same_file,
    tmp_file,
    used_size,
    walk_entries,
    writer_file,
)

INITIAL_SIZE = 1 << 16
#: The name number of a worker main's ledger (`counter_<pid>-1000.db`): past any name `open_owned` takes.
LEDGER_N = 1000
_DOUBLE = struct.Struct("<d")


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


class Ledger:
    """Counts for processes that cannot write their own files, in space a worker main reserved ahead.

    A pool child forked once the metrics volume is full cannot make its
    files, so without this its runs would be counted nowhere. The worker
    main makes the ledger at start, while there is room: a counter file
    holding every series it will take, at 0, so adding to one never needs
    space. The main holds the writer's lock (the file is its own, merged and
    compacted like any other); its children, and the main when its own file
    is full, add under a POSIX record lock, which is separate from that flock.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._values: Doubles | None = None
        self._slots: dict[str, int] = {}

    @staticmethod
    def make(directory: str, keys: list[str]) -> MetricFile:
        """This process's ledger (its writer's lock held) with every key in it; OSError without room.

        A ledger left under our pid by a dead worker main (a restarted
        container is pid 1 again) is carried on, as counters are; one held
        by a live process (another pid namespace) makes us take the next name.
        """
        pid = os.getpid()
        for n in range(LEDGER_N, LEDGER_N + 100):
            path = os.path.join(directory, writer_file("counter", pid, n))
            fd, tmp = _fresh_file(directory, os.path.basename(path))
            try:
                os.link(tmp, path)
            except FileExistsError:
                os.close(fd)
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
                try:
                    lock_as_writer(fd)
                except BlockingIOError:
                    os.close(fd)
                    continue
            finally:
                os.unlink(tmp)
            ledger = MetricFile(path, fd)
            try:
                for key in keys:
                    ledger.slot(key)
            except BaseException:
                ledger.close()
                raise
            return ledger
        raise OSError(f"no free ledger name for pid {pid} in {directory}")

    def add(self, key: str, amount: float = 1.0) -> bool:
        """Add to `key`'s value; False if the ledger does not hold that key."""
        if self._values is None:
            self._fd = os.open(self.path, os.O_RDWR)
            size = os.fstat(self._fd).st_size
            self._map = mmap.mmap(self._fd, size)
            self._values = as_doubles(self._map)
            for key_, length, pos in walk_entries(self._map[:used_size(self._map)]):
                self._slots[key_] = (pos + 4 + padded_length(length)) >> 3
        index = self._slots.get(key)
        if index is None:
            return False
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            self._values[index] += amount
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        return True

    def close(self) -> None:
        if self._values is not None:
            self._values.release()
            self._values = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Store:
    """All of this process's metric files in one directory.

    After a fork the child starts with no open files and a new lock, so it
    writes under its own pid and never into its parent's mapping. It closes
    its inherited copies too, so that it does not keep its parent's writer
    locks alive after the parent dies.
    """

    def __init__(self, directory: str, exclude: re.Pattern[str] | None = None) -> None:
        self.directory = directory
        #: Families switched off (options.py): their recorders write nowhere.
        self.exclude = exclude
        self.generation = 0
        self._files: dict[str, MetricFile] = {}
        self.lock = threading.Lock()
        #: The worker main's ledger (see Ledger): its path is inherited by the children it forks.
        self.ledger_path: str | None = None
        self._ledger: Ledger | None = None
        self._own_ledger: MetricFile | None = None
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        inherited, self._files = self._files, {}
        self.lock = threading.Lock()
        self.generation += 1
        if self._own_ledger is not None:
            inherited["ledger"] = self._own_ledger  # the parent's, and its lock: not ours to keep alive
            self._own_ledger = None
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        for f in inherited.values():
            try:
                f.close()  # our copies only: the parent's lock lives on in the parent
            except (OSError, ValueError):
                pass

    def reserve(self, keys: list[str]) -> None:
        """Make this process's ledger, holding `keys`, for the children it will fork (a worker main, at start)."""
        with self.lock:
            if self._own_ledger is None:
                os.makedirs(self.directory, exist_ok=True)
                self._own_ledger = Ledger.make(self.directory, keys)
                self.ledger_path = self._own_ledger.path

    def spill(self, key: str, amount: float = 1.0) -> bool:
        """Add to `key` in the worker main's ledger, for a write this process's own file could not take."""
        with self.lock:
            if self.ledger_path is None:
                return False
            if self._ledger is None:
                self._ledger = Ledger(self.ledger_path)
            return self._ledger.add(key, amount)

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
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None
            if self._own_ledger is not None:
                self._own_ledger.close()
                self._own_ledger = None
            self.generation += 1
