"""The drill's checks on the promoted server: connect, list the databases, ``amcheck`` on the system catalogs of
each database (when the extension is installed), then each ``--check-sql`` query."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from cloudbk.drill.report import CheckOutcome
from cloudbk.errors import CloudbkError

MAX_ROWS = 20  # rows of a check query kept in the report

Connect = Callable[[str], Any]  # database name -> an autocommit psycopg connection

_CATALOG_INDEXES = (
    "SELECT count(bt_index_check(c.oid)) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
    "JOIN pg_am am ON am.oid = c.relam WHERE am.amname = 'btree' AND c.relnamespace = 'pg_catalog'::regnamespace "
    "AND c.relpersistence = 'p'"
)


def _query(connect: Connect, dbname: str, sql: str, before: str | None = None) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` in ``dbname`` (after running ``before`` there, when given)."""
    with connect(dbname) as conn, conn.cursor() as cur:
        if before is not None:
            cur.execute(before)
        cur.execute(sql)
        return list(cur.fetchall()) if cur.description is not None else []


def _timed(name: str, sql: str | None, work: Callable[[], Any]) -> CheckOutcome:
    start = time.monotonic()
    try:
        result = work()
        return CheckOutcome(name, True, sql, result, seconds=time.monotonic() - start)
    except Exception as exc:  # a failed check is a result, not a crash: psycopg's errors, lost connections
        text = exc.message if isinstance(exc, CloudbkError) else str(exc).strip() or type(exc).__name__
        return CheckOutcome(name, False, sql, error=text, seconds=time.monotonic() - start)


def _rows(rows: list[tuple[Any, ...]]) -> list[list[str]]:
    return [[str(v) for v in row] for row in rows[:MAX_ROWS]]


def _amcheck(connect: Connect, dbname: str) -> Callable[[], Any]:
    return lambda: _query(connect, dbname, _CATALOG_INDEXES, "CREATE EXTENSION IF NOT EXISTS amcheck")


def _custom(connect: Connect, dbname: str, sql: str) -> Callable[[], Any]:
    return lambda: _rows(_query(connect, dbname, sql))


def run_checks(connect: Connect, dbname: str, queries: Sequence[str]) -> list[CheckOutcome]:
    """Every check, in order; after a failed connection nothing else is tried."""
    outcomes = [_timed("connect", None, lambda: _query(connect, dbname, "SELECT version()")[0][0])]
    if not outcomes[0].ok:
        return outcomes
    listing = "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname"
    databases = _timed("databases", listing, lambda: [r[0] for r in _query(connect, dbname, listing)])
    outcomes.append(databases)
    available = "SELECT count(*) FROM pg_available_extensions WHERE name = 'amcheck'"
    if databases.ok and _query(connect, dbname, available)[0][0]:
        for db in databases.result:
            outcome = _timed(f"amcheck {db}", _CATALOG_INDEXES, _amcheck(connect, db))
            if outcome.ok:
                outcome.result = f"{outcome.result[0][0]} catalog indexes checked"
            outcomes.append(outcome)
    elif databases.ok:
        outcomes.append(CheckOutcome("amcheck", True, result="skipped: the amcheck extension is not installed"))
    for sql in queries:
        outcomes.append(_timed(sql, sql, _custom(connect, dbname, sql)))
    return outcomes
