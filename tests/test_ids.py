"""Job ids made by the client: valid UUIDs, unique, and in creation order across milliseconds."""

from __future__ import annotations

import time
import uuid

from mailqd.ids import new_job_id


def _next_millisecond() -> None:
    start = time.time_ns() // 1_000_000
    deadline = time.monotonic() + 1.0
    while time.time_ns() // 1_000_000 == start:
        assert time.monotonic() < deadline, "the clock did not advance"


def test_ids_are_version_7_uuids() -> None:
    parsed = uuid.UUID(new_job_id())
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


def test_ids_are_unique() -> None:
    ids = [new_job_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)


def test_ids_made_in_later_milliseconds_sort_later() -> None:
    earlier = [new_job_id() for _ in range(10)]
    _next_millisecond()
    later = [new_job_id() for _ in range(10)]
    assert max(earlier) < min(later)
