"""A batch's listener statements, kept so that no listener runs twice for another's failure.

Durable listeners of a batch share one transaction, and their statements are
pipelined: none waits for its result, and the batch costs one round trip. A
statement that fails is then known late, after listeners of later messages
ran; a listener that raises has statements to undo without a savepoint of its
own (a savepoint per message would cost more than such a listener).

So each statement a listener sends on the processing connection is written
down, by message, with the cursor that sent it. When something has to be
undone (a listener raised, or the pipeline reported an error of some
statement), the transaction goes back to its last checkpoint (a savepoint)
and the statements of the messages since are sent again, each message in a
savepoint of its own and waited for: the one whose statements fail is the
failed message; the others are done; no listener runs again. Sending a
statement again is faithful because its first run was rolled back before its
result was read: a statement whose result a listener reads (a fetch, a
``COPY``, a stream, a server-side cursor, ``executemany(returning=True)``) is
waited for, and a new checkpoint follows its message, so that it is never sent
twice.

Used only on a psycopg connection in pipeline mode; without a pipeline every
statement is waited for and the processor gives each message a savepoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import datetime
import decimal
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

__all__ = ["Journal", "JournalCursor"]

_CHECKPOINT = "SAVEPOINT pgpubsub_checkpoint"
_MOVE_CHECKPOINT = "RELEASE SAVEPOINT pgpubsub_checkpoint"
_BACK_TO_CHECKPOINT = "ROLLBACK TO SAVEPOINT pgpubsub_checkpoint"
_MESSAGE = "SAVEPOINT pgpubsub_replay"
_MESSAGE_DONE = "RELEASE SAVEPOINT pgpubsub_replay"
_MESSAGE_UNDONE = "ROLLBACK TO SAVEPOINT pgpubsub_replay"
_FORGET_PREPARED = "DEALLOCATE ALL /* pgpubsub rewind {} */"
_forgets = itertools.count()

#: The journal of the batch whose listener runs in this thread (None: no listener runs).
_current: contextvars.ContextVar[Journal | None] = contextvars.ContextVar(
    "pgpubsub_journal", default=None
)


@dataclass(slots=True)
class _Message:
    """One message's listener statements since the checkpoint."""

    mid: int
    key: str | None
    statements: list[tuple[psycopg.Cursor[Any], Any, Any]] = field(default_factory=list)
    read: bool = False  # a result was read: never sent again; a checkpoint follows
    blocks: int = 0  # the listener's transaction blocks open now
    error: BaseException | None = None  # its own statement failed


#: Parameter values a later change of the caller's cannot reach.
_IMMUTABLE = frozenset(
    {
        int,
        float,
        str,
        bytes,
        bool,
        type(None),
        decimal.Decimal,
        datetime.date,
        datetime.datetime,
        datetime.time,
        datetime.timedelta,
        uuid.UUID,
    }
)


def _frozen(params: Any) -> Any:
    """``params`` as they are now: a listener may change its objects after sending them."""
    if type(params) is tuple:
        for p in params:
            if type(p) not in _IMMUTABLE:
                break
        else:
            return params  # the common case: a tuple of numbers and strings
    return copy.deepcopy(params)


