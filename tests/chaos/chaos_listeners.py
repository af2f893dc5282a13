"""The workers' listeners for the chaos tier: what each message does is in its payload.

``pgpubsub listen chaos_listeners`` runs these in real worker processes. Each
attempt records its start and end (pid, instant, attempt) in ``chaos_history``
on a separate autocommit connection, so the record survives the message's
rollback. Instants come from this machine's clock, which the test server
shares (the checker compares them with the server's ``clock_timestamp()``).
The message's *effect* is a row in ``chaos_effect`` written through
``durable.connection()``, in the claim transaction, so it commits exactly
when the message completes.

``behaviour`` fails the first ``until`` attempts of the message (99: always,
a poison message), counted in the history so a replay sees the earlier ones:

* ``ok``: no failure; ``slow``: sleeps ``sleep`` seconds first, then as ``ok``
  (on ``chaos_limited`` it waits on its cancellation: past the channel's
  timeout, or cancelled while it runs, it stops there, its end ``stopped``);
* ``raise``: raises; ``nul``: raises with a NUL and a lone surrogate in the text;
* ``commit_fail``: writes a row that breaks a deferred foreign key (fails at COMMIT);
* ``crash``: SIGKILLs its own process inside the listener.

A start on ``chaos_limited`` (key_rate_limit) says in its ``detail`` when its
message was claimed: its claim set ``run_at`` to that instant plus the retry
delay of the attempt (the lease; the channels' retry policy, no jitter).
"""

from __future__ import annotations

import datetime
import os
import signal
import time
from typing import Any

import psycopg
from chaos_channels import RETRY, Crew, Limited, Tick, Work

import pgpubsub
from pgpubsub.durable import cancellation, connection

_conn: psycopg.Connection[Any] | None = None


def _record(kind: str, channel: str, n: int | None, detail: str | None = None) -> int:
    """Append to the history (autocommit, own connection); return the attempt number."""
    global _conn
    # The instant of the event, not of the insert: after a server restart the
    # insert waits for the server, and the record must not stretch the attempt.
    # (The server runs on this machine: one clock for the history and the test.)
    at = datetime.datetime.now(datetime.timezone.utc)
    deadline = time.monotonic() + 60
    while True:
        try:
            if _conn is None or _conn.closed:
                _conn = psycopg.connect(
                    os.environ["PGPUBSUB_DSN"], autocommit=True, application_name="chaos-history"
                )
            row = _conn.execute(
                "INSERT INTO chaos_history (kind, channel, n, pid, at, attempt, detail) "
                "VALUES (%s, %s, %s, %s, %s, "
                "(SELECT pg_catalog.count(*) + 1 FROM chaos_history "
                " WHERE kind = 'start' AND channel = %s AND n = %s), %s) RETURNING attempt",
                (kind, channel, n, os.getpid(), at, channel, n, detail),
            ).fetchone()
            assert row is not None
            return int(row[0])
        except psycopg.OperationalError:
            # A server restart or a killed session: the record must still be made.
            if _conn is not None:
                _conn.close()
            _conn = None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# The instant of the claim of the running attempt (see the module's docstring).
CLAIMED_SQL = (
    "SELECT run_at - pg_catalog.make_interval(secs => "
    "least(%s, %s * pg_catalog.power(2, least(attempts - 1, 64)))) "
    "FROM pgpubsub.message WHERE id = %s"
)


def _claimed() -> str | None:
    try:
        row = connection().execute(
            CLAIMED_SQL, (RETRY["retry_max_delay"], RETRY["retry_delay"], cancellation().message_id)
        ).fetchone()
    except psycopg.Error:  # a killed session: the attempt fails anyway
        return None
    return row[0].isoformat() if row else None


def _handle(
    channel: str,
    n: int,
    behaviour: str,
    until: int,
    sleep: float,
    claimed: str | None = None,
    stoppable: bool = False,
) -> None:
    attempt = _record("start", channel, n, claimed)
    failing = attempt <= until
    outcome = "ok"
    try:
        if behaviour == "slow" and stoppable:
            if cancellation().wait(sleep):
                outcome = "stopped"
                cancellation().raise_if_requested()
        elif behaviour == "slow":
            time.sleep(sleep)
        if failing and behaviour == "crash":
            _record("end", channel, n, "crash")
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # not reached
        if failing and behaviour == "raise":
            outcome = "raise"
            raise RuntimeError(f"chaos: message {n} fails attempt {attempt}")
        if failing and behaviour == "nul":
            outcome = "raise"
            raise RuntimeError(f"chaos: message {n} \x00 odd \udcff bytes ' $$ \\x00")
        if failing and behaviour == "commit_fail":
            outcome = "commit_fail"
            connection().execute("INSERT INTO chaos_deferred (ref) VALUES (-1)")
        connection().execute(
            "INSERT INTO chaos_effect (channel, n, pid, at) "
            "VALUES (%s, %s, %s, pg_catalog.clock_timestamp())",
            (channel, n, os.getpid()),
        )
    finally:
        _record("end", channel, n, outcome)


@pgpubsub.listener(Work)
def work(n: int, behaviour: str, until: int, sleep: float) -> dict[str, int]:
    _handle("chaos_work", n, behaviour, until, sleep)
    return {"n": n, "pid": os.getpid()}  # stored with the effect (results=True)


@pgpubsub.listener(Crew)
def crew(n: int, behaviour: str, until: int, sleep: float) -> None:
    time.sleep(0.01)  # worth a share of its batch (see chaos_channels.Crew)
    _handle("chaos_crew", n, behaviour, until, sleep)


@pgpubsub.listener(Limited)
def limited(n: int, behaviour: str, until: int, sleep: float) -> None:
    _handle("chaos_limited", n, behaviour, until, sleep, _claimed(), stoppable=True)


@pgpubsub.listener(Tick)
def tick(scheduled_at: datetime.datetime | None) -> None:
    _record("start", "chaos_tick", None, scheduled_at.isoformat() if scheduled_at else None)
    connection().execute(
        "INSERT INTO chaos_effect (channel, n, pid, at, tick) "
        "VALUES ('chaos_tick', NULL, %s, pg_catalog.clock_timestamp(), %s)",
        (os.getpid(), scheduled_at),
    )
    _record("end", "chaos_tick", None, scheduled_at.isoformat() if scheduled_at else None)
