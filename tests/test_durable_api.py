"""The durable API's promises at their edges: "everything due" means everything (ordering
keys included), replay does what it can and says what it could not, and channel options are
checked when the channel is declared."""

from __future__ import annotations

import html
import math
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import pytest
from helpers import Racers, admin_query, fast_deadlock_detection, wait_until

import pgpubsub
from pgpubsub import messages, testing
from pgpubsub.channel import Channel, spec_of
from pgpubsub.durable import migrate
from pgpubsub.errors import ConfigurationError
from pgpubsub.listen import Registry
from pgpubsub.testing import DrainIncomplete


@dataclass
class Keyed(Channel, name="keyed", lock_notifications=True, retry_delay=0.01):
    key: str
    n: int


@dataclass
class Stubborn(Channel, name="stubborn", lock_notifications=True, max_attempts=10_000):
    n: int


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    migrate(dsn)
    yield dsn


def publish_keyed(dsn: str, keys: list[str], per_key: int) -> None:
    with psycopg.connect(dsn) as conn:
        for n in range(per_key):
            for key in keys:
                pgpubsub.notify(Keyed(key=key, n=n), conn=conn, ordering_key=key)


def recorder(seen: list[tuple[str, int]]) -> Registry:
    registry = Registry()
    registry.add(Keyed, lambda key, n: seen.append((key, n)))
    return registry


def left(dsn: str) -> list[tuple[object, ...]]:
    return admin_query(dsn, "SELECT channel, status FROM pgpubsub.message ORDER BY id")


# -- everything due, ordering keys included ----------------------------------------------


def test_process_stored_notifications_runs_every_due_message_of_ordering_keys(db: str) -> None:
    seen: list[tuple[str, int]] = []
    publish_keyed(db, ["a"], 5)  # one key: a claim finds one head at a time
    publish_keyed(db, ["b", "c", "d"], 4)
    with psycopg.connect(db) as conn:  # not due: stays
        pgpubsub.notify(Keyed(key="later", n=0), conn=conn, delay=3600, ordering_key="later")

    done = pgpubsub.process_stored_notifications([Keyed], dsn=db, registry=recorder(seen))

    assert done == 5 + 3 * 4 == len(seen)
    for key in "abcd":
        assert [n for k, n in seen if k == key] == list(range(5 if key == "a" else 4))
    assert left(db) == [("keyed", "pending")]


def test_drain_runs_every_message_of_a_long_ordering_key(db: str) -> None:
    seen: list[tuple[str, int]] = []
    publish_keyed(db, ["only"], 150)
    assert testing.drain(db, registry=recorder(seen)) == 150
    assert seen == [("only", n) for n in range(150)]
    assert left(db) == []


def test_drain_that_cannot_finish_says_how_many_are_left_and_why(db: str) -> None:
    registry = Registry()

    def refuse(n: int) -> None:
        raise RuntimeError("the bank is down")

    registry.add(Stubborn, refuse)
    with psycopg.connect(db) as conn:
        pgpubsub.notify_many(Stubborn, [{"n": 1}, {"n": 2}], conn=conn)

    with pytest.raises(DrainIncomplete) as raised:
        testing.drain(db, registry=registry)

    text = str(raised.value)
    assert "2 message(s)" in text, text
    assert "stubborn" in text and "RuntimeError: the bank is down" in text, text
    assert re.search(r"failed \d+ times \(max_attempts 10000\)", text), text
    assert [s for _, s in left(db)] == ["pending", "pending"]
    # Without retries, a failure simply waits for its delay: nothing is left due.
    assert testing.drain(db, registry=registry, retry=False) == 0


