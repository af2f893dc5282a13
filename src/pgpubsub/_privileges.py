"""The privileges each kind of role needs: ``pgpubsub grant ROLE --publisher ...``.

========================  ==================================================================
kind                      what it may do
========================  ==================================================================
``publisher``             publish on durable channels with every option: INSERT into
                          ``pgpubsub.message``, and read back the ids it gets and the id of a
                          pending message with the same dedupe key (not other messages'
                          payloads); publish batches (``pgpubsub.publish_batch``: the only
                          way a batch or a member's batch is written)
``awaiter``               wait for the outcome of messages of results channels
                          (``handle.result()``): the status, the listener's return value and,
                          of a dead message, its final error, which may quote the payload: as
                          private as payloads, so not part of ``--publisher``
``worker``                claim, complete, retry and purge stored messages, read the spilled
                          rows of plain trigger channels, store the ticks of scheduled
                          channels (``pgpubsub.schedule`` and INSERT into the message table),
                          keep its row in the worker registry, read whether a channel is
                          paused and take a rate-limited channel's tokens; publish batches
                          and wait for results (from listeners)
``monitor``               read what ``pgpubsub status`` and the dashboard's overview show:
                          counts, ages, priorities and attempts of messages (never their
                          payloads, errors, keys or context), the worker registry and the
                          schema version, which channels are paused, batches' counts: for
                          probes and dashboards
``operator``              what a monitor may, plus read whole messages and replay, cancel and
                          purge them, pause and resume channels (``pgpubsub messages``, the
                          dashboard's pages and actions), wait for results
``django_writer``         write to tables watched by Django trigger channels: django-pgtrigger
                          trigger functions run as the writer and call the pgpubsub helpers
========================  ==================================================================

Publishing on plain channels, listening, and writing to tables watched by
trigger channels installed without Django need no grant at all (the trigger
that publishes runs as the schema's owner, for the (table, channel) pairs
installed, and the rows are turned into JSON as the writer). Each grant is
revoked the same way, and ``--revoke`` takes back all of it: USAGE on the
schema too, unless the role still holds another privilege in it.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from . import driver
from .errors import ConfigurationError, PermissionDenied, PgPubSubError

__all__ = ["KINDS", "grant", "statements"]

_SCHEMA = "GRANT USAGE ON SCHEMA pgpubsub TO {role}"
_HELPERS = "pgpubsub.event, pgpubsub.send_events, pgpubsub.notify_row"
# What a monitor reads of a message: never its payload, error, dedupe key,
# context or trace (its ordering key: to tell messages held back by their key).
_MONITORED = (
    "id, channel, status, attempts, run_at, priority, created_at, completed_at, "
    "ordering_key, unfinished"
)
# What a monitor reads of a batch: its counts, never its callback's payload.
_BATCH_COUNTS = (
    "id, total, pending, done, dead, cancelled, callback_channel, callback_id, created_at, "
    "completed_at"
)
# What a publisher writes: never a message's id, state, attempts or times.
_PUBLISHED = "channel, payload, trace, run_at, priority, dedupe_key, ordering_key, limit_key"

KINDS: dict[str, tuple[str, ...]] = {
    "publisher": (
        _SCHEMA,
        f"GRANT INSERT ({_PUBLISHED}) ON pgpubsub.message TO {{role}}",
        # The ids notify() returns, and a pending dedupe_key's message id.
        "GRANT SELECT (id, channel, status, dedupe_key) ON pgpubsub.message TO {role}",
        # Batches: the batch row and its members, in one call that counts them.
        "GRANT EXECUTE ON FUNCTION pgpubsub.publish_batch(text, text, text[], text[]) "
        "TO {role}",
    ),
    "awaiter": (
        _SCHEMA,
        # One message's outcome, by id and channel (never its payload).
        "GRANT EXECUTE ON FUNCTION pgpubsub.outcome(bigint, text) TO {role}",
    ),
    "worker": (
        _SCHEMA,
        "GRANT SELECT, UPDATE, DELETE ON pgpubsub.message TO {role}",
        f"GRANT INSERT ({_PUBLISHED}) ON pgpubsub.message TO {{role}}",  # schedule ticks
        "GRANT SELECT, INSERT, UPDATE, DELETE ON pgpubsub.worker TO {role}",
        "GRANT SELECT, INSERT, UPDATE ON pgpubsub.schedule TO {role}",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON pgpubsub.lease TO {role}",
        "GRANT INSERT ON pgpubsub.sleeper TO {role}",  # asleep: wake me (pgpubsub.sleep)
        # Stop a cancelled listener; cancel a running message (workers may cancel).
        "GRANT SELECT, INSERT, DELETE ON pgpubsub.cancel_request TO {role}",
        "GRANT SELECT ON pgpubsub.channel_pause TO {role}",  # a paused channel: claim nothing
        "GRANT SELECT, INSERT, UPDATE ON pgpubsub.rate_bucket TO {role}",  # take rate tokens
        # Lock the batch rows of the members it settles, in order (batches: no deadlock).
        "GRANT EXECUTE ON FUNCTION pgpubsub.lock_batches(bigint[]) TO {role}",
        # Batches published by listeners, and outcomes awaited by them.
        "GRANT EXECUTE ON FUNCTION pgpubsub.publish_batch(text, text, text[], text[]) "
        "TO {role}",
        "GRANT EXECUTE ON FUNCTION pgpubsub.outcome(bigint, text) TO {role}",
        # Finished batches whose members are all swept: deleted after the retention.
        "GRANT EXECUTE ON FUNCTION pgpubsub.sweep_batches(double precision) TO {role}",
        # A limit_key's tokens (key_rate_limit); full buckets of idle keys deleted.
        "GRANT SELECT, INSERT, UPDATE, DELETE ON pgpubsub.key_bucket TO {role}",
        "GRANT SELECT ON pgpubsub.version TO {role}",
        # Empty drained storage segments (runs as the schema's owner, no argument).
        "GRANT EXECUTE ON FUNCTION pgpubsub.rotate() TO {role}",
    ),
    "monitor": (
        _SCHEMA,
        f"GRANT SELECT ({_MONITORED}) ON pgpubsub.message TO {{role}}",
        "GRANT SELECT ON pgpubsub.worker, pgpubsub.version, pgpubsub.lease TO {role}",
        "GRANT SELECT ON pgpubsub.channel_pause, pgpubsub.rate_bucket TO {role}",
        f"GRANT SELECT ({_BATCH_COUNTS}) ON pgpubsub.batch TO {{role}}",
        "GRANT SELECT ON pgpubsub.key_bucket TO {role}",
    ),
    "operator": (
        _SCHEMA,
        "GRANT SELECT, UPDATE, DELETE ON pgpubsub.message TO {role}",
        "GRANT SELECT, INSERT, DELETE ON pgpubsub.cancel_request TO {role}",  # stop a running one
        "GRANT SELECT, INSERT, DELETE ON pgpubsub.channel_pause TO {role}",  # pause and resume
        "GRANT SELECT ON pgpubsub.rate_bucket, pgpubsub.key_bucket TO {role}",
        "GRANT SELECT ON pgpubsub.worker, pgpubsub.version, pgpubsub.lease TO {role}",
        "GRANT SELECT ON pgpubsub.batch TO {role}",
        "GRANT EXECUTE ON FUNCTION pgpubsub.outcome(bigint, text) TO {role}",  # reads all anyway
    ),
    "django_writer": (
        _SCHEMA,
        f"GRANT EXECUTE ON FUNCTION {_HELPERS} TO {{role}}",
        # Durable events, and the spill rows of wide plain ones (their ids sent).
        "GRANT INSERT (channel, payload, status) ON pgpubsub.message TO {role}",
        "GRANT SELECT (id) ON pgpubsub.message TO {role}",
    ),
}

# Every privilege the role holds on the schema and the objects in it.
_HELD_SQL = """
WITH r AS (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = %(role)s)
SELECT 'schema', n.nspname, a.privilege_type
    FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a, r
    WHERE n.nspname = 'pgpubsub' AND a.grantee = r.oid
