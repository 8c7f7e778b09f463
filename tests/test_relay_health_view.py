"""What the sidecar makes of the relays' breakers: up/down per relay, degraded or unhealthy.

Pure rules (`mailqd.daemon.sidecar_relays`) and the `/metrics` page made
from worker files (`mailqd.metrics.render`); the sidecar serving them from
a real database is tested in test_sidecar.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from mailqd.breaker import RelayState
from mailqd.daemon.sidecar_relays import relay_health
from mailqd.errors import RELAY_REASONS
from mailqd.metrics import render
from mailqd.routes import RelayPlan, RelaySpec, RouteSpec

T0 = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)

PLAN = RelayPlan.build(
    [RelaySpec("primary", "null://"), RelaySpec("backup", "null://"), RelaySpec("bulk", "null://")],
    [
        RouteSpec(relays=("bulk",), recipient_domains=("news.example",)),
        RouteSpec(relays=("primary", "backup")),
    ],
)


def down(relay: str, reason: str = "refused", error: str = "connection refused") -> RelayState:
    return RelayState(
        relay=relay,
        failures=3,
        down_since=T0,
        probe_at=T0 + timedelta(seconds=5),
        probe_interval=5.0,
        last_reason=reason,
        last_error=error,
        last_failure_at=T0,
    )


def test_a_relay_without_a_row_is_up_and_nothing_is_wrong() -> None:
    health = relay_health(PLAN, [])
    assert health.up_by_name() == (("primary", True), ("backup", True), ("bulk", True))
    assert health.problem() is None and health.degradation() is None


def test_failures_below_the_threshold_leave_a_relay_up() -> None:
    counting = RelayState(relay="primary", failures=2, last_reason="timeout", last_failure_at=T0)
    health = relay_health(PLAN, [counting])
    assert dict(health.up_by_name())["primary"] is True
    assert health.relays[0].failures == 2 and health.relays[0].since is None
    assert health.degradation() is None


def test_one_relay_of_the_default_route_down_is_degraded_not_unhealthy() -> None:
    health = relay_health(PLAN, [down("backup", "auth", "535 5.7.8 bad credentials")])
    assert dict(health.up_by_name()) == {"primary": True, "backup": False, "bulk": True}
    assert health.problem() is None
    assert health.degradation() == "relay down: backup (auth)"


def test_a_relay_only_another_route_uses_down_is_degraded_not_unhealthy() -> None:
    health = relay_health(PLAN, [down("bulk")])
    assert health.problem() is None
    assert health.degradation() == "relay down: bulk (refused)"


def test_every_relay_of_the_default_route_down_is_unhealthy_and_names_them() -> None:
    health = relay_health(PLAN, [down("primary", "timeout"), down("backup", "tls")])
    assert health.problem() == "every relay of the default route is down: primary, backup"
    assert health.degradation() == "relay down: primary (timeout), backup (tls)"


def test_a_row_of_a_relay_no_longer_configured_is_not_shown() -> None:
    health = relay_health(PLAN, [down("old-relay")])
    assert [relay.name for relay in health.relays] == ["primary", "backup", "bulk"]
    assert health.degradation() is None


def test_the_view_of_a_down_relay_masks_the_addresses_in_its_last_error() -> None:
    error = "550 5.7.1 <alice@example.com>: relaying denied for bob@example.org"
    view = relay_health(PLAN, [down("backup", "unavailable", error)]).relays[1]
    assert view.as_json() == {
        "name": "backup",
        "up": False,
        "since": "2026-12-02T03:00:00+00:00",
        "failures": 3,
        "last_reason": "unavailable",
        "last_error": "550 5.7.1 <a***@example.com>: relaying denied for b***@example.org",
        "last_failure_at": "2026-12-02T03:00:00+00:00",
        "next_probe_at": "2026-12-02T03:00:05+00:00",
    }


def test_a_relay_back_up_keeps_its_last_error_but_no_since_or_probe() -> None:
    recovered = RelayState(relay="primary", last_reason="refused", last_error="refused")
    view = relay_health(PLAN, [recovered]).relays[0].as_json()
    assert view["up"] is True and view["since"] is None and view["next_probe_at"] is None
    assert view["last_reason"] == "refused"


# -- the counters on /metrics --------------------------------------------------------

WORKER_SCRIPT = """
import sys
from mailqd.metrics import WorkerMetrics, use_multiprocess_dir
use_multiprocess_dir(sys.argv[1])
metrics = WorkerMetrics()
for _ in range(int(sys.argv[2])):
    metrics.relay_failed("primary", "timeout")
metrics.relay_failed("backup", "auth")
metrics.recipients_refused(int(sys.argv[3]))
metrics.recipients_refused(0)
"""


class _Nothing(Collector):
    def collect(self) -> Iterator[Metric]:
        return iter(())


def samples(page: bytes) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(page.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def test_relay_failures_and_refusals_are_summed_over_worker_processes(tmp_path: Path) -> None:
    """Two worker processes count into their own files; `/metrics` shows the sums, and a 0
    for each configured relay and reason no worker has counted."""
    for failures, refused in ((2, 3), (5, 1)):
        done = subprocess.run(
            [sys.executable, "-c", WORKER_SCRIPT, str(tmp_path), str(failures), str(refused)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    found = samples(render(str(tmp_path), _Nothing(), ("primary", "backup", "bulk")))
    assert found["mailqd_relay_failures_total{reason=timeout,relay=primary}"] == 7
    assert found["mailqd_relay_failures_total{reason=auth,relay=backup}"] == 2
    assert found["mailqd_recipients_refused_total"] == 4
    failures = {k: v for k, v in found.items() if k.startswith("mailqd_relay_failures_total")}
    assert len(failures) == 3 * len(RELAY_REASONS)
    assert sum(failures.values()) == 9
    assert found["mailqd_relay_failures_total{reason=down,relay=bulk}"] == 0


def test_relay_failure_counters_show_at_zero_before_any_worker_counts(tmp_path: Path) -> None:
    found = samples(render(str(tmp_path), _Nothing(), ("relay1",)))
    assert {k: v for k, v in found.items() if k.startswith("mailqd_relay")} == {
        f"mailqd_relay_failures_total{{reason={reason},relay=relay1}}": 0.0
        for reason in RELAY_REASONS
    }
