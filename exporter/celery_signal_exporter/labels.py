"""Label values made from outside input are capped in length.

A task name, queue name or exception class name comes from our users' code or
from whoever publishes to the broker. Uncapped, one 100 KB name makes every
scrape 4.8 MiB and every child's histogram file 4 MiB, so every label value made
from outside input goes through `cut` once, when it is first seen.
"""

from __future__ import annotations

import hashlib

#: The documented cap on a label value's length, in characters.
MAX_LABEL_LENGTH: int = 200
#: What a label value becomes once its per-process cap of distinct values is reached.
OVERFLOW = "__overflow__"
_HASH_CHARS = 12


def cut(value: str, limit: int = MAX_LABEL_LENGTH) -> str:
    """`value` unchanged if it fits, else a prefix, "~" and a short hash of the whole value.

    The result is exactly `limit` characters long. The hash keeps distinct long
    values distinct, and being a real digest (not Python's salted hash()) it
    cuts the same way in every process, so their series merge.
    """
    if len(value) <= limit:
        return value
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()[:_HASH_CHARS]
    keep = limit - 1 - _HASH_CHARS
    if keep < 0:  # a limit too small for the marker: the hash alone
        return digest[:limit]
    return f"{value[:keep]}~{digest}"