UNION ALL
SELECT 'relation', c.relname, a.privilege_type
    FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a, r
    WHERE c.relnamespace = 'pgpubsub'::pg_catalog.regnamespace AND a.grantee = r.oid
UNION ALL
SELECT 'column', c.relname || '.' || t.attname, a.privilege_type
    FROM pg_catalog.pg_attribute t JOIN pg_catalog.pg_class c ON c.oid = t.attrelid,
        pg_catalog.aclexplode(t.attacl) a, r
    WHERE c.relnamespace = 'pgpubsub'::pg_catalog.regnamespace AND a.grantee = r.oid
UNION ALL
SELECT 'function', p.oid::pg_catalog.regprocedure::text, a.privilege_type
    FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a, r
    WHERE p.pronamespace = 'pgpubsub'::pg_catalog.regnamespace AND a.grantee = r.oid
"""


def _revoked(statement: str) -> str:
    return statement.replace("GRANT ", "REVOKE ", 1).replace(" TO {role}", " FROM {role}")


def _flag(kind: str) -> str:
    return "--" + kind.replace("_", "-")


def statements(role: str, kinds: list[str], revoke: bool = False) -> list[sql.Composed]:
    """The GRANT (or REVOKE) statements for ``role`` and ``kinds``, in order, without repeats."""
    if not kinds:
        raise ConfigurationError(
            f"say what {role!r} is for: {', '.join(KINDS)} ({', '.join(_flag(k) for k in KINDS)})"
        )
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigurationError(f"unknown role kind(s) {unknown}; known: {sorted(KINDS)}")
    texts: list[str] = []
    for kind in kinds:
        texts += [t for t in KINDS[kind] if t not in texts]
    if revoke:  # what grant() runs keeps what the role held otherwise; this is all of it
        texts = [_revoked(t) for t in texts]
    return [sql.SQL(t).format(role=sql.Identifier(role)) for t in texts]


def _held(conn: psycopg.Connection[tuple[str, str, str]], role: str) -> set[tuple[str, ...]]:
    return {tuple(row) for row in conn.execute(_HELD_SQL, {"role": role})}


def _statements_of(role: str, kind: str) -> list[sql.Composed]:
    return [sql.SQL(t).format(role=sql.Identifier(role)) for t in KINDS[kind]]


def _conferred(conn: psycopg.Connection[tuple[str, str, str]], role: str) -> dict[str, set[Any]]:
    """The privileges each kind gives ``role``: granted alone, in a savepoint undone at once."""
    every = [t for kind in KINDS for t in KINDS[kind]]
    conferred = {}
    for kind in KINDS:
        with conn.transaction(force_rollback=True):
            for text in dict.fromkeys(every):
                conn.execute(sql.SQL(_revoked(text)).format(role=sql.Identifier(role)))
            bare = _held(conn, role)
            for statement in _statements_of(role, kind):
                conn.execute(statement)
            conferred[kind] = _held(conn, role) - bare
    return conferred


# What `grant` gave each role, so that `--revoke` can give back exactly what
# the role held before: its kinds, and the privileges it held before its first.
_KINDS_SQL = "SELECT kind FROM pgpubsub.role_grant WHERE role = %s"
_BASELINE_SQL = "SELECT held FROM pgpubsub.role_baseline WHERE role = %s"
_RECORD_SQL = (
    "INSERT INTO pgpubsub.role_grant (role, kind) "
    "SELECT %s, k FROM pg_catalog.unnest(%s::text[]) k ON CONFLICT DO NOTHING"
)
_RECORD_BASELINE_SQL = (
    "INSERT INTO pgpubsub.role_baseline (role, held) VALUES (%s, %s) ON CONFLICT DO NOTHING"
)
_FORGET_SQL = "DELETE FROM pgpubsub.role_grant WHERE role = %s AND kind = ANY(%s)"
_FORGET_BASELINE_SQL = (
    "DELETE FROM pgpubsub.role_baseline b WHERE b.role = %s "
    "AND NOT EXISTS (SELECT 1 FROM pgpubsub.role_grant g WHERE g.role = b.role)"
)


# What grants before version 4 gave that version 4 gives no more: revoked too.
_BEFORE_4: dict[str, set[tuple[str, ...]]] = {
    "publisher": {("relation", "message", "INSERT")},
    "worker": {("relation", "message", "INSERT")},
    "monitor": {("relation", "message", "SELECT")},
    "django_writer": {("relation", "message", "INSERT"), ("column", "message.payload", "SELECT")},
}


def _revocation(role: str, held: tuple[str, ...]) -> sql.Composed:
    """The REVOKE of one privilege as :data:`_HELD_SQL` names it."""
    what, name, privilege = held
    target = sql.Identifier(role)
    if what == "schema":
        return sql.SQL("REVOKE {} ON SCHEMA pgpubsub FROM {}").format(sql.SQL(privilege), target)
    if what == "relation":
        return sql.SQL("REVOKE {} ON {} FROM {}").format(
            sql.SQL(privilege), sql.Identifier("pgpubsub", name), target
        )
    if what == "column":
        table, column = name.split(".", 1)
        return sql.SQL("REVOKE {} ({}) ON {} FROM {}").format(
            sql.SQL(privilege), sql.Identifier(column), sql.Identifier("pgpubsub", table), target
        )
    # a function's regprocedure text, from the catalog: pgpubsub's own functions
    return sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM {}").format(sql.SQL(name), target)


def _grant(conn: psycopg.Connection[Any], role: str, kinds: list[str]) -> list[sql.Composed]:
    conn.execute(_RECORD_BASELINE_SQL, (role, Jsonb(sorted(_held(conn, role)))))
    done = statements(role, kinds)
    for statement in done:
        conn.execute(statement)
    conn.execute(_RECORD_SQL, (role, kinds))
    return done


def _revoke(conn: psycopg.Connection[Any], role: str, kinds: list[str]) -> list[sql.Composed]:
    """Take back what ``kinds`` gave ``role``, and nothing it held otherwise.

    The privileges the role keeps are those it held before its first grant
    (recorded then) and those of the kinds it is still granted; every other
    privilege that one of ``kinds`` gives is revoked. A role granted before
    version 4 has no record: then every privilege of ``kinds`` goes, USAGE too.
    """
    conferred = _conferred(conn, role)
    recorded = {row[0] for row in conn.execute(_KINDS_SQL, (role,))}
    baseline_row = conn.execute(_BASELINE_SQL, (role,)).fetchone()
    keep = {tuple(p) for p in baseline_row[0]} if baseline_row else set()
    for kind in recorded - set(kinds):
        keep |= conferred[kind]
    given = set().union(*(conferred[k] | _BEFORE_4.get(k, set()) for k in kinds))
    done = [_revocation(role, p) for p in sorted((_held(conn, role) & given) - keep)]
    for statement in done:
        conn.execute(statement)
    conn.execute(_FORGET_SQL, (role, kinds))
    conn.execute(_FORGET_BASELINE_SQL, (role,))
    return done


def grant(conninfo: str, role: str, kinds: list[str], revoke: bool = False) -> list[str]:
    """Grant (or revoke) ``kinds`` in one transaction; return the statements run, as text."""
    statements(role, kinds, revoke)  # checks the kinds
    with driver.connect(driver.build_conninfo(conninfo), autocommit=False) as conn:
        try:
            with conn.transaction():
                done = _revoke(conn, role, kinds) if revoke else _grant(conn, role, kinds)
        except psycopg.Error as exc:
            raise driver.translate(exc, f"granting privileges to {role!r}") from exc
        return [s.as_string(conn) for s in done]


# (table, privilege) pairs a worker's channels need, by what the channels do.
_DURABLE = (
    ("message", "SELECT"),
    ("message", "UPDATE"),
    ("message", "DELETE"),
    ("sleeper", "INSERT"),
    ("cancel_request", "SELECT"),
    ("channel_pause", "SELECT"),
    ("rate_bucket", "SELECT"),
    ("rate_bucket", "INSERT"),
    ("rate_bucket", "UPDATE"),
    ("key_bucket", "SELECT"),
    ("key_bucket", "INSERT"),
    ("key_bucket", "UPDATE"),
    ("key_bucket", "DELETE"),
)
_SCHEDULED = (("schedule", "SELECT"), ("schedule", "INSERT"), ("schedule", "UPDATE"))
_REGISTRY = (("worker", "SELECT"), ("worker", "INSERT"), ("worker", "UPDATE"), ("worker", "DELETE"))
_LEASES = (("lease", "SELECT"), ("lease", "INSERT"), ("lease", "UPDATE"), ("lease", "DELETE"))
# By oid: a role without USAGE on the schema could not even name its tables.
_MISSING_SQL = (
    "SELECT t, p FROM ROWS FROM (pg_catalog.unnest(%s::text[]), pg_catalog.unnest(%s::text[])) "
    "AS x(t, p) JOIN pg_catalog.pg_class c ON c.relname = x.t "
    "AND c.relnamespace = 'pgpubsub'::pg_catalog.regnamespace "
    "WHERE NOT CASE WHEN x.p = 'INSERT' THEN pg_catalog.has_any_column_privilege(c.oid, x.p) "
    "ELSE pg_catalog.has_table_privilege(c.oid, x.p) END"
)
_USAGE_SQL = "SELECT pg_catalog.has_schema_privilege('pgpubsub', 'USAGE')"
# The functions a durable worker calls (batches), among those the schema has.
_WORKER_FUNCTIONS = ("pgpubsub.lock_batches(bigint[])", "pgpubsub.sweep_batches(double precision)")
_MISSING_FUNCTIONS_SQL = (
    "SELECT f FROM pg_catalog.unnest(%s::text[]) AS f "
    "WHERE pg_catalog.to_regprocedure(f) IS NOT NULL "
    "AND NOT pg_catalog.has_function_privilege(pg_catalog.to_regprocedure(f), 'EXECUTE')"
)
_SCHEMA_SQL = "SELECT pg_catalog.to_regnamespace('pgpubsub') IS NOT NULL"


def missing_for_worker(conn: Any, durable: bool, scheduled: bool, spills: bool) -> str | None:
    """What the connected role lacks to run these kinds of channels, as GRANT text, or None."""
    if not conn.execute(_SCHEMA_SQL).fetchone()[0]:
        return None  # no schema: the schema check says so
    needed = set(_REGISTRY)
    if durable:
        needed.update((*_DURABLE, *_LEASES))
    if scheduled:
        needed.update((*_SCHEDULED, ("message", "INSERT")))
    if spills:
        needed.add(("message", "SELECT"))
    pairs = sorted(needed)
    rows = conn.execute(_MISSING_SQL, ([t for t, _ in pairs], [p for _, p in pairs])).fetchall()
    usage = conn.execute(_USAGE_SQL).fetchone()[0]
    functions = (
        [f for (f,) in conn.execute(_MISSING_FUNCTIONS_SQL, (list(_WORKER_FUNCTIONS),))]
        if durable and usage  # (without USAGE the schema's functions cannot be named)
        else []
    )
    if not rows and not functions and usage:
        return None
    role = sql.Identifier(conn.info.user).as_string(conn)
    by_table: dict[str, list[str]] = {}
    for table, privilege in rows:
        if (table, privilege) == ("message", "INSERT"):  # the columns a publisher writes
            by_table[f"message ({_PUBLISHED})"] = ["INSERT"]
        else:
            by_table.setdefault(table, []).append(privilege)
    grants = [] if usage else [f"GRANT USAGE ON SCHEMA pgpubsub TO {role}"]
    for table, privileges in by_table.items():
        name, _, columns = table.partition(" ")
        target = f"{', '.join(privileges)} {columns}".strip()
        grants.append(f"GRANT {target} ON pgpubsub.{name} TO {role}")
    grants += [f"GRANT EXECUTE ON FUNCTION {f} TO {role}" for f in functions]
    return "; ".join(grants)


def check_worker(conninfo: str, channels: list[Any]) -> None:
    """Raise PermissionDenied, with the GRANT to run, when the role lacks a privilege
    that ``channels`` need (durable processing, schedules, spilled rows, the registry).

    An unreachable database is no error here: workers wait for it.
    """
    from .channel import TriggerChannel

    if not any(c.lock or issubclass(c.cls, TriggerChannel) for c in channels):
        return
    try:
        conn = driver.connect(driver.build_conninfo(conninfo), autocommit=True)
    except PgPubSubError:
        return
    with conn:
        lacking = missing_for_worker(
            conn,
            durable=any(c.lock for c in channels),
            scheduled=any(c.lock and c.cls.schedule for c in channels),
            spills=any(issubclass(c.cls, TriggerChannel) and not c.lock for c in channels),
        )
        user = conn.info.user
    if lacking:
        raise PermissionDenied(
            f"role {user!r} lacks privileges its channels need: run "
            f"`pgpubsub grant {user} --worker` (as the schema's owner), or {lacking}"
        )
