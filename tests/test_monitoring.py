"""The monitoring kit in `monitoring/`: alert rules, their unit tests, the Grafana dashboard.

The rules are checked with `promtool check rules` and `promtool test rules`
(skipped where promtool is missing, except in CI, which installs it). Every
metric the dashboard, the rules and docs/metrics.md name must be one the
real daemon's `/metrics` exposes, and every metric it exposes is documented.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from daemon_process import DaemonPool
from external_tools import require_tool
from mailqd import Client
from mailqd.models import Status
from mailqd.store import Store, upgrade
from mailqd.store.engine import make_engine
from sidecar_client import families

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "monitoring" / "prometheus" / "mailqd-alerts.yml"
RULE_TESTS = REPO / "monitoring" / "prometheus" / "mailqd-alerts.test.yml"
DASHBOARD = REPO / "monitoring" / "grafana" / "mailqd-dashboard.json"
METRICS_DOC = REPO / "docs" / "metrics.md"
METRIC_NAME = re.compile(r"\bmailqd_[a-z0-9_]+\b")
SEED_ALERTS = {
    "MailqdHighFailureRate",
    "MailqdQueueDepthHigh",
    "MailqdSlowDelivery",
    "MailqdPermanentFailures",
}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def dashboard_queries() -> list[str]:
    def walk(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["expr"]] if isinstance(node.get("expr"), str) else []
            return found + [e for value in node.values() for e in walk(value)]
        if isinstance(node, list):
            return [e for item in node for e in walk(item)]
        return []

    return walk(json.loads(DASHBOARD.read_text()))


# -- alert rules -------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    defined = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    assert defined >= SEED_ALERTS
    assert tested == defined, "every alert has a unit test"


# -- the dashboard -----------------------------------------------------------------


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "mailqd"
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = {p["title"] for p in panels}
    for wanted in ("Send rate", "Failure rate (1 h window)", "Queue depth", "Delivery latency"):
        assert wanted in titles
    assert "Workers" in titles
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]


def test_every_dashboard_query_honours_the_instance_selector() -> None:
    """Each metric a panel reads is filtered by the `$instance` variable, so picking one
    daemon shows that daemon's numbers in every panel, not the sum of all."""
    selector = re.compile(r"\b(mailqd_[a-z0-9_]+)(?![a-z0-9_])(\{[^}]*\})?")
    for query in dashboard_queries():
        for match in selector.finditer(query):
            assert 'instance=~"$instance"' in (match.group(2) or ""), (match.group(1), query)


def test_dashboard_shows_relays_throttling_and_refusals() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    by_title = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dashboard["panels"]}
    wanted = {
        "Relays up": "mailqd_relay_up",
        "Relay failures by reason": "mailqd_relay_failures_total",
        "Throttling": "mailqd_domain_throttled_total",
        "Refusals": "mailqd_recipients_refused_total",
        "Due now": "mailqd_email_due_count",
    }
    for title, metric in wanted.items():
        assert any(metric in expr for expr in by_title[title]), title


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule promtool parses."""
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for number, query in enumerate(dashboard_queries()):
        expr = query.replace("$__rate_interval", "5m").replace("$instance", ".*")
        rules += [f"      - record: dashboard:query{number}", f"        expr: {json.dumps(expr)}"]
    (tmp_path / "dashboard.yml").write_text("\n".join(rules) + "\n")
    result = promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- names against the real /metrics -------------------------------------------------


@pytest.fixture
def exposed(daemons: DaemonPool, sqlite_url: str) -> dict[str, set[str]]:
    """The metric families (and their sample names) a real daemon serves after one delivery."""
    engine = make_engine(sqlite_url)
    upgrade(engine)
    engine.dispose()
    env = {
        "MAILQD_DATABASE_URL": sqlite_url,
        "MAILQD_SMTP_URL": "null://",
        "MAILQD_WORKERS": "1",
        # A configured domain limit shows its counter at 0 from the start.
        "MAILQD_DOMAIN_RATE_LIMITS": "example.org=100",
    }
    daemon = daemons.mailqd(env)
    sidecar = daemon.sidecar_url()
    with Client(sqlite_url) as client:
        client.enqueue("a@example.com", "s", "b")
    store = Store.from_url(sqlite_url)
    daemon.wait_for(lambda: store.counts().by_status.get(Status.SENT) == 1, "one delivery")
    store.close()
    found = families(sidecar)
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    return found


def test_every_metric_queried_or_documented_is_exposed(exposed: dict[str, set[str]]) -> None:
    samples = set().union(*exposed.values())
    for source, text in [
        ("dashboard", "\n".join(dashboard_queries())),
        ("alert rules", RULES.read_text()),
        ("alert rule tests", RULE_TESTS.read_text()),
        ("docs/metrics.md", METRICS_DOC.read_text()),
    ]:
        named = set(METRIC_NAME.findall(text))
        assert named, source
        assert named <= samples | set(exposed), f"{source} names unknown metrics: {named - samples}"


def test_every_exposed_metric_is_documented_and_the_seed_names_are_there(
    exposed: dict[str, set[str]],
) -> None:
    documented = set(METRIC_NAME.findall(METRICS_DOC.read_text()))
    samples = set().union(*exposed.values())
    for seed_name in (
        "mailqd_email_sent_total",
        "mailqd_email_failed_total",
        "mailqd_email_queue_depth",
        "mailqd_email_pending_count",
        "mailqd_email_failed_count",
        "mailqd_email_send_duration_seconds_bucket",
    ):
        assert seed_name in samples
    undocumented = {
        name
        for name, names in exposed.items()
        if name.startswith("mailqd_") and not (names | {name}) & documented
    }
    assert not undocumented


CONTRACT_SCRIPT = """
import sys
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.multiprocess import MultiProcessCollector
from mailqd.metrics import use_multiprocess_dir
use_multiprocess_dir(sys.argv[1])
Counter("contract_probe", "probe", registry=None).inc(3)
registry = CollectorRegistry()
MultiProcessCollector(registry, path=sys.argv[1])
print(registry.get_sample_value("contract_probe_total"))
"""


def test_prometheus_client_contract_the_value_class_swap_reaches_new_metrics(
    tmp_path: Path,
) -> None:
    """`use_multiprocess_dir` replaces prometheus-client's `values.ValueClass`, which its
    metrics read when created (pinned to the tested range in pyproject.toml). Run in a
    child process, as the swap is process-wide: a counter made after it writes to the
    directory's files, and the sidecar's collector reads them back."""
    import sys

    done = subprocess.run(
        [sys.executable, "-c", CONTRACT_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3.0"
    assert [path.name.split("_")[0] for path in tmp_path.iterdir()] == ["counter"]