class Journal:
    """The listener statements of one batch since its last checkpoint, and their outcome.

    ``failed`` maps the id of each message found failed by its statements
    after its listener returned (a rewind sent them again and one failed).
    """

    def __init__(self, conn: psycopg.Connection[Any]):
        self.conn = conn
        self.failed: dict[int, BaseException] = {}
        self._since: list[_Message] = []  # completed messages since the checkpoint
        self._unconfirmed_keys: set[str] = set()  # keys with statements not waited for
        self._message: _Message | None = None  # the message in a listener
        self._rewound = False  # the driver's prepared statements are then not trusted

    @contextlib.contextmanager
    def installed(self) -> Iterator[Journal]:
        """Statements of listeners go through the journal while the block runs."""
        conn = self.conn
        factory, server_factory = conn.cursor_factory, conn.server_cursor_factory
        threshold = conn.prepare_threshold
        conn.cursor_factory = JournalCursor
        conn.server_cursor_factory = _JournalServerCursor
        # A listener's transaction block is a savepoint written down too.
        conn.transaction = self._transaction  # type: ignore[method-assign]
        token = _current.set(self)
        try:
            self._exec(_CHECKPOINT)
            yield self
            if self._rewound:
                # After a rewind the driver's record of prepared statements may
                # name one that an aborted part of the pipeline never prepared:
                # both sides forget them all. The driver does when it reads the
                # result of a DEALLOCATE ALL, with preparing on again, but only
                # of a statement text it has not seen before: a text of its own
                # each time (the same text, seen once while nothing was
                # prepared, deallocated everything later behind its back).
                conn.prepare_threshold = threshold
                self._exec(_FORGET_PREPARED.format(next(_forgets)))
                self._sync()
        finally:
            _current.reset(token)
            conn.cursor_factory, conn.server_cursor_factory = factory, server_factory
            conn.prepare_threshold = threshold
            del conn.transaction

    @property
    def listening(self) -> bool:
        return self._message is not None

    def must_wait(self, key: str | None) -> bool:
        """Whether an earlier message of ``key`` has statements not yet known to hold."""
        return key is not None and key in self._unconfirmed_keys

    def run(
        self, mid: int, key: str | None, handle: Any, row: Any
    ) -> tuple[bool, BaseException | None]:
        """Run ``handle(row)``, the listeners of message ``mid``, its statements written down.

        Return ``(own, error)``: ``(True, None)`` when they completed; ``(True,
        exc)`` when they failed (their statements undone); ``(False, exc)``
        when they raised an error of another message's statement that surfaced
        outside the journal's cursors (undone too: the message is given back).
        """
        msg = self._message = _Message(mid, key)
        try:
            try:
                handle(row)
            finally:
                self._message = None
            if msg.error is not None:  # its statement failed and the listener went on
                raise msg.error
            if msg.read:
                # Waited for now, then a checkpoint: it is never sent again.
                self._confirm_read(msg)
                self._move_checkpoint()
        # SystemExit, KeyboardInterrupt, CancelledError from a listener fail its
        # message too: they must not end the processor's thread.
        except BaseException as exc:
            if self._broken():
                raise
            own = self._undo(msg, exc)
            if msg.error is not None and isinstance(exc, psycopg.errors.InFailedSqlTransaction):
                # The listener caught its statement's error and went on: what
                # failed next failed of that one, which is the failure.
                return own, msg.error
            return own, exc
        if msg.statements and not msg.read:
            self._since.append(msg)
            if key is not None:
                self._unconfirmed_keys.add(key)
        return True, None

    def confirm(self) -> None:
        """Wait for every statement sent so far; one that failed fails its message."""
        try:
            self._sync()
        except psycopg.Error:
            if self._broken():
                raise
            self._rewind(strict=True)
            return
        # Held: never sent again, so never undone by a later rewind (sending a
        # statement again may fail where it held, if other transactions changed
        # its data meanwhile: a later message of its key has run on it).
        self._move_checkpoint()

    # -- through the journal's cursors ----------------------------------------------------

    def execute(self, cursor: psycopg.Cursor[Any], query: Any, params: Any, opts: Any) -> Any:
        msg = self._message
        assert msg is not None
        msg.statements.append((cursor, query, _frozen(params)))
        try:
            return psycopg.Cursor.execute(cursor, query, params, **opts)
        except psycopg.Error as exc:
            if self._broken():
                raise
            self._resync(msg, exc)
            return cursor

    def read(self, fetch: Any) -> Any:
        msg = self._message
        assert msg is not None
        try:
            rows = fetch()
        except psycopg.Error as exc:
            if self._broken():
                raise
            self._resync(msg, exc)
            rows = fetch()
        msg.read = True
        return rows

    def opaque(self) -> None:
        """A statement whose data is not written down (COPY, a stream): wait for the rest first."""
        msg = self._message
        assert msg is not None
        self._settle(msg)
        msg.read = True

    def wait(self) -> None:
        """A result is needed now (a row count): every statement sent is waited for."""
        self.read(self._sync)

    @contextlib.contextmanager
    def _transaction(self, *args: Any, **kwargs: Any) -> Iterator[psycopg.Transaction]:
        """A listener's ``conn.transaction()`` block: a savepoint, written down by its outcome.

        What came before is waited for first, so that an error surfacing in the
        block is the block's own. A block that rolled back (or raised) leaves
        nothing to send again; one that was released, its statements.
        """
        real = psycopg.Connection.transaction
        msg = self._message
        if msg is None:
            with real(self.conn, *args, **kwargs) as tx:
                yield tx
            return
        self._settle(msg)
        start = len(msg.statements)
        kept = False
        msg.blocks += 1
        try:
            with real(self.conn, *args, **kwargs) as tx:
                yield tx
            kept = tx.status is psycopg.Transaction.Status.COMMITTED
        finally:
            msg.blocks -= 1
            if not kept:
                del msg.statements[start:]

    def _settle(self, msg: _Message) -> None:
        """Wait for every statement sent so far; an error is placed where it belongs."""
        try:
            self._sync()
        except psycopg.Error as exc:
            if self._broken():
                raise
            self._resync(msg, exc)

    # -- machinery ------------------------------------------------------------------------

    def _undo(self, msg: _Message, exc: BaseException) -> bool:
        """Undo ``msg``'s statements; return whether ``exc`` was its own failure."""
        if not msg.statements and not msg.read and not isinstance(exc, psycopg.Error):
            return True  # nothing of it reached the database
        # An error of a statement that did not come through the journal may be an
        # earlier message's (it surfaced late): unless ``msg`` read a result since
        # every earlier statement held, each earlier message is sent again alone.
        suspect = isinstance(exc, psycopg.Error) and msg.error is None and not msg.read
        found = self._rewind(strict=suspect)  # an earlier message's statement failed
        return not (suspect and found)

    def _resync(self, msg: _Message, exc: psycopg.Error) -> None:
        """An error surfaced in ``msg``'s listener: find whose it is.

        After a result of ``msg`` was read every earlier statement held: its own.
        Otherwise the messages since the checkpoint are sent again, each alone:
        one that fails is the failed one, and then ``msg``'s statements are sent
        again, the listener going on unaware. If they fail, the error is
        ``msg``'s own: raised into its listener, and its message fails whatever
        the listener does with it.
        """
        if msg.blocks:
            # Everything before the block held when it began: the block's own
            # error, which its savepoint undoes (the listener may go on).
            raise exc
        if msg.read:
            msg.error = exc
            raise exc
        self._message = None
        try:
            self._rewind(strict=True)
        finally:
            self._message = msg
        last = {id(cursor): i for i, (cursor, _, _) in enumerate(msg.statements)}
        for i, (cursor, query, params) in enumerate(msg.statements):
            try:
                if last[id(cursor)] == i and not cursor.closed:
                    psycopg.Cursor.execute(cursor, query, params)  # its result is read next
                else:
                    self._exec(query, params)
                self._sync()
            except psycopg.Error as own:
                if self._broken():
                    raise
                msg.error = own
                raise own from None

    def _confirm_read(self, msg: _Message) -> None:
        try:
            self._sync()
        except psycopg.Error as exc:
            if self._broken():
                raise
            msg.error = exc  # after its read every earlier statement held: its own
            raise

    def _rewind(self, strict: bool) -> bool:
        """Back to the checkpoint; the statements of the messages since sent again.

        ``strict``: each message waited for on its own (one is likely to fail);
        otherwise all at once, and one by one only if that fails. Return whether
        a message failed.
        """
        self._drain()
        self._exec(_BACK_TO_CHECKPOINT)
        since, self._since = self._since, []
        if not strict:
            try:
                for msg in since:
                    self._send(msg)
                self._sync()
            except psycopg.Error:
                if self._broken():
                    raise
                self._drain()
                self._exec(_BACK_TO_CHECKPOINT)
            else:
                self._move_checkpoint()
                return False
        found = False
        for msg in since:
            self._exec(_MESSAGE)
            try:
                self._send(msg)
                self._sync()
            except psycopg.Error as exc:
                if self._broken():
                    raise
                self._drain()
                self._exec(_MESSAGE_UNDONE)
                self.failed[msg.mid] = exc
                found = True
            self._exec(_MESSAGE_DONE)
        self._move_checkpoint()
        return found

    def _send(self, msg: _Message) -> None:
        for _cursor, query, params in msg.statements:
            self._exec(query, params)

    def _move_checkpoint(self) -> None:
        self._exec(_MOVE_CHECKPOINT)
        self._exec(_CHECKPOINT)
        self._since = []
        self._unconfirmed_keys.clear()

    def _exec(self, query: Any, params: Any = None) -> None:
        psycopg.Cursor(self.conn).execute(query, params)

    def _sync(self) -> None:
        pipeline = self.conn._pipeline
        if isinstance(pipeline, psycopg.Pipeline):
            pipeline.sync()

    def _drain(self) -> None:
        """The pipeline out of its aborted state (its error is known already).

        Nothing is prepared for the rest of the batch (see :meth:`installed`).
        """
        self._rewound = True
        self.conn.prepare_threshold = None
        with contextlib.suppress(psycopg.Error):
            self._sync()
        if self._broken():
            raise psycopg.OperationalError("the connection was lost")

    def _broken(self) -> bool:
        return self.conn.closed


