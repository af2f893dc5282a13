"""Durable storage that keeps its size and speed whatever transaction is open (issue 26).

A transaction open anywhere in the database stops vacuum from reclaiming any row deleted
after it began. Before version 6 every processed message left its row versions and
index entries behind, so the tables grew with every message processed and each claim
walked more dead entries. The invariant: with a transaction held open, the storage the
durable tables use is bounded by the messages pending, not by those processed.

And the upgrade: a table as versions 1 to 5 made it becomes the ring of segments with
every message, id and privilege kept.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import DurableRunning, admin_query, install_version_5, record_calls, wait_until

import pgpubsub
from pgpubsub import _claim_sql, _processor
from pgpubsub.channel import Channel, spec_of
from pgpubsub.durable import migrate
from pgpubsub.listen import Registry

# What the durable tables hold, whatever their layout: the table and its partitions,
# their indexes and TOAST.
STORAGE_SQL = (
    "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = 'pgpubsub' AND left(c.relname, 7) = 'message' AND c.relkind = 'r'"
)
ROWS_SQL = (
    "SELECT id, channel, payload, status, attempts, run_at, last_error, created_at, "
    "completed_at, priority, dedupe_key, ordering_key, unfinished FROM pgpubsub.message "
    "ORDER BY id"
)


@dataclass
class Stored(Channel, lock_notifications=True, concurrency=2):
    n: int


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    migrate(dsn)
    yield dsn


def storage(dsn: str) -> int:
    return int(admin_query(dsn, STORAGE_SQL)[0][0])  # type: ignore[call-overload]


def test_a_transaction_held_open_does_not_keep_processed_messages(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_processor, "ROTATE_EVERY", 0.0)  # each batch: deterministic here
    done: list[int] = []
    registry = Registry()
    registry.add(Stored, lambda n: done.append(n))
    runner = DurableRunning(db, [Stored], registry, poll_interval=0.2)
    report = psycopg.connect(db)
    try:
        # A report in REPEATABLE READ: its snapshot holds the xmin horizon. It reads
        # another table, as reports do.
        report.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        report.execute("SELECT count(*) FROM pg_class")
        sizes = []
        for chunk in range(8):
            with psycopg.connect(db) as conn:
                pgpubsub.notify_many(
                    Stored, [{"n": chunk * 5000 + i} for i in range(5000)], conn=conn
                )
            wait_until(lambda c=chunk: len(done) >= (c + 1) * 5000, timeout=120, interval=0.05)
            sizes.append(storage(db))
        held = admin_query(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_xmin IS NOT NULL "
            "AND state = 'idle in transaction'",
        )
        assert held[0][0] >= 1, "the report holds no snapshot: the test proves nothing"
        # 40,000 processed and none pending: bounded by a few segments, not growing with
        # every 5,000 processed (the table as versions 1 to 5 made it grew about 8x),
        # once the crew's drains have moved the ring on (the last call as soon as
        # ROTATE_DRAINED_EVERY allows, whichever drain ended last).
        bound = 1.5 * max(sizes[:3])
        try:
            wait_until(lambda: storage(db) <= bound, timeout=5)
        except AssertionError:
            raise AssertionError([s // 1024 for s in [*sizes, storage(db)]]) from None
    finally:
        report.close()
        runner.stop()
    assert sorted(done) == list(range(40_000))


def test_upgrading_a_version_5_table_keeps_every_message_id_and_privilege(dsn: str) -> None:
    install_version_5(dsn)
    assert admin_query(dsn, "SELECT version FROM pgpubsub.version") == [(5,)]
    admin_query(dsn, "CREATE ROLE storage_pub LOGIN")
    try:
        admin_query(
            dsn,
            "GRANT USAGE ON SCHEMA pgpubsub TO storage_pub; "
            "GRANT INSERT (channel, payload, trace, run_at, priority, dedupe_key, ordering_key) "
            "ON pgpubsub.message TO storage_pub; "
            "GRANT SELECT (id, channel, status, dedupe_key) ON pgpubsub.message TO storage_pub",
        )
        name = spec_of(Stored).name
        admin_query(
            dsn,
            "INSERT INTO pgpubsub.message (channel, payload, status, attempts, last_error, "
            "dedupe_key, ordering_key, run_at, completed_at) VALUES "
            "(%s, '{\"n\": 1}', 'pending', 0, NULL, NULL, NULL, now(), NULL), "
            "(%s, '{\"n\": 2}', 'pending', 1, 'boom', NULL, NULL, now() + interval '1 day', NULL), "
            "(%s, '{\"n\": 3}', 'dead', 5, 'ValueError: no', NULL, NULL, now(), NULL), "
            "(%s, '{\"n\": 4}', 'done', 1, NULL, NULL, NULL, now(), now()), "
            "(%s, '{\"n\": 5}', 'pending', 0, NULL, 'once', NULL, now(), NULL), "
            "(%s, '{\"n\": 6}', 'pending', 0, NULL, NULL, 'k', now(), NULL), "
            "(%s, '{\"n\": 7}', 'pending', 0, NULL, NULL, 'k', now(), NULL), "
            "('wide', 'x', 'spill', 0, NULL, NULL, NULL, now(), NULL)",
            (name,) * 7,
        )
        before = admin_query(dsn, ROWS_SQL)
        last_id = max(int(r[0]) for r in before)  # type: ignore[call-overload]

        migrate(dsn)

        assert admin_query(
            dsn, "SELECT relkind FROM pg_class WHERE oid = 'pgpubsub.message'::regclass"
        ) == [("p",)]
        assert admin_query(dsn, ROWS_SQL) == before
        places = dict(
            admin_query(  # type: ignore[arg-type]
                dsn, "SELECT payload, tableoid::regclass::text FROM pgpubsub.message"
            )
        )
        assert places['{"n": 3}'] == places['{"n": 4}'] == places["x"] == "pgpubsub.message_kept"
        assert places['{"n": 5}'] == "pgpubsub.message_deduped"
        assert places['{"n": 1}'] == places['{"n": 6}'] == "pgpubsub.message_0"
        # The privileges the role held on the old table, and no more.
        assert admin_query(
            dsn,
            "SELECT has_column_privilege('storage_pub', 'pgpubsub.message', 'payload', 'INSERT'), "
            "has_column_privilege('storage_pub', 'pgpubsub.message', 'status', 'INSERT'), "
            "has_column_privilege('storage_pub', 'pgpubsub.message', 'dedupe_key', 'SELECT'), "
            "has_column_privilege('storage_pub', 'pgpubsub.message', 'payload', 'SELECT'), "
            "has_table_privilege('storage_pub', 'pgpubsub.message', 'UPDATE')",
        ) == [(True, False, True, False, False)]
        # New ids follow the old ones; the migrated dedupe key still holds.
        pub = psycopg.conninfo.make_conninfo(dsn, user="storage_pub")
        with psycopg.connect(pub, autocommit=True) as conn:
            assert pgpubsub.notify(Stored(n=8), conn=conn) > last_id
            assert pgpubsub.notify(Stored(n=9), conn=conn, dedupe_key="once") == int(
                before[4][0]  # type: ignore[call-overload]
            )
        # The pending ones run; the delayed one waits, the dead and done stay.
        seen: list[int] = []
        registry = Registry()
        registry.add(Stored, lambda n: seen.append(n))
        assert pgpubsub.process_stored_notifications([Stored], dsn=dsn, registry=registry) == 5
        assert sorted(seen) == [1, 5, 6, 7, 8]
        statuses = admin_query(dsn, "SELECT payload, status FROM pgpubsub.message ORDER BY id")
        assert ('{"n": 2}', "pending") in statuses and ('{"n": 3}', "dead") in statuses
        migrate(dsn)  # again: nothing changes
        assert admin_query(dsn, "SELECT count(*) FROM pgpubsub.message") == [(len(statuses),)]
    finally:
        admin_query(dsn, "DROP OWNED BY storage_pub; DROP ROLE storage_pub")


def model_rows(dsn: str) -> list[tuple[object, ...]]:
    return admin_query(dsn, ROWS_SQL)


def test_rotating_never_loses_or_changes_a_message(db: str) -> None:
    """Rounds of random rows (due, delayed, retried, dead, done, deduped, in a worker's
    hands, locked by a claim, stored by a transaction still open), random completions,
    and rotations: every row that was not completed is there, unchanged."""
    rnd = random.Random(26)
    name = spec_of(Stored).name
    for round_ in range(12):
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO pgpubsub.message (channel, payload, status, run_at, dedupe_key, "
                "unfinished) SELECT %s, g::text, (ARRAY['pending','pending','pending','dead',"
                "'done'])[1 + (g %% 5)], now() + (g %% 3) * interval '1 hour', "
                "CASE WHEN g %% 17 = 0 THEN 'd' || g END, g %% 11 = 0 "
                "FROM generate_series(%s::int, %s::int) g",
                (name, round_ * 100_000, round_ * 100_000 + rnd.choice([50, 900, 4000, 11000])),
            )
            # Completed: most of the due ones.
            conn.execute(
                "DELETE FROM pgpubsub.message WHERE status = 'pending' AND NOT unfinished "
                "AND run_at <= now() AND random() < 0.9"
            )
        expected = model_rows(db)
        # A claim holding some rows locked, and a publisher in its transaction.
        with psycopg.connect(db) as claim, psycopg.connect(db) as publisher:
            claim.execute(
                "SELECT id FROM pgpubsub.message WHERE status = 'pending' LIMIT 20 FOR UPDATE"
            )
            publisher.execute(
                "INSERT INTO pgpubsub.message (channel, payload) VALUES (%s, 'open')", (name,)
            )
            for _ in range(3):
                admin_query(db, "SELECT pgpubsub.rotate()")
            assert model_rows(db) == expected
            publisher.commit()
            claim.commit()
        expected = model_rows(db)
        for _ in range(3):
            admin_query(db, "SELECT pgpubsub.rotate()")
        assert model_rows(db) == expected
        admin_query(db, "DELETE FROM pgpubsub.message WHERE payload = 'open'")


def test_rotate_refuses_an_older_snapshot(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(psycopg.errors.RaiseException, match="READ COMMITTED"):
            conn.execute("SELECT pgpubsub.rotate()")


def test_claims_go_on_while_rows_move_between_segments(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim whose row another transaction moved to another segment meanwhile fails
    with a serialization failure; the processor claims again, and nothing is lost,
    duplicated or logged as a failed round."""
    name = spec_of(Stored).name
    done: list[int] = []
    registry = Registry()
    registry.add(Stored, lambda n: done.append(n))
    stop = threading.Event()

    def mover() -> None:
        with psycopg.connect(db, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(
                    "UPDATE pgpubsub.message SET segment = (segment + 1) %% 4 WHERE id IN ("
                    "SELECT id FROM pgpubsub.message WHERE channel = %s AND status = 'pending' "
                    "AND NOT unfinished LIMIT 50 FOR UPDATE SKIP LOCKED)",
                    (name,),
                )

    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify_many(Stored, [{"n": i} for i in range(3000)], conn=conn)
    thread = threading.Thread(target=mover)
    thread.start()
    runner = DurableRunning(db, [Stored], registry, poll_interval=0.2, batch_size=20)
    try:
        wait_until(lambda: len(done) >= 3000, timeout=120, interval=0.05)
    finally:
        stop.set()
        thread.join()
        runner.stop()
    assert sorted(done) == list(range(3000))
    failed = [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert not failed, failed[:3]


def test_publishers_store_into_the_current_segment(db: str) -> None:
    admin_query(db, "UPDATE pgpubsub.ring SET segment = 2")
    with psycopg.connect(db, autocommit=True) as conn:
        assert pgpubsub.notify_many(Stored, [{"n": 1}, {"n": 2}], conn=conn) == 2
        pgpubsub.notify(Stored(n=3), conn=conn, priority=5)
    assert admin_query(db, "SELECT DISTINCT tableoid::regclass::text FROM pgpubsub.message") == [
        ("pgpubsub.message_2",)
    ]
    rows = admin_query(db, "SELECT payload FROM pgpubsub.message")
    payloads = [json.loads(str(r[0])) for r in rows]
    assert sorted(p["n"] for p in payloads) == [1, 2, 3]


# -- finding 1 of the hostile review: a processing transaction locks only its rows' partitions --

PARTITIONS_LOCKED = (
    "SELECT c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE l.pid = pg_backend_pid() "
    "AND n.nspname = 'pgpubsub' AND c.relkind = 'r' AND left(c.relname, 7) = 'message' "
    "ORDER BY 1"
)


@dataclass
class Brittle(Channel, lock_notifications=True, max_attempts=1):
    n: int


def publish_brittle(dsn: str) -> None:
    """Messages 0 and 2 in the current segment, 1 with a dedupe key (message_deduped)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgpubsub.notify_many(Brittle, [{"n": 0}, {"n": 2}], conn=conn)
        pgpubsub.notify(Brittle(n=1), conn=conn, dedupe_key="one")


def test_a_processing_transaction_locks_only_the_partitions_of_its_rows(db: str) -> None:
    """Inside the processing transaction, while listeners run and at its commit, the
    message partitions locked are those its rows are in (and message_kept, where a
    dead one moves): not the other segments, which pgpubsub.rotate() must be able to
    empty meanwhile. At commit: a deferred constraint trigger of the test's own,
    fired by the listener's write, records the transaction's locks."""
    admin_query(
        db,
        "CREATE TABLE probe (n int); CREATE TABLE seen (at text, rel text); "
        "CREATE FUNCTION record_locks() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN "
        "INSERT INTO seen SELECT 'commit', r.relname FROM (" + PARTITIONS_LOCKED + ") r; "
        "RETURN NULL; END $f$; "
        "CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON probe DEFERRABLE INITIALLY "
        "DEFERRED FOR EACH ROW EXECUTE FUNCTION record_locks()",
    )
    admin_query(db, "UPDATE pgpubsub.ring SET segment = 1")
    during: list[set[str]] = []

    def listener(n: int) -> None:
        conn = pgpubsub.durable.connection()
        during.append({str(r[0]) for r in conn.execute(PARTITIONS_LOCKED).fetchall()})
        if n == 0:
            conn.execute("SET CONSTRAINTS at_commit DEFERRED")  # the processor set IMMEDIATE
            conn.execute("INSERT INTO probe VALUES (%s)", (n,))
        if n == 2:
            raise ValueError("dies: moves to message_kept")

    publish_brittle(db)
    registry = Registry()
    registry.add(Brittle, listener)
    assert pgpubsub.process_stored_notifications([Brittle], dsn=db, registry=registry) == 2
    assert len(during) == 3
    assert set().union(*during) == {"message_1", "message_deduped"}
    at_commit = {str(r[0]) for r in admin_query(db, "SELECT rel FROM seen")}
    assert at_commit == {"message_1", "message_deduped", "message_kept"}


def test_a_drained_segment_is_emptied_while_a_batch_of_another_segment_runs(db: str) -> None:
    """The point of finding 1: rotate() empties a drained segment while a listener of a
    batch stored in another segment is running (its transaction open)."""
    name = spec_of(Stored).name
    admin_query(db, "UPDATE pgpubsub.ring SET segment = 2")
    with psycopg.connect(db, autocommit=True) as conn:  # segment 2: stored, then completed
        pgpubsub.notify_many(Stored, [{"n": -i} for i in range(1, 50)], conn=conn)
        conn.execute("DELETE FROM pgpubsub.message WHERE channel = %s", (name,))
    admin_query(db, "UPDATE pgpubsub.ring SET segment = 1")
    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify(Stored(n=1), conn=conn)
    started, release = threading.Event(), threading.Event()

    def listener(n: int) -> None:
        started.set()
        assert release.wait(30)

    registry = Registry()
    registry.add(Stored, listener)
    worker = threading.Thread(
        target=pgpubsub.process_stored_notifications, args=([Stored], db, registry)
    )
    worker.start()
    try:
        assert started.wait(30)
        assert admin_query(db, "SELECT pg_relation_size('pgpubsub.message_2')")[0][0] > 0
        admin_query(db, "SELECT pgpubsub.rotate()")
        assert admin_query(db, "SELECT pg_relation_size('pgpubsub.message_2')") == [(0,)]
    finally:
        release.set()
        worker.join()


# -- finding 3: logical replication (a publication FOR ALL TABLES) --


def test_every_partition_has_a_replica_identity_and_a_published_database_processes(
    dsn: str,
) -> None:
    """Under a publication FOR ALL TABLES every UPDATE and DELETE of a table without a
    replica identity fails: each partition has one (its unique index on id), so
    claims, completions, deaths (a move to message_kept), dedupe and rotation go on."""
    admin_query(dsn, "CREATE PUBLICATION everything FOR ALL TABLES")
    migrate(dsn)  # the partitions created under the publication
    assert admin_query(
        dsn,
        "SELECT c.relname, c.relreplident, i.indexrelid::regclass::text FROM pg_inherits h "
        "JOIN pg_class c ON c.oid = h.inhrelid LEFT JOIN pg_index i ON i.indrelid = c.oid "
        "AND i.indisreplident WHERE h.inhparent = 'pgpubsub.message'::regclass ORDER BY 1",
    ) == [
        (p, "i", f"pgpubsub.{p}_id_key")
        for p in ("message_0", "message_1", "message_2", "message_3", "message_deduped")
    ] + [(p, "i", f"pgpubsub.{p}_id_key") for p in ("message_kept", "message_later")]
    seen: list[int] = []

    def listener(n: int) -> None:
        seen.append(n)
        if n == 2:
            raise ValueError("dies")

    publish_brittle(dsn)
    registry = Registry()
    registry.add(Brittle, listener)
    assert pgpubsub.process_stored_notifications([Brittle], dsn=dsn, registry=registry) == 2
    assert sorted(seen) == [0, 1, 2]
    admin_query(dsn, "SELECT pgpubsub.rotate()")
    assert admin_query(dsn, "SELECT payload, status FROM pgpubsub.message") == [('{"n":2}', "dead")]


# -- findings 4 and 7: the upgrade keeps the table's owner and each privilege's grantor --

SCHEMA_V6 = Path(__file__).parent / "schema_v6.sql"
ACL_SQL = (
    "SELECT a.privilege_type, a.grantee::regrole::text, a.grantor::regrole::text, "
    "a.is_grantable, NULL::name FROM pg_class c, aclexplode(c.relacl) a "
    "WHERE c.oid = 'pgpubsub.message'::regclass AND a.grantee <> c.relowner "
    "UNION ALL SELECT a.privilege_type, a.grantee::regrole::text, a.grantor::regrole::text, "
    "a.is_grantable, t.attname FROM pg_attribute t, aclexplode(t.attacl) a "
    "WHERE t.attrelid = 'pgpubsub.message'::regclass AND t.attacl IS NOT NULL ORDER BY 1, 2, 3, 5"
)


def test_an_upgrade_by_a_superuser_keeps_the_owner_and_every_grantor(dsn: str) -> None:
    """The schema as version 6 installed it, by the application's role (as its Django
    migrations do), a grant option passed on by another role; `migrate` run by a
    superuser: the table and its partitions are still the application's, every
    privilege is held from the same grantor (who can still take it back)."""
    db = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    roles = ("r2_app", "r2_lead", "r2_analyst")
    for role in roles:
        admin_query(dsn, f"CREATE ROLE {role} LOGIN")
    try:
        admin_query(dsn, f"GRANT CREATE ON DATABASE {db} TO r2_app")
        app, lead = (psycopg.conninfo.make_conninfo(dsn, user=r) for r in roles[:2])
        with psycopg.connect(app, autocommit=True) as conn:
            conn.execute(SCHEMA_V6.read_text().encode())
            conn.execute(
                "INSERT INTO pgpubsub.message (channel, payload) VALUES ('c', '1'); "
                "GRANT USAGE ON SCHEMA pgpubsub TO r2_lead, r2_analyst; "
                "GRANT SELECT ON pgpubsub.message TO r2_lead WITH GRANT OPTION; "
                "GRANT INSERT (channel, payload) ON pgpubsub.message TO r2_lead "
                "WITH GRANT OPTION; GRANT DELETE ON pgpubsub.message TO r2_analyst"
            )
        with psycopg.connect(lead, autocommit=True) as conn:
            conn.execute(
                "GRANT SELECT ON pgpubsub.message TO r2_analyst; "
                "GRANT INSERT (channel, payload) ON pgpubsub.message TO r2_analyst"
            )
        before = admin_query(dsn, ACL_SQL)
        assert ("SELECT", "r2_analyst", "r2_lead", False, None) in before

        migrate(dsn)

        assert admin_query(
            dsn, "SELECT relkind FROM pg_class WHERE oid = 'pgpubsub.message'::regclass"
        ) == [("p",)]
        owners = admin_query(
            dsn,
            "SELECT DISTINCT relowner::regrole::text FROM pg_class WHERE oid = "
            "'pgpubsub.message'::regclass OR oid IN (SELECT inhrelid FROM pg_inherits WHERE "
            "inhparent = 'pgpubsub.message'::regclass) OR oid = "
            "pg_get_serial_sequence('pgpubsub.message', 'id')::regclass",
        )
        assert owners == [("r2_app",)]
        assert admin_query(dsn, ACL_SQL) == before
        with psycopg.connect(app, autocommit=True) as conn:  # the app's table still
            conn.execute("INSERT INTO pgpubsub.message (channel, payload) VALUES ('c', '2')")
            assert conn.execute("SELECT count(*) FROM pgpubsub.message").fetchone() == (2,)
        with psycopg.connect(lead, autocommit=True) as conn:  # its grant is still its own
            conn.execute("REVOKE SELECT ON pgpubsub.message FROM r2_analyst")
        assert admin_query(
            dsn, "SELECT has_table_privilege('r2_analyst', 'pgpubsub.message', 'SELECT')"
        ) == [(False,)]
    finally:
        admin_query(dsn, "DROP SCHEMA pgpubsub CASCADE")
        admin_query(dsn, f"DROP OWNED BY {', '.join(roles)}")
        for role in roles:
            admin_query(dsn, f"DROP ROLE {role}")


# -- finding 5: replay, cancel and purge meet a row rotate() moves --


def _outcome(outcomes: dict[str, object], what: str, operation: Any) -> None:
    try:
        outcomes[what] = operation()
    except Exception as exc:  # the test's assertion names it
        outcomes[what] = exc


def _until_waiting_or_done(db: str, pid: int, thread: threading.Thread) -> None:
    """Until backend ``pid`` waits for a lock, or ``thread`` is done (it did not wait)."""
    waiting = "SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted"
    wait_until(
        lambda: not thread.is_alive() or admin_query(db, waiting, (pid,)) == [(1,)],
        timeout=10,
        interval=0.01,
    )


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "read-committed"])
def test_cancel_purge_and_replay_follow_a_row_moved_to_another_segment(
    db: str, autocommit: bool
) -> None:
    """A pending message no worker holds, moved to another segment by a transaction
    (as pgpubsub.rotate() moves leftovers) while an operation waits for its lock:
    cancel deletes it (it never reports it as stopping, and it never runs), purge
    deletes it, replay makes it due and reports nothing skipped; none fails with a
    serialization failure, on an autocommit connection or in the caller's READ
    COMMITTED transaction (replay's statements then run in savepoints)."""
    from pgpubsub import messages

    operations = {
        "cancel": lambda conn, mid: messages.cancel(conn, ids=[mid]),
        "purge": lambda conn, mid: messages.purge(conn, status="pending", ids=[mid]),
        "replay": lambda conn, mid: messages.replay(conn, ids=[mid], status="pending"),
    }
    outcomes: dict[str, object] = {}
    for what, operation in operations.items():
        ring = admin_query(db, "SELECT segment FROM pgpubsub.ring")
        with psycopg.connect(db, autocommit=True) as conn:
            mid = pgpubsub.notify(Stored(n=1), conn=conn, delay=3600)
        with psycopg.connect(db) as mover, psycopg.connect(db, autocommit=autocommit) as op:
            mover.execute(
                "UPDATE pgpubsub.message SET segment = (%s + 1) %% 4 WHERE id = %s",
                (ring[0][0], mid),
            )
            thread = threading.Thread(
                target=_outcome,
                args=(outcomes, what, lambda op=op, mid=mid, f=operation: f(op, mid)),
            )
            thread.start()
            _until_waiting_or_done(db, op.info.backend_pid, thread)
            mover.commit()
            thread.join(10)
            if not autocommit:
                op.commit()
        result = outcomes[what]
        assert not isinstance(result, Exception), (what, result)
        left = admin_query(
            db, "SELECT status, run_at <= now() FROM pgpubsub.message WHERE id = %s", (mid,)
        )
        if what == "replay":
            assert int(result) == 1 and left == [("pending", True)], (result, left)  # type: ignore[call-overload]
            assert result.skipped == ()  # type: ignore[attr-defined]
        else:
            assert int(result) == 1 and left == [], (what, result, left)  # type: ignore[call-overload]
        if what == "cancel":
            assert result.stopping == ()  # type: ignore[attr-defined]
            assert admin_query(db, "SELECT count(*) FROM pgpubsub.cancel_request") == [(0,)]


# -- finding 6: the dashboard's estimates, from what autovacuum analyzes --


def test_the_dashboards_estimates_come_from_statistics_autovacuum_builds(db: str) -> None:
    """Autovacuum analyzes the partitions, never the partitioned parent: analyzed as it
    would be, the planner's estimate of a channel's messages of one status (what the
    dashboard shows above 1,000) is close to the count."""
    admin_query(
        db,
        "INSERT INTO pgpubsub.message (channel, payload, status) "
        "SELECT 'a', 'x', 'dead' FROM generate_series(1, 20000); "
        "INSERT INTO pgpubsub.message (channel, payload, status, completed_at) "
        "SELECT 'b', 'x', 'done', now() FROM generate_series(1, 20000)",
    )
    leaves = admin_query(
        db,
        "SELECT inhrelid::regclass::text FROM pg_inherits "
        "WHERE inhparent = 'pgpubsub.message'::regclass",
    )
    for (leaf,) in leaves:
        admin_query(db, f"ANALYZE {leaf}")
    for channel, status, real in (("a", "dead", 20000), ("b", "done", 20000), ("a", "done", 0)):
        plan = admin_query(
            db,
            "EXPLAIN (FORMAT JSON) SELECT 1 FROM pgpubsub.message m "
            f"WHERE m.channel = '{channel}' AND m.status = '{status}'",
        )[0][0]
        estimate = plan[0]["Plan"]["Plan Rows"]  # type: ignore[index]
        assert abs(estimate - real) <= 0.1 * 20000, (channel, status, estimate, real)


# -- the batch counts of version 6, kept across partitions --


def test_a_batch_of_version_6_goes_on_counting_after_the_upgrade(dsn: str) -> None:
    """A batch published on the table of version 6, one member dead: after the upgrade
    its members move between partitions as they settle (a completion moves to
    message_kept, a replay back to a segment), and each move counts once, as the
    plain table's updates did: the callback comes with every member done."""
    from pgpubsub import messages

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA_V6.read_text().encode())
    name = spec_of(Stored).name
    batch, members = admin_query(
        dsn,
        "SELECT * FROM pgpubsub.publish_batch('after.batch', '{}', %s, %s)",
        ([name] * 3, ['{"n": 1}', '{"n": 2}', '{"n": 3}']),
    )[0]
    dead = members[0]  # type: ignore[index]
    admin_query(dsn, "UPDATE pgpubsub.message SET status = 'dead' WHERE id = %s", (dead,))
    counts = "SELECT pending, done, dead, cancelled, callback_id IS NOT NULL FROM pgpubsub.batch"
    assert admin_query(dsn, counts) == [(2, 0, 1, 0, False)]

    migrate(dsn)

    assert admin_query(dsn, counts) == [(2, 0, 1, 0, False)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert int(messages.replay(conn, ids=[dead])) == 1  # message_kept -> a segment
    assert admin_query(dsn, counts) == [(3, 0, 0, 0, False)]
    seen: list[int] = []
    registry = Registry()
    registry.add(Stored, lambda n: seen.append(n))
    assert pgpubsub.process_stored_notifications([Stored], dsn=dsn, registry=registry) == 3
    assert sorted(seen) == [1, 2, 3]
    assert admin_query(dsn, counts) == [(0, 3, 0, 0, True)]
    callback = admin_query(
        dsn, "SELECT payload FROM pgpubsub.message WHERE channel = 'after.batch'"
    )
    assert json.loads(str(callback[0][0]))["batch"] == {
        "id": batch,
        "total": 3,
        "done": 3,
        "dead": 0,
        "cancelled": 0,
    }


# -- claims plan and lock only the partitions that may hold pending messages --

# The message partitions whose table or one of its indexes this transaction has locked.
PARTITIONS_TOUCHED = (
    "SELECT DISTINCT t.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
    "LEFT JOIN pg_index i ON i.indexrelid = c.oid "
    "JOIN pg_class t ON t.oid = COALESCE(i.indrelid, c.oid) "
    "JOIN pg_namespace n ON n.oid = t.relnamespace WHERE l.pid = pg_backend_pid() "
    "AND n.nspname = 'pgpubsub' AND left(t.relname, 8) = 'message_' ORDER BY 1"
)


def _live(db: str) -> list[int]:
    """The segments that may hold messages: the current one, and those not emptied since
    they were (an emptied segment is truncated: no pages)."""
    rows = admin_query(
        db,
        "SELECT s FROM generate_series(0, 3) s WHERE s = (SELECT segment FROM pgpubsub.ring) "
        "OR pg_relation_size(format('pgpubsub.message_%%s', s)::regclass) > 0 ORDER BY s",
    )
    return [int(r[0]) for r in rows]  # type: ignore[call-overload]


def _rotate_on(db: str) -> None:
    """pgpubsub.rotate() once the current segment has had 10,000 new messages (as if it
    had: its first id set back): the ring moves on to the next segment. A call may leave it
    where it is while a worker's own call runs (its advisory lock) or a claim holds the
    next segment's lock for longer than rotate waits (20 ms): called again then (a
    PostgreSQL 15 run of CI met one such call)."""
    before = admin_query(db, "SELECT segment FROM pgpubsub.ring")
    admin_query(db, "UPDATE pgpubsub.ring SET first_id = first_id - 10000")
    for _ in range(50):
        admin_query(db, "SELECT pgpubsub.rotate()")
        if admin_query(db, "SELECT segment FROM pgpubsub.ring") != before:
            return
        time.sleep(0.02)
    raise AssertionError(f"the ring stayed at {before}")


@pytest.mark.parametrize("limited", [False, True], ids=["claim", "key-limited claim"])
def test_a_claim_locks_only_the_partitions_that_may_hold_pending_messages(
    db: str, limited: bool
) -> None:
    """Inside a claim's transaction the message partitions locked (table or index) are
    the ring's live segments, and message_deduped only while it holds a message: never
    a segment emptied, nor message_kept (where no pending message is). Most of the time
    that is one table: a claim's cost follows the number of tables it reads."""
    from pgpubsub.session import PsycopgSession

    channel = Limited if limited else Stored
    spec = spec_of(channel)
    admin_query(db, "SELECT pgpubsub.rotate()")  # segments 1 to 3 are empty: live {0}
    assert _live(db) == [0]
    proc = _processor.ChannelProcessor(PsycopgSession(db), spec, [], poll_interval=60)
    proc.session.open()

    def claim_locks() -> set[str]:
        with proc.session.atomic():
            proc._claim()
            return {str(r[0]) for r in proc.session.execute(PARTITIONS_TOUCHED)}

    try:
        claim_locks()  # a first claim reads every segment, and learns the ring
        assert claim_locks() == {"message_0"}
        admin_query(  # more messages left in segment 0 than rotate() moves on (not due,
            db,  # but within a minute: they stay in a segment)
            "INSERT INTO pgpubsub.message (channel, payload, run_at) "
            "SELECT %s, '{\"n\": 1}', now() + interval '50 s' FROM generate_series(1, 1001)",
            (spec.name,),
        )
        _rotate_on(db)
        assert _live(db) == [0, 1]
        claim_locks()  # learns the ring's move
        assert claim_locks() == {"message_0", "message_1"}
        admin_query(
            db, "DELETE FROM pgpubsub.message WHERE id = (SELECT min(id) FROM pgpubsub.message)"
        )
        admin_query(db, "SELECT pgpubsub.rotate()")  # segment 0's 1,000 move to 1
        assert _live(db) == [1]
        claim_locks()
        assert claim_locks() == {"message_1"}
        with psycopg.connect(db, autocommit=True) as conn:
            pgpubsub.notify(channel(n=2), conn=conn, dedupe_key="k", delay=3600)
        admin_query(db, "SELECT pgpubsub.rotate()")  # message_deduped holds one: read
        claim_locks()
        assert claim_locks() == {"message_1", "message_deduped"}
        admin_query(db, "DELETE FROM pgpubsub.message WHERE dedupe_key = 'k'")
        admin_query(db, "SELECT pgpubsub.rotate()")
        claim_locks()
        assert claim_locks() == {"message_1"}
    finally:
        proc.session.close()


def test_a_backlog_stays_in_one_segment_until_the_workers_nearly_caught_up(db: str) -> None:
    """The ring moves on from a segment that has had 10,000 new messages only once at
    most 1,000 of its messages are due: a backlog drains from one segment (claims read
    one table), and the segment then drains in a moment and is emptied. Messages delayed
    for later do not count (they would hold the ring back)."""
    name = spec_of(Stored).name
    admin_query(db, "SELECT pgpubsub.rotate()")
    store = (
        "INSERT INTO pgpubsub.message (channel, payload, run_at) "
        "SELECT %s, '{\"n\": 1}', now() + %s * interval '1 hour' FROM generate_series(1, %s)"
    )
    admin_query(db, store, (name, 0, 1001))  # due
    admin_query(db, store, (name, 1, 5000))  # delayed
    admin_query(db, "UPDATE pgpubsub.ring SET first_id = first_id - 10000")
    admin_query(db, "SELECT pgpubsub.rotate()")
    assert admin_query(db, "SELECT segment, live FROM pgpubsub.ring") == [(0, [0])]
    admin_query(
        db, "DELETE FROM pgpubsub.message WHERE id = (SELECT min(id) FROM pgpubsub.message)"
    )  # 1,000 due left
    admin_query(db, "SELECT pgpubsub.rotate()")  # hands over, and segment 0 is emptied:
    assert admin_query(db, "SELECT segment, live FROM pgpubsub.ring") == [(1, [1])]
    assert admin_query(  # its due messages moved on, the delayed ones to message_later
        db, "SELECT segment, count(*) FROM pgpubsub.message GROUP BY 1 ORDER BY 1"
    ) == [(-3, 5000), (1, 1000)]


@dataclass
class Burst(Channel, lock_notifications=True):  # one processor: no other claim holds a lock
    n: int


def test_a_burst_drained_in_less_than_a_second_frees_its_segment(db: str) -> None:
    """A burst drained faster than rotate()'s once a second: the one call during the drain
    saw the backlog and left the ring where it was, and nothing moved it on until the next
    traffic, so under a held transaction the dead rows of burst after burst piled up in
    one segment (160,000 after 5 minutes of chunks of 10,000). Invariant: once a drain has
    emptied the queue, a segment that has had its 10,000 messages is handed over and
    emptied, without waiting for more traffic."""
    name = spec_of(Burst).name
    admin_query(db, "SELECT pgpubsub.rotate()")
    admin_query(
        db,
        "INSERT INTO pgpubsub.message (channel, payload) "
        "SELECT %s, '{\"n\": 1}' FROM generate_series(1, 3000)",
        (name,),
    )
    admin_query(db, "UPDATE pgpubsub.ring SET first_id = first_id - 10000")
    registry = Registry()
    registry.add(Burst, lambda n: None)
    assert pgpubsub.process_stored_notifications([Burst], dsn=db, registry=registry) == 3000
    assert admin_query(db, "SELECT segment, live FROM pgpubsub.ring") == [(1, [1])]
    assert admin_query(db, "SELECT pg_relation_size('pgpubsub.message_0')") == [(0,)]


def store_past_a_handover(db: str, channel: type[Any], n: int) -> None:
    """Messages 1 to ``n`` of ``channel`` in segment 0, the current one, as if it had had
    its 10,000 new messages: the ring hands over once they are drained."""
    admin_query(
        db,
        "INSERT INTO pgpubsub.message (channel, payload) "
        "SELECT %s, jsonb_build_object('n', i) FROM generate_series(1, %s) i",
        (spec_of(channel).name, n),
    )
    admin_query(db, "UPDATE pgpubsub.ring SET first_id = first_id - 10000")


def wait_for_segment_0_emptied(db: str) -> None:
    """Segment 0, left by the ring's hand-over, emptied within 5 s (no traffic needed)."""
    wait_until(
        lambda: admin_query(db, "SELECT pg_relation_size('pgpubsub.message_0')") == [(0,)],
        timeout=5,
    )
    assert admin_query(db, "SELECT segment, live FROM pgpubsub.ring") == [(1, [1])]


def test_a_burst_whose_last_drains_end_together_frees_its_segment(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processors end their drains within the crew's ROTATE_DRAINED_EVERY: the first
    one's call handed the ring over but could not empty the segment left (the other still
    ran a batch of it), and the second one's call was skipped as too soon after, so the
    segment's dead rows stayed until the next traffic (a flake of the held-transaction
    test above, in CI). Invariant: once the crew's drains have emptied the queue, the
    segment left is emptied without waiting for more traffic, whichever drain ends last."""
    monkeypatch.setattr(_processor, "ROTATE_EVERY", float("inf"))  # as drains end only
    monkeypatch.setattr(_processor, "ROTATE_DRAINED_EVERY", 1.0)
    admin_query(db, "SELECT pgpubsub.rotate()")
    store_past_a_handover(db, Stored, 3000)
    done: list[int] = []

    def listener(n: int) -> None:
        if n == 3000:  # the last one: the other processor's drain ends meanwhile
            time.sleep(0.3)
        done.append(n)

    registry = Registry()
    registry.add(Stored, listener)
    runner = DurableRunning(db, [Stored], registry, poll_interval=30)
    try:
        wait_until(lambda: len(done) == 3000, timeout=30)
        wait_for_segment_0_emptied(db)
    finally:
        runner.stop()


@dataclass
class Shared(Channel, lock_notifications=True, concurrency=4):
    n: int


@pytest.mark.parametrize("drained_every", [0.1, 2.0])
def test_a_burst_whose_last_rows_run_in_a_share_frees_its_segment(
    db: str, drained_every: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last rows of a burst run in a share handed to another processor, which never
    drains: its batch's end called no rotate(), and the claimer's drain, ended first,
    could not empty the segment left (a row of it in the share's hands), which then kept
    its dead rows until the next traffic, polls or not (hostile review 21 of issue 26).
    And a call owed while the poller slept waited for the poll: nothing told the poller
    (review 22; ``drained_every`` 2.0: the share's end too soon after the claimer's).
    Invariant: as test_a_burst_whose_last_drains_end_together_frees_its_segment, whoever
    runs the burst's last rows."""
    monkeypatch.setattr(_processor, "ROTATE_DRAINED_EVERY", drained_every)
    admin_query(db, "SELECT pgpubsub.rotate()")
    done: list[int] = []

    def listener(n: int) -> None:
        if n == 2:  # handed out: it ends last
            time.sleep(1.0)
        done.append(n)

    registry = Registry()
    registry.add(Shared, listener)
    runner = DurableRunning(db, [Shared], registry, poll_interval=30)
    try:
        time.sleep(0.5)  # every processor rests
        for proc in runner.durable.processors:  # as after batches of slow listeners
            proc.claim_size, proc._listener_pace = 50, 0.5
        store_past_a_handover(db, Shared, 2)
        admin_query(db, "SELECT pg_notify(%s, '')", (spec_of(Shared).name,))
        wait_until(lambda: len(done) == 2, timeout=10)
        wait_for_segment_0_emptied(db)
    finally:
        runner.stop()


@dataclass
class Trickle(Channel, lock_notifications=True, concurrency=1):
    n: int


def test_a_trickle_costs_no_claim_for_the_ring(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages at 10/s: each drain ends about 0.1 s after the last one's rotate(), within
    ROTATE_DRAINED_EVERY, and a skipped call owed always woke the poller for a claim of
    nothing and a question: 3.6 claims a message against 2.0 (hostile review 21 of issue
    26). Invariant: a skipped call is owed only while a segment is left to empty, so a
    steady trickle costs a claim that takes its message and one that finds the queue
    empty, and no more."""
    claims = record_calls(monkeypatch, "_claim")
    done: list[int] = []
    registry = Registry()
    registry.add(Trickle, lambda n: done.append(n))
    runner = DurableRunning(db, [Trickle], registry, poll_interval=30)
    try:
        time.sleep(0.5)
        claims.clear()
        with psycopg.connect(db, autocommit=True) as conn:
            began = time.monotonic()
            for n in range(30):
                pgpubsub.notify(Trickle(n=n), conn=conn)
                time.sleep(max(0.0, began + (n + 1) / 10 - time.monotonic()))
        wait_until(lambda: len(done) == 30, timeout=10)
        time.sleep(0.5)
    finally:
        runner.stop()
    sizes = [len(rows) for _, rows in claims]
    assert sum(sizes) == 30
    assert len(sizes) <= 2 * 30 + 4, sizes


def test_messages_due_later_never_pin_a_segment(db: str) -> None:
    """Review of the ring, finding 2: a segment the ring left holding more than 1,000
    messages (reminders for tomorrow, retries in an hour) was passed over until they were
    due; after three hand-overs every other segment was pinned, and the current one grew
    without bound under a held transaction. Invariant: messages not due within a minute
    never keep a segment from being emptied (they move to message_later), the ring goes
    round every segment, and they are claimed from there once due."""
    name = spec_of(Stored).name
    admin_query(db, "SELECT pgpubsub.rotate()")
    admin_query(
        db,
        "INSERT INTO pgpubsub.message (channel, payload, run_at, segment) "
        "SELECT %s, json_build_object('n', s), now() + interval '1 day', 1 "
        "FROM generate_series(1, 1001) s",
        (name,),
    )
    visited = []
    for _ in range(6):
        _rotate_on(db)
        visited.append(int(admin_query(db, "SELECT segment FROM pgpubsub.ring")[0][0]))
        admin_query(db, "SELECT pgpubsub.rotate()")  # the segment left is emptied
    assert visited == [1, 2, 3, 0, 1, 2]
    assert admin_query(db, "SELECT segment, live FROM pgpubsub.ring") == [(2, [2])]
    assert admin_query(db, "SELECT count(*) FROM pgpubsub.message_later") == [(1001,)]
    admin_query(db, "UPDATE pgpubsub.message SET run_at = now() WHERE segment = -3")
    admin_query(db, "SELECT pgpubsub.rotate()")  # due: claims read message_later
    assert admin_query(db, "SELECT live FROM pgpubsub.ring") == [([-3, 2],)]
    seen: list[int] = []
    registry = Registry()
    registry.add(Stored, lambda n: seen.append(n))
    assert pgpubsub.process_stored_notifications([Stored], dsn=db, registry=registry) == 1001
    assert sorted(seen) == list(range(1, 1002))


def test_a_deduped_message_is_claimed_at_its_wake_up(db: str) -> None:
    """Claims read message_deduped only while it holds a message; one stored while the
    worker rests on the channel, with its wake-up, is claimed at once, not at the
    worker's next poll (30 s here)."""
    seen: list[int] = []
    registry = Registry()
    registry.add(Stored, lambda n: seen.append(n))
    admin_query(db, "SELECT pgpubsub.rotate()")
    runner = DurableRunning(db, [Stored], registry, poll_interval=30)
    try:
        with psycopg.connect(db, autocommit=True) as conn:
            pgpubsub.notify(Stored(n=0), conn=conn)
            wait_until(lambda: seen == [0], timeout=10, interval=0.01)
            admin_query(db, "SELECT pgpubsub.rotate()")
            assert -2 not in admin_query(db, "SELECT live FROM pgpubsub.ring")[0][0]
            for n in (1, 2, 3):
                pgpubsub.notify(Stored(n=n), conn=conn, dedupe_key="once")
                wait_until(lambda n=n: seen[-1] == n, timeout=5, interval=0.01)
                admin_query(db, "SELECT pgpubsub.rotate()")
    finally:
        runner.stop()
    assert seen == [0, 1, 2, 3]


@pytest.mark.parametrize("where", ["message_deduped", "an emptied segment"])
@pytest.mark.parametrize("limited", [False, True], ids=["claim", "key-limited claim"])
def test_a_keys_older_message_outside_the_partitions_a_claim_reads_holds_the_newer_ones(
    db: str, limited: bool, where: str
) -> None:
    """Review of the ring, finding 1: claims read the live partitions only, and a key's
    head was picked among those, so a newer message of the key ran before an older one
    stored where claims did not yet look (a deduped message while message_deduped was
    not live; a publisher's that read the ring before it moved on). Invariant: a claim
    takes no message of an ordering key while an older one of the key is pending,
    wherever either is stored; the older one is claimed first by a claim of every partition."""
    from pgpubsub.session import PsycopgSession

    channel = Limited if limited else Stored
    spec = spec_of(channel)
    admin_query(db, "SELECT pgpubsub.rotate()")
    assert admin_query(db, "SELECT live FROM pgpubsub.ring") == [([0],)]
    proc = _processor.ChannelProcessor(PsycopgSession(db), spec, [], poll_interval=60)
    proc.session.open()
    try:
        with proc.session.atomic():
            assert proc._claim() == []  # a first claim reads every segment, and learns the ring
        with psycopg.connect(db, autocommit=True) as conn:
            if where == "message_deduped":
                older = pgpubsub.notify(channel(n=1), conn=conn, ordering_key="k", dedupe_key="d")
            else:
                older = int(
                    admin_query(
                        db,
                        "INSERT INTO pgpubsub.message (channel, payload, ordering_key, segment) "
                        "VALUES (%s, '{\"n\": 1}', 'k', 2) RETURNING id",
                        (spec.name,),
                    )[0][0]  # type: ignore[call-overload]
                )
            newer = pgpubsub.notify(channel(n=2), conn=conn, ordering_key="k")
        assert newer > older
        assert proc._ring_view.state == (0, (0,))  # where the older message is not
        taken = [r[0] for r in proc._claim_moving()]
        assert taken[0] == older and taken == sorted(taken)
    finally:
        proc.session.close()


def _count_older_elsewhere(proc: Any, before: Any = None) -> list[int]:
    """How many of ``proc``'s checks for older messages elsewhere found one (a list that
    fills as it runs); ``before()`` runs just before each check."""
    hits: list[int] = []
    fetch = proc.session.fetch

    def counted(sql: str, params: Any = (), first: str | None = None) -> list[tuple[Any, ...]]:
        if _claim_sql.claim_template(sql) is not _claim_sql.OLDER_ELSEWHERE_SQL:
            return fetch(sql, params, first)  # type: ignore[no-any-return]
        if before is not None:
            before()
        rows = fetch(sql, params)
        hits.extend([1] if rows else [])
        return rows  # type: ignore[no-any-return]

    proc.session.fetch = counted
    return hits


def test_a_keys_older_message_moved_into_a_read_partition_after_the_claim_holds_it_too(
    db: str,
) -> None:
    """Re-review of the ring, finding 1: the check after a claim read only the partitions
    the claim did not read, in a snapshot of its own; rotate() moved the older message
    into a partition the claim had read, between the two, and the newer one ran first."""
    from pgpubsub.session import PsycopgSession

    spec = spec_of(Stored)
    admin_query(db, "SELECT pgpubsub.rotate()")
    proc = _processor.ChannelProcessor(PsycopgSession(db), spec, [], poll_interval=60)
    proc.session.open()
    try:
        with proc.session.atomic():
            assert proc._claim() == []  # learns the ring: live {0}
        older = int(
            admin_query(
                db,
                "INSERT INTO pgpubsub.message (channel, payload, ordering_key, segment) "
                "VALUES (%s, '{\"n\": 1}', 'k', 2) RETURNING id",
                (spec.name,),
            )[0][0]  # type: ignore[call-overload]
        )
        with psycopg.connect(db, autocommit=True) as conn:
            pgpubsub.notify(Stored(n=2), conn=conn, ordering_key="k")
        moved = "UPDATE pgpubsub.message SET segment = 0 WHERE id = %s"  # as rotate() does
        hits = _count_older_elsewhere(proc, lambda: admin_query(db, moved, (older,)))
        taken = [r[0] for r in proc._claim_moving()]
        assert hits == [1]
        assert taken[0] == older and taken == sorted(taken)
    finally:
        proc.session.close()


def test_a_key_waiting_for_a_message_due_later_costs_one_rolled_back_claim_a_poll(
    db: str,
) -> None:
    """Re-review of the ring, finding 2: a message due now behind an older one of its key
    due in an hour (in message_later, which claims do not read until it is due soon):
    every claim took it, found the older one and was rolled back (drains 12 times
    slower). Claims on some partitions now pass over such a key for a poll interval."""
    from pgpubsub.session import PsycopgSession

    spec = spec_of(Stored)
    admin_query(db, "SELECT pgpubsub.rotate()")
    proc = _processor.ChannelProcessor(PsycopgSession(db), spec, [], poll_interval=60)
    proc.session.open()
    try:
        with proc.session.atomic():
            assert proc._claim() == []  # learns the ring: live {0}
        admin_query(
            db,
            "INSERT INTO pgpubsub.message (channel, payload, ordering_key, segment, run_at) "
            "VALUES (%s, '{\"n\": 1}', 'k', -3, now() + interval '1 hour')",
            (spec.name,),
        )
        with psycopg.connect(db, autocommit=True) as conn:
            pgpubsub.notify(Stored(n=2), conn=conn, ordering_key="k")
            pgpubsub.notify(Stored(n=3), conn=conn)  # another message goes on
        hits = _count_older_elsewhere(proc)
        taken = [proc._claim_moving() for _ in range(5)]
        assert [len(t) for t in taken] == [1, 0, 0, 0, 0]
        assert hits == [1]
    finally:
        proc.session.close()


@dataclass
class Limited(Channel, lock_notifications=True, key_concurrency=2):
    n: int


def test_a_message_in_any_live_segment_is_claimed_at_its_wake_up(db: str) -> None:
    """Whatever the ring did while the worker rested on the channel (one rotation, two,
    segments emptied), a message stored into any live segment, with its wake-up, is
    claimed at once: not at the worker's next poll (30 s here)."""
    name = spec_of(Stored).name
    seen: list[int] = []
    registry = Registry()
    registry.add(Stored, lambda n: seen.append(n))
    admin_query(db, "SELECT pgpubsub.rotate()")
    runner = DurableRunning(db, [Stored], registry, poll_interval=30)
    n = 0

    def store_into_each_live_segment() -> None:
        nonlocal n
        for segment in _live(db):
            n += 1
            admin_query(
                db,
                "WITH m AS (INSERT INTO pgpubsub.message (channel, payload, segment) "
                "VALUES (%s, %s, %s) RETURNING channel) SELECT pgpubsub.wake(channel) FROM m",
                (name, json.dumps({"n": n}), segment),
            )
            wait_until(lambda n=n: n in seen, timeout=10, interval=0.01)

    try:
        with psycopg.connect(db, autocommit=True) as conn:
            pgpubsub.notify(Stored(n=0), conn=conn)
        wait_until(lambda: 0 in seen, timeout=10, interval=0.01)
        store_into_each_live_segment()
        for rotations in (1, 2, 1, 2):
            for _ in range(rotations):
                _rotate_on(db)
            store_into_each_live_segment()
            admin_query(db, "SELECT pgpubsub.rotate()")  # drained segments emptied
            store_into_each_live_segment()
    finally:
        runner.stop()
    assert sorted(seen) == list(range(n + 1))


def test_a_drain_that_read_segments_the_ring_moved_past_claims_again_before_it_rests(
    db: str,
) -> None:
    """A processor that last claimed before two rotations claims on the segments it
    knew and finds nothing; the claim says the ring moved past them, and the same drain
    claims again on the live ones, instead of resting until a wake-up or a poll."""
    from pgpubsub.session import PsycopgSession

    spec = spec_of(Stored)
    seen: list[int] = []
    registry = Registry()
    registry.add(Stored, lambda n: seen.append(n))
    admin_query(db, "SELECT pgpubsub.rotate()")
    proc = _processor.ChannelProcessor(
        PsycopgSession(db), spec, registry.listeners(spec), poll_interval=60
    )
    try:
        assert proc.drain_once() == 0  # learns the ring: segment 0 current, 0 and 1 read
        _rotate_on(db)
        _rotate_on(db)
        with psycopg.connect(db, autocommit=True) as conn:
            pgpubsub.notify(Stored(n=1), conn=conn)
        assert admin_query(db, "SELECT DISTINCT segment FROM pgpubsub.message") == [(2,)]
        assert proc.drain_once() == 1
        assert seen == [1]
    finally:
        proc.session.close()


def test_a_message_stored_into_a_segment_emptied_meanwhile_waits_a_poll_at_most(
    db: str,
) -> None:
    """A publisher whose statement read the ring before it moved on may store into a
    segment emptied since, which claims do not read: a claim of every segment once a
    poll interval finds it (and rotate() takes the segment back into the live ones)."""
    name = spec_of(Stored).name
    seen: list[int] = []
    registry = Registry()
    registry.add(Stored, lambda n: seen.append(n))
    admin_query(db, "SELECT pgpubsub.rotate()")
    runner = DurableRunning(db, [Stored], registry, poll_interval=1.0)
    try:
        with psycopg.connect(db, autocommit=True) as conn:
            pgpubsub.notify(Stored(n=0), conn=conn)
        wait_until(lambda: seen == [0], timeout=10, interval=0.01)
        assert _live(db) == [0]
        admin_query(
            db,
            "WITH m AS (INSERT INTO pgpubsub.message (channel, payload, segment) "
            "VALUES (%s, '{\"n\": 1}', 2) RETURNING channel) SELECT pgpubsub.wake(channel) FROM m",
            (name,),
        )
        wait_until(lambda: seen == [0, 1], timeout=5, interval=0.01)
    finally:
        runner.stop()


def test_rotate_keeps_the_live_segments_and_takes_back_one_it_cannot_empty(db: str) -> None:
    """pgpubsub.ring.live: the current segment and each one not emptied. A segment
    emptied leaves it; one found holding more rows than rotate() moves on (stored there
    by a publisher that read the ring before it moved) joins it again, so claims read it."""
    name = spec_of(Stored).name
    live = "SELECT segment, live FROM pgpubsub.ring"
    admin_query(db, "SELECT pgpubsub.rotate()")
    assert admin_query(db, live) == [(0, [0])]
    admin_query(
        db,
        "INSERT INTO pgpubsub.message (channel, payload, segment) "
        "SELECT %s, '{\"n\": 1}', 2 FROM generate_series(1, 1001)",
        (name,),
    )
    admin_query(db, "SELECT pgpubsub.rotate()")
    assert admin_query(db, live) == [(0, [0, 2])]
    admin_query(db, "DELETE FROM pgpubsub.message WHERE segment = 2")
    admin_query(db, "SELECT pgpubsub.rotate()")
    assert admin_query(db, live) == [(0, [0])]
    assert admin_query(db, "SELECT pg_relation_size('pgpubsub.message_2')") == [(0,)]


def test_a_claim_held_back_by_an_older_message_on_its_last_try_is_made_on_every_partition(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim met rows moving under it (a serialization failure) on all but its last
    try, and on that one took a message of a key with an older one elsewhere: it ended
    in AssertionError("unreachable") (hostile review of the ring, a suspicion). The last
    try reads every partition, where no older message is elsewhere."""
    from pgpubsub.session import PsycopgSession

    proc = _processor.ChannelProcessor(PsycopgSession(db), spec_of(Stored), [])
    tries: list[bool] = []

    def claim(suspect: int | None = None) -> list[tuple[Any, ...]]:
        tries.append(proc._everywhere)
        if len(tries) < _processor.MOVED_RETRIES:
            raise psycopg.errors.SerializationFailure("a row moved under the claim")
        if not proc._everywhere:
            raise _processor._OlderElsewhere
        return []

    monkeypatch.setattr(proc, "_claim", claim)
    assert proc._claim_moving() == []
    assert tries[-1] and not any(tries[:-1])
    assert len(tries) == _processor.MOVED_RETRIES


# -- review of the wake-ups: messages outside the live partitions, found at once --


@dataclass
class Solo(Channel, lock_notifications=True, concurrency=1):
    n: int


@contextmanager
def busy_solo(db: str) -> Iterator[dict[int, float]]:
    """A worker of Solo (poll interval 30 s) whose listener records when each message
    started and takes 40 ms over message 0; message_deduped not live. Yields the record."""
    seen: dict[int, float] = {}

    def listener(n: int) -> None:
        seen[n] = time.monotonic()
        if n == 0:
            time.sleep(0.04)  # busy: publishes meanwhile send no wake-up

    registry = Registry()
    registry.add(Solo, listener)
    admin_query(db, "SELECT pgpubsub.rotate()")
    assert -2 not in admin_query(db, "SELECT live FROM pgpubsub.ring")[0][0]
    runner = DurableRunning(db, [Solo], registry, poll_interval=30)
    try:
        time.sleep(0.3)
        yield seen
    finally:
        runner.stop()


def test_a_deduped_message_committed_as_the_busy_worker_rests_is_claimed_at_once(db: str) -> None:
    """Review of the wake-ups, finding 1: a deduped message (message_deduped not live)
    published in a transaction still open as the busy worker ends its drain waited for
    the poll: the crew's looks as it registers read only the live partitions
    (docs/guides/durable.md: about 5 ms to 50 ms)."""
    with busy_solo(db) as seen:
        with psycopg.connect(db, autocommit=True) as conn, psycopg.connect(db) as pub:
            pgpubsub.notify(Solo(n=0), conn=conn)  # wakes the worker: 40 ms
            wait_until(lambda: 0 in seen, timeout=10, interval=0.001)
            pgpubsub.notify(Solo(n=1), conn=pub, dedupe_key="once")
            time.sleep(0.15)  # the worker ends its drain, registers as asleep
            pub.commit()
            committed = time.monotonic()
            wait_until(lambda: 1 in seen, timeout=40, interval=0.001)
    assert seen[1] - committed < 1.0, seen[1] - committed  # about 30 s: the poll


def test_a_delayed_message_in_message_later_runs_when_due(db: str) -> None:
    """Review of the wake-ups, finding 2: a reminder rotate() moved to message_later
    (not live: no rotate in the minute before it is due, a quiet system) ran at the poll
    after it was due: the poller's claim read only the live partitions. It runs within
    milliseconds of its time (docs)."""
    seen: dict[int, float] = {}
    registry = Registry()
    registry.add(Solo, lambda n: seen.setdefault(n, time.time()))
    with psycopg.connect(db, autocommit=True) as conn:
        pgpubsub.notify(Solo(n=1), conn=conn, delay=3600)
    # 10,000 messages published (and processed) since the segment became current
    admin_query(
        db,
        "SELECT setval(pg_get_serial_sequence('pgpubsub.message', 'id'), "
        "(SELECT first_id FROM pgpubsub.ring) + 10000)",
    )
    admin_query(db, "SELECT pgpubsub.rotate()")
    where = admin_query(db, "SELECT tableoid::regclass::text FROM pgpubsub.message")
    assert where == [("pgpubsub.message_later",)]
    assert -3 not in admin_query(db, "SELECT live FROM pgpubsub.ring")[0][0]
    # the hour has nearly passed
    due = admin_query(
        db,
        "UPDATE pgpubsub.message SET run_at = clock_timestamp() + "
        "interval '2 s' RETURNING extract(epoch FROM run_at)",
    )[0][0]
    runner = DurableRunning(db, [Solo], registry, poll_interval=30)
    try:
        wait_until(lambda: 1 in seen, timeout=40, interval=0.005)
    finally:
        runner.stop()
    assert seen[1] - float(due) < 1.0  # type: ignore[arg-type], seen[1] - float(due)  # about 30 s: the poll


def test_a_deduped_message_is_claimed_after_the_crews_failed_look_reconnects(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-review of the wake-ups, finding 1: the crew's look for messages published while
    it was busy (a claim of every partition) lost its backend (a failover, an operator's
    pg_terminate_backend); the first claim after the reconnect read only the live
    partitions, and a deduped message waited for the poll."""
    from pgpubsub.session import PsycopgSession

    every = _claim_sql.claim_on(_claim_sql.CLAIM_SQL, _claim_sql.EVERY_SEGMENT)
    armed = threading.Event()
    fetch = PsycopgSession.fetch

    def killing(self: Any, query: str, params: Any = (), first: str | None = None) -> Any:
        if armed.is_set() and query == every:
            armed.clear()
            admin_query(db, "SELECT pg_terminate_backend(%s)", (self.conn.info.backend_pid,))
            time.sleep(0.05)
        return fetch(self, query, params, first)

    monkeypatch.setattr(PsycopgSession, "fetch", killing)
    with busy_solo(db) as seen:
        with psycopg.connect(db, autocommit=True) as conn:
            # a message whose drain ends in rotate(): the next drain's end, within
            # 0.1 s, does not call it again (and so does not make message_deduped live)
            pgpubsub.notify(Solo(n=2), conn=conn)
            wait_until(lambda: 2 in seen, timeout=10, interval=0.001)
            time.sleep(0.02)
            pgpubsub.notify(Solo(n=0), conn=conn)
            wait_until(lambda: 0 in seen, timeout=10, interval=0.001)
            published = time.monotonic()
            pgpubsub.notify(Solo(n=1), conn=conn, dedupe_key="once")  # no wake-up: busy
            armed.set()
            wait_until(lambda: 1 in seen, timeout=40, interval=0.001)
    assert not armed.is_set()  # the look was made, and killed
    assert seen[1] - published < 5.0, seen[1] - published  # a reconnect (0.5 s), not the poll
