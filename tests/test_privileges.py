"""No role does more than it was granted: each attack run as the attacking role.

Roles are cluster-wide, so every role here carries the test database's name
and is dropped at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from helpers import Running, admin_query, wait_until
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgpubsub
from pgpubsub import Channel, TriggerChannel, cli, durable, errors
from pgpubsub.channel import spec_of
from pgpubsub.listen import Registry
from pgpubsub.triggers import install_triggers


@dataclass
class Orders(TriggerChannel, table="shop.orders", lock_notifications=True):
    pass


@dataclass
class Note(Channel, lock_notifications=True):
    text: str


class Roles:
    """Login roles named after the test database, dropped at the end."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.suffix = conninfo_to_dict(dsn)["dbname"]
        self.made: list[str] = []

    def make(self, kind: str, *grant: str) -> str:
        role = f"{kind}_{self.suffix}"[:63]
        admin_query(self.dsn, f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'")
        self.made.append(role)
        if grant:
            assert cli.main(["grant", role, *grant, "--dsn", self.dsn]) == 0
        return role

    def dsn_of(self, role: str) -> str:
        return make_conninfo(self.dsn, user=role, password="pw")

    def drop(self) -> None:
        for role in self.made:
            admin_query(self.dsn, f'DROP OWNED BY "{role}" CASCADE; DROP ROLE "{role}"')


@pytest.fixture
def roles(dsn: str) -> Iterator[Roles]:
    durable.migrate(dsn)
    admin_query(dsn, "CREATE SCHEMA shop; CREATE TABLE shop.orders (id int PRIMARY KEY)")
    made = Roles(dsn)
    yield made
    made.drop()


def is_superuser(dsn: str, role: str) -> bool:
    return bool(admin_query(dsn, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,))[0][0])


# A cast to json that a role owns: whoever serialises a row with such a column
# to JSON runs it. It tries to make its owner superuser and records as whom it ran.
EVIL_CAST = """
CREATE TYPE {schema}.mood AS ENUM ('x');
CREATE FUNCTION {schema}.j(m {schema}.mood) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', session_user);
    EXCEPTION WHEN insufficient_privilege THEN NULL;
    END;
    INSERT INTO {log} VALUES (current_user);
    RETURN '"x"';
END $$;
CREATE CAST ({schema}.mood AS json) WITH FUNCTION {schema}.j({schema}.mood);
"""


