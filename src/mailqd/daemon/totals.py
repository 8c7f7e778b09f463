"""What a worker counts: jobs claimed, and how their attempts ended (`BatchResult`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mailqd.models import Outcome
from mailqd.store import Completion
from mailqd.store.screening import Screened

__all__ = ["BatchResult", "as_fields"]


@dataclass(slots=True)
class BatchResult:
    """How many jobs were claimed, and how their attempts ended."""

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    ambiguous: int = 0
    failed: int = 0
    expired: int = 0
    deduplicated: int = 0
    """Not sent: the same content was claimed within `dedup_window` (cancelled)."""
    deferred: int = 0
    """Not sent yet: a recipient reached `recipient_hourly_cap` (pending, next hour)."""
    throttled: int = 0
    """Not sent yet: a recipient domain was at its `domain_rate_limits` (pending, soon)."""
    relay_deferred: int = 0
    """Not sent yet: the relay failed or was down (pending, no attempt used)."""

    @property
    def recorded(self) -> int:
        """Outcomes committed (duplicates, deferrals and throttled jobs at their claim)."""
        return (
            self.sent
            + self.retried
            + self.ambiguous
            + self.failed
            + self.expired
            + self.deduplicated
            + self.deferred
            + self.throttled
            + self.relay_deferred
        )

    def count(self, completions: Iterable[Completion | Screened]) -> None:
        for completion in completions:
            field = _RESULT_FIELD[completion.outcome]
            if field == "deferred" and isinstance(completion, Completion):
                field = "relay_deferred"  # a delivery's deferral; the claim's is the cap
            setattr(self, field, getattr(self, field) + 1)


_RESULT_FIELD = {
    Outcome.SENT: "sent",
    Outcome.RETRY: "retried",
    Outcome.AMBIGUOUS: "ambiguous",
    Outcome.FAILED: "failed",
    Outcome.EXPIRED: "expired",
    Outcome.LOST: "failed",
    Outcome.DUPLICATE: "deduplicated",
    Outcome.DEFERRED: "deferred",
    Outcome.THROTTLED: "throttled",
}


def as_fields(result: BatchResult) -> dict[str, int]:
    """The counts as log fields."""
    return {name: getattr(result, name) for name in BatchResult.__slots__}