def test_due_messages_another_worker_holds_end_both_loops_and_drain_says_so(db: str) -> None:
    @dataclass
    class Scarce(Channel, name="scarce", lock_notifications=True, max_in_flight=1):
        n: int

    registry = Registry()
    registry.add(Scarce, lambda n: None)
    with psycopg.connect(db) as conn:
        pgpubsub.notify_many(Scarce, [{"n": 1}, {"n": 2}, {"n": 3}], conn=conn)
    with psycopg.connect(db, autocommit=True) as other:  # another worker holds the one slot
        other.execute(
            "INSERT INTO pgpubsub.lease VALUES ('scarce', 'slot', '0', 'elsewhere', "
            "clock_timestamp() + interval '1 minute')"
        )
        assert pgpubsub.process_stored_notifications([Scarce], dsn=db, registry=registry) == 0
        with pytest.raises(DrainIncomplete, match=re.escape("3 message(s) still due")) as raised:
            testing.drain(db, registry=registry)
        assert "another worker holds them" in str(raised.value)
        other.execute("DELETE FROM pgpubsub.lease")
    assert testing.drain(db, registry=registry) == 3


# -- replay does what it can -------------------------------------------------------------


def test_replay_skips_dead_messages_whose_dedupe_key_is_held_and_says_why(db: str) -> None:
    @dataclass
    class Mail(Channel, name="mail", lock_notifications=True, max_attempts=1):
        to: str

    def publish(to: str, key: str | None) -> int:
        with psycopg.connect(db) as conn:
            options: dict[str, Any] = {"dedupe_key": key} if key else {}
            return int(pgpubsub.notify(Mail(to=to), conn=conn, **options))

    def kill(*ids: int) -> None:
        admin_query(
            db, "UPDATE pgpubsub.message SET status = 'dead' WHERE id = ANY(%s)", (list(ids),)
        )

    held = publish("ann", "k")  # dead; then a newer message takes its key
    kill(held)
    holder = publish("ann-again", "k")
    free = publish("bob", None)
    first = publish("cy", "twin")
    kill(free, first)
    second = publish("cy-again", "twin")  # two dead messages with one key: one goes back
    kill(second)

    with psycopg.connect(db) as conn:
        result = messages.replay(conn, channel="mail")
    assert sorted(result.replayed) == [free, first]
    assert int(result) == 2
    assert {s.id: s.reason for s in result.skipped} == {
        held: f"a pending message holds dedupe key 'k' (id {holder})",
        second: f"message {first} of the same dedupe key 'twin' is replayed instead",
    }
    rows = dict(admin_query(db, "SELECT id, status FROM pgpubsub.message"))
    assert rows == {
        held: "dead", holder: "pending", free: "pending", first: "pending", second: "dead"
    }

    # Asked by id: one that cannot be replayed is reported too.
    with psycopg.connect(db) as conn:
        result = messages.replay(conn, ids=[held, 999_999])
    assert result.replayed == ()
    assert {s.id: s.reason for s in result.skipped} == {
        held: f"a pending message holds dedupe key 'k' (id {holder})",
        999_999: "no such message",
    }

    out = subprocess.run(
        [sys.executable, "-m", "pgpubsub", "messages", "replay", "--channel", "mail", "--dsn", db],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr  # not everything asked for was done
    assert out.stdout.splitlines() == [
        "replayed 0 message(s)",
        f"skipped {held}: a pending message holds dedupe key 'k' (id {holder})",
        f"skipped {second}: a pending message holds dedupe key 'twin' (id {first})",
    ]


@pytest.mark.parametrize("rival", ["publish", "replay", "rolled back"])
def test_replay_beside_an_uncommitted_holder_of_the_key_skips_or_replays_never_fails(
    db: str, rival: str
) -> None:
    """A pending message may take a dead message's dedupe key in a transaction that has
    not committed when replay looks: replay waits for it, then reports the holder (or
    replays, if it rolled back), and never fails with the key's unique violation."""

    @dataclass
    class Mail(Channel, name="mail", lock_notifications=True, max_attempts=1):
        to: str

    dead = []
    for n in (1, 2):  # two dead messages of key k
        with psycopg.connect(db) as conn:
            dead.append(int(pgpubsub.notify(Mail(to=str(n)), conn=conn, dedupe_key="k")))
            conn.execute("UPDATE pgpubsub.message SET status = 'dead' WHERE id = %s", (dead[-1],))
    with psycopg.connect(db) as rival_conn:
        if rival == "replay":  # another replay takes the key back first
            assert messages.replay(rival_conn, ids=[dead[1]]).replayed == (dead[1],)
            holder = dead[1]
        else:
            holder = int(pgpubsub.notify(Mail(to="new"), conn=rival_conn, dedupe_key="k"))
        results: list[Any] = []

        def replay() -> None:
            with psycopg.connect(db) as conn:
                try:
                    results.append(messages.replay(conn, ids=[dead[0]]))
                except Exception as exc:
                    results.append(exc)

        worker = threading.Thread(target=replay)
        worker.start()
        wait_until(
            lambda: admin_query(
                db,
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%%WITH asked%%'",
            )
        )
        if rival == "rolled back":
            rival_conn.rollback()
        else:
            rival_conn.commit()
        worker.join(timeout=30)
    [result] = results
    assert not isinstance(result, BaseException), repr(result)
    if rival == "rolled back":
        assert result.replayed == (dead[0],) and result.skipped == ()
    else:
        assert result.replayed == ()
        assert [(s.id, s.reason) for s in result.skipped] == [
            (dead[0], f"a pending message holds dedupe key 'k' (id {holder})")
        ]
    pending = admin_query(db, "SELECT id FROM pgpubsub.message WHERE status = 'pending'")
    assert pending == [(dead[0] if rival == "rolled back" else holder,)]


@dataclass
class Letter(Channel, name="letter", lock_notifications=True, max_attempts=1):
    to: str


def dead_letters(dsn: str, keys: list[str]) -> list[int]:
    """One dead message of each dedupe key, in the order of ``keys``."""
    ids = []
    for key in keys:
        with psycopg.connect(dsn) as conn:
            ids.append(int(pgpubsub.notify(Letter(to=key), conn=conn, dedupe_key=key)))
            conn.execute("UPDATE pgpubsub.message SET status = 'dead' WHERE id = %s", (ids[-1],))
    return ids


def test_replay_of_many_keys_each_taken_meanwhile_reports_every_holder(db: str) -> None:
    """However many of the keys a replay asks for are being taken by publishes that commit
    while it runs, it skips those messages and names each holder: it never fails."""
    keys = [f"k{n}" for n in range(5)]
    dead = dead_letters(db, keys)
    publishers = [psycopg.connect(db) for _ in keys]
    try:
        holders = {
            int(pgpubsub.notify(Letter(to="new"), conn=conn, dedupe_key=key)): conn
            for key, conn in zip(keys, publishers, strict=True)
        }  # each key taken, none committed yet
        by_pid = {conn.info.backend_pid: conn for conn in publishers}
        racers = Racers(db)
        racers.start("replay", lambda c: messages.replay(c, channel="letter"))
        while racers.threads[0].is_alive():  # commit whichever publisher the replay waits for
            if "replay" in racers.pids:
                [(blockers,)] = admin_query(
                    db, "SELECT pg_blocking_pids(%s)", (racers.pids["replay"],)
                )
                for pid in blockers:
                    by_pid[pid].commit()
            racers.threads[0].join(timeout=0.02)
    finally:
        for conn in publishers:
            conn.close()
    result = racers.finish()["replay"]
    assert result.replayed == ()
    assert {s.id: s.reason for s in result.skipped} == {
        mid: f"a pending message holds dedupe key {key!r} (id {holder})"
        for mid, key, holder in zip(dead, keys, holders, strict=True)
    }


def test_two_replays_that_deadlock_over_a_key_both_return(db: str) -> None:
    """Replay B holds a key's new pending message uncommitted; replay A, which locked a row B
    then asks for, waits for B at the key's unique index: PostgreSQL fails one of them as a
    deadlock. Neither may fail; a key never gets two pending messages."""
    [d1, d2, d3] = dead_letters(db, ["k", "k-later", "free"])
    admin_query(db, "UPDATE pgpubsub.message SET dedupe_key = 'k' WHERE id = %s", (d2,))
    fast_deadlock_detection(db)
    racers = Racers(db)
    with psycopg.connect(db) as b:
        assert messages.replay(b, ids=[d1]).replayed == (d1,)  # key k, not committed
        racers.start("a", lambda a: messages.replay(a, ids=[d2, d3]))
        wait_until(lambda: racers.waiting("a"))
        mine = messages.replay(b, ids=[d3])  # waits for A's lock on d3: a deadlock
        b.commit()
    theirs = racers.finish()["a"]
    assert d2 not in theirs.replayed
    assert sorted(mine.replayed + theirs.replayed) == [d3]
    pending = admin_query(
        db, "SELECT dedupe_key, count(*) FROM pgpubsub.message WHERE status = 'pending' GROUP BY 1"
    )
    assert sorted(pending) == [("free", 1), ("k", 1)]


T = TypeVar("T")


def replay_after_the_snapshot(
    db: str, isolation: str, ids: list[int], meanwhile: Callable[[], T]
) -> tuple[messages.ReplayResult, T]:
    """Replay ``ids`` in a transaction of ``isolation`` whose snapshot (taken by its own
    work: a table created) is older than what ``meanwhile`` did in other sessions; then
    commit it, its work kept (asserted). The replay's result, and ``meanwhile``'s."""
    with psycopg.connect(db) as caller:
        caller.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
        caller.execute("CREATE TABLE audit (x int)")
        done = meanwhile()
        result = messages.replay(caller, ids=ids)
        caller.commit()
    assert admin_query(db, "SELECT count(*) FROM audit") == [(0,)]
    return result, done


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_replay_in_a_snapshot_older_than_the_keys_holder_reports_it_and_keeps_the_work(
    db: str, isolation: str
) -> None:
    """The caller's snapshot cannot see a holder committed after it began: the message is
    reported as not replayed, and the caller's transaction, with its earlier work, goes on."""
    [dead, free] = dead_letters(db, ["k", "free"])

    def publish() -> int:
        with psycopg.connect(db) as other:
            return int(pgpubsub.notify(Letter(to="new"), conn=other, dedupe_key="k"))

    result, holder = replay_after_the_snapshot(db, isolation, [dead, free], publish)
    assert result.replayed == (free,)
    assert [(s.id, s.reason) for s in result.skipped] == [
        (dead, "a pending message holds dedupe key 'k' (committed after this transaction began)")
    ]
    statuses = admin_query(db, "SELECT id, status FROM pgpubsub.message ORDER BY id")
    assert statuses == [(dead, "dead"), (free, "pending"), (holder, "pending")]


@pytest.mark.parametrize("rival", ["replay", "purge"])
def test_replay_in_an_older_snapshot_of_a_message_changed_since_reports_it(
    db: str, rival: str
) -> None:
    """Another session replayed or purged the message after the caller's REPEATABLE READ
    snapshot: locking it fails with a serialization failure, which replay reports."""
    [changed, free] = dead_letters(db, ["k", "free"])

    def change() -> object:
        with psycopg.connect(db) as other:
            operation = messages.replay if rival == "replay" else messages.purge
            return operation(other, ids=[changed])

    result, _ = replay_after_the_snapshot(db, "REPEATABLE READ", [changed, free], change)
    assert result.replayed == (free,)
    assert [(s.id, s.reason) for s in result.skipped] == [
        (changed, "another transaction changed it after this transaction began")
    ]


def test_replay_in_a_serializable_transaction_that_must_retry_raises_for_the_retry(
    db: str,
) -> None:
    """A serialization failure of SERIALIZABLE's own checks (a write skew: nobody touched
    the messages) is the caller's to retry: replay raises it, and reports nothing false."""
    [first, second] = dead_letters(db, ["k1", "k2"])
    admin_query(db, "CREATE TABLE audit (x int)")
    with psycopg.connect(db) as caller, psycopg.connect(db) as other:
        caller.isolation_level = other.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        caller.execute("SELECT count(*) FROM audit").fetchone()
        other.execute("SELECT count(*) FROM pgpubsub.message WHERE status = 'dead'").fetchone()
        other.execute("INSERT INTO audit VALUES (1)")
        other.commit()
        with pytest.raises(psycopg.errors.SerializationFailure):
            messages.replay(caller)
    statuses = admin_query(db, "SELECT id, status FROM pgpubsub.message ORDER BY id")
    assert statuses == [(first, "dead"), (second, "dead")]


def test_replay_one_at_a_time_replays_no_later_dead_message_of_a_key_before_the_first(
    db: str,
) -> None:
    """The first dead message of a key cannot go back (another transaction changed it after
    the caller's REPEATABLE READ snapshot): the later one of its key stays dead too."""
    [first, later] = dead_letters(db, ["k", "k-later"])
    admin_query(db, "UPDATE pgpubsub.message SET dedupe_key = 'k' WHERE id = %s", (later,))
    result, _ = replay_after_the_snapshot(
        db,
        "REPEATABLE READ",
        [first, later],
        lambda: admin_query(
            db, "UPDATE pgpubsub.message SET last_error = 'seen' WHERE id = %s", (first,)
        ),
    )
    assert result.replayed == ()
    assert [(s.id, s.reason) for s in result.skipped] == [
        (first, "another transaction changed it after this transaction began"),
        (
            later,
            f"message {first} of the same dedupe key 'k' comes first and could not be "
            "replayed in this transaction: replay again",
        ),
    ]


def test_replay_one_at_a_time_still_replays_one_dead_message_per_key(db: str) -> None:
    """Of dead messages of one key only the oldest goes back, also when replay goes one
    message at a time (a key taken meanwhile) on an autocommit connection, where the
    replayed one may complete before the next is looked at."""
    [taken, first, second] = dead_letters(db, ["taken", "tw", "tw-second"])
    admin_query(db, "UPDATE pgpubsub.message SET dedupe_key = 'tw' WHERE id = %s", (second,))
    admin_query(  # a worker that completes a replayed 'tw' message at once
        db,
        "CREATE FUNCTION complete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "DELETE FROM pgpubsub.message WHERE id = NEW.id; RETURN NULL; END $$; "
        "CREATE TRIGGER complete AFTER UPDATE ON pgpubsub.message FOR EACH ROW "
        "WHEN (NEW.status = 'pending' AND NEW.dedupe_key = 'tw') EXECUTE FUNCTION complete()",
    )
    with psycopg.connect(db) as rival:
        holder = int(pgpubsub.notify(Letter(to="new"), conn=rival, dedupe_key="taken"))
        racers = Racers(db)
        racers.start("replay", lambda c: messages.replay(c, channel="letter"))
        wait_until(lambda: racers.waiting("replay"))
        rival.commit()  # the replay's statement fails: one message at a time
    result = racers.finish()["replay"]
    assert result.replayed == (first,)
    assert {s.id: s.reason for s in result.skipped} == {
        taken: f"a pending message holds dedupe key 'taken' (id {holder})",
        second: f"message {first} of the same dedupe key 'tw' is replayed instead",
    }


def test_purge_and_replay_of_the_same_messages_take_them_in_the_same_order(db: str) -> None:
    """Replay locks its messages in id order; purge took them channel by channel, so each
    could hold a message the other waited for, and PostgreSQL failed the purge."""
    [(low,), (high,)] = admin_query(  # the lower id on the later channel
        db,
        "INSERT INTO pgpubsub.message (channel, payload, status) "
        "VALUES ('b', '{}', 'dead'), ('a', '{}', 'dead') RETURNING id",
    )
    fast_deadlock_detection(db)
    racers = Racers(db)
    with psycopg.connect(db) as holder:  # a worker holds the higher id for a moment
        holder.execute("SELECT 1 FROM pgpubsub.message WHERE id = %s FOR UPDATE", (high,))
        racers.start("purge", messages.purge)
        wait_until(lambda: racers.waiting("purge"))
        racers.start("replay", lambda c: messages.replay(c, ids=[low, high]))
        wait_until(lambda: racers.waiting("replay"))
    outcomes = racers.finish()
    assert outcomes["purge"] + len(outcomes["replay"].replayed) == 2


def test_purge_beside_a_worker_expiring_done_messages_does_not_deadlock(db: str) -> None:
    """A worker deletes a channel's expired done messages (EXPIRE_SQL) in its scan's order,
    purge in id order: the worker must not wait for a row purge holds."""
    from pgpubsub._processor import EXPIRE_SQL

    [(low,), (high,)] = admin_query(  # the lower id comes later in the scan
        db,
        "INSERT INTO pgpubsub.message (channel, payload, status, completed_at, created_at) "
        "VALUES ('r', '{}', 'done', now() - interval '1 hour', now()), "
        "('r', '{}', 'done', now() - interval '1 hour', now() - interval '1 minute') "
        "RETURNING id",
    )
    fast_deadlock_detection(db)
    racers = Racers(db)
    with psycopg.connect(db) as holder:  # a transaction holds the lower id for a moment
        holder.execute("SELECT 1 FROM pgpubsub.message WHERE id = %s FOR UPDATE", (low,))
        racers.start("purge", lambda c: messages.purge(c, "done"))
        wait_until(lambda: racers.waiting("purge"))
        racers.start("expire", lambda c: c.execute(EXPIRE_SQL, ("r", 60)).rowcount)
        racers.threads[-1].join(timeout=30)  # it waits for nothing: it leaves the held row
    outcomes = racers.finish()
    assert outcomes["purge"] + outcomes["expire"] == 2
    left = admin_query(db, "SELECT id FROM pgpubsub.message WHERE id IN (%s, %s)", (low, high))
    assert left == []


@pytest.mark.acceptance
def test_the_dashboard_shows_what_a_replay_could_not_replay_and_why(db: str) -> None:
    from test_dashboard import dashboard, request

    def store(status: str, key: str) -> int:
        return int(
            admin_query(
                db,
                "INSERT INTO pgpubsub.message (channel, payload, status, dedupe_key) "
                "VALUES ('mail', '{}', %s, %s) RETURNING id",
                (status, key),
            )[0][0]
        )

    held, holder, free = store("dead", "k"), store("pending", "k"), store("dead", "free")
    with dashboard(db, "--allow-actions") as url:
        status, page = request(f"{url}/channel?name=mail&status=dead")
        assert status == 200, page
        match = re.search(r'name="csrf" value="([^"]+)"', page)
        assert match, page
        body = f"channel=mail&csrf={match.group(1)}".encode()
        status, page = request(f"{url}/actions/replay", body)
    assert status == 200, page
    (notice,) = re.findall(r'<p class="notice"[^>]*>(.*?)</p>', page, re.S)
    assert html.unescape(notice) == (
        f"1 message(s) will run again; 1 not replayed "
        f"({held}: a pending message holds dedupe key 'k' (id {holder}))"
    )
    assert dict(admin_query(db, "SELECT id, status FROM pgpubsub.message")) == {
        held: "dead", holder: "pending", free: "pending"
    }


@pytest.mark.acceptance
def test_the_dashboard_runs_a_replay_again_after_a_serialization_failure(db: str) -> None:
    """On a database whose transactions are SERIALIZABLE, the dashboard's own transaction
    meets a serialization failure when another replay of the message commits first: the
    dashboard runs it again (it said "the database is unreachable")."""
    from test_dashboard import dashboard, request

    [dead] = dead_letters(db, ["k"])
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL(
                "ALTER DATABASE {} SET default_transaction_isolation = 'serializable'"
            ).format(psycopg.sql.Identifier(str(conn.info.dbname)))
        )
    with dashboard(db, "--allow-actions") as url, psycopg.connect(db) as rival:
        status, page = request(f"{url}/channel?name=letter&status=dead")
        match = re.search(r'name="csrf" value="([^"]+)"', page)
        assert status == 200 and match, page
        assert messages.replay(rival, ids=[dead]).replayed == (dead,)  # not committed yet
        answers: list[tuple[int, str]] = []
        body = f"channel=letter&csrf={match.group(1)}".encode()
        asking = threading.Thread(
            target=lambda: answers.append(request(f"{url}/actions/replay", body))
        )
        asking.start()
        wait_until(
            lambda: admin_query(
                db, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            )[0][0]
            > 0
        )
        rival.commit()
        asking.join(timeout=30)
    [(status, page)] = answers
    assert status == 200, page
    (notice,) = re.findall(r'<p class="notice"[^>]*>(.*?)</p>', page, re.S)
    assert html.unescape(notice) == "0 message(s) will run again"


