"""The SQL surface in a shared database, tried with real roles.

A hostile role that may create objects in a schema on others' ``search_path``
defines functions named like built-ins; a role that only writes to a watched
table; a session that forges spill references with ``pg_notify``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from helpers import Running, admin_query, wait_until
from psycopg.conninfo import make_conninfo

import pgpubsub
from pgpubsub import Channel, TriggerChannel, cli, durable, errors
from pgpubsub.listen import Registry
from pgpubsub.triggers import install_triggers

# Each trap records that it ran (as whom) and then behaves like the built-in.
TRAP_SQL = """
CREATE TABLE public.sprung (fn text, by_user text);
GRANT INSERT ON public.sprung TO PUBLIC;
CREATE FUNCTION public.unnest(a text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sprung VALUES ('unnest', current_user);
    RETURN QUERY SELECT x FROM pg_catalog.unnest(a::anyarray) x;
END $$;
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sprung VALUES ('now', current_user);
    RETURN pg_catalog.now();
END $$;
CREATE FUNCTION public.power(a double precision, b integer) RETURNS double precision
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sprung VALUES ('power', current_user);
    RETURN pg_catalog.power(a, b::double precision);
END $$;
CREATE FUNCTION public.make_interval(secs double precision) RETURNS interval
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sprung VALUES ('make_interval', current_user);
    RETURN pg_catalog.make_interval(secs => secs);
END $$;
CREATE FUNCTION public.concat(a name, b text, c name) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sprung VALUES ('concat', current_user);
    RETURN a || b || c;
END $$;
CREATE FUNCTION public.octet_length(a text) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.sprung VALUES ('octet_length', current_user);
    RETURN pg_catalog.octet_length(a);
END $$;
"""


@dataclass
class Watched(TriggerChannel, table="shop.orders"):
    pass


@dataclass
class WatchedDurable(TriggerChannel, table="shop.orders", lock_notifications=True):
    pass


@dataclass
class Stored(Channel, lock_notifications=True, retry_delay=0.05):
    n: int


def role_dsn(dsn: str, role: str) -> str:
    return make_conninfo(dsn, user=role, password="pw")


@pytest.fixture
def shop(dsn: str) -> str:
    durable.migrate(dsn)
    admin_query(
        dsn,
        "CREATE SCHEMA shop; CREATE TABLE shop.orders (id int PRIMARY KEY, note text);"
        "DROP ROLE IF EXISTS pgpubsub_writer; DROP ROLE IF EXISTS pgpubsub_hostile;"
        "CREATE ROLE pgpubsub_writer LOGIN PASSWORD 'pw';"
        "CREATE ROLE pgpubsub_hostile LOGIN PASSWORD 'pw';"
        "GRANT USAGE ON SCHEMA shop TO pgpubsub_writer;"
        "GRANT INSERT, UPDATE, DELETE, SELECT ON shop.orders TO pgpubsub_writer;"
        "GRANT CREATE, USAGE ON SCHEMA public TO pgpubsub_hostile;",
    )
    yield dsn
    admin_query(
        dsn,
        "DROP OWNED BY pgpubsub_writer, pgpubsub_hostile CASCADE;"
        "DROP ROLE pgpubsub_writer; DROP ROLE pgpubsub_hostile;",
    )


def sprung(dsn: str) -> list[tuple[Any, ...]]:
    return admin_query(dsn, "SELECT fn, by_user FROM public.sprung")


def test_functions_named_like_built_ins_never_run_in_pgpubsub_sql(shop: str) -> None:
    with psycopg.connect(role_dsn(shop, "pgpubsub_hostile"), autocommit=True) as hostile:
        hostile.execute(TRAP_SQL)
    registry = Registry()
    got: list[Any] = []
    registry.add(Watched, lambda new: got.append(new), events=frozenset({"AFTER INSERT"}))
    registry.add(WatchedDurable, lambda new: got.append(new), events=frozenset({"AFTER UPDATE"}))
    registry.add(Stored, lambda n: got.append(n))
    with psycopg.connect(shop) as conn:
        install_triggers(conn, registry=registry)
    # The superuser writes with the hostile schema first on its path.
    with psycopg.connect(shop, autocommit=True) as su:
        su.execute("SET search_path = public, pg_catalog")
        su.execute("INSERT INTO shop.orders VALUES (1, 'small'), (2, %s)", ("x" * 50_000,))
        su.execute("UPDATE shop.orders SET note = 'changed' WHERE id = 1")
        pgpubsub.notify(Stored, conn=su, n=1)
        pgpubsub.notify_many(Stored, [{"n": 2}, {"n": 3}], conn=su)
    run = Running(shop + " options='-c search_path=public,pg_catalog'", registry)
    try:
        with psycopg.connect(shop, autocommit=True) as su:
            su.execute("SET search_path = public, pg_catalog")
            su.execute("INSERT INTO shop.orders VALUES (3, 'live'), (4, %s)", ("y" * 50_000,))
            pgpubsub.notify(Stored, conn=su, n=4)
        wait_until(lambda: len(got) >= 4, timeout=15)
    finally:
        run.stop()
    assert sprung(shop) == []
    assert admin_query(
        shop, "SELECT rolsuper FROM pg_roles WHERE rolname = 'pgpubsub_hostile'"
    ) == [(False,)]


def test_a_role_that_only_writes_to_watched_tables_needs_nothing_on_the_message_table(
    shop: str,
) -> None:
    registry = Registry()
    plain: list[Any] = []
    stored: list[Any] = []
    registry.add(Watched, lambda new: plain.append(new["id"]), events=frozenset({"AFTER INSERT"}))
    registry.add(
        WatchedDurable, lambda new: stored.append(new["id"]), events=frozenset({"AFTER UPDATE"})
    )
    with psycopg.connect(shop) as conn:
        install_triggers(conn, registry=registry)
    run = Running(shop, registry)
    try:
        with psycopg.connect(role_dsn(shop, "pgpubsub_writer"), autocommit=True) as writer:
            writer.execute("INSERT INTO shop.orders VALUES (1, 'small'), (2, %s)", ("z" * 50_000,))
            writer.execute("UPDATE shop.orders SET note = %s", ("w" * 50_000,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                writer.execute("SELECT * FROM pgpubsub.message")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                writer.execute("SELECT pgpubsub.send_events('x', true, ARRAY['{}'])")
        wait_until(lambda: sorted(plain) == [1, 2] and sorted(stored) == [1, 2], timeout=15)
    finally:
        run.stop()


def test_a_forged_spill_reference_delivers_nothing(shop: str) -> None:
    admin_query(shop, "CREATE TABLE shop.secrets (id int, secret text)")
    registry = Registry()
    got: list[Any] = []
    registry.add(Watched, lambda new: got.append(new), events=frozenset({"AFTER INSERT"}))

    @dataclass
    class Secrets(TriggerChannel, table="shop.secrets"):
        pass

    registry.add(Secrets, lambda new: None, events=frozenset({"AFTER INSERT"}))
    with psycopg.connect(shop) as conn:
        install_triggers(conn, registry=registry)
    # A wide row of another table is spilled (kept for its own channel's listeners).
    admin_query(shop, "INSERT INTO shop.secrets VALUES (1, %s)", ("s" * 50_000,))
    (spill_id,) = admin_query(shop, "SELECT id FROM pgpubsub.message WHERE status = 'spill'")[0]
    name = pgpubsub.channel.spec_of(Watched).name
    run = Running(shop, registry)
    try:
        with psycopg.connect(role_dsn(shop, "pgpubsub_hostile"), autocommit=True) as hostile:
            for forged in (
                f'{{"spill": {spill_id}}}',
                f'{{"spill": {spill_id}, "sha256": "{"0" * 64}"}}',
                '{"spill": 1, "sha256": "x"}',
            ):
                hostile.execute("SELECT pg_notify(%s, %s)", (name, forged))
        admin_query(shop, "INSERT INTO shop.orders VALUES (7, 'real')")
        wait_until(lambda: len(got) == 1, timeout=10)
    finally:
        run.stop()
    assert [row["id"] for row in got] == [7]


def test_errors_at_public_entry_points_come_from_one_hierarchy(dsn: str) -> None:
    with pytest.raises(errors.ConfigurationError) as bad_conninfo:
        pgpubsub.connect("dbname='unterminated")
    assert isinstance(bad_conninfo.value.__cause__, psycopg.Error)
    with pytest.raises(errors.ConfigurationError):
        pgpubsub.connect(dsn, no_such_option="x")
    registry = Registry()
    registry.add(Watched, lambda new: None, events=frozenset({"AFTER INSERT"}))
    with psycopg.connect(dsn) as conn, pytest.raises(errors.PgPubSubError) as missing:
        install_triggers(conn, registry=registry)
    assert "shop" in str(missing.value)


def test_granted_publisher_and_worker_roles_work_and_see_no_more(shop: str) -> None:
    admin_query(
        shop,
        "DROP ROLE IF EXISTS pgpubsub_pub; DROP ROLE IF EXISTS pgpubsub_work;"
        "CREATE ROLE pgpubsub_pub LOGIN PASSWORD 'pw';"
        "CREATE ROLE pgpubsub_work LOGIN PASSWORD 'pw'",
    )
    try:
        assert cli.main(["grant", "pgpubsub_pub", "--publisher", "--dsn", shop]) == 0
        assert cli.main(["grant", "pgpubsub_work", "--worker", "--dsn", shop]) == 0
        admin_query(shop, "INSERT INTO pgpubsub.message (channel, payload) VALUES ('other', 'x')")
        with psycopg.connect(role_dsn(shop, "pgpubsub_pub"), autocommit=True) as pub:
            assert isinstance(pgpubsub.notify(Stored, conn=pub, n=1), int)
            assert pgpubsub.notify_many(Stored, [{"n": 2}, {"n": 3}], conn=pub) == 2
            # Every publishing option works for a least-privileged publisher, a
            # dedupe hit included (it reads back the pending message's id).
            first = pgpubsub.notify(Stored(n=6), conn=pub, dedupe_key="k", priority=5)
            assert pgpubsub.notify(Stored(n=7), conn=pub, dedupe_key="k") == first
            pgpubsub.notify(Stored(n=8), conn=pub, ordering_key="o", delay=0.1, limit_key="c")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                pub.execute("SELECT payload FROM pgpubsub.message")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                pub.execute("DELETE FROM pgpubsub.message")
        registry = Registry()
        got: list[int] = []
        registry.add(Stored, lambda n: got.append(n))
        run = Running(role_dsn(shop, "pgpubsub_work"), registry)
        try:
            wait_until(lambda: sorted(got) == [1, 2, 3, 6, 8], timeout=15)
            # The worker role keeps its row in the registry.
            wait_until(lambda: len(pgpubsub.status(shop).workers) == 1, timeout=15)
        finally:
            run.stop()
        with psycopg.connect(role_dsn(shop, "pgpubsub_work"), autocommit=True) as work:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="owner"):
                work.execute("DROP TABLE pgpubsub.message")
        assert cli.main(["grant", "pgpubsub_pub", "--publisher", "--revoke", "--dsn", shop]) == 0
        with psycopg.connect(role_dsn(shop, "pgpubsub_pub"), autocommit=True) as pub:
            with pytest.raises(errors.PermissionDenied):
                pgpubsub.notify(Stored, conn=pub, n=5)
    finally:
        admin_query(
            shop,
            "DROP OWNED BY pgpubsub_pub, pgpubsub_work CASCADE;"
            "DROP ROLE pgpubsub_pub; DROP ROLE pgpubsub_work;",
        )


def test_grant_quotes_the_role_and_says_what_is_wrong(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["grant", 'x"; DROP TABLE t; --', "--worker", "--sql"]) == 0
    assert 'TO "x""; DROP TABLE t; --"' in capsys.readouterr().out
    assert cli.main(["grant", "nobody_here", "--worker", "--dsn", dsn]) in (1, 4)
    assert "nobody_here" in capsys.readouterr().err
    assert cli.main(["grant", "someone", "--dsn", dsn]) == 2
    assert "--publisher" in capsys.readouterr().err


def test_migrate_without_the_privilege_is_one_line_and_exit_5(
    shop: str, capsys: pytest.CaptureFixture[str]
) -> None:
    admin_query(
        shop,
        "DROP SCHEMA pgpubsub CASCADE; REVOKE CREATE ON DATABASE "
        f"{psycopg.conninfo.conninfo_to_dict(shop)['dbname']} FROM PUBLIC",
    )
    assert cli.main(["migrate", "--dsn", role_dsn(shop, "pgpubsub_writer")]) == 5
    err = capsys.readouterr().err.strip()
    assert err.startswith("pgpubsub migrate: error:") and "\n" not in err
    assert "permission denied" in err


def test_closed_and_unencodable_inputs_raise_library_errors(dsn: str) -> None:
    pubsub = pgpubsub.connect(dsn)
    pubsub.listen("a")
    for payload in ("\ud800", "x" * 100 + "\udfff", "é\udc80" * 3000):
        with pytest.raises(errors.PayloadError, match="not valid Unicode"):
            pubsub.notify("a", payload)
    pubsub.close()
    with pytest.raises(errors.ConnectionLost, match="closed"):
        pubsub.get_event()
    with pytest.raises(errors.ConnectionLost):
        pubsub.notify("a", "x")
    with psycopg.connect(dsn, autocommit=True) as conn:
        durable.migrate(dsn)
        for value in (object(), "\ud800"):
            with pytest.raises(errors.SchemaMismatch, match="cannot be sent"):
                pgpubsub.notify(Stored, conn=conn, n=value)
        assert conn.execute("SELECT count(*) FROM pgpubsub.message").fetchone() == (0,)