class JournalCursor(psycopg.Cursor[Any]):
    """The processing connection's cursor while listeners run: statements are written down."""

    def execute(self, query: Any, params: Any = None, **opts: Any) -> Any:
        journal = _current.get()
        if journal is None or journal._message is None:
            return super().execute(query, params, **opts)
        return journal.execute(self, query, params, opts)

    def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        journal = _current.get()
        self._many: list[psycopg.Cursor[Any]] = []
        if journal is None or not journal.listening:
            return super().executemany(query, params_seq, returning=returning)
        if returning:
            journal.opaque()
            return super().executemany(query, params_seq, returning=True)
        # One statement each, written down; the row count is their sum.
        for params in params_seq:
            cursor = psycopg.Cursor(self.connection)
            journal.execute(cursor, query, params, {})
            self._many.append(cursor)
        return None

    def fetchone(self) -> Any:
        return self._read(super().fetchone)

    def fetchmany(self, size: int = 0) -> Any:
        return self._read(lambda: super(JournalCursor, self).fetchmany(size))

    def fetchall(self) -> Any:
        return self._read(super().fetchall)

    def __next__(self) -> Any:
        return self._read(super().__next__)

    def scroll(self, value: int, mode: str = "relative") -> None:
        self._read(lambda: super(JournalCursor, self).scroll(value, mode))

    @contextlib.contextmanager
    def copy(self, statement: Any, params: Any = None, **opts: Any) -> Iterator[Any]:
        journal = _current.get()
        if journal is not None and journal.listening:
            journal.opaque()
        with super().copy(statement, params, **opts) as copy:
            yield copy

    def stream(self, query: Any, params: Any = None, **opts: Any) -> Iterator[Any]:
        journal = _current.get()
        if journal is not None and journal.listening:
            journal.opaque()
        return super().stream(query, params, **opts)

    @property
    def rowcount(self) -> int:
        many = getattr(self, "_many", None)
        if many:
            for cursor in many:
                self._ran(cursor)
            return sum(cursor.rowcount for cursor in many)
        self._ran(self)
        return int(psycopg.Cursor.rowcount.fget(self))  # type: ignore[attr-defined]

    @property
    def statusmessage(self) -> str | None:
        self._ran(self)
        return psycopg.Cursor.statusmessage.fget(self)  # type: ignore[attr-defined,no-any-return]

    @property
    def description(self) -> Any:
        self._ran(self)
        return psycopg.Cursor.description.fget(self)  # type: ignore[attr-defined]

    @staticmethod
    def _ran(cursor: psycopg.Cursor[Any]) -> None:
        """Wait for ``cursor``'s statement if it was pipelined: its result is read now."""
        journal = _current.get()
        if journal is not None and journal.listening and cursor.pgresult is None:
            journal.wait()

    def _read(self, fetch: Any) -> Any:
        journal = _current.get()
        if journal is None or not journal.listening:
            return fetch()
        return journal.read(fetch)


class _JournalServerCursor(psycopg.ServerCursor[Any]):
    """A server-side cursor of a listener: its rows are read as they come, never sent again."""

    def execute(self, query: Any, params: Any = None, **opts: Any) -> Any:
        journal = _current.get()
        if journal is not None and journal.listening:
            journal.opaque()
        return super().execute(query, params, **opts)
