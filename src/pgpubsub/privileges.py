"""The privileges each kind of role needs: ``pgpubsub grant ROLE --publisher ...``.

========================  ==================================================================
kind                      what it may do
========================  ==================================================================
``publisher``             publish on durable channels with every option: INSERT into
                          ``pgpubsub.message``, and read back the ids it gets and the id of a
                          pending message with the same dedupe key (not other messages'
                          payloads)
``worker``                claim, complete, retry and purge stored messages, read the spilled
                          rows of plain trigger channels, store the ticks of scheduled
                          channels (``pgpubsub.schedule`` and INSERT into the message table),
                          keep its row in the worker registry
``monitor``               read what ``pgpubsub status`` and the dashboard's overview show:
                          counts, ages, priorities and attempts of messages (never their
                          payloads, errors, keys or context), the worker registry and the
                          schema version: for probes and dashboards
``operator``              what a monitor may, plus read whole messages and replay, cancel and
                          purge them (``pgpubsub messages``, the dashboard's pages and actions)
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

from . import driver
from .errors import ConfigurationError

__all__ = ["KINDS", "grant", "statements"]

_SCHEMA = "GRANT USAGE ON SCHEMA pgpubsub TO {role}"
_HELPERS = "pgpubsub.event, pgpubsub.send_events, pgpubsub.notify_row"
# What a monitor reads of a message: never its payload, error, keys, context or trace.
_MONITORED = "id, channel, status, attempts, run_at, priority, created_at, completed_at"

KINDS: dict[str, tuple[str, ...]] = {
    "publisher": (
        _SCHEMA,
        "GRANT INSERT ON pgpubsub.message TO {role}",
        # The ids notify() returns, and a pending dedupe_key's message id.
        "GRANT SELECT (id, channel, status, dedupe_key) ON pgpubsub.message TO {role}",
    ),
    "worker": (
        _SCHEMA,
        "GRANT SELECT, INSERT, UPDATE, DELETE ON pgpubsub.message TO {role}",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON pgpubsub.worker TO {role}",
        "GRANT SELECT, INSERT, UPDATE ON pgpubsub.schedule TO {role}",
        "GRANT SELECT ON pgpubsub.version TO {role}",
    ),
    "monitor": (
        _SCHEMA,
        f"GRANT SELECT ({_MONITORED}) ON pgpubsub.message TO {{role}}",
        "GRANT SELECT ON pgpubsub.worker, pgpubsub.version TO {role}",
    ),
    "operator": (
        _SCHEMA,
        "GRANT SELECT, UPDATE, DELETE ON pgpubsub.message TO {role}",
        "GRANT SELECT ON pgpubsub.worker, pgpubsub.version TO {role}",
    ),
    "django_writer": (
        _SCHEMA,
        f"GRANT EXECUTE ON FUNCTION {_HELPERS} TO {{role}}",
        "GRANT INSERT ON pgpubsub.message TO {role}",
        "GRANT SELECT (id, payload) ON pgpubsub.message TO {role}",
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
    if revoke:  # USAGE last, and only when nothing else needs it (see grant())
        texts = [_revoked(t) for t in texts if t != _SCHEMA]
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


def _revoke(
    conn: psycopg.Connection[tuple[str, str, str]], role: str, kinds: list[str]
) -> list[sql.Composed]:
    """Revoke ``kinds`` from ``role``, keeping what the kinds it still holds need.

    Kinds share privileges (every kind needs USAGE; a monitor and a publisher
    both read ``channel``): another kind that the role holds in full is granted
    again after the revoke, unless all it gives is part of what is revoked (an
    operator's privileges go with a worker's). USAGE goes when no kept kind
    needs it.
    """
    before = _held(conn, role)
    conferred = _conferred(conn, role)
    revoked = set().union(*(conferred[k] for k in kinds))
    kept = [
        k
        for k in KINDS
        if k not in kinds and conferred[k] <= before and not conferred[k] <= revoked
    ]
    done = statements(role, kinds, revoke=True)
    done.append(sql.SQL(_revoked(_SCHEMA)).format(role=sql.Identifier(role)))
    for statement in done:
        conn.execute(statement)
    for other in kept:
        for statement in _statements_of(role, other):
            conn.execute(statement)
    return done


def grant(conninfo: str, role: str, kinds: list[str], revoke: bool = False) -> list[str]:
    """Run the statements in one transaction; return them as text."""
    todo = statements(role, kinds, revoke)
    with driver.connect(driver.build_conninfo(conninfo), autocommit=False) as conn:
        try:
            with conn.transaction():
                if revoke:
                    todo = _revoke(conn, role, kinds)
                else:
                    for statement in todo:
                        conn.execute(statement)
        except psycopg.Error as exc:
            raise driver.translate(exc, f"granting privileges to {role!r}") from exc
        return [s.as_string(conn) for s in todo]


# (table, privilege) pairs a worker's channels need, by what the channels do.
_DURABLE = (("message", "SELECT"), ("message", "UPDATE"), ("message", "DELETE"))
_SCHEDULED = (("schedule", "SELECT"), ("schedule", "INSERT"), ("schedule", "UPDATE"))
_REGISTRY = (("worker", "SELECT"), ("worker", "INSERT"), ("worker", "UPDATE"), ("worker", "DELETE"))
# By oid: a role without USAGE on the schema could not even name its tables.
_MISSING_SQL = (
    "SELECT t, p FROM ROWS FROM (pg_catalog.unnest(%s::text[]), pg_catalog.unnest(%s::text[])) "
    "AS x(t, p) JOIN pg_catalog.pg_class c ON c.relname = x.t "
    "AND c.relnamespace = 'pgpubsub'::pg_catalog.regnamespace "
    "WHERE NOT (pg_catalog.has_schema_privilege('pgpubsub', 'USAGE') "
    "AND pg_catalog.has_table_privilege(c.oid, x.p))"
)


def missing_for_worker(conn: Any, durable: bool, scheduled: bool, spills: bool) -> str | None:
    """What the connected role lacks to run these kinds of channels, as GRANT text, or None."""
    needed = set(_REGISTRY)
    if durable:
        needed.update(_DURABLE)
    if scheduled:
        needed.update((*_SCHEDULED, ("message", "INSERT")))
    if spills:
        needed.add(("message", "SELECT"))
    pairs = sorted(needed)
    rows = conn.execute(_MISSING_SQL, ([t for t, _ in pairs], [p for _, p in pairs])).fetchall()
    if not rows:
        return None
    by_table: dict[str, list[str]] = {}
    for table, privilege in rows:
        by_table.setdefault(table, []).append(privilege)
    role = sql.Identifier(conn.info.user).as_string(conn)
    return "; ".join(
        f"GRANT {', '.join(privileges)} ON pgpubsub.{table} TO {role}"
        for table, privileges in by_table.items()
    )
