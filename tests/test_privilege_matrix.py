"""Every ``pgpubsub grant`` kind against every operation, run as that role.

One database with a role per kind (and one with no grant at all); each
operation is tried as each role, and the whole table of what was allowed is
compared with the one the security guide documents. A refusal must be the
library's permission error (or the dashboard's 403 page), never another one.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from helpers import Running, admin_query, wait_until
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from test_dashboard_security import Request, serve

import pgpubsub
from pgpubsub import Channel, TriggerChannel, cli, durable, errors, messages
from pgpubsub.channel import spec_of
from pgpubsub.listen import Registry
from pgpubsub.triggers import install_triggers


@dataclass
class Note(Channel, lock_notifications=True, retry_delay=0.05):
    n: int


@dataclass
class Tick(Channel, lock_notifications=True, schedule="* * * * * *"):
    scheduled_at: datetime.datetime | None = None


@dataclass
class Rows(TriggerChannel, table="shop.rows", lock_notifications=True):
    pass


@dataclass
class Answer(Channel, lock_notifications=True, results=True):
    n: int


KINDS = ["none", "publisher", "awaiter", "worker", "monitor", "operator", "django_writer"]
ALL = set(KINDS)
PUBLISH = {"publisher", "worker"}
# A Django writer stores the durable events of its writes: it may insert a
# message, but it is no publisher (the options need --publisher).
INSERTS = {*PUBLISH, "django_writer"}
READ_MESSAGES = {"worker", "operator"}
# The documented table (docs/guides/security.md): operation -> the kinds allowed.
EXPECTED = {
    "publish plain": ALL,
    "listen plain": ALL,
    "write a watched table": ALL,
    "publish durable": INSERTS,
    "publish with delay": PUBLISH,
    "publish with run_at": PUBLISH,
    "publish with priority": PUBLISH,
    "publish with ordering_key": PUBLISH,
    "publish with dedupe_key": PUBLISH,
    "publish a batch": PUBLISH,
    # A result or an error may quote the payload: not for publishers.
    "await a result": {"awaiter", "worker", "operator"},
    "run a durable channel": {"worker"},
    "run a scheduled channel": {"worker"},
    "status": {"worker", "monitor", "operator"},
    "dashboard overview": {"worker", "monitor", "operator"},
    "dashboard channel page": READ_MESSAGES,
    "dashboard message page": READ_MESSAGES,
    "list messages": READ_MESSAGES,
    "replay": READ_MESSAGES,
    "cancel": READ_MESSAGES,
    "purge": READ_MESSAGES,
    "pause and resume": {"operator"},
}


class Refused(Exception):
    pass


def _publish(**options: Any) -> Callable[[str], None]:
    def publish(dsn: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgpubsub.notify(Note(n=1), conn=conn, **options)

    return publish


def _publish_plain(dsn: str) -> None:
    pubsub = pgpubsub.connect(dsn)
    try:
        pubsub.notify("plain", "x")
    finally:
        pubsub.close()


def _listen_plain(dsn: str) -> None:
    pubsub = pgpubsub.connect(dsn)
    try:
        pubsub.listen("plain")
        pubsub.notify("plain", "hello")
        event = pubsub.get_event()
        deadline = 50
        while event is None and deadline:
            event = next(pubsub.events(select_timeout=0.1, yield_timeouts=True))
            deadline -= 1
        assert event is not None and event.payload == "hello"
    finally:
        pubsub.close()


def _write_watched(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO shop.rows VALUES (DEFAULT)")


def _run_durable(dsn: str) -> None:
    registry = Registry()
    registry.add(Note, lambda n: None)
    pgpubsub.process_stored_notifications([Note], dsn=dsn, registry=registry)


def _run_scheduled(dsn: str) -> None:
    ticks: list[object] = []
    registry = Registry()
    registry.add(Tick, lambda scheduled_at: ticks.append(scheduled_at))
    run = Running(dsn, registry, channels=[spec_of(Tick)])
    try:
        wait_until(lambda: ticks, timeout=10)
    finally:
        run.stop()


def _status(dsn: str) -> None:
    report = pgpubsub.status(dsn)
    if report.error:
        raise Refused(report.error)


def _page(path: str) -> Callable[[str], None]:
    def get(dsn: str) -> None:
        from pgpubsub.dashboard import create_app

        where, _, query = path.format(**IDS).partition("?")
        (answer,) = serve(create_app(dsn), Request(where, query=query.encode()))
        if answer.status == 403:
            raise Refused(answer.body.decode()[-300:])
        assert answer.status == 200, answer.body.decode()[-2000:]

    return get


def _messages(action: Callable[[Any], object]) -> Callable[[str], None]:
    def act(dsn: str) -> None:
        with psycopg.connect(dsn) as conn:
            try:
                action(conn)
            except psycopg.Error as exc:
                raise pgpubsub.driver.translate(exc, "messages") from exc

    return act


IDS: dict[str, Any] = {}


def _publish_batch(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgpubsub.batch([Note(n=1), Note(n=2)], on_complete=Note(n=3), conn=conn)


def _await_result(dsn: str) -> None:
    assert pgpubsub.handle(Answer, IDS["answer"], dsn=dsn).result_sync(timeout=5) == 42


OPERATIONS: dict[str, Callable[[str], None]] = {
    "publish plain": _publish_plain,
    "listen plain": _listen_plain,
    "write a watched table": _write_watched,
    "publish durable": _publish(),
    "publish with delay": _publish(delay=60),
    "publish with run_at": _publish(
        run_at=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    ),
    "publish with priority": _publish(priority=3),
    "publish with ordering_key": _publish(ordering_key="k"),
    "publish with dedupe_key": _publish(dedupe_key="d"),
    "run a durable channel": _run_durable,
    "run a scheduled channel": _run_scheduled,
    "status": _status,
    "dashboard overview": _page("/"),
    "dashboard channel page": _page("/channel?name={channel}&status=dead"),
    "dashboard message page": _page("/message/{dead}"),
    "list messages": _messages(lambda c: messages.list_messages(c, status="dead")),
    "replay": _messages(lambda c: messages.replay(c, ids=[IDS["dead"]])),
    "cancel": _messages(lambda c: messages.cancel(c, ids=[IDS["pending"]])),
    "purge": _messages(lambda c: messages.purge(c, "done", older_than=0)),
    "pause and resume": _messages(
        lambda c: messages.pause(c, "note") and messages.resume(c, "note")
    ),
    "publish a batch": _publish_batch,
    "await a result": _await_result,
}


@pytest.fixture
def granted(dsn: str) -> Iterator[dict[str, str]]:
    durable.migrate(dsn)
    admin_query(
        dsn,
        "CREATE SCHEMA shop; CREATE TABLE shop.rows (id serial PRIMARY KEY);"
        "GRANT USAGE ON SCHEMA shop TO PUBLIC; GRANT INSERT ON shop.rows TO PUBLIC;"
        "GRANT USAGE ON SEQUENCE shop.rows_id_seq TO PUBLIC",
    )
    registry = Registry()
    registry.add(Rows, lambda new: None, events=frozenset({"AFTER INSERT"}))
    with psycopg.connect(dsn) as conn:
        install_triggers(conn, registry=registry)
    suffix = conninfo_to_dict(dsn)["dbname"]
    roles = {kind: f"{kind}_{suffix}"[:63] for kind in KINDS}
    try:
        for kind, role in roles.items():
            admin_query(dsn, f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'")
            if kind != "none":
                flag = "--" + kind.replace("_", "-")
                assert cli.main(["grant", role, flag, "--dsn", dsn]) == 0
        yield {kind: make_conninfo(dsn, user=role, password="pw") for kind, role in roles.items()}
    finally:
        for role in roles.values():
            admin_query(dsn, f'DROP OWNED BY "{role}" CASCADE; DROP ROLE IF EXISTS "{role}"')


def _prepare(dsn: str) -> None:
    """A dead, a pending and a done message of Note, fresh for each role."""
    admin_query(dsn, "DELETE FROM pgpubsub.message")
    [(dead,), (pending,)] = admin_query(
        dsn,
        "INSERT INTO pgpubsub.message (channel, payload, status, run_at) VALUES "
        "(%(c)s, '{\"n\": 1}', 'dead', now()), "
        "(%(c)s, '{\"n\": 2}', 'pending', now() + interval '1 hour') RETURNING id",
        {"c": spec_of(Note).name},  # type: ignore[arg-type]
    )
    [(answer,)] = admin_query(
        dsn,
        "INSERT INTO pgpubsub.message (channel, payload, status, result, completed_at) "
        "VALUES (%s, '{\"n\": 1}', 'done', '42', now()) RETURNING id",
        (spec_of(Answer).name,),
    )
    IDS.update(dead=dead, pending=pending, channel=spec_of(Note).name, answer=answer)


def test_every_grant_kind_can_do_exactly_what_the_security_guide_says(
    dsn: str, granted: dict[str, str]
) -> None:
    allowed: dict[str, set[str]] = {operation: set() for operation in OPERATIONS}
    wrong: list[str] = []
    for kind, role_dsn in granted.items():
        for operation, run in OPERATIONS.items():
            _prepare(dsn)
            try:
                run(role_dsn)
            except (errors.PermissionDenied, Refused):
                continue
            except Exception as exc:  # refused the wrong way, or broken
                wrong.append(f"{kind} / {operation}: {type(exc).__name__}: {exc}")
                continue
            allowed[operation].add(kind)
    assert not wrong, "\n".join(wrong)
    differences = {
        operation: {"allowed": sorted(allowed[operation]), "documented": sorted(kinds)}
        for operation, kinds in EXPECTED.items()
        if allowed[operation] != kinds
    }
    assert not differences, differences
