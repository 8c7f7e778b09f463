"""Fixtures of the reliability suite: a PostgreSQL per module that the tests own, a faulty
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
from pg import PostgresServer, start_owned_postgres

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


@pytest.fixture(scope="module")
def owned_pg() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster this module started and may stop, crash and restart."""
    with start_owned_postgres() as server:
        yield server


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
