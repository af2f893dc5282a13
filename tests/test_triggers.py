"""Trigger channels without Django: row events, wide rows, quoting, durability."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from app.channels import OrderEvents, OrderJobs
from helpers import Running, admin_query, wait_until

import pgpubsub
from pgpubsub import durable, messages
from pgpubsub.listen import Registry
from pgpubsub.triggers import install_triggers, remove_triggers, trigger_listener

TABLE = '"we""ird"."Order"'


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    durable.migrate(dsn)
    admin_query(
        dsn,
        'CREATE SCHEMA "we""ird"; '
        f'CREATE TABLE {TABLE} (id int PRIMARY KEY, "we""ird" text, "Order" int);'
        "CREATE TABLE effects (id int, op text)",
    )
    yield dsn


def install(dsn: str, registry: Registry) -> None:
    with psycopg.connect(dsn) as conn:
        install_triggers(conn, registry=registry)


def write(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def recorder(events: list[dict[str, Any]]) -> Callable[..., None]:
    def record(old: Any, new: Any, operation: str, when: str, table: str) -> None:
        events.append({"old": old, "new": new, "op": operation, "when": when, "table": table})

    return record


def test_each_listener_gets_only_the_operations_it_asked_for(db: str) -> None:
    registry = Registry()
    got: dict[str, list[dict[str, Any]]] = {"INSERT": [], "UPDATE": [], "DELETE": []}
    for op, events in got.items():
        trigger_listener(OrderEvents, operations=[op], registry=registry)(recorder(events))
    install(db, registry)
    run = Running(db, registry)
    try:
        write(
            db,
            f"""INSERT INTO {TABLE} VALUES (1, 'a''b', 10)""",
            f'UPDATE {TABLE} SET "Order" = 11 WHERE id = 1',
            f"DELETE FROM {TABLE} WHERE id = 1",
        )
        wait_until(lambda: all(got.values()), timeout=10)
        time.sleep(0.3)
    finally:
        run.stop()
    (ins,), (upd,), (dele,) = got["INSERT"], got["UPDATE"], got["DELETE"]
    row = {"id": 1, 'we"ird': "a'b", "Order": 10}
    assert ins == {
        "old": None,
        "new": row,
        "op": "INSERT",
        "when": "AFTER",
        "table": 'we"ird.Order',
    }
    assert (upd["old"], upd["new"]) == (row, {**row, "Order": 11})
    assert (dele["old"], dele["new"], dele["op"]) == ({**row, "Order": 11}, None, "DELETE")


def test_wide_row_is_written_and_delivered_and_rollback_sends_nothing(db: str) -> None:
    registry = Registry()
    seen: list[Any] = []
    pgpubsub.post_insert_listener(OrderEvents, registry=registry)(lambda new: seen.append(new))
    install(db, registry)
    run = Running(db, registry)
    try:
        with psycopg.connect(db) as conn:
            conn.execute(f"INSERT INTO {TABLE} VALUES (1, 'rolled back', 0)")  # type: ignore[arg-type]
            conn.rollback()
        write(db, f"INSERT INTO {TABLE} VALUES (2, repeat('é', 25000), 0)")
        wait_until(lambda: seen, timeout=10)
        time.sleep(0.3)
    finally:
        run.stop()
    assert [(r["id"], len(r['we"ird'])) for r in seen] == [(2, 25_000)]  # 50 kB in UTF-8
    assert admin_query(db, "SELECT status FROM pgpubsub.message") == [("spill",)]


def test_pre_delete_listener_never_cancels_the_delete(db: str) -> None:
    registry = Registry()
    seen: list[Any] = []
    pgpubsub.pre_delete_listener(OrderEvents, registry=registry)(lambda old: seen.append(old))
    install(db, registry)
    write(db, f"INSERT INTO {TABLE} VALUES (1, 'x', 0)")
    run = Running(db, registry)
    try:
        write(db, f"DELETE FROM {TABLE} WHERE id = 1")
        wait_until(lambda: seen, timeout=10)
    finally:
        run.stop()
    assert seen[0]["id"] == 1
    assert admin_query(db, f"SELECT count(*) FROM {TABLE}") == [(0,)]


# The triggers of tables outside pgpubsub's schema (its own table has its own).
WATCHED = (
    "WITH t AS (SELECT g.oid FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid "
    "WHERE c.relnamespace <> 'pgpubsub'::regnamespace)"
)


def test_install_is_idempotent_quotes_identifiers_and_removes(db: str) -> None:
    registry = Registry()
    pgpubsub.post_save_listener(OrderEvents, registry=registry)(lambda new: None)
    pgpubsub.pre_delete_listener(OrderEvents, registry=registry)(lambda old: None)
    install(db, registry)
    install(db, registry)
    every = [d for (d,) in admin_query(db, f"{WATCHED} SELECT pg_get_triggerdef(oid) FROM t")]
    # A pair per event: the rows captured as the writer, then sent (sql/schema.sql).
    defs = [d for d in every if "pgpubsub.send_captured" not in d]
    sends = [d for d in every if "pgpubsub.send_captured" in d]
    assert len(defs) == len(sends) == 3  # AFTER INSERT, AFTER UPDATE, BEFORE DELETE
    assert all(f"ON {TABLE} " in d for d in every), every
    assert sorted(d.split()[2] for d in sends) == sorted(f"{d.split()[2]}_send" for d in defs)
    by_event = {" ".join(d.split()[3:5]): d for d in defs}
    assert "REFERENCING NEW TABLE AS pgpubsub_new FOR EACH STATEMENT" in by_event["AFTER INSERT"]
    assert (
        "FOR EACH ROW" in by_event["AFTER UPDATE"] and "FOR EACH ROW" in by_event["BEFORE DELETE"]
    )
    assert all(f"'{pgpubsub.channel.spec_of(OrderEvents).name}', 'plain'" in d for d in defs)
    (body,) = admin_query(db, "SELECT prosrc FROM pg_proc WHERE proname = 'send_events'")[0]
    assert "pg_catalog.pg_notify" in str(body)

    narrower = Registry()
    pgpubsub.post_insert_listener(OrderEvents, registry=narrower)(lambda new: None)
    install(db, narrower)  # the triggers no listener needs any more are dropped
    assert admin_query(db, f"{WATCHED} SELECT count(*) FROM t") == [(2,)]
    with psycopg.connect(db) as conn:
        remove_triggers(conn, [OrderEvents])
        remove_triggers(conn, [OrderEvents])
    assert admin_query(db, f"{WATCHED} SELECT count(*) FROM t") == [(0,)]
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.trigger_channel") == [(0,)]


def test_durable_trigger_channel_bulk_insert_processed_once_by_two_workers(db: str) -> None:
    registry = Registry()

    def effect(new: dict[str, Any], operation: str) -> None:
        durable.connection().execute("INSERT INTO effects VALUES (%s, %s)", (new["id"], operation))

    pgpubsub.post_insert_listener(OrderJobs, registry=registry)(effect)
    install(db, registry)
    runs = [Running(db, registry), Running(db, registry)]
    try:
        write(
            db,
            "SELECT set_config('pgpubsub.notification_context', '{\"by\": 1}', true)",
            f"INSERT INTO {TABLE} SELECT g, repeat('x', 9000), g FROM generate_series(1, 2000) g",
        )
        wait_until(lambda: admin_query(db, "SELECT count(*) FROM effects") == [(2000,)], 30)
        time.sleep(0.5)
    finally:
        for run in runs:
            run.stop()
    counts = admin_query(db, "SELECT count(DISTINCT id), count(*) FROM effects WHERE op='INSERT'")
    assert counts == [(2000, 2000)]
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.message") == [(0,)]


def test_notification_context_reaches_event_and_stored_message(db: str) -> None:
    registry = Registry()
    contexts: list[Any] = []
    pgpubsub.post_insert_listener(OrderEvents, registry=registry)(
        lambda context: contexts.append(context)
    )
    install(db, registry)
    run = Running(db, registry)
    try:
        with psycopg.connect(db) as conn:
            pgpubsub.set_notification_context({"request": "r-1"}, conn=conn)
            conn.execute(f"INSERT INTO {TABLE} VALUES (1, 'x', 0)")  # type: ignore[arg-type]
            pgpubsub.notify(OrderJobs, conn=conn)  # a durable message in the same transaction
        with psycopg.connect(db) as conn:
            conn.execute(f"INSERT INTO {TABLE} VALUES (2, 'x', 0)")  # type: ignore[arg-type]
        wait_until(lambda: len(contexts) == 2, timeout=10)
    finally:
        run.stop()
    assert contexts == [{"request": "r-1"}, None]  # scoped to its transaction
    with psycopg.connect(db) as conn:
        (stored,) = messages.list_messages(conn, "pending")
    assert stored.context == {"request": "r-1"}
    assert json.loads(stored.payload)["old"] is None


def test_old_spilled_events_are_purged_by_workers(db: str) -> None:
    registry = Registry()
    pgpubsub.post_insert_listener(OrderEvents, registry=registry)(lambda new: None)
    name = pgpubsub.channel.spec_of(OrderEvents).name
    admin_query(
        db,
        "INSERT INTO pgpubsub.message (channel, payload, status, created_at) VALUES "
        "(%s, '{}', 'spill', now() - interval '1 hour'), (%s, '{}', 'spill', now())",
        (name, name),
    )
    run = Running(db, registry)
    try:
        wait_until(lambda: admin_query(db, "SELECT count(*) FROM pgpubsub.message") == [(1,)])
    finally:
        run.stop()


@pytest.mark.unit
def test_trigger_listener_rejects_bad_events_and_plain_channels() -> None:
    from app.channels import Jobs

    registry = Registry()
    with pytest.raises(pgpubsub.ConfigurationError, match="BEFORE/AFTER"):
        trigger_listener(OrderEvents, when="DURING", registry=registry)
    with pytest.raises(pgpubsub.ConfigurationError, match="BEFORE/AFTER"):
        trigger_listener(OrderEvents, operations=["TRUNCATE"], registry=registry)
    with pytest.raises(pgpubsub.ConfigurationError, match="is not a TriggerChannel"):
        pgpubsub.post_insert_listener(Jobs, registry=registry)(lambda new: None)


@pytest.mark.unit
def test_trigger_listener_takes_a_pgtrigger_trigger_as_django_pgpubsub_did() -> None:
    import pgtrigger

    registry = Registry()
    trigger = pgtrigger.Trigger(
        name="x", when=pgtrigger.After, operation=pgtrigger.Insert | pgtrigger.Update, func="-"
    )
    trigger_listener(OrderEvents, trigger, registry=registry)(lambda new: None)
    spec = pgpubsub.channel.spec_of(OrderEvents)
    assert registry.events(spec) == {"AFTER INSERT", "AFTER UPDATE"}
