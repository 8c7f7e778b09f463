"""The database a benchmark runs on: the one given, or a throwaway one.

Shared by the bench scripts (run as `python bench/NAME.py`, so this folder
is on sys.path). The throwaway database is made with tests/pg.py, which
finds or starts a PostgreSQL the same way the test suite does.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType


def test_pg_helpers() -> ModuleType:
    """tests/pg.py, which knows how to find or start a server and make databases."""
    tests_dir = str(Path(__file__).resolve().parent.parent / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    return importlib.import_module("pg")


@contextmanager
def bench_database(url: str | None) -> Iterator[str]:
    """The given database, else a throwaway one dropped (and its server stopped) after."""
    if url is not None:
        yield url
        return
    pg = test_pg_helpers()
    with pg.find_or_start_postgres() as server:
        name = pg.unique_database_name("mailqd_bench")
        created = pg.create_database(server.admin_url, name)
        print(f"database: {name} (throwaway, on {server.admin_url})")
        try:
            yield created
        finally:
            pg.drop_database(server.admin_url, name)


def add_database_url_option(parser: argparse.ArgumentParser) -> None:
    """`--database-url`, the database `bench_database` is given (else a throwaway one)."""
    parser.add_argument(
        "--database-url",
        help="an empty PostgreSQL database the bench may fill and empty "
        "(default: a throwaway database, dropped at the end)",
    )


def run_bench(
    run: Callable[[argparse.Namespace, str, Path], None],
    args: argparse.Namespace,
    prefix: str,
    keep: bool,
) -> None:
    """`run(args, database_url, workdir)` in a fresh work folder, removed after unless `keep`."""
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with bench_database(args.database_url) as url:
            run(args, url, workdir)
    finally:
        if keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"total bench time: {time.perf_counter() - started:.0f} s")