# -- channel options checked at declaration ----------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("max_attempts", 0, "max_attempts must be an int from 1"),
        ("max_attempts", -1, "max_attempts must be an int from 1"),
        ("max_attempts", "many", "max_attempts must be an int from 1"),
        ("max_attempts", True, "max_attempts must be an int from 1"),
        ("max_attempts", 2.5, "max_attempts must be an int from 1"),
        ("max_attempts", 2**31, "max_attempts must be an int from 1"),
        ("retry_delay", -5, "retry_delay must be seconds"),
        ("retry_delay", math.nan, "retry_delay must be seconds"),
        ("retry_delay", math.inf, "retry_delay must be seconds"),
        ("retry_delay", "1", "retry_delay must be seconds"),
        ("retry_delay", False, "retry_delay must be seconds"),
        ("retry_max_delay", -1, "retry_max_delay must be seconds"),
        ("retry_max_delay", 0.5, "retry_max_delay (0.5) is under retry_delay (1.0)"),
        ("retention", -1, "retention must be seconds"),
        ("retention", 1e300, "retention must be seconds"),
        ("concurrency", 0, "concurrency must be an int from 1 to 256"),
        ("concurrency", True, "concurrency must be an int from 1 to 256"),
        ("concurrency", 1.0, "concurrency must be an int from 1 to 256"),
        ("max_in_flight", 0, "max_in_flight must be None or an int from 1"),
        ("max_in_flight", False, "max_in_flight must be None or an int from 1"),
        ("lock_notifications", "yes", "lock_notifications must be True or False"),
        ("lock_notifications", 1, "lock_notifications must be True or False"),
    ],
)
def test_a_bad_channel_option_fails_at_declaration_naming_it(
    option: str, value: object, says: str
) -> None:
    durable = {} if option == "lock_notifications" else {"lock_notifications": True}
    with pytest.raises(ConfigurationError, match=re.escape(says)) as keyword:
        type("Bad", (Channel,), {}, **durable, **{option: value})
    assert repr(value) in str(keyword.value) or option == "retry_max_delay"
    # The same as a class attribute (django-pgpubsub's spelling).
    with pytest.raises(ConfigurationError, match=re.escape(says)):
        type("Bad", (Channel,), {**durable, option: value})


@pytest.mark.unit
def test_sound_channel_options_are_accepted() -> None:
    @dataclass
    class Fine(
        Channel,
        lock_notifications=True,
        max_attempts=1,
        retry_delay=0,
        retry_max_delay=0,
        retention=0.5,
        concurrency=2,
        max_in_flight=1,
    ):
        n: int

    assert spec_of(Fine).lock
