"""Parse histogram bucket bounds from text (an option or environment variable).

One parser for every place an operator types buckets, so that a typo is
caught with the same one-line message by `instrument()`, by
`celery-signal-exporter check` (an init container) and by the docs, instead
of surfacing later as a histogram that silently puts everything in +Inf.
"""

from __future__ import annotations

import math


def parse_buckets(text: str, option: str, unit: str = "seconds") -> tuple[float, ...]:
    """Comma-separated upper bounds in `unit` (seconds, or bytes for memory), e.g. ``"0.01,0.1,1,10"``.

    They must be finite numbers greater than 0, in strictly increasing order
    (+Inf is always added by the histogram itself, so it is refused here).
    Raises ValueError with one line naming `option` and the bad item.
    """
    example = "1048576,16777216,268435456" if unit == "bytes" else "0.1,1,10"
    items = [item.strip() for item in text.split(",")]
    if not text.strip():
        raise ValueError(f"{option}: no buckets given; expected comma-separated {unit} such as {example}")
    bounds: list[float] = []
    for position, item in enumerate(items, 1):
        if not item:
            raise ValueError(f"{option}: bucket {position} is empty; expected comma-separated {unit} such as {example}")
        try:
            bound = float(item)
        except ValueError:
            raise ValueError(f"{option}: bucket {item!r} is not a number") from None
        if not math.isfinite(bound):
            raise ValueError(f"{option}: bucket {item!r} must be finite (+Inf is always added)")
        if bound <= 0:
            raise ValueError(f"{option}: bucket {item!r} must be greater than 0")
        if bounds and bound <= bounds[-1]:
            raise ValueError(f"{option}: bucket {item!r} must be greater than the one before it ({bounds[-1]:g})")
        bounds.append(bound)
    return tuple(bounds)
