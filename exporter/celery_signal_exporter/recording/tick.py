"""A tick on a daemon thread: where the worker's own timer cannot tick (solo) and in beat.

Beat sleeps up to `beat_max_loop_interval` between its own ticks and the solo pool runs each task on
the consumer's loop, so both need a thread to write their heartbeat on time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class TickThread:
    """Calls `fn()` every `interval` seconds on a daemon thread until stopped."""

    def __init__(self, interval: float, fn: Callable[[], None]) -> None:
        self.interval, self.fn = interval, fn
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="celery-signal-exporter-tick", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                self.fn()
            except Exception:  # noqa: BLE001 - tick() counts its own errors; the thread must live on
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """Stop and wait (bounded) for a tick in flight, so that nothing is written after the last word."""
        self.stopping.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)
