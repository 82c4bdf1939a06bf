"""Compaction stopped part-way, as a crash would leave the directory, for the tests of what comes after.

The compactor has no hook of its own: the steps after the crash point are swapped for ones that do
nothing, and `compact()` returns what it counted up to there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from celery_signal_exporter import compact as compaction


@contextmanager
def crashing_after(step: str) -> Iterator[None]:
    """Within the block, `compact()` stops after `step`:

    - "reap_link": a dead live file's lost runs are counted (their counter file linked into place),
      the live file is not yet removed, and nothing is staged;
    - "stage": dead files are moved into a staging directory, no archive is rewritten;
    - "archive": the archives are rewritten, nothing staged is removed.
    """
    with pytest.MonkeyPatch.context() as patch:
        if step == "reap_link":
            unlink = compaction._unlink_reaped

            def keep_if_counted(path: str, counted: str, lost: dict[str, float],
                                result: compaction.CompactResult) -> str | tuple[str, int]:
                return "alive" if counted else unlink(path, counted, lost, result)

            patch.setattr(compaction, "_unlink_reaped", keep_if_counted)
            patch.setattr(compaction, "_fold_dead", lambda *args: None)
        elif step == "stage":
            patch.setattr(compaction, "_fold_staged", lambda *args: set())
            patch.setattr(compaction, "_remove_absorbed", lambda *args: None)
        elif step == "archive":
            patch.setattr(compaction, "_remove_absorbed", lambda *args: None)
        else:
            raise ValueError(f"no compaction step {step!r}")
        yield
