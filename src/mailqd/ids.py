"""Job ids: UUIDs in the version 7 layout (RFC 9562), made by the client.

The first 48 bits are the Unix time in milliseconds, so ids made close
together sort together: each new row lands at the right-hand edge of the
primary-key index instead of on a random page. That made bulk enqueue about
a fifth cheaper for PostgreSQL than random (version 4) ids
(bench/bench_store.py). Ids stay opaque to callers; rows inserted by plain
SQL get the database's random UUID, which is just as valid.
"""

from __future__ import annotations

import os
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0x2 << 62
_RANDOM_MASK = ~((0xF << 76) | (0x3 << 62))


def new_job_id() -> str:
    """A fresh time-ordered UUID (version 7) as text."""
    millis = time.time_ns() // 1_000_000
    random_bits = int.from_bytes(os.urandom(10), "big")
    value = ((millis << 80) | random_bits) & _RANDOM_MASK | _VERSION_7 | _VARIANT_RFC
    return str(uuid.UUID(int=value))