def test_usage_on_the_schema_does_not_let_a_monitor_become_superuser(roles: Roles) -> None:
    """The temp-table route: a trigger function attached to the attacker's own table."""
    monitor = roles.make("mon", "--monitor")
    with psycopg.connect(roles.dsn_of(monitor), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE ran_as (who text)")
        conn.execute(EVIL_CAST.format(schema="pg_temp", log="pg_temp.ran_as"))
        conn.execute("CREATE TEMP TABLE t (m pg_temp.mood)")
        for function in ("pgpubsub.notify_trigger('any', 'plain')", "pgpubsub.send_captured()"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(
                    f"CREATE TRIGGER t AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION {function}"
                )
        # With no trigger, writing its row runs its cast as itself, if at all.
        conn.execute("INSERT INTO t VALUES ('x')")
    assert not is_superuser(roles.dsn, monitor)


def test_the_owner_of_a_watched_table_cannot_run_code_as_the_schema_owner(roles: Roles) -> None:
    """The table-owner route: no grant at all, a column added to its own watched table."""
    owner = roles.make("owner")
    admin_query(
        roles.dsn,
        f'CREATE SCHEMA own AUTHORIZATION "{owner}";'
        f'CREATE TABLE own.items (id int PRIMARY KEY); ALTER TABLE own.items OWNER TO "{owner}"',
    )

    @dataclass
    class Items(TriggerChannel, table="own.items", lock_notifications=True):
        pass

    registry = Registry()
    seen: list[Any] = []
    registry.add(Items, lambda new: seen.append(new), events=frozenset({"AFTER INSERT"}))
    with psycopg.connect(roles.dsn) as conn:  # installed by a superuser
        install_triggers(conn, registry=registry)
    with psycopg.connect(roles.dsn_of(owner), autocommit=True) as conn:
        conn.execute("CREATE TABLE own.ran_as (who text)")
        conn.execute(EVIL_CAST.format(schema="own", log="own.ran_as"))
        conn.execute("ALTER TABLE own.items ADD COLUMN m own.mood")
        conn.execute("INSERT INTO own.items VALUES (1, 'x')")
        ran_as = {r[0] for r in conn.execute("SELECT who FROM own.ran_as")}
    assert not is_superuser(roles.dsn, owner)
    assert ran_as == {owner}  # the row was serialised by the role that wrote it
    # ... and its event was still stored, once.
    rows = admin_query(
        roles.dsn, "SELECT payload FROM pgpubsub.message WHERE channel = %s", (spec_of(Items).name,)
    )
    assert [json.loads(str(payload))["new"] for (payload,) in rows] == [{"id": 1, "m": "x"}]


def test_no_role_can_attach_the_trigger_functions_to_publish_on_another_channel(
    roles: Roles,
) -> None:
    """Forged durable events: a monitor's own table posing as the orders channel."""
    monitor = roles.make("mon", "--monitor")
    with psycopg.connect(roles.dsn_of(monitor), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE fake (id int)")
        for function in (
            "pgpubsub.notify_trigger('orders', 'durable')",
            "pgpubsub.notify_statement('orders', 'durable')",
            "pgpubsub.send_captured('orders')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(
                    "CREATE TRIGGER f AFTER UPDATE ON fake FOR EACH ROW "
                    f"EXECUTE FUNCTION {function}"
                )
    # Even attached by a role that may (the schema's owner), the sending
    # function publishes only for the (table, channel) pairs an installer set up.
    admin_query(
        roles.dsn,
        "CREATE TABLE public.fake (id int);"
        "CREATE TRIGGER f AFTER INSERT ON public.fake FOR EACH ROW "
        "EXECUTE FUNCTION pgpubsub.notify_trigger('orders', 'durable');"
        "CREATE TRIGGER f_send AFTER INSERT ON public.fake FOR EACH ROW "
        "EXECUTE FUNCTION pgpubsub.send_captured('orders')",
    )
    with pytest.raises(
        psycopg.errors.RaiseException, match="no trigger channel orders is installed on public.fake"
    ):
        admin_query(roles.dsn, "INSERT INTO public.fake VALUES (1)")
    assert admin_query(roles.dsn, "SELECT count(*) FROM pgpubsub.message") == [(0,)]


def test_a_monitor_reads_counts_ages_and_workers_but_no_payloads(roles: Roles) -> None:
    monitor = roles.make("mon", "--monitor")
    with psycopg.connect(roles.dsn) as conn:
        pgpubsub.notify(Note(text="secret"), conn=conn)
    report = pgpubsub.status(roles.dsn_of(monitor))
    assert [(c.channel, c.pending) for c in report.channels] == [(spec_of(Note).name, 1)]
    with psycopg.connect(roles.dsn_of(monitor), autocommit=True) as conn:
        for column in ("payload", "last_error", "context", "trace", "dedupe_key"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT {column} FROM pgpubsub.message")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE pgpubsub.message SET status = 'dead'")


def privileges(dsn: str, role: str) -> set[tuple[Any, ...]]:
    """Every privilege ``role`` holds on the pgpubsub schema and the objects in it."""
    query = """
    SELECT 'schema', n.nspname, a.privilege_type FROM pg_namespace n,
        aclexplode(n.nspacl) a WHERE n.nspname = 'pgpubsub' AND a.grantee = %(r)s::regrole
    UNION ALL
    SELECT 'rel', c.relname, a.privilege_type FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.relnamespace = 'pgpubsub'::regnamespace AND a.grantee = %(r)s::regrole
    UNION ALL
    SELECT 'col', c.relname || '.' || t.attname, a.privilege_type
        FROM pg_attribute t JOIN pg_class c ON c.oid = t.attrelid, aclexplode(t.attacl) a
        WHERE c.relnamespace = 'pgpubsub'::regnamespace AND a.grantee = %(r)s::regrole
    UNION ALL
    SELECT 'fn', p.oid::regprocedure::text, a.privilege_type FROM pg_proc p,
        aclexplode(p.proacl) a
        WHERE p.pronamespace = 'pgpubsub'::regnamespace AND a.grantee = %(r)s::regrole
    """
    return set(admin_query(dsn, query, {"r": role}))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kinds",
    [
        ["--monitor"],
        ["--publisher"],
        ["--worker"],
        ["--django-writer"],
        ["--operator"],
        ["--publisher", "--worker", "--monitor"],
    ],
)
def test_revoke_takes_back_everything_grant_gave(roles: Roles, kinds: list[str]) -> None:
    role = roles.make("rev")
    before = privileges(roles.dsn, role)
    assert cli.main(["grant", role, *kinds, "--dsn", roles.dsn]) == 0
    assert privileges(roles.dsn, role) > before
    assert cli.main(["grant", role, *kinds, "--revoke", "--dsn", roles.dsn]) == 0
    assert privileges(roles.dsn, role) == before


def test_revoking_one_kind_keeps_what_the_others_need(roles: Roles) -> None:
    role = roles.make("two", "--publisher", "--monitor")
    assert cli.main(["grant", role, "--monitor", "--revoke", "--dsn", roles.dsn]) == 0
    with psycopg.connect(roles.dsn_of(role), autocommit=True) as conn:
        assert isinstance(pgpubsub.notify(Note(text="still"), conn=conn), int)
    with pytest.raises(errors.PermissionDenied):
        pgpubsub.status(roles.dsn_of(role))


def test_a_worker_role_runs_scheduled_channels(roles: Roles) -> None:
    worker = roles.make("work", "--worker")

    @dataclass
    class Tick(Channel, lock_notifications=True, schedule="* * * * * *"):
        pass

    registry = Registry()
    ticks: list[Any] = []
    registry.add(Tick, lambda: ticks.append(1))
    run = Running(roles.dsn_of(worker), registry)
    try:
        wait_until(lambda: len(ticks) >= 2, timeout=15)
    finally:
        run.stop()


def test_status_warns_about_a_worker_whose_role_may_not_call_rotate(roles: Roles) -> None:
    """Review of the ring, finding 4: a worker role granted before version 7 may not call
    pgpubsub.rotate(), so its worker never frees stored messages' space. It logged a
    warning, but `pgpubsub status` said nothing."""
    worker = roles.make("work", "--worker")
    admin_query(roles.dsn, f'REVOKE EXECUTE ON FUNCTION pgpubsub.rotate() FROM "{worker}"')
    registry = Registry()
    seen: list[str] = []
    registry.add(Note, lambda text: seen.append(text))
    run = Running(roles.dsn_of(worker), registry, channels=[spec_of(Note)])
    try:
        with psycopg.connect(roles.dsn, autocommit=True) as conn:
            pgpubsub.notify(Note(text="hi"), conn=conn)
        wait_until(lambda: seen == ["hi"], timeout=10)

        def warned() -> list[str]:
            return [w for w in pgpubsub.status(roles.dsn).warnings if "rotate" in w]

        wait_until(warned, timeout=15)  # the worker's next heartbeat
        assert warned() == [
            f"worker {pgpubsub.status(roles.dsn).workers[0].host}:{os.getpid()}: "
            f"{spec_of(Note).name}: this role may not call pgpubsub.rotate() (pgpubsub grant "
            "ROLE --worker gives it): the worker does not free stored messages' space itself"
        ]
        assert pgpubsub.status(roles.dsn).problems() == []  # processing goes on
    finally:
        run.stop()


def test_a_worker_lacking_a_privilege_its_channels_need_says_so_and_exits_5(
    roles: Roles,
) -> None:
    from test_operations import one_failure, run

    worker = roles.make("work", "--worker")  # the grant of version 3, without schedules:
    admin_query(roles.dsn, f'REVOKE ALL ON pgpubsub.schedule FROM "{worker}"')
    channel = "app.jobs.EverySecond"
    out = run("listen", "app.jobs", "--channels", channel, "--dsn", roles.dsn_of(worker))
    one_failure(out, 5, f"pgpubsub grant {worker} --worker", "ON pgpubsub.schedule")
    assert admin_query(roles.dsn, "SELECT count(*) FROM pgpubsub.worker") == [(0,)]



def test_a_worker_without_the_batch_functions_says_so_and_exits_5(roles: Roles) -> None:
    """A grant from before the batch functions (a sweep calls one on every worker): the
    worker names the GRANT at start instead of failing its sweeps."""
    from test_operations import one_failure, run

    worker = roles.make("work", "--worker")
    admin_query(
        roles.dsn,
        "REVOKE EXECUTE ON FUNCTION pgpubsub.sweep_batches(double precision) "
        f'FROM "{worker}"',
    )
    out = run("listen", "app.jobs", "--dsn", roles.dsn_of(worker))
    one_failure(out, 5, f"pgpubsub grant {worker} --worker", "pgpubsub.sweep_batches")

V3_TRIGGERS = """
CREATE TRIGGER {insert} AFTER INSERT ON {table} REFERENCING NEW TABLE AS pgpubsub_new
    FOR EACH STATEMENT EXECUTE FUNCTION pgpubsub.notify_statement({channel}, 'durable');
CREATE TRIGGER {update} AFTER UPDATE ON {table}
    FOR EACH ROW EXECUTE FUNCTION pgpubsub.notify_trigger({channel}, 'durable');
"""


def v3_triggers(dsn: str, table: str, spec: Any, role: str | None = None) -> None:
    """Triggers as version 3 installed them (its function was then executable by PUBLIC)."""
    from pgpubsub._trigger_events import trigger_name

    text = V3_TRIGGERS.format(
        table=table,
        insert=trigger_name(spec, "AFTER INSERT"),
        update=trigger_name(spec, "AFTER UPDATE"),
        channel="'" + spec.name.replace("'", "''") + "'",
    )
    if role is None:
        admin_query(dsn, text)
    else:
        with psycopg.connect(make_conninfo(dsn, user=role, password="pw"), autocommit=True) as c:
            c.execute(text)


def events_of(dsn: str) -> list[tuple[str, str, Any]]:
    return [
        (e["operation"], e["table"], (e["new"] or {}).get("note"))
        for (e,) in admin_query(dsn, "SELECT payload::jsonb FROM pgpubsub.message ORDER BY id")
    ]


def test_migrate_to_version_4_registers_no_trigger_and_reinstalling_confirms_them(
    roles: Roles,
) -> None:
    """Version 3's trigger function was executable by PUBLIC: a trigger found at the
    upgrade may be anybody's. Its writes fail, loudly, until the listener modules
    install their triggers again; an attacker's stays refused."""
    writer = roles.make("writer")
    mallory = roles.make("mallory")
    admin_query(
        roles.dsn,
        f'GRANT USAGE ON SCHEMA shop TO "{writer}";'
        f'GRANT SELECT, INSERT, UPDATE ON shop.orders TO "{writer}";'
        "ALTER TABLE shop.orders ADD COLUMN note text;"
        f'GRANT USAGE ON SCHEMA pgpubsub TO "{mallory}";'
        f'CREATE SCHEMA m AUTHORIZATION "{mallory}";'
        "DELETE FROM pgpubsub.trigger_channel; UPDATE pgpubsub.version SET version = 3;"
        # version 3's function, as it was: SECURITY DEFINER, executable by PUBLIC
        "ALTER FUNCTION pgpubsub.notify_trigger() SECURITY DEFINER;"
        "ALTER FUNCTION pgpubsub.notify_statement() SECURITY DEFINER;"
        "GRANT EXECUTE ON FUNCTION pgpubsub.notify_trigger(), pgpubsub.notify_statement() "
        "TO PUBLIC",
    )
    v3_triggers(roles.dsn, "shop.orders", spec_of(Orders))
    with psycopg.connect(roles.dsn_of(mallory), autocommit=True) as conn:
        conn.execute("CREATE TABLE m.t (id int, note text)")
    v3_triggers(roles.dsn, "m.t", spec_of(Orders), role=mallory)
    assert not pgpubsub.status(roles.dsn).schema_current
    durable.migrate(roles.dsn)
    durable.migrate(roles.dsn)  # idempotent
    assert pgpubsub.status(roles.dsn).schema_current
    assert admin_query(roles.dsn, "SELECT count(*) FROM pgpubsub.trigger_channel") == [(0,)]
    secdef = (
        "SELECT bool_or(prosecdef) FROM pg_proc "
        "WHERE proname IN ('notify_trigger', 'notify_statement')"
    )
    assert admin_query(roles.dsn, secdef) == [(False,)]
    for role, table in ((writer, "shop.orders"), (mallory, "m.t")):
        with psycopg.connect(roles.dsn_of(role), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.RaiseException, match="no trigger channel"):
                conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    registry = Registry()
    registry.add(Orders, lambda new: None, events=frozenset({"AFTER INSERT", "AFTER UPDATE"}))
    with psycopg.connect(roles.dsn) as conn:  # `pgpubsub migrate myapp.listeners`
        install_triggers(conn, registry=registry)
    with psycopg.connect(roles.dsn_of(writer), autocommit=True) as conn:
        conn.execute("INSERT INTO shop.orders VALUES (1, 'a'), (2, 'b')")
        conn.execute("UPDATE shop.orders SET note = 'c' WHERE id = 1")
    with psycopg.connect(roles.dsn_of(mallory), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="no trigger channel"):
            conn.execute("INSERT INTO m.t VALUES (1, 'forged')")
    assert events_of(roles.dsn) == [
        ("INSERT", "shop.orders", "a"),
        ("INSERT", "shop.orders", "b"),
        ("UPDATE", "shop.orders", "c"),
    ]


def test_no_trigger_a_role_made_before_version_4_blocks_the_upgrade(roles: Roles) -> None:
    mallory = roles.make("mallory")
    admin_query(
        roles.dsn,
        f'GRANT USAGE ON SCHEMA pgpubsub TO "{mallory}"; CREATE SCHEMA m AUTHORIZATION "{mallory}";'
        "UPDATE pgpubsub.version SET version = 3;"
        "GRANT EXECUTE ON FUNCTION pgpubsub.notify_trigger(), pgpubsub.notify_statement() "
        "TO PUBLIC",
    )
    long_name = "a" * 63
    with psycopg.connect(roles.dsn_of(mallory), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE m.t (x int); CREATE VIEW m.v AS SELECT * FROM m.t;"
            "CREATE TRIGGER noargs AFTER UPDATE ON m.t FOR EACH ROW "
            "EXECUTE FUNCTION pgpubsub.notify_trigger();"
            "CREATE TRIGGER instead INSTEAD OF INSERT ON m.v FOR EACH ROW "
            "EXECUTE FUNCTION pgpubsub.notify_trigger('c', 'durable');"
            f"CREATE TRIGGER {long_name} AFTER DELETE ON m.t FOR EACH ROW "
            "EXECUTE FUNCTION pgpubsub.notify_trigger('c', 'durable');"
            "CREATE TRIGGER trunc AFTER TRUNCATE ON m.t FOR EACH STATEMENT "
            "EXECUTE FUNCTION pgpubsub.notify_statement('c', 'durable');"
            "CREATE TRIGGER three AFTER UPDATE ON m.t FOR EACH ROW "
            "EXECUTE FUNCTION pgpubsub.notify_trigger('c', 'durable', 'x');"
        )
    durable.migrate(roles.dsn)
    assert pgpubsub.status(roles.dsn).schema_current
    sends = r"SELECT tgname, tgtype FROM pg_trigger WHERE tgname LIKE '%%\_send'"
    assert admin_query(roles.dsn, sends) == []


def test_a_partitioned_watched_table_publishes_its_rows(roles: Roles) -> None:
    admin_query(
        roles.dsn,
        "CREATE TABLE shop.parts (id int, v int) PARTITION BY RANGE (id);"
        "CREATE TABLE shop.parts_1 PARTITION OF shop.parts FOR VALUES FROM (0) TO (100);"
        "CREATE TABLE shop.parts_2 PARTITION OF shop.parts FOR VALUES FROM (100) TO (200)",
    )

    @dataclass
    class Parts(TriggerChannel, table="shop.parts", lock_notifications=True):
        pass

    registry = Registry()
    registry.add(Parts, lambda new: None, events=frozenset({"AFTER INSERT", "AFTER UPDATE"}))
    with psycopg.connect(roles.dsn) as conn:
        install_triggers(conn, registry=registry)
        install_triggers(conn, registry=registry)
    admin_query(roles.dsn, "INSERT INTO shop.parts VALUES (1, 1), (150, 1)")
    admin_query(roles.dsn, "UPDATE shop.parts SET v = 2")
    ops = admin_query(
        roles.dsn, "SELECT payload::jsonb ->> 'operation' FROM pgpubsub.message ORDER BY id"
    )
    assert [op for (op,) in ops] == ["INSERT", "INSERT", "UPDATE", "UPDATE"]


def test_revoke_keeps_the_kinds_still_granted_and_what_was_held_before(roles: Roles) -> None:
    role = roles.make("op", "--operator")
    operator = privileges(roles.dsn, role)
    assert cli.main(["grant", role, "--worker", "--dsn", roles.dsn]) == 0
    assert cli.main(["grant", role, "--worker", "--revoke", "--dsn", roles.dsn]) == 0
    assert privileges(roles.dsn, role) == operator  # still an operator

    manual = roles.make("manual")
    admin_query(
        roles.dsn,
        f'GRANT USAGE ON SCHEMA pgpubsub TO "{manual}";'
        f'GRANT INSERT ON pgpubsub.message TO "{manual}";'
        f'GRANT SELECT ON pgpubsub.version TO "{manual}"',
    )
    before = privileges(roles.dsn, manual)
    assert cli.main(["grant", manual, "--monitor", "--dsn", roles.dsn]) == 0
    assert cli.main(["grant", manual, "--monitor", "--revoke", "--dsn", roles.dsn]) == 0
    assert privileges(roles.dsn, manual) == before


def test_a_django_writer_sends_wide_rows_but_reads_no_payload(roles: Roles) -> None:
    writer = roles.make("dw", "--django-writer")
    admin_query(
        roles.dsn,
        "INSERT INTO pgpubsub.message (channel, payload) VALUES ('payroll', 'secret')",
    )
    with psycopg.connect(roles.dsn_of(writer), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT payload FROM pgpubsub.message")
        conn.execute("LISTEN wide")
        conn.execute("SELECT pgpubsub.send_events('wide', false, ARRAY[repeat('x', 9000)])")
        (note,) = list(conn.notifies(timeout=5, stop_after=1))
    ref = json.loads(note.payload)
    (payload,) = admin_query(
        roles.dsn, "SELECT payload FROM pgpubsub.message WHERE id = %s", (ref["spill"],)
    )[0]
    assert payload == "x" * 9000
    assert ref["sha256"] == hashlib.sha256(b"x" * 9000).hexdigest()


@pytest.mark.parametrize("kind", ["--publisher", "--worker", "--django-writer"])
def test_no_role_that_inserts_messages_can_choose_their_ids_or_state(
    roles: Roles, kind: str
) -> None:
    role = roles.make("ins", kind)
    with psycopg.connect(roles.dsn_of(role), autocommit=True) as conn:
        for statement in (
            "INSERT INTO pgpubsub.message (id, channel, payload) OVERRIDING SYSTEM VALUE "
            "VALUES (1000000, 'junk', '')",
            "INSERT INTO pgpubsub.message (channel, payload, attempts) VALUES ('junk', '', 9)",
            "INSERT INTO pgpubsub.message (channel, payload, completed_at) "
            "VALUES ('junk', '', now())",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_a_worker_started_from_python_without_its_privileges_refuses_to_start(
    roles: Roles,
) -> None:
    from pgpubsub.worker import Worker

    worker = roles.make("work", "--worker")
    admin_query(roles.dsn, f'REVOKE ALL ON pgpubsub.schedule FROM "{worker}"')

    @dataclass
    class Tick(Channel, lock_notifications=True, schedule="* * * * *"):
        pass

    registry = Registry()
    registry.add(Tick, lambda: None)
    with pytest.raises(errors.PermissionDenied, match="ON pgpubsub.schedule"):
        Running(roles.dsn_of(worker), registry, channels=[spec_of(Tick)])
    assert Worker  # the class Running starts
    assert admin_query(roles.dsn, "SELECT count(*) FROM pgpubsub.worker") == [(0,)]


def test_a_role_without_usage_is_told_the_grant_to_run(roles: Roles) -> None:
    from test_operations import one_failure, run

    nobody = roles.make("nobody")
    channel = "app.jobs.EverySecond"
    out = run("listen", "app.jobs", "--channels", channel, "--dsn", roles.dsn_of(nobody))
    one_failure(out, 5, f"pgpubsub grant {nobody} --worker", "GRANT USAGE ON SCHEMA pgpubsub")


def test_revoke_takes_back_what_a_grant_before_version_4_gave(roles: Roles) -> None:
    role = roles.make("old")
    before = privileges(roles.dsn, role)
    admin_query(  # `pgpubsub grant --publisher --monitor --django-writer` of version 3
        roles.dsn,
        f'GRANT USAGE ON SCHEMA pgpubsub TO "{role}";'
        f'GRANT INSERT ON pgpubsub.message TO "{role}";'
        f'GRANT SELECT (id, channel, status, dedupe_key) ON pgpubsub.message TO "{role}";'
        f'GRANT SELECT ON pgpubsub.message, pgpubsub.worker, pgpubsub.version TO "{role}";'
        f'GRANT SELECT (id, payload) ON pgpubsub.message TO "{role}";'
        "GRANT EXECUTE ON FUNCTION pgpubsub.event, pgpubsub.send_events, pgpubsub.notify_row "
        f'TO "{role}"',
    )
    kinds = ["--publisher", "--monitor", "--django-writer"]
    assert cli.main(["grant", role, *kinds, "--revoke", "--dsn", roles.dsn]) == 0
    assert privileges(roles.dsn, role) == before


def test_a_worker_grant_registers_as_asleep_with_nothing_more(roles: Roles) -> None:
    """Review of issue 26 (ring2 review, also on main): registration read pgpubsub.sleeper
    to see whether a registration was there, and `pgpubsub grant --worker` gives only
    INSERT on it: an idle worker of such a role failed to register about 4 times a second,
    each time with a warning. It registers, and a publisher then wakes it."""
    worker = roles.make("wrk", "--worker")
    with psycopg.connect(roles.dsn_of(worker), autocommit=True) as conn:
        assert conn.execute("SELECT pgpubsub.sleep('shop.jobs')").fetchone() == (True,)
        assert conn.execute("SELECT pgpubsub.sleep('shop.jobs')").fetchone() == (True,)
    assert admin_query(roles.dsn, "SELECT channel FROM pgpubsub.sleeper") == [("shop.jobs",)]


@pytest.mark.parametrize("kind", ["--worker", "--operator"])
def test_migrate_by_a_role_that_cannot_migrate_fails_without_holding_up_the_queue(
    roles: Roles, kind: str
) -> None:
    """A worker or operator role (it may write the message table) that may create schemas:
    its migrate must fail at once, not first queue for the table's exclusive lock behind a
    transaction on it, with every publish and claim queued behind that."""
    role = roles.make(kind.strip("-"), kind)
    dbname = str(conninfo_to_dict(roles.dsn)["dbname"])
    admin_query(roles.dsn, f'GRANT CREATE ON DATABASE "{dbname}" TO "{role}"')
    outcome: list[BaseException | None] = []

    def migrate_as_role() -> None:
        try:
            durable.migrate(roles.dsn_of(role))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    with psycopg.connect(roles.dsn) as reader:
        reader.execute("SELECT count(*) FROM pgpubsub.message")  # a transaction on the table
        thread = threading.Thread(target=migrate_as_role)
        thread.start()
        thread.join(timeout=5)
        waited = thread.is_alive()
    thread.join(timeout=30)
    assert not waited, "migrate waited for the table's lock"
    [error] = outcome
    assert isinstance(error, errors.PgPubSubError) and "permission denied" in str(error), error
