"""The retry backoff policy: how long a transiently failed job waits before its next attempt.

The policy is a tenacity wait strategy (exponential, capped, with jitter), so
it reads like every other retry policy in the Python world; the worker does
not loop inside tenacity, though: a retry is a row rescheduled in the
database, so the strategy is only evaluated for "attempt n failed, how long
until n + 1?".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import tenacity
from tenacity.wait import wait_base

from mailqd.config import Settings

__all__ = ["BackoffPolicy", "wait_proportional_jitter"]


class wait_proportional_jitter(wait_base):
    """Wrap a wait strategy and add up to `fraction` of its delay at random.

    Jitter spreads the retries of jobs that failed together (an SMTP outage)
    so they do not all come back in the same second. Without `rng` it draws
    from the `random` module's generator, which Python reseeds in every
    forked child: the policy is built once in the supervisor (`mailqd.runtime`),
    and a private generator copied into each worker would give every worker
    the same jitter.
    """

    def __init__(self, inner: wait_base, fraction: float, rng: random.Random | None = None):
        self.inner = inner
        self.fraction = fraction
        self.rng = rng

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        delay = self.inner(retry_state)
        if self.fraction <= 0:
            return delay
        uniform = random.uniform if self.rng is None else self.rng.uniform
        return delay + uniform(0.0, self.fraction * delay)


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """`delay(n)`: seconds to wait after failed attempt n (1-based) before trying again."""

    wait: wait_base

    @classmethod
    def from_settings(cls, settings: Settings, rng: random.Random | None = None) -> BackoffPolicy:
        """base * factor^(n-1), capped at max, plus jitter; defaults give 60, 120, 240 s."""
        exponential = tenacity.wait_exponential(
            multiplier=settings.backoff_base,
            exp_base=settings.backoff_factor,
            max=settings.backoff_max,
        )
        return cls(wait_proportional_jitter(exponential, settings.backoff_jitter, rng))

    def delay(self, attempt: int) -> float:
        state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        state.attempt_number = max(1, attempt)
        return float(self.wait(state))
