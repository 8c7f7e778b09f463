"""Fixtures of the reliability suite: a PostgreSQL cluster that the tests own, a faulty
SMTP server and a `Scenario` per test.

Every test here is marked `reliability` and gets a timeout that suits CI
mode, or soak mode under `--soak` (bigger counts, longer runs).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import books
import pytest
from faulty_smtp import FaultySmtp
from harness import MakeScenario, Scenario, migrated_database

from daemon_process import DaemonPool
from pg import PostgresServer, answers, start_owned_postgres

HERE = Path(__file__).resolve().parent
CI_TIMEOUT = 300
SOAK_TIMEOUT = 1800


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--soak", default=False):
        books.run_mode = "soak"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    timeout = SOAK_TIMEOUT if config.getoption("--soak") else CI_TIMEOUT
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.timeout(timeout))


@pytest.fixture(scope="session")
def owned_cluster() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster this test process started (one per xdist worker), reused by tests."""
    with start_owned_postgres() as server:
        yield server


@pytest.fixture
def owned_pg(owned_cluster: PostgresServer) -> PostgresServer:
    """The cluster, which the test may stop, crash and restart; running when the test starts.

    Each scenario works in a database of its own on it, so sharing the cluster
    between the tests of one process (which run one after another) only saves
    an `initdb` per module.
    """
    if not answers(owned_cluster.admin_url):
        owned_cluster.start()  # a test that failed during an outage left it stopped
    return owned_cluster


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak"))


@pytest.fixture
def smtp() -> Iterator[FaultySmtp]:
    server = FaultySmtp()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_scenario(
    owned_pg: PostgresServer, smtp: FaultySmtp, daemons: DaemonPool, soak: bool
) -> Iterator[MakeScenario]:
    """`make_scenario(name, slug)`: a `Scenario` on a fresh database of the module's server."""
    made: list[Scenario] = []

    def make(name: str, slug: str) -> Scenario:
        scenario = Scenario(name, slug, migrated_database(owned_pg), smtp, daemons, soak=soak)
        made.append(scenario)
        return scenario

    yield make
    daemons.close()
    for scenario in made:
        scenario.close()
