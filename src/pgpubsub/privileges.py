"""The privileges each kind of role needs: ``pgpubsub grant ROLE --publisher ...``.

========================  ==================================================================
kind                      what it may do
========================  ==================================================================
``publisher``             publish on durable channels: INSERT into ``pgpubsub.message``, and
                          read back the ids it gets and the id of a pending message with
                          the same dedupe key (not other messages' payloads)
``worker``                claim, complete, retry and purge stored messages (and read the
                          spilled rows of plain trigger channels); keep its row in the
                          worker registry
``monitor``               read what ``pgpubsub status`` shows (queues, workers, the schema
                          version): for probes and dashboards
``django_writer``         write to tables watched by Django trigger channels: django-pgtrigger
                          trigger functions run as the writer and call the pgpubsub helpers
========================  ==================================================================

Publishing on plain channels and writing to tables watched by trigger channels
installed without Django need no grant at all (the trigger functions run as the
schema's owner). Each grant can be revoked the same way.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from . import driver
from .errors import ConfigurationError

__all__ = ["KINDS", "grant", "statements"]

_SCHEMA = "GRANT USAGE ON SCHEMA pgpubsub TO {role}"
_HELPERS = "pgpubsub.event, pgpubsub.send_events, pgpubsub.notify_row"

KINDS: dict[str, tuple[str, ...]] = {
    "publisher": (
        _SCHEMA,
        "GRANT INSERT ON pgpubsub.message TO {role}",
        # The ids notify() returns, and a pending dedupe_key's message id.
        "GRANT SELECT (id, channel, status, dedupe_key) ON pgpubsub.message TO {role}",
    ),
    "worker": (
        _SCHEMA,
        "GRANT SELECT, UPDATE, DELETE ON pgpubsub.message TO {role}",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON pgpubsub.worker TO {role}",
        "GRANT SELECT ON pgpubsub.version TO {role}",
    ),
    "monitor": (
        _SCHEMA,
        "GRANT SELECT ON pgpubsub.message, pgpubsub.worker, pgpubsub.version TO {role}",
    ),
    "django_writer": (
        _SCHEMA,
        f"GRANT EXECUTE ON FUNCTION {_HELPERS} TO {{role}}",
        "GRANT INSERT ON pgpubsub.message TO {role}",
        "GRANT SELECT (id, payload) ON pgpubsub.message TO {role}",
    ),
}


def _revoked(statement: str) -> str:
    return statement.replace("GRANT ", "REVOKE ", 1).replace(" TO {role}", " FROM {role}")


def statements(role: str, kinds: list[str], revoke: bool = False) -> list[sql.Composed]:
    """The GRANT (or REVOKE) statements for ``role`` and ``kinds``, in order, without repeats."""
    if not kinds:
        raise ConfigurationError(
            f"say what {role!r} is for: publisher, worker, monitor and/or django_writer"
            " (--publisher, --worker, --monitor, --django-writer)"
        )
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigurationError(f"unknown role kind(s) {unknown}; known: {sorted(KINDS)}")
    texts: list[str] = []
    for kind in kinds:
        texts += [t for t in KINDS[kind] if t not in texts]
    if revoke:  # USAGE on the schema stays: other grants of the role may need it
        texts = [_revoked(t) for t in texts if t != _SCHEMA]
    return [sql.SQL(t).format(role=sql.Identifier(role)) for t in texts]


def grant(conninfo: str, role: str, kinds: list[str], revoke: bool = False) -> list[str]:
    """Run the statements in one transaction; return them as text."""
    todo = statements(role, kinds, revoke)
    with driver.connect(driver.build_conninfo(conninfo), autocommit=False) as conn:
        try:
            with conn.transaction():
                for statement in todo:
                    conn.execute(statement)
        except psycopg.Error as exc:
            raise driver.translate(exc, f"granting privileges to {role!r}") from exc
        return [s.as_string(conn) for s in todo]
