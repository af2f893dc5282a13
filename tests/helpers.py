"""Small helpers shared by the tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg


def admin_query(dsn: str, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run one query on a fresh autocommit connection and return its rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
