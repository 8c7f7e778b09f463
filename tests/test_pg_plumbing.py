"""The test database plumbing itself: isolation per database, and owned servers."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from pg import (
    PG_PROBE_ENV,
    PG_URL_ENV,
    MakeDatabase,
    PostgresServer,
    answers,
    create_database,
    drop_database,
    find_or_start_postgres,
    libpq_url,
    start_owned_postgres,
    unique_database_name,
)


def table_names(url: str) -> list[str]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return [row[0] for row in rows]


def database_exists(admin_url: str, name: str) -> bool:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
    return row is not None and row[0] == 1


def test_fresh_database_is_empty_and_uniquely_named(make_pg_database: MakeDatabase) -> None:
    first, second = make_pg_database(), make_pg_database()

    assert first != second
    assert first.startswith("postgresql+psycopg://")
    name = sa.make_url(first).database
    assert name is not None and name.startswith("mailqd_test_")
    assert table_names(first) == []


def test_rows_in_one_database_are_invisible_in_another(make_pg_database: MakeDatabase) -> None:
    urls = [make_pg_database(), make_pg_database()]
    engines = [sa.create_engine(url) for url in urls]
    try:
        for engine in engines:
            with engine.begin() as conn:
                conn.execute(sa.text("CREATE TABLE note (body text)"))
        with engines[0].begin() as conn:
            conn.execute(sa.text("INSERT INTO note VALUES ('only in the first')"))

        counts = []
        for engine in engines:
            with engine.connect() as conn:
                counts.append(conn.execute(sa.text("SELECT count(*) FROM note")).scalar_one())
    finally:
        for engine in engines:
            engine.dispose()

    assert counts == [1, 0]


def test_drop_database_disconnects_its_clients(pg_admin_url: str) -> None:
    name = unique_database_name()
    url = create_database(pg_admin_url, name)
    client = psycopg.connect(libpq_url(url), autocommit=True)
    try:
        drop_database(pg_admin_url, name)
    finally:
        client.close()

    assert not database_exists(pg_admin_url, name)


def test_explicit_server_url_that_does_not_answer_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PG_URL_ENV, "postgresql://postgres@127.0.0.1:1/postgres")

    with pytest.raises(RuntimeError, match=PG_URL_ENV):
        find_or_start_postgres()


def assert_runs_as_postgres_user_when_root(server: PostgresServer) -> None:
    with psycopg.connect(server.url) as conn:
        row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    assert row is not None
    if os.geteuid() == 0:
        assert Path(row[0]).stat().st_uid == pwd.getpwnam("postgres").pw_uid


@pytest.mark.slow
def test_owned_server_survives_crash_and_fast_restart() -> None:
    with start_owned_postgres() as server:
        assert server.owned
        assert_runs_as_postgres_user_when_root(server)
        url = libpq_url(create_database(server.admin_url, "outage"))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE note (body text)")
            conn.execute("INSERT INTO note VALUES ('committed before the crash')")

        server.stop("immediate")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
        server.start()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM note").fetchone() == (1,)

        server.restart("immediate")
        server.restart("fast")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM note").fetchone() == (1,)

    assert not answers(url)


@pytest.mark.slow
def test_throwaway_server_when_nothing_answers_the_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PG_URL_ENV, raising=False)
    monkeypatch.setenv(PG_PROBE_ENV, "127.0.0.1:1")

    with find_or_start_postgres() as server:
        assert server.owned
        url = create_database(server.admin_url, unique_database_name())
        assert table_names(url) == []
        directory = server.directory
        assert directory is not None and directory.exists()

    assert not directory.exists()
