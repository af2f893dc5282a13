"""Claiming and processing the stored messages of one durable channel.

The contract is in :mod:`pgpubsub.durable`; this is the machinery: a claim in
a short transaction of its own (the attempt counts, the rows are leased; a
message whose last attempt never finished is claimed alone), then the
listeners and the completion in one transaction (a failed listener undone
alone, its neighbours' statements sent again, never run again), retries with
backoff, dead letters, and batch sizes that follow the listeners' speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from . import _cancel, _leases, _metrics, _tracing, driver
from ._cancel import Cancellation
from ._claim_sql import (
    CLAIM_SQL,
    EVERY_SEGMENT,
    GENERIC_PLANS_SQL,
    IN_PARTS,
    OLDER_ELSEWHERE_SQL,
    PART,
    claim_on,
    ring_parts,
    ring_state,
)
from ._crew import Crew
from ._flow_sql import (
    BUCKET_SLICE,
    BUCKET_SWEEP_EVERY,
    EXPIRED_SLOTS_SQL,
    FULL_BUCKETS_FIRST_SQL,
    FULL_BUCKETS_SQL,
    KEY_TOKEN_DUE_FIRST_SQL,
    KEY_TOKEN_DUE_SQL,
    KEYS_PER_REST,
    LIMITED_CLAIM_SQL,
    NEXT_DUE_SQL,
    SLOT_LEASE_KEPT,
    SPEND_KEY_TOKENS_SQL,
    SPEND_SQL,
    TAKE_KEY_TOKENS_SQL,
    TAKE_SQL,
    UNCLAIM_SQL,
)
from ._journal import Journal
from ._leases import RELEASE_SQL, TAKE_LIMIT_SLOTS_SQL, TAKE_SLOT_SQL, new_owner
from .backoff import Backoff, worth_logging
from .channel import RESULT_RETENTION, ChannelSpec, Rate, kept_for, key_rate_of, rate_of
from .driver import PRIVILEGE_STATE, SCHEMA_STATES, one_line, sqlstate
from .errors import AttemptStopped, MessageCancelled, PayloadError, SchemaMismatch
from .listen import ListenerSpec
from .session import Session

__all__ = ["ChannelProcessor", "ProcessorStatus", "current_connection"]

log = logging.getLogger("pgpubsub.durable")


class _OlderElsewhere(Exception):
    """The claim took a message of a key with an older one where it did not look."""


class _Share(NamedTuple):
    """Rows a processor claimed and handed to another of its crew (ChannelProcessor._hand_out)."""

    rows: list[tuple[Any, ...]]
    parts: dict[int, int]  # id -> partition
    leeway: dict[int, float]  # id -> its start's leeway (ChannelProcessor._leeway_of)


class _RingView:
    """What the processors of one channel in this process (one crew) know of the ring."""

    def __init__(self) -> None:
        #: (current segment, live segments) as the last claim saw them; None: not known.
        self.state: tuple[int, tuple[int, ...]] | None = None
        #: time.monotonic() of the next claim of every segment.
        self.every_segment_at = 0.0
        #: time.monotonic() of the last call of pgpubsub.rotate as a drain ended.
        self.rotated_drained = 0.0
        #: Whether the last call left a segment other than the current one not emptied
        #: (a row of it in a batch's hands, or another process's call running).
        self.unemptied = False
        #: A call to make once ROTATE_DRAINED_EVERY has passed, by the crew's next drain
        #: or its poller's wake-up: a drain ended too soon after the last call while a
        #: segment was left to empty, or that call left one (its rows waited for the
        #: next traffic). Once: a call made for it owes none.
        self.rotate_owed = False
        #: Suspects whose turn alone did not come: id -> (ordering key, time.monotonic()
        #: until which claims pass them over).
        self.passed: dict[int, tuple[str | None, float]] = {}


# One view per crew: its processors share it, so that the claim of every segment
# comes once a poll interval per channel and process, not per processor (32 at
# concurrency=32, each a larger plan), and a processor's first claim knows the ring.
_RING_VIEWS: weakref.WeakKeyDictionary[Crew, _RingView] = weakref.WeakKeyDictionary()


# The processing transaction locks its claimed rows, waiting (not skipping): a
# concurrent claim's scan may hold one of them for an instant (it re-checks the
# row and moves on), and skipping it would leave the message leased, unrun,
# until its lease ran out. Locked in id order, so two processors never deadlock.
# A row whose attempt count changed was claimed again by another worker (this
# one outlived its lease): it is theirs.
# (The third column: the batch of a batch member, kept as done when it completes.)
LOCK_SQL = (
    "SELECT id, attempts, batch_id FROM pgpubsub.message "
    "WHERE id = ANY(%s) AND {in_parts} ORDER BY id FOR UPDATE"
)
# The batch rows of the members about to be settled, locked in id order (see schema.sql).
LOCK_BATCHES_SQL = "SELECT pgpubsub.lock_batches(%s::bigint[])"
LOCK_BATCHES_TRIES = 20
DELETE_SQL = "DELETE FROM pgpubsub.message WHERE id = ANY(%s) AND {in_parts}"
KEEP_SQL = (
    "UPDATE pgpubsub.message SET status = 'done', completed_at = pg_catalog.now(), "
    "last_error = NULL, unfinished = false WHERE id = ANY(%s) AND {in_parts}"
)
# A results channel's completion: the listeners' return values stored with the
# effects, and each waiting handle told (pgpubsub.done, the id; sent at commit).
KEEP_RESULTS_SQL = (
    "WITH k AS (UPDATE pgpubsub.message m SET status = 'done', "
    "completed_at = pg_catalog.now(), last_error = NULL, unfinished = false, "
    "result = r.result::jsonb "
    "FROM ROWS FROM (pg_catalog.unnest(%s::bigint[]), pg_catalog.unnest(%s::text[])) "
    "AS r(id, result) WHERE m.id = r.id AND {in_parts} RETURNING m.id) "
    "SELECT pg_catalog.count(pg_catalog.pg_notify(%s, k.id::text)) FROM k"
)
#: The channel on which a results channel's settled messages are announced (payload: the id).
DONE_CHANNEL = "pgpubsub.done"
SETTLED_SQL = "SELECT pg_catalog.pg_notify(%s, %s::text)"
# Finished batches whose members are all swept, deleted after the retention too.
SWEEP_BATCHES_SQL = "SELECT pgpubsub.sweep_batches(%s)"
#: Seconds between sweeps of a channel without a retention (its batch members).
SWEEP_EVERY = 60.0
# Rows another transaction holds (a purge, which locks in id order) are left
# for the next sweep: a worker that waited for one while holding others in its
# scan's order could deadlock with it.
EXPIRE_SQL = (
    "DELETE FROM pgpubsub.message WHERE id IN (SELECT id FROM pgpubsub.message "
    "WHERE channel = %s AND status = 'done' "
    "AND completed_at < pg_catalog.now() - pg_catalog.make_interval(secs => %s) "
    "FOR UPDATE SKIP LOCKED)"
)
# Completing a message with an ordering key makes the next one of its key
# claimable, and a max_in_flight slot given back lets a waiting worker in:
# wake the other workers (sent at commit).
WAKE_SQL = "SELECT pg_catalog.pg_notify(%s, '')"
# Asleep: publishers of the channel send a wake-up (see pgpubsub.wake).
SLEEP_SQL = "SELECT pgpubsub.sleep(%s)"
# A failed attempt: its outcome is recorded (no longer unfinished), and the
# retry delay counts from now, not from the start of the batch's transaction.
# (A batch-mate's crash may have cost it an attempt: one at most, as it is then
# claimed alone. Giving that attempt back would let a message that crashes and
# fails by turns run twice its max_attempts.)
RETRY_SQL = (
    "UPDATE pgpubsub.message SET last_error = %s, unfinished = false, "
    "run_at = pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => %s), "
    "status = CASE WHEN attempts >= %s THEN 'dead' ELSE 'pending' END "
    "WHERE id = %s AND {in_parts} RETURNING status = 'dead'"
)
# Messages whose round failed on a lost session, in a live process: as if never
# claimed, unless another worker claimed them since.
RECOVER_SQL = (
    "UPDATE pgpubsub.message m SET attempts = m.attempts - 1, "
    "claimed_alone = false, run_at = pg_catalog.clock_timestamp() "
    "FROM ROWS FROM (pg_catalog.unnest(%s::bigint[]), pg_catalog.unnest(%s::int[])) "
    "AS h(id, attempt) "
    "WHERE m.id = h.id AND m.attempts = h.attempt AND m.unfinished AND m.status = 'pending'"
)
# A message claimed alone, as it starts alone: nothing else of its process is in a
# listener (GATE, held from before its claim), so that the process's end is its
# doing. A claim whose reply is lost leaves it charged and unmarked: run alone
# again once its lease is over. Not if another worker claimed it since (its lease
# ran out meanwhile).
MARK_ALONE_SQL = (
    "UPDATE pgpubsub.message m SET claimed_alone = true "
    "FROM ROWS FROM (pg_catalog.unnest(%s::bigint[]), pg_catalog.unnest(%s::int[])) "
    "AS h(id, attempt) "
    "WHERE m.id = h.id AND m.attempts = h.attempt AND m.status = 'pending' AND {in_parts}"
)
# Messages of a lost round that were cancelled while they ran.
CANCELLED_SQL = (
    "DELETE FROM pgpubsub.message WHERE id = ANY(%s) AND status = 'pending' "
    "AND id IN (SELECT id FROM pgpubsub.cancel_request)"
)
# A message claimed behind a failed one of its key: as if never claimed.
GIVE_BACK_SQL = (
    "UPDATE pgpubsub.message SET attempts = attempts - 1, unfinished = false, "
    "run_at = pg_catalog.clock_timestamp() WHERE id = ANY(%s) AND {in_parts}"
)
# A worker stopping past its grace ends the processing session it abandons
# (its transaction rolls back, its row locks go) before giving the batch back.
END_SESSION_SQL = (
    "SELECT pg_catalog.pg_terminate_backend(a.pid) FROM pg_catalog.pg_stat_activity a "
    "WHERE a.pid = %s AND a.datname = pg_catalog.current_database()"
)
# The messages of that batch that no listener runs, as if never claimed: none
# of them stops the process. A message claimed alone (suspected of stopping
# an earlier process: the first parameter) stays suspect. Those another worker
# claimed since, or whose outcome committed, are left alone.
ABANDON_SQL = (
    "UPDATE pgpubsub.message m SET attempts = m.attempts - 1, unfinished = %s, "
    "claimed_alone = false, run_at = pg_catalog.clock_timestamp() "
    "FROM ROWS FROM (pg_catalog.unnest(%s::bigint[]), pg_catalog.unnest(%s::int[])) "
    "AS h(id, attempt) "
    "WHERE m.id = h.id AND m.attempts = h.attempt AND m.unfinished AND m.status = 'pending'"
)
#: How long the give-back at a stop past the grace may wait for the row locks.
ABANDON_LOCK_TIMEOUT = "5s"
LOCK_TIMEOUT_SQL = "SELECT pg_catalog.set_config('lock_timeout', %s, true)"
# Deferrable constraints (every Django foreign key) are checked at each
# statement in the processing transaction, inside the message's savepoint, so
# that a violation is its message's failure rather than a failed COMMIT.
IMMEDIATE_SQL = "SET CONSTRAINTS ALL IMMEDIATE"

#: The most messages of one ordering key in one claimed batch.
PER_KEY = 32
#: Seconds a processor waits for its turn alone (a suspect to run) before it goes on
#: with its channel's other messages: a listener of the process may be waiting for
#: one of them (a result), and no turn alone comes until it returns.
ALONE_WAIT = 0.25
#: The least seconds a suspect whose turn alone did not come is passed over by claims
#: (a poll interval when longer): passed over for less than ALONE_WAIT, it was back in
#: the first row of nearly every claim of a processor claiming one message at a time,
#: and the messages behind it were not claimed.
PASSED_FOR = 1.0
#: The least listener time, in seconds, worth a share of a batch handed to an idle
#: processor (ChannelProcessor._hand_out): a share costs a wake-up and a transaction
#: of its own. Bursts of 16 messages at concurrency=32: with listeners of 5 ms, handed
#: out one a share, publish-to-start p50 45 -> 18 ms; with listeners of a row's insert,
#: handed out alike, 5.5 -> 25 ms.
SHARE_SECONDS = 0.005
#: A message that took a token of a rate limit of at most LATE_MAX_RATE a second
#: (rate_limit, key_rate_limit) at its claim starts within this share of a token's
#: interval after its batch's first message, or goes back, its token spent: behind a slow
#: listener of its batch it started late, as later claims started theirs at their tokens,
#: and starts bunched (two starts of a key 21 ms apart at 1/s: hostile review 20 of issue
#: 26). Less than a whole interval, so that a window of one period holds no more starts
#: than claims (count + capacity). Faster limits keep their claims to the rate: a start a
#: little late there is one of many, and a leeway of a few ms gave back (spent) so many
#: tokens that a backlog ran at 0.8-0.9 of the rate (review 22). The first one starts
#: whatever: each batch gets on; but after a wait at the gate (another's turn alone), the
#: leeways count from before it, and the new claims made once the gate opens get on. (A
#: message run again alone after its batch's COMMIT failed starts whatever: one given
#: back uncharged there could be the failure's cause, never dead.)
LATE_SHARE = 0.5
LATE_MAX_RATE = 10.0

# The storage ring (schema version 6, pgpubsub.rotate): moved on and its
# drained segments emptied about once a second by each processor that claims.
ROTATE_SQL = "SELECT pgpubsub.rotate()"
# The ring as the call left it (live: the segments not emptied, and two partitions apart).
RING_SQL = "SELECT segment, live FROM pgpubsub.ring"
#: Seconds between a processor's calls of pgpubsub.rotate while it claims messages.
ROTATE_EVERY = 1.0
#: The least seconds between calls of pgpubsub.rotate as drains end, per channel and process.
ROTATE_DRAINED_EVERY = 0.1
# A claim that met a row another transaction had just moved to another
# segment (pgpubsub.rotate moves a few pending ones) fails with a
# serialization failure: it is tried again, in a transaction of its own.
MOVED_STATE = "40001"
#: How many times in a row a claim is tried again after a row moved under it (rotate
#: moves at most 1,000 rows a second; a claim meets one of them only while it moves).
#: Past that the processor logs the error and claims again after its back-off.
MOVED_RETRIES = 50

#: Waits between attempts while the database is unavailable.
RECONNECT = Backoff(base=0.5, factor=2, cap=10)


class _Gate:
    """Shared by batches, exclusive for a message that may crash its process.

    Batches go first: a processor waiting for its turn alone lets new batches
    in, and batches waiting when a turn alone ends go before the next one. A
    listener may wait for a message that another processor of its process
    handles (a result), and a channel's suspects, one after another, held up
    every other channel of the process (review 5 of issue 26). A suspect waits
    unclaimed, at no cost (see CRASHED_OUT).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._queued = 0  # batches waiting for a turn alone to end
        self._alone = False

    @contextlib.contextmanager
    def shared(self) -> Any:
        """Yields whether it waited for a turn alone to end."""
        with self._cond:
            waited = self._alone
            self._queued += 1
            self._cond.wait_for(lambda: not self._alone)
            self._queued -= 1
            self._running += 1
        try:
            yield waited
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, timeout: float | None = None) -> Any:
        """Yields whether the turn alone came within ``timeout`` seconds (None: wait)."""
        with self._cond:
            alone = self._cond.wait_for(
                lambda: not (self._alone or self._running or self._queued), timeout
            )
            if alone:  # (a wait in vain leaves another's turn as it is: review 7 of issue 26)
                self._alone = True
        try:
            yield alone
        finally:
            if alone:
                with self._cond:
                    self._alone = False
                    self._cond.notify_all()


#: One per process: the processors of every channel take it.
GATE = _Gate()

#: The claim transaction's connection, while listeners run (``durable.connection()``).
current_connection: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "pgpubsub_durable_connection"
)


@dataclass(frozen=True)
class ProcessorStatus:
    """A snapshot of one durable channel's processor in this worker."""

    channel: str
    processed: int  # messages completed
    failed: int  # attempts that raised (retried or dead)
    claim_size: int  # the current batch size
    alive: bool  # its thread is running


def _leeway(rate: Rate | None) -> float | None:
    """Seconds after its batch's first start within which a message that took a token
    of ``rate`` starts (see LATE_SHARE); None without a limit, or a faster one."""
    if rate is None or rate.per_second > LATE_MAX_RATE:
        return None
    return LATE_SHARE / rate.per_second


def _non_finite(value: Any) -> bool:
    """Whether a value of plain JSON types holds a float that is NaN or infinite."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_non_finite(v) for v in value)
    return False


class ChannelProcessor:
    """Claims and processes one durable channel, in a thread with its own session."""

    def __init__(
        self,
        session: Session,
        spec: ChannelSpec,
        listeners: list[ListenerSpec],
        *,
        batch_size: int = 500,
        batch_seconds: float = 0.25,
        poll_interval: float = 1.0,
        holder: str | None = None,
    ):
        self.session = session
        # Whose leases (ordering keys, max_in_flight slots) this processor takes.
        self.holder = holder or f"{new_owner()}#0"
        self._leasing = True  # it may hold leases: give them back at the next round
        self._after_key = ""  # keys are visited from the one after the last claimed
        self._in_hand: dict[int, int] = {}  # id -> attempt of the batch being processed
        # Rows another processor of the crew claimed and handed to this one (hand_out),
        # with their partitions: run next, even when stopping (they are in hand).
        self._share: _Share | None = None
        # Rows in hand that took a rate limit's token: id -> seconds after the batch's
        # first start within which they start (LATE_SHARE), or go back.
        self._leeway_of: dict[int, float] = {}
        self._first_start: float | None = None  # time.monotonic() the batch's first began
        self._listener_pace: float | None = None  # seconds in listeners a message, last batch
        self._claimed_at: Any = None  # the now() (UTC) of its last claim statement
        self._listening = 0.0  # seconds in listeners of the batch so far
        self._ran = 0  # messages whose listeners ran in the batch so far
        self._handed = 0  # rows of the batch handed out after a cut (_after_cut)
        self._cut_after = 0.0  # time.monotonic() past which the batch may be cut
        self._current: int | None = None  # the message whose listeners run now
        self._backend: int | None = None  # the server process of the batch's session
        self.spec = spec
        self.listeners = listeners
        # Batches adapt: as large as batch_size when listeners are fast, down to
        # one message when they are slow, so that no worker holds many messages
        # that another could be processing.
        cls = spec.cls
        self.max_in_flight: int | None = cls.max_in_flight
        if self.max_in_flight is not None:
            batch_size = 1  # a slot handles one message at a time: claim no more
        self.batch_size = batch_size
        self.batch_seconds = batch_seconds
        # With several processors per channel, start small so that the first
        # claim does not take the work the others could do at once.
        self.claim_size = min(batch_size, 50 if cls.concurrency == 1 else 1)
        self.poll_interval = poll_interval
        self._alone = False  # the last claim took a message alone (unfinished before)
        # The last claim met a suspect (and left it): its id and ordering key.
        self._suspect: tuple[int, str | None] | None = None
        self._left = 0  # wake-ups left to the last claim (see Crew.take_turn)
        self._uncounted = False  # the next claim is a look's or a lent hand's (_run)
        # The last claim took the channel's last token (or found none): a processor whose
        # claim came back full claimed again at once, with nothing to take (review 12).
        self._out_of_tokens = False
        self._began = False  # a listener of the rows in hand began
        self._abandoned = False  # a stop past the grace gave up the rows in hand
        self._round_failed = False  # the rows in hand are a failed round's
        self._retried = False  # the rows in process set a message to run later
        self.max_attempts = int(cls.max_attempts)
        self.timeout: float | None = None if cls.timeout is None else float(cls.timeout)
        self._stops: dict[int, Cancellation] = {}  # the attempts running now, by message id
        self._doomed: set[int] = set()  # in hand, cancelled before their listener started
        # A results channel keeps its outcomes a day when it sets no retention.
        self.retention = kept_for(cls)
        self.results = bool(cls.results)
        self.result_type: Any = getattr(cls, "Result", None)
        self._values: dict[int, str] = {}  # id -> the JSON of its listeners' return value
        self._members: dict[int, int] = {}  # id -> batch, of the members in hand
        self._parts: dict[int, int] = {}  # id -> partition (PART), of the rows in hand
        # The last claim came back short, and the ring had moved past its partitions.
        self._ring_moved = False
        # The next claim reads every partition: the crew looks for messages published
        # while it was busy, or the last claim found nothing after a wake-up or a poll,
        # or took a message of a key with an older one elsewhere.
        self._everywhere = False
        # A wake-up or its poll woke it since its last claim: a first claim that finds
        # nothing on some partitions is made again on every partition. (The crew's
        # looks for messages published while it was busy read every partition at
        # once: a claim on the live ones before it was one more claim a message.)
        self._woken = False
        # Keys held back by an older message elsewhere (OLDER_ELSEWHERE_SQL), and until when
        # (a poll interval) claims on some partitions pass over them.
        self._blocked_keys: dict[str, float] = {}
        self._next_sweep = 0.0  # time.monotonic() of the next sweep of a channel without retention
        # Flow control per limit_key (key_rate_limit, key_concurrency).
        self.key_rate = key_rate_of(cls)
        self.key_slots: int | None = cls.key_concurrency
        self._limited = self.key_rate is not None or self.key_slots is not None
        # Seconds after its batch's first start within which a message that took a
        # token starts (LATE_SHARE), per limit: the channel's and its keys'.
        self._leeway_rate = _leeway(rate_of(cls))
        self._leeway_key = _leeway(self.key_rate)
        self._leased_keys = False  # the last claim leased ordering keys of rows given back
        self._buckets_swept = time.monotonic()  # when key buckets and slot leases were last swept
        self._buckets_after: str | None = None  # the last bucket key the last sweep saw
        self._keys_after: str | None = None  # the last limit key the last rest looked at
        self._limit_slots = False  # the last claim took key_concurrency slots
        self.backoff = Backoff(base=float(cls.retry_delay), cap=float(cls.retry_max_delay))
        self.wake = threading.Event()
        self.stopping = threading.Event()
        # The channel's processors in this process share wake-ups (DurableRunner
        # makes one crew per channel).
        self.crew = Crew()
        self._turn = False  # this processor holds the crew's turn to claim
        self._always_woken = False  # a schema without pgpubsub.sleep: nothing to register
        self._rotated: float | None = 0.0  # when it last called pgpubsub.rotate; None: never
        #: What the worker should tell `pgpubsub status` (its heartbeat): a role that may
        #: not call pgpubsub.rotate().
        self.warning: str | None = None
        self.processed = 0  # messages completed
        self.failed = 0  # attempts that raised
        self.claimed = 0  # attempts started (claims)
        self.dead = 0  # messages that ran out of attempts here
        metrics = _metrics.metrics()
        self._observe = (
            metrics.handler_duration.labels(spec.name).observe if metrics is not None else None
        )
        self._claim_batch = (
            metrics.claim_batch.labels(spec.name).observe if metrics is not None else None
        )
        self._instrumented = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"pgpubsub-durable:{spec.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def halt(self) -> None:
        """Take no more messages (the batch in hand goes on): :meth:`stop` without the wait."""
        self.stopping.set()
        self.wake.set()

    def stop(self, timeout: float, conninfo: str | None = None) -> None:
        """Stop taking messages and wait up to ``timeout`` seconds for the batch in hand.

        When the batch is still in hand then (a listener outlasts the grace), and
        ``conninfo`` is given (the process exits next: the listener will not
        finish), the batch is given up before the process exits:
        its processing session is ended (nothing of the batch commits) and its
        messages are pending again, uncharged, but for the one whose listener
        runs: that one keeps its attempt and is claimed alone next time, so
        that only a message that hangs (or crashes) its process runs out of
        attempts that way (issue 23).
        """
        self.halt()
        self._thread.join(timeout)
        if self._thread.is_alive() and conninfo is not None:
            self._abandon(conninfo)

    def _abandon(self, conninfo: str) -> None:
        """Give back the batch in hand of a thread that did not stop in time (see stop)."""
        in_hand, current, backend = dict(self._in_hand), self._current, self._backend
        alone, failed, began = self._alone, self._round_failed, self._began
        self._abandoned = True
        back = {mid: attempt for mid, attempt in in_hand.items() if mid != current}
        if not in_hand:
            return
        log.warning(
            "durable channel %s: stopping with a batch of %d in hand (message %s still in its "
            "listener); giving back the %d that no listener runs, uncharged",
            self.spec.path,
            len(in_hand),
            current if current is not None else "none",
            len(back),
            extra={"channel": self.spec.name},
        )
        try:
            with driver.connect(conninfo) as conn:
                if backend is not None:
                    conn.execute(END_SESSION_SQL, (backend,))
                with conn.transaction():
                    # The ended session's locks go as its server process exits.
                    conn.execute(LOCK_TIMEOUT_SQL, (ABANDON_LOCK_TIMEOUT,))
                    if failed:  # a failed round's, given back by its rules (see _recover)
                        for statement, params in _recovery(in_hand, alone and began):
                            conn.execute(statement, params)
                    else:
                        conn.execute(ABANDON_SQL, (alone, list(back), list(back.values())))
        except Exception as exc:  # the process exits anyway: they come back charged
            log.warning(
                "durable channel %s: could not give back the batch in hand (%s); its messages "
                "are claimed again once their lease is over, with this attempt counted",
                self.spec.path,
                one_line(exc),
                extra={"channel": self.spec.name},
            )

    @property
    def running(self) -> bool:
        """Whether its thread still runs (a listener outlasting a stop's timeout)."""
        return self._thread.is_alive()

    def join(self) -> None:
        """Wait for its thread to end."""
        self._thread.join()

    def status(self) -> ProcessorStatus:
        return ProcessorStatus(
            self.spec.name, self.processed, self.failed, self.claim_size, self._thread.is_alive()
        )

    def drain_once(self) -> int:
        """Process due messages batch by batch until none is left; return how many completed."""
        self.session.open()
        before = self.processed
        self._recover()  # what a failed round may have left in hand
        self._release(wake=False)  # and held
        full = 0  # full batches in a row
        while not self.stopping.is_set():
            # A max_in_flight slot is held for one batch (one message) at a
            # time, so that the slots pass between every worker.
            if not self._take_slot():
                # What is due waits for a slot, whose give-back wakes the crew: not due
                # to a question (one asked every ms while a long job held the slot:
                # review 16 of issue 26).
                self.crew.held()
                break
            asked = self.claim_size
            # On an error the leases stay held, given back at the next round:
            # by then no listener of this processor runs.
            got, keyed = self._batch()
            # Slot and keys given back once the outcome is recorded, waking the
            # workers that the key or the slot kept waiting.
            self._release(
                wake=got > 0 and (keyed > 0 or self.max_in_flight is not None or self._limit_slots)
            )
            # A suspect the claim left: its turn alone if it comes now, or soon when
            # the claim took nothing else.
            suspect = self._suspect
            if suspect is not None and not self.stopping.is_set():
                got += self._alone_turn(suspect, 0 if got else ALONE_WAIT)
            self._sweep_limits()
            if got:
                self._rotate()
            # A claim cut short by a suspect left is no sign of an empty queue
            # (unless it took nothing, and the suspect's turn did not come), nor
            # one that read segments the ring had moved past.
            if got < asked and (suspect is None or not got) and not self._ring_moved:
                break
            if self._out_of_tokens:  # nothing is claimable before the next token
                break
            full = full + 1 if got >= asked else 0
            if full == 2:  # a second full batch in a row: more is waiting, ask for a hand
                self.crew.wake_one(more=True)
        # Kept outcomes and batch members expire after the retention (a day
        # without one): swept on every drain of a channel with a retention,
        # and every SWEEP_EVERY seconds on any other (the batch members that
        # any worker, alive or gone, completed), with the batches finished a
        # day ago whose members are all gone.
        now = time.monotonic()
        sweep = now >= self._next_sweep
        if self.retention or sweep:
            with self.session.atomic():
                self.session.execute(
                    EXPIRE_SQL, (self.spec.name, self.retention or RESULT_RETENTION)
                )
                if sweep:
                    self.session.execute(SWEEP_BATCHES_SQL, (RESULT_RETENTION,))
            if sweep:
                self._next_sweep = now + SWEEP_EVERY
        if self.processed > before or self._ring_view.rotate_owed:
            self._rotate(drained=True)
        return self.processed - before

    def _take_slot(self) -> bool:
        """One of the channel's max_in_flight slots, leased (or no limit); False when all are taken.

        When all are taken there is no need to poll: the holder wakes the
        channel's workers when it gives its slot back.
        """
        if self.max_in_flight is None:
            return True
        params = {
            "channel": self.spec.name,
            "holder": self.holder,
            "slots": self.max_in_flight,
            "ttl": _leases.TTL,
        }
        self._leasing = True
        with self.session.atomic():
            return bool(self.session.execute(TAKE_SLOT_SQL, params))

    def _recover(self) -> None:
        """Give back, uncharged, the messages of a round that failed on a lost session.

        This process is alive, so none of them crashed it, but one of them may
        have ended the session (a failover, a proxy and a killed backend are more
        likely): no attempt spent, and each is run alone next time, so that one
        which ends its session again does so alone, and runs out. Those another
        worker claimed since (their attempt count moved on) are left alone.
        """
        if self._in_hand:
            with self.session.atomic():
                for statement, params in _recovery(self._in_hand, self._alone and self._began):
                    self.session.execute(statement, params)
            self._in_hand = {}
            self._round_failed = False

    def _release(self, wake: bool) -> None:
        if not self._leasing:
            return
        with self.session.atomic():
            self.session.execute(RELEASE_SQL, (self.spec.name, self.holder))
            if wake:
                self.session.execute(WAKE_SQL, (self.spec.name,))
        self._leasing = self.max_in_flight is not None

    def _sweep_limits(self) -> None:
        """Every BUCKET_SWEEP_EVERY seconds, after a batch or at a rest: delete full buckets
        of idle limit keys (a worker that never rested kept one row per key it had ever
        claimed: review of issue 28, finding 3) and the expired slot leases of stopped
        processes (each claim reads the channel's slot leases). Not at every rest: a rest
        may come hundreds of times a second."""
        if not self._limited:
            return
        now = time.monotonic()
        if now - self._buckets_swept < BUCKET_SWEEP_EVERY:
            return
        self._buckets_swept = now
        with self.session.atomic():
            if self.key_rate is not None:
                self._sweep_buckets()
            if self.key_slots is not None:
                kept = SLOT_LEASE_KEPT * _leases.TTL
                self.session.execute(EXPIRED_SLOTS_SQL, (self.spec.name, kept))

    def _sweep_buckets(self) -> None:
        """Delete the full buckets of the next slice of the channel's (FULL_BUCKETS_SQL)."""
        after = self._buckets_after
        params = {**self._key_params(), "after": after, "slice": BUCKET_SLICE}
        query = FULL_BUCKETS_FIRST_SQL if after is None else FULL_BUCKETS_SQL
        until, n = self.session.execute(query, params)[0]
        self._buckets_after = until if n >= BUCKET_SLICE else None

    def _next_due(self) -> float:
        """Seconds to sleep: until the earliest retry or delayed message is due, or a poll.

        On a rate-limited channel out of tokens with messages due: until its
        next token is due. A paused channel: a poll (or resume's wake-up). A call of
        pgpubsub.rotate owed by the crew's last drain: when it is allowed.

        Never 0: a message already due that this processor could not claim is
        another worker's; a wake-up (NOTIFY) ends the sleep early.
        """
        rate = rate_of(self.spec.cls)
        params = {
            "channel": self.spec.name,
            "capacity": None if rate is None else rate.capacity,
            "per_second": None if rate is None else rate.per_second,
            "slots": self.max_in_flight,
            "short": self.crew.short_of_tokens,
            "since": self.crew.since,
        }
        self._sweep_limits()
        asked: list[tuple[str, Any]] = [(NEXT_DUE_SQL, params)]
        if self.key_rate is not None:
            keys = {
                **self._key_params(),
                "key_short": self.crew.short_keys,
                "since": params["since"],
                "after": self._keys_after,
                "keys": KEYS_PER_REST,
                "scan": self._scan,
            }
            query = KEY_TOKEN_DUE_FIRST_SQL if self._keys_after is None else KEY_TOKEN_DUE_SQL
            asked.append((query, keys))
        answers = self.session.together(asked)
        due = answers[0][0][0] if answers[0] else None
        if self.key_rate is not None:
            wait, last, cut = answers[1][0]
            self._keys_after = last if cut else None
            if wait is not None:
                due = wait if due is None else min(due, wait)
        view = self._ring_view
        if view.rotate_owed and self._rotated is not None:
            owed = view.rotated_drained + ROTATE_DRAINED_EVERY - time.monotonic()
            due = owed if due is None else min(due, owed)
        return self.poll_interval if due is None else min(self.poll_interval, max(0.001, due))

    def _asleep(self) -> bool:
        """Register this worker as asleep on the channel; False while a publisher is in a
        transaction (it may have checked before the registration: look again soon).

        On a schema older than version 5 publishers always wake workers: True.
        """
        if self._always_woken:
            return True
        try:
            return bool(self.session.together([(SLEEP_SQL, (self.spec.name,))])[0][0][0])
        except Exception as exc:
            if sqlstate(exc) not in SCHEMA_STATES:
                raise
            self._always_woken = True
            return True

    def _run(self) -> None:
        failures = 0  # in a row: the wait grows, so an outage is not a log storm
        # Rows handed to it are in hand: run even when stopping (as a batch is).
        while not self.stopping.is_set() or self._share is not None:
            try:
                if self._share is not None:
                    self._run_share()  # then rest again: it was handed work, not woken
                else:
                    self.drain_once()
                failures = 0
                look = self.crew.rest(self, self._next_due, self._asleep)
                # A look's or a lent hand's claim is for messages that no wake-up counted.
                self._uncounted = look or self.crew.lent(self)
                if look:
                    self._everywhere = True  # a look: no wake-up said where
                elif self._share is None:
                    self._woken = True
            except BaseException as exc:  # never let the thread end while the worker runs
                # Rows in hand now are a failed round's: said before anything else (a stop
                # past the grace may come during the log line: review 9 of issue 26).
                self._round_failed = bool(self._in_hand)
                if not isinstance(exc, Exception):
                    exc = RuntimeError(f"{type(exc).__name__}: {exc}")
                wait = RECONNECT.delay(failures)
                failures += 1
                self._trouble(exc, wait, failures)
                # What the failed round was to look for (a look of every partition for
                # messages published while the crew was busy, say) is not known done:
                # the first claim after it reads every partition.
                self._everywhere = True
                self.session.close()
                self._give_back_round()
                self.wake.wait(wait)
                self.wake.clear()
        self._give_back_round(exiting=True)
        self.session.close()
        if self._loop is not None:
            self._loop.close()

    def _give_back_round(self, exiting: bool = False) -> None:
        """:meth:`_recover` the rows of a failed round at once, on a new session: at the
        next round, after the reconnect wait, their lease may be over and another worker
        have claimed them, their attempt lost (the chaos tier, seed 5); and a thread
        stopped meanwhile has no next round (a suspect marked alone was then dead of a
        crash its listener never saw: review 6 of issue 26). Not what a stop past the
        grace gave up (see _abandon). When the database is not there either, the next
        round tries again."""
        if not self._in_hand or self._abandoned:
            return
        try:
            self.session.open()
            self._recover()
        except Exception as exc:
            self.session.close()
            if exiting:
                log.warning(
                    "durable channel %s: could not give back the messages of a failed round "
                    "(%s); they are claimed again once their lease is over, with their "
                    "attempt counted",
                    self.spec.path,
                    one_line(exc),
                    extra={"channel": self.spec.name},
                )

    def _trouble(self, exc: Exception, wait: float, failures: int) -> None:
        """Log a failed round: a known cause in one line, anything else with its traceback.

        The waits grow (up to 10 s), so an outage or a missing schema is not a log storm.
        """
        name = self.spec.name
        if self.session.broken(exc):
            why = f"database unavailable ({one_line(exc)})"
        elif sqlstate(exc) in SCHEMA_STATES:
            why = f"the schema is missing or outdated ({one_line(exc)}); run `pgpubsub migrate`"
        elif sqlstate(exc) == PRIVILEGE_STATE:
            why = f"permission denied ({one_line(exc)}); see `pgpubsub grant ROLE --worker`"
        else:
            log.exception("durable channel %s: unexpected error; trying again in %.1fs", name, wait)
            return
        level = logging.WARNING if worth_logging(failures) else logging.DEBUG
        log.log(level, "durable channel %s: %s; trying again in %.1fs", name, why, wait)

    def _call(self, listener: ListenerSpec, message: Any, stop: Cancellation) -> Any:
        """Run one listener; its return value."""
        result = listener.call(message)
        if listener.is_async:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            loop = self._loop
            task = loop.create_task(result)

            def cancel() -> None:
                loop.call_soon_threadsafe(task.cancel)

            stop.on_request(cancel)
            return loop.run_until_complete(task)
        return result

    def _handle(self, row: tuple[Any, ...]) -> None:
        """Run the listeners of one claimed row ``(id, payload, attempt, trace)``.

        Each attempt has a :class:`Cancellation`, requested when the channel's
        ``timeout`` passes or the message is cancelled meanwhile: the attempt
        then ends with its error, whatever the listener did.
        """
        mid = row[0]
        begun = time.monotonic()
        if self._first_start is None:
            self._first_start = begun
        self._began = True
        self._current = mid  # a stop past the grace leaves this one charged
        stop = Cancellation(mid, self.spec.path, self.timeout)
        token = _cancel.current.set(stop)
        self._stops[mid] = stop
        if self._doomed and mid in self._doomed:  # cancelled before its listener started
            self._doomed.discard(mid)
            stop.request("cancelled")
        timer = None
        if self.timeout is not None:
            timer = threading.Timer(self.timeout, stop.request, ("timeout",))
            timer.daemon = True
            timer.start()
        try:
            if stop.requested:
                raise stop.error()
            if self._instrumented:
                self._traced(row, stop)
            else:
                self._run_listeners(row, stop)
        except BaseException as exc:
            if stop.requested and not isinstance(exc, AttemptStopped):
                raise stop.error() from exc
            raise
        else:
            stop.raise_if_requested()
        finally:
            if timer is not None:
                timer.cancel()
            del self._stops[mid]
            _cancel.current.reset(token)
            self._current = None
            self._listening += time.monotonic() - begun
            self._ran += 1

    def _traced(self, row: tuple[Any, ...], stop: Cancellation) -> None:
        started = time.perf_counter()
        try:
            with _tracing.processing(self.spec.name, row[0], row[2], row[3]):
                self._run_listeners(row, stop)
        finally:
            if self._observe is not None:
                self._observe(time.perf_counter() - started)

    @property
    def in_hand(self) -> list[int]:
        """The ids of the messages this processor has claimed and not yet completed."""
        return list(self._in_hand)

    def stop_running(self, mid: int) -> None:
        """Message ``mid`` was cancelled: its listener is asked to stop (or never starts)."""
        stop = self._stops.get(mid)
        if stop is not None:
            stop.request("cancelled")
        elif mid in self._in_hand:
            self._doomed.add(mid)

    def _run_listeners(self, row: tuple[Any, ...], stop: Cancellation) -> None:
        """Run the listeners of a row; on a results channel, keep their value's JSON.

        The value is the last one a listener returned that is not None (None
        when all returned None). One that cannot be stored fails the attempt,
        like any listener error.
        """
        message = self.spec.decode(row[1])
        value = None
        for listener in self.listeners:
            if listener.accepts(message):
                returned = self._call(listener, message, stop)
                if returned is not None:
                    value = returned
        if self.results:
            self._values[row[0]] = self._encode(row[0], value)

    def _encode(self, mid: int, value: Any) -> str:
        """The JSON of a listener's return value, checked against the channel's ``Result``."""
        try:
            plain = msgspec.to_builtins(value)
            if _non_finite(plain):  # JSON has none: msgspec would store null silently
                raise ValueError("it holds a float that is NaN or infinite (JSON has none)")
            text = msgspec.json.encode(plain)
            if self.result_type is not None:
                msgspec.json.decode(text, type=self.result_type)
            decoded = text.decode("utf-8")
        except (TypeError, ValueError, OverflowError, msgspec.MsgspecError) as exc:
            expected = "" if self.result_type is None else f" as {self.result_type!r}"
            raise PayloadError(
                f"the listener of {self.spec.path} returned a value for message {mid} that "
                f"cannot be stored{expected}: {exc}"
            ) from exc
        if "\x00" in decoded or "\\u0000" in decoded.replace("\\\\", ""):  # jsonb has no NUL
            raise PayloadError(
                f"the listener of {self.spec.path} returned a value for message {mid} that "
                "cannot be stored: a string holds a NUL character (jsonb has none)"
            )
        return decoded

    def _claim(self, suspect: int | None = None) -> list[tuple[Any, ...]]:
        """A batch of due messages but suspects (``_suspect``: the first one met); with
        ``suspect``, that one alone (or nothing)."""
        params = {
            "suspect": suspect,
            "channel": self.spec.name,
            "limit": self.claim_size,
            "max": self.max_attempts,
            "base": self.backoff.base,
            "factor": self.backoff.factor,
            "cap": self.backoff.cap,
            "holder": self.holder,
            "ttl": _leases.TTL,
            "after": self._after_key,
            # Up to a quarter of a batch (and PER_KEY) from one key, so that a batch
            # mixes keys and other processors find keys of their own: a key's next
            # message waits until its previous one's writes are known to hold (a
            # round trip), so a batch costs as many round trips as it has
            # messages of one key.
            "per_key": max(1, min(PER_KEY, self.claim_size // 4)),
        }
        self._leasing = True  # a claim may lease keys
        self._ring_moved = self._out_of_tokens = False
        self._leeway_of = {}
        rate = rate_of(self.spec.cls)
        if self._limited:
            return self._claim_limited(params, rate)
        with self.session.atomic():
            if rate is None:
                return self._run_claim(CLAIM_SQL, params)
            tokens = self._take_tokens(rate, params)
            if tokens < 1:
                return []
            claimed = self._run_claim(CLAIM_SQL, params)
            self._spend_tokens(tokens, claimed)
            return claimed

    def _claim_parts(self) -> tuple[int, ...]:
        """The partitions the next claim reads (see CLAIM_PARTS).

        Those of the ring as the last claim saw it; every partition for the
        first claim, one after a claim that took a message of a key with an
        older one where it did not look (OLDER_ELSEWHERE_SQL), the crew's looks
        for messages published while it was busy, one after the first claim
        after a wake-up or a poll found nothing (the wake-up's message
        may be in a partition the ring did not yet count as live: a deduped
        one while message_deduped was empty, one stored by a publisher whose
        statement read the ring before it moved on, see pgpubsub.rotate), and
        once every poll interval (such a message stored while the workers were
        busy). Shared by the channel's processors in this process (see
        _RING_VIEWS).
        """
        view = self._ring_view
        now = time.monotonic()
        everywhere, self._everywhere = self._everywhere, False
        if view.state is None or everywhere or now >= view.every_segment_at:
            view.every_segment_at = now + self.poll_interval
            return EVERY_SEGMENT
        return ring_parts(*view.state)

    @property
    def _ring_view(self) -> _RingView:
        view = _RING_VIEWS.get(self.crew)
        if view is None:
            view = _RING_VIEWS[self.crew] = _RingView()
        return view

    def _run_claim(self, template: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run the claim ``template`` on the partitions of :meth:`_claim_parts`; its rows
        without their partition (noted in ``_parts``) and the ring's state (noted in ``_ring``).

        A claim that comes back short when the ring had moved past the
        partitions it read sets ``_ring_moved``: the processor claims again,
        with the ring's partitions as they are now, before it rests.
        """
        parts = self._claim_parts()
        at = time.monotonic()
        self._blocked_keys = {k: t for k, t in self._blocked_keys.items() if t > at}
        # (a claim of every partition takes a blocked key's older message)
        blocked = [] if parts == EVERY_SEGMENT else list(self._blocked_keys)
        passed = self._ring_view.passed
        for mid in [mid for mid, (_, until) in passed.items() if until <= at]:
            del passed[mid]
        params["passed"] = [mid for mid, (key, _) in passed.items() if key is None]
        params["blocked"] = blocked + [key for key, _ in passed.values() if key is not None]
        result = self.session.fetch(claim_on(template, parts), params, GENERIC_PLANS_SQL)
        # Every row ends with the suspect met and its key (or NULLs), the ring's state
        # (ring_state) and the claim's now(); a claim that took nothing returns them on
        # a row of NULLs.
        found, key, code, at = result[0][-4:]
        self._suspect = None if found is None else (int(found), key)
        state = ring_state(int(code))
        self._ring_view.state = state
        self._end_turn()  # the next processor's claim goes while this one commits
        if result[0][0] is None:
            claimed: list[tuple[Any, ...]] = []
        else:
            claimed = [r[:-4] for r in result]
        now = ring_parts(*state)
        self._ring_moved = len(claimed) < int(params["limit"]) and not set(now) <= set(parts)
        woken, self._woken = self._woken, False
        if woken and not claimed and parts != EVERY_SEGMENT:
            # A wake-up's or a poll's message may be where the ring does not yet look:
            # claimed again at once on every partition (as after the ring moved).
            self._everywhere = self._ring_moved = True
        self._parts = {r[0]: r[-1] for r in claimed}
        last: dict[str, int] = {}  # each ordering key's newest message taken
        for r in claimed:
            if r[8] is not None:
                last[r[8]] = max(last.get(r[8], 0), r[0])
        if last and parts != EVERY_SEGMENT:
            older = self.session.fetch(
                claim_on(OLDER_ELSEWHERE_SQL, EVERY_SEGMENT),
                {
                    "keys": list(last),
                    "last": list(last.values()),
                    "ids": [r[0] for r in claimed],
                    "channel": self.spec.name,
                },
            )
            if older:
                until = time.monotonic() + self.poll_interval
                self._blocked_keys.update((str(r[0]), until) for r in older)
                raise _OlderElsewhere
        self._claimed_at = at
        return [r[:-1] for r in claimed]

    def _in_parts(self, template: str, ids: list[int]) -> str:
        """``template`` with its ``{in_parts}`` the partitions of rows ``ids``, as constants.

        Constants, not parameters: the planner prunes the other partitions
        whatever plan the driver prepares, and no lock is taken on them (see
        PART). The values are the claim's integers, never input. A row of
        unknown partition (none: every row in hand was claimed) searches all.
        """
        if not ids or any(mid not in self._parts for mid in ids):
            return template.replace(IN_PARTS, "true")
        listed = ", ".join(str(int(p)) for p in sorted({self._parts[mid] for mid in ids}))
        return template.replace(IN_PARTS, f"{PART} IN ({listed})")

    def _take_tokens(self, rate: Any, params: dict[str, Any]) -> int:
        """A rate-limited claim's first statement: the channel bucket's whole tokens,
        the claim's sizes in ``params`` cut to them.

        At most the bucket's whole tokens are claimed, each message claimed
        taking one, in the claim's transaction (the bucket row locked until it
        commits). Out of tokens, nothing is claimed: _next_due says when the
        next one is due.
        """
        bucket = {"channel": self.spec.name, "capacity": rate.capacity}
        bucket["per_second"] = rate.per_second
        tokens = int(self.session.execute(TAKE_SQL, bucket)[0][0])
        short, self.crew.short_of_tokens = self.crew.short_of_tokens, True
        self._out_of_tokens = tokens < 1
        if self._out_of_tokens:
            self.crew.held()  # what is due waits for the next token (NEXT_DUE_SQL)
            if not short:
                # The poller waits for the next token (if the crew was short already, it
                # does: a change each time made two processors take the polling from
                # each other and claim for nothing every ASK_AGAIN, review 12 of issue 26).
                self.crew.rescheduled()
        params["limit"] = min(self.claim_size, tokens)
        params["per_key"] = max(1, min(PER_KEY, self.claim_size // 4, tokens))
        return tokens

    def _spend_tokens(self, tokens: int, claimed: list[tuple[Any, ...]]) -> None:
        """One token per message claimed that will start (a dead one never does)."""
        # Took fewer than the tokens allowed: nothing more is claimable now,
        # and tokens are not what the rest waits for.
        self._out_of_tokens = self.crew.short_of_tokens = len(claimed) >= tokens
        if self._out_of_tokens:  # the poller waits for the next token
            self.crew.rescheduled()
        started = [r[0] for r in claimed if r[3] != "dead"]
        if started:
            self.session.execute(SPEND_SQL, (len(started), self.spec.name))
            self._must_start(started, self._leeway_rate)

    def _claim_moving(self, suspect: int | None = None) -> list[tuple[Any, ...]]:
        """:meth:`_claim`, again when a row moved segments under it (see MOVED_STATE), or
        on every partition when it took a message of a key with an older one elsewhere."""
        self._left = 0  # the wake-ups left to its claims (see Crew.take_turn)
        for _ in range(MOVED_RETRIES - 1):
            try:
                return self._claim_in_turn(suspect)
            except _OlderElsewhere:
                self._everywhere = True  # rolled back: claimed again on every partition
            except Exception as exc:
                if sqlstate(exc) != MOVED_STATE:
                    raise
        # The last try reads every partition, where no older message is elsewhere;
        # its error, if any, is raised.
        self._everywhere = True
        return self._claim_in_turn(suspect)

    def _claim_in_turn(self, suspect: int | None) -> list[tuple[Any, ...]]:
        """:meth:`_claim` in the crew's turn (Crew.take_turn), from before its BEGIN to its
        statement's rows (_run_claim ends it); nothing when stopped while waiting.

        Taken before the transaction begins, so that no processor waits for its turn
        holding a lock (a rate limit's bucket) that the claim in turn may wait for;
        ended once the statement returned, so that a max_in_flight channel (a message
        a claim) is not capped at one claim's three round trips (held to the COMMIT,
        20-40% slower over a 1 ms network).
        """
        self._suspect = None
        # Wake-ups that come while it waits are left to it, up to its room (see
        # Crew.take_turn): not for a suspect's claim (it takes that one alone), nor
        # on a channel with key limits (a key's messages are capped in a claim) or a
        # rate limit (the poller, not this processor, waits for the next token).
        shares = suspect is None and not self._limited and rate_of(self.spec.cls) is None
        uncounted, self._uncounted = self._uncounted and shares, False
        if not self.crew.take_turn(self, self.claim_size - 1 if shares else 0):
            return []
        self._left += self.crew.left
        self._turn = True
        self._claimed_at = None
        try:
            claimed = self._claim(suspect)
            if self._claimed_at is not None and suspect is None and len(claimed) < self.claim_size:
                # What was due by its now() it took, or left to the wake-up or the token
                # that frees it: the next question counts from there (Crew.claimed). Not
                # after a full claim: the rest of what was due, left to no one, started a
                # listener's length apart (review 17 of issue 26); nor a suspect's, which
                # takes that one alone.
                self.crew.claimed(self._claimed_at)
            if (self._left or uncounted) and len(claimed) >= self.claim_size:
                # Full, with wake-ups left to it (each may stand for more messages), or
                # the first claim of a look or a lent hand (messages published while
                # the crew was not registered sent none: a burst to a crew of slow
                # listeners started a listener's length apart, review 13 of issue 26):
                # another processor claims the next batch meanwhile, as it would have.
                self.crew.wake_one(more=True)
            return claimed
        except Exception as exc:
            # Claimed again at once by this processor (_claim_moving), or not before its
            # reconnect: the wake-ups left to it go to another processor meanwhile.
            again = isinstance(exc, _OlderElsewhere) or sqlstate(exc) == MOVED_STATE
            if self._left and not again:
                self.crew.wake_one()
            raise
        finally:
            self._end_turn()

    def _end_turn(self) -> None:
        if self._turn:
            self._turn = False
            self.crew.end_turn()

    def _rotate(self, drained: bool = False) -> None:
        """Move the storage ring on (pgpubsub.rotate), at most every ROTATE_EVERY seconds
        while the processor claims, and as a drain that processed messages ends
        (``drained``: at most every ROTATE_DRAINED_EVERY seconds, whenever the last
        call was), when the ring may hand over: a burst drained in
        less than a second would otherwise keep its segment until more traffic came.
        While a segment is left to empty, a drain that ends too soon after the crew's
        last such call, or that call itself, leaves one more owed
        (``_RingView.rotate_owed``): made by the next drain once allowed, the poller
        waking for it (_next_due); a processor that ran a share calls it as a drain
        does. A steady trickle of messages owes none (a claim of nothing for each
        would follow: review 21 of issue 26).

        Not inside a transaction of the caller's (process_stored_notifications
        on a connection in use): emptying a segment holds its lock to the end
        of the transaction. A schema before version 6, or a role that may not
        call it, never rotates (the ring is then only moved on by other
        workers; nothing is lost either way, only space is not freed).
        """
        now = time.monotonic()
        if self._rotated is None:
            return
        view = self._ring_view
        retry = False  # a call owed already: made now, never owed again (no spin)
        if drained:  # once for the crew: 32 processors' drains end at 400 messages/s
            retry, view.rotate_owed = view.rotate_owed, False
            if now - view.rotated_drained < ROTATE_DRAINED_EVERY:
                view.rotate_owed = retry or view.unemptied
                return
            view.rotated_drained = now
        elif now - self._rotated < ROTATE_EVERY:
            return
        self._rotated = now
        if self.session.in_transaction():
            return
        try:
            segment, live = self.session.together([(ROTATE_SQL, ()), (RING_SQL, ())])[1][0]
            view.unemptied = any(0 <= s != segment for s in live)
            if drained and view.unemptied and not retry:
                view.rotate_owed = True  # (in a batch's hands, or another process's call)
        except Exception as exc:
            if sqlstate(exc) in SCHEMA_STATES or sqlstate(exc) == PRIVILEGE_STATE:
                self._rotated = None
                if sqlstate(exc) == PRIVILEGE_STATE:
                    self.warning = (
                        f"{self.spec.name}: this role may not call pgpubsub.rotate() "
                        "(pgpubsub grant ROLE --worker gives it): the worker does not free "
                        "stored messages' space itself"
                    )
                    log.warning("%s", self.warning)
                return
            if self.session.broken(exc):
                raise
            log.warning("%s: pgpubsub.rotate() failed: %s", self.spec.name, one_line(exc))

    @property
    def _scan(self) -> int:
        """Due messages a claim of a key-limited channel looks at (held keys' passed over)."""
        return max(self.claim_size * 4, 64)

    def _key_params(self) -> dict[str, Any]:
        key_rate = self.key_rate
        return {
            "channel": self.spec.name,
            "key_capacity": None if key_rate is None else key_rate.capacity,
            "key_per_second": None if key_rate is None else key_rate.per_second,
            "key_slots": self.key_slots,
        }

    def _claim_limited(self, params: dict[str, Any], rate: Any) -> list[tuple[Any, ...]]:
        """The claim of a channel with key limits (key_rate_limit, key_concurrency).

        In one transaction: the channel's tokens (rate_limit), then the claim,
        passing over the messages of keys seen out of tokens or slots; then
        the limits taken for real, on locked rows (see :meth:`_limit`).
        """
        params.update(self._key_params())
        key_rate = self.key_rate
        # A key's messages beyond its bucket could never start in this batch.
        cap = max(1, self.claim_size // 4)
        params["per_limit_key"] = cap if key_rate is None else min(cap, key_rate.capacity)
        params["scan"] = self._scan
        self._limit_slots = False
        with self.session.atomic():
            tokens = None if rate is None else self._take_tokens(rate, params)
            if tokens is not None and tokens < 1:
                return []
            taken = self._run_claim(LIMITED_CLAIM_SQL, params)
            # The claim leased the ordering keys of all it took, kept or not.
            self._leased_keys = any(r[6] for r in taken)
            claimed = self._limit(taken, params)
            if tokens is not None:
                self._spend_tokens(tokens, claimed)
            return claimed

    def _limit(
        self, claimed: list[tuple[Any, ...]], params: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        """Of a claimed batch, the rows that may start; the others given back, uncharged.

        Each limit_key's bucket is locked and refilled (key order, as every
        claim: no deadlock): the batch keeps at most its whole tokens and
        spends one per message kept. With key_concurrency each limit_key takes
        a free slot (a lease: its messages run one after the other in this
        processor), or keeps none of its messages. A message of an ordering
        key given back takes the later ones of its key back with it (none
        starts before an older one). Dead rows (out of attempts, never run)
        take nothing. Returns the rows without their limit_key column.
        """
        keys = sorted({r[9] for r in claimed if r[9] is not None and r[3] != "dead"})
        allowed: dict[str, int] = {}
        if keys and self.key_rate is not None:
            got = self.session.execute(TAKE_KEY_TOKENS_SQL, {**params, "keys": keys})
            allowed = {key: int(tokens) for key, tokens in got}
        else:
            allowed = dict.fromkeys(keys, len(claimed))
        if self.key_slots is not None:
            wanted = [k for k in keys if allowed.get(k, 0) >= 1]
            slots: set[str] = set()
            if wanted:
                holder = {"holder": self.holder, "ttl": _leases.TTL, "keys": wanted}
                taken = self.session.execute(TAKE_LIMIT_SLOTS_SQL, {**params, **holder})
                slots = {r[0] for r in taken}
                self._limit_slots = bool(slots)
            allowed = {k: n if k in slots else 0 for k, n in allowed.items()}
        left = dict(allowed)
        kept: list[tuple[Any, ...]] = []
        back: list[int] = []
        blocked: set[str] = set()  # ordering keys with a message given back
        for row in sorted(claimed, key=lambda r: r[0]):
            key, order = row[9], row[8] if row[6] else None
            if row[3] == "dead" or key is None and order not in blocked:
                kept.append(row[:9])
            elif order not in blocked and key is not None and left.get(key, 0) >= 1:
                left[key] -= 1
                kept.append(row[:9])
            else:
                back.append(row[0])
                if order is not None:
                    blocked.add(order)
        if back:
            alone = any(r[7] for r in claimed)
            self.session.execute(self._in_parts(UNCLAIM_SQL, back), (alone, back))
        spent = {k: allowed[k] - left[k] for k in allowed if allowed[k] > left[k]}
        if spent and self.key_rate is not None:
            self.session.execute(
                SPEND_KEY_TOKENS_SQL, (list(spent), list(spent.values()), self.spec.name)
            )
            keyed = {r[0] for r in claimed if r[9] is not None}
            self._must_start(
                [r[0] for r in kept if r[3] != "dead" and r[0] in keyed], self._leeway_key
            )
        # Keys that used all their tokens (or some of whose messages went back): their
        # next token may be due while this batch runs, so the rest asks for it. Those
        # keys only: a flag for all made every key with a whole token due to the
        # question, one held by its ordering key too (review 19 of issue 26).
        short = [k for k in allowed if left.get(k, 0) < 1] if self.key_rate is not None else []
        self.crew.short_keys = short
        if short:  # the poller waits for the keys' next token
            self.crew.rescheduled()
        return kept

    def _must_start(self, ids: list[int], late: float | None) -> None:
        """Rows ``ids`` took a token of a limit whose messages start within ``late``
        seconds of their batch's first (LATE_SHARE), or go back."""
        if late is not None:
            for mid in ids:
                self._leeway_of[mid] = min(late, self._leeway_of.get(mid, late))

    def _too_late(self, mid: int) -> bool:
        """Whether message ``mid`` took a token too long before it could start (LATE_SHARE)."""
        late, first = self._leeway_of.get(mid), self._first_start
        return late is not None and first is not None and time.monotonic() > first + late

    def _batch(self) -> tuple[int, int]:
        """Claim a batch and process it; return how many messages were claimed, and with keys."""
        return self._settle(self._claim_moving())

    def _alone_turn(self, suspect: tuple[int, str | None], wait: float) -> int:
        """Claim and run the suspect ``suspect`` (id, key) alone, once nothing else of this
        process is in a listener; how many messages it claimed (0: no turn within ``wait``
        seconds, the suspect then passed over for a while (PASSED_FOR); or another worker took
        it). Its slot (max_in_flight) and key given back after."""
        with GATE.exclusive(wait) as alone:
            if not alone:
                until = time.monotonic() + max(self.poll_interval, PASSED_FOR)
                self._ring_view.passed[suspect[0]] = (suspect[1], until)
                return 0
            if self.stopping.is_set() or not self._take_slot():
                return 0
            got, keyed = self._settle(self._claim_moving(suspect[0]))
        self._release(wake=got > 0 and (keyed > 0 or self.max_in_flight is not None))
        return got

    def _settle(self, claimed: list[tuple[Any, ...]]) -> tuple[int, int]:
        """Process what a claim took (see :meth:`_batch`)."""
        self.claimed += len(claimed)
        self._alone = any(r[7] for r in claimed)
        if claimed and self._claim_batch is not None:
            self._claim_batch(len(claimed))
        rows = []
        # Each key's first message, then each key's second, and so on (a key's
        # next one waits for its previous one's writes: one wait per round, not
        # per message); within a round higher priority first (a key at the
        # priority of its first message), then oldest.
        head: dict[Any, int] = {}
        rank: dict[int, int] = {}
        seen: dict[Any, int] = {}
        for r in sorted(claimed, key=lambda r: r[0]):
            if r[6]:
                head.setdefault(r[8], r[5])
                rank[r[0]] = seen.get(r[8], 0)
                seen[r[8]] = rank[r[0]] + 1
        order = sorted(
            claimed,
            key=lambda r: (rank.get(r[0], 0), -(head[r[8]] if r[6] else r[5]), r[0]),
        )
        for mid, payload, attempts, status, trace, _, keyed, _, key in order:
            if status == "dead":
                self.dead += 1
                log.error(
                    "message %s on %s is dead: its worker stopped during attempt %d",
                    mid,
                    self.spec.path,
                    attempts,
                    extra={"channel": self.spec.name, "message_id": mid, "attempt": attempts},
                )
            else:
                rows.append((mid, payload, attempts, trace, key if keyed else None))
        rows = self._hand_out(rows, self._listener_pace)
        if rows:
            self.crew.working(self)
            # In hand from the claim on (a stop may come while this waits at
            # the gate).
            self._in_hand = {r[0]: r[2] for r in rows}
            self._began = False
            self._run_rows(rows)
        keyed = sum(1 for r in claimed if r[6])
        if keyed:
            self._after_key = max(str(r[8]) for r in claimed if r[6])
        # Leases to give back: ordering keys leased by the claim (also those of
        # messages given back unrun: review of issue 28, finding 1), slots.
        self._leasing = (
            keyed > 0 or self._leased_keys or self.max_in_flight is not None or self._limit_slots
        )
        self._leased_keys = False
        return len(claimed), keyed

    def _run_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """Process rows in hand (``_in_hand``), in the session that will hold them; note
        the seconds a message took in its listeners (``_listener_pace``), and size the
        next claim to the seconds it took in all."""
        started = time.monotonic()
        self._cut_after = started + self.batch_seconds
        self._listening = 0.0
        self._ran = self._handed = 0
        self._first_start = None
        # Timed or traced messages cost a clock and a span each: decided once a batch.
        self._instrumented = self._observe is not None or _tracing.enabled()
        self._backend = _backend_pid(self.session)
        # A message claimed alone may be the one that kills this process: it was
        # claimed holding the gate (see _alone_turn), so that nothing else of the
        # process is in a listener meanwhile, and its crash is charged to it alone.
        try:
            at_gate = time.monotonic()
            with contextlib.nullcontext(False) if self._alone else GATE.shared() as waited:
                if waited:  # for another's turn alone: its leeways count from before
                    self._first_start = at_gate
                if self._alone:  # (committed before its listener starts)
                    ids = [r[0] for r in rows]
                    with self.session.atomic():
                        mark = self._in_parts(MARK_ALONE_SQL, ids)
                        self.session.execute(mark, (ids, [r[2] for r in rows]))
                self._process(rows)
                self._in_hand = {}
        except BaseException:
            self._round_failed = True  # (see _abandon)
            raise
        finally:
            if self._retried:  # (committed now, or undone): the crew's poller asks again
                self._retried = False
                self.crew.rescheduled()
        ran = max(1, len(rows) - self._handed)
        pace = (time.monotonic() - started) / ran
        self._listener_pace = self._listening / ran
        # The next claim's size follows (a processor handed shares too: the next
        # wake-up goes to the processor that rested last, often one of those); on a
        # rate-limited channel, its listeners fit the leeway of a token (LATE_SHARE).
        fits = int(self.batch_seconds / max(pace, 1e-6))
        for leeway in (self._leeway_rate, self._leeway_key):
            if leeway is not None:
                fits = min(fits, int(leeway / max(self._listener_pace, 1e-6)) + 1)
        self.claim_size = max(1, min(self.batch_size, (self.claim_size + fits) // 2))

    def _hand_out(self, rows: list[tuple[Any, ...]], pace: float | None) -> list[tuple[Any, ...]]:
        """Hand rows of a claim to the crew's idle processors; the rows this one runs.

        A batch's listeners run one after another in its transaction, and a
        batch grows until it fills ``batch_seconds``: with concurrency=N, the
        last message of a claim waited up to that long for the others' listeners
        while the other processors had nothing to do. Idle processors run them
        at once, each share in a transaction of its own. Only rows without an
        ordering key (a key's rows run in order, under this processor's lease on
        the key), of a claim that took no message alone and no slot of a limit
        (leased in this processor's name for its batch). ``pace``: the seconds a
        message is expected to take in its listeners.
        """
        if len(rows) < 2 or pace is None or not self._may_hand_out():
            return rows
        loose = [r for r in rows if r[4] is None]
        keeps = len(loose) == len(rows)  # a share of them (else: the keyed rows)
        # Each share holds SHARE_SECONDS of listeners at least: a transaction and a
        # wake-up each cost more than fast listeners run one after another.
        least = max(1, math.ceil(SHARE_SECONDS / max(pace, 1e-6)))
        shares = min(self.crew.idle() + keeps, len(loose) // least)
        if shares - keeps < 1:
            return rows
        size = -(-len(loose) // shares)  # rows a share
        start = size if keeps else 0
        late = self._leeway_of
        handing = [
            _Share(
                share,
                {r[0]: self._parts[r[0]] for r in share},
                {r[0]: late[r[0]] for r in share if r[0] in late},
            )
            for share in (loose[i : i + size] for i in range(start, len(loose), size))
        ]
        handed = self.crew.hand_out(handing)
        if not handed:
            return rows
        gone = {r[0] for share in handing[:handed] for r in share.rows}
        return [r for r in rows if r[0] not in gone]

    def _may_hand_out(self) -> bool:
        """Whether rows in hand may go to other processors (see :meth:`_hand_out`)."""
        return not self._alone and self.max_in_flight is None and not self._limited

    def _cut_at(self, rows: list[tuple[Any, ...]], i: int, cut_after: float | None) -> bool:
        """Whether the batch stops before ``rows[i]``, once it has overrun the time it was
        sized for (past ``cut_after``, time.monotonic(); None: never): a message of it ran
        (each transaction gets on), at least two are left, one that may be handed out (see
        :meth:`_after_cut`; else a cut is a commit for nothing), and a processor is idle
        to take some."""
        return (
            cut_after is not None
            and time.monotonic() > cut_after
            and 0 < i <= len(rows) - 2
            and any(self._movable(r) for r in rows[i:])
            and self.crew.idle() > 0
        )

    def _movable(self, row: tuple[Any, ...]) -> bool:
        """Whether a row left by a cut may go to another processor: not one of an ordering
        key (its key's order), nor one cancelled while it waited (its stop is noted here),
        nor one that took a rate limit's token (its leeway counts from this batch's first
        start; handed out, it started a leeway after the taker's: review 23 of issue 26)."""
        return row[4] is None and row[0] not in self._doomed and row[0] not in self._leeway_of

    def _cut(self, rows: list[tuple[Any, ...]], blocked: set[str], outcome: _Outcome) -> None:
        """The batch stops here: ``rows`` (not run) stay in hand for after its commit
        (``outcome.cut``), but those that would have gone back (:meth:`_back`)."""
        for row in rows:
            if row[4] in blocked or self._too_late(row[0]):
                self._back(row, blocked, outcome)
            else:
                outcome.cut.append(row)

    def _back(self, row: tuple[Any, ...], blocked: set[str], outcome: _Outcome) -> None:
        """``row`` goes back unrun, uncharged: behind a failed message of its ordering key,
        or too late for the token it took (:meth:`_too_late`; spent: a token given back
        now would let the next claim start beside one started at it). The later
        messages of its ordering key go back with it."""
        outcome.returned.append(row[0])
        if row[4] is not None:
            blocked.add(row[4])
        if row[0] in self._leeway_of:
            self._retried = True  # due again: the crew's poller asks when

    def _after_cut(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Rows a committed batch left unrun (:meth:`_cut`), handed out to the idle
        processors at the pace the batch ran at; the ones this processor runs next."""
        pace = self._listening / max(1, self._ran)
        movable = [r for r in rows if self._movable(r)]
        gone = {r[0] for r in movable} - {r[0] for r in self._hand_out(movable, pace)}
        self._handed += len(gone)
        self._cut_after = time.monotonic() + self.batch_seconds  # (the next transaction's)
        kept = [r for r in rows if r[0] not in gone]
        self._in_hand = {r[0]: r[2] for r in kept}
        self._began = False
        return kept

    def accept(self, share: _Share) -> None:
        """Rows another processor of the crew claimed, to run next (Crew.hand_out, under
        the crew's lock while this one is idle): in hand from now on."""
        self._in_hand = {r[0]: r[2] for r in share.rows}
        self._began = False
        self._share = share

    def _run_share(self) -> None:
        """Run the rows handed to this processor (see :meth:`_hand_out`)."""
        assert self._share is not None
        rows, self._parts, self._leeway_of = self._share
        self._share = None
        self._alone = False  # (never handed: see _hand_out)
        self.session.open()
        before = self.processed
        self._run_rows(rows)
        if self.processed > before:  # it may have run the burst's last rows (see _rotate)
            self._rotate(drained=True)

    def _process(self, claimed: list[tuple[Any, ...]]) -> None:
        """Run and complete claimed rows ``(id, payload, attempt, trace)`` in one transaction.

        A listener that fails (it raised, a write of its failed, its failure
        could not be stored as given) is undone alone and its failure recorded
        while the batch goes on; no listener runs again for another message's
        failure. On a pipelined psycopg connection the batch's statements are
        not waited for one by one: its listeners' statements are written down
        (:mod:`pgpubsub._journal`) and sent again, not run again, when a
        neighbour's are undone. Elsewhere each message has a savepoint of its
        own, waited for before the next listener runs. Only when the
        transaction fails as a whole (at COMMIT: a constraint a listener
        deferred itself; or in the library's own statements) is each message
        run again, alone in a transaction of its own. Counters count what
        committed.

        A batch that overruns the time it was sized for while a processor of
        the crew is idle stops (:meth:`_cut_at`): what ran commits, and the rest
        is handed out, or run here in the next transaction. A claim's size and
        its hand-out follow the last batch's pace, so a fast batch's claim
        that took slow messages ran them one after another while processors
        idled (hostile review 14 of issue 26).
        """
        token = current_connection.set(self.session.connection)
        known: dict[int, BaseException] = {}  # failures that need no second run
        kept: list[tuple[Any, ...]] = []  # left unrun by a cut, not handed out
        try:
            try:
                outcome = self._transaction(claimed, known)
            except Exception as exc:
                if self.session.broken(exc):
                    raise
                self._one_by_one(claimed, exc, known)
            else:
                self._count(outcome)
                if outcome.cut:
                    kept = self._after_cut(outcome.cut)
                    parts = {r[0]: self._parts[r[0]] for r in kept}
        finally:
            current_connection.reset(token)
            self._values.clear()
            self._members.clear()
            self._parts.clear()
        if kept:  # (a transaction of their own: the cut's committed)
            self._parts.update(parts)
            self._process(kept)

    def _transaction(
        self, claimed: list[tuple[Any, ...]], known: dict[int, BaseException]
    ) -> _Outcome:
        session = self.session
        nested = session.in_transaction()
        # A batch in the caller's transaction is never cut (it commits with the caller's).
        cut_after = None if nested or not self._may_hand_out() else self._cut_after
        # Pipelined, the transaction's COMMIT goes with the batch's last statements.
        with session.pipeline() as pipeline, session.atomic():
            locked = self._lock([r[0] for r in claimed])
            # A row claimed again by someone else since (lease over) is theirs.
            rows = [r for r in claimed if locked.get(r[0]) == r[2]]
            if not nested:  # never change the mode of the caller's transaction
                session.execute(IMMEDIATE_SQL)
            if pipeline is None:
                return self._run_all(rows, known, cut_after)
            return self._run_journaled(rows, Journal(session.connection), known, cut_after)

    def _run_journaled(
        self,
        rows: list[tuple[Any, ...]],
        journal: Journal,
        known: dict[int, BaseException],
        cut_after: float | None,
    ) -> _Outcome:
        """The batch pipelined, its listeners' statements written down; a failure is undone alone.

        A message of a key runs only once the statements of the key's earlier
        message are known to hold: a later message of a key never runs before
        an earlier one's failure is known. Past ``cut_after`` (time.monotonic())
        the batch may stop (:meth:`_cut_at`).
        """
        outcome = _Outcome()
        ran: list[int] = []
        failures: list[tuple[tuple[Any, ...], BaseException]] = []
        keys = {r[0]: r[4] for r in rows}
        blocked: set[str] = set()  # keys whose message failed: the later ones wait
        with journal.installed():
            for i, row in enumerate(rows):
                mid, key = row[0], row[4]
                cut = self._cut_at(rows, i, cut_after)
                if cut or key is not None and journal.must_wait(key):
                    journal.confirm()
                if journal.failed:
                    blocked.update(k for m in journal.failed if (k := keys[m]) is not None)
                if cut:
                    self._cut(rows[i:], blocked, outcome)
                    break
                if key in blocked or self._too_late(mid):
                    self._back(row, blocked, outcome)
                    continue
                exc = known.get(mid)
                own = True
                if exc is None:
                    own, exc = journal.run(mid, key, self._handle, row)
                if exc is None:
                    ran.append(mid)
                    continue
                if own:
                    known[mid] = exc
                    failures.append((row, exc))
                else:  # another message's error surfaced in its listener
                    outcome.returned.append(mid)
                if key is not None:
                    blocked.add(key)
            journal.confirm()
        by_id = {r[0]: r for r in rows}
        for mid in ran:
            if mid in journal.failed:
                known[mid] = journal.failed[mid]
                failures.append((by_id[mid], journal.failed[mid]))
            else:
                outcome.done.append(mid)
        self._lock_batches([row[0] for row, _ in failures] + outcome.done)
        for row, exc in failures:
            outcome.failed.append(self._failed(row[0], row[2], exc))
        self._complete(outcome.done)
        self._give_back(outcome.returned)
        return outcome  # (their errors raise at the pipeline's end, with the COMMIT's)

    def _run_all(
        self,
        rows: list[tuple[Any, ...]],
        known: dict[int, BaseException],
        cut_after: float | None,
    ) -> _Outcome:
        """The batch with a savepoint per message; a failure is recorded and the batch goes
        on. Past ``cut_after`` (time.monotonic()) it may stop (:meth:`_cut_at`)."""
        outcome = _Outcome()
        blocked: set[str] = set()  # keys whose message failed: the later ones wait
        failures: list[tuple[tuple[Any, ...], BaseException]] = []
        for i, row in enumerate(rows):
            if self._cut_at(rows, i, cut_after):
                self._cut(rows[i:], blocked, outcome)
                break
            if row[4] in blocked or self._too_late(row[0]):
                self._back(row, blocked, outcome)
                continue
            exc = known.get(row[0]) or self._attempt(row)
            if exc is None:
                outcome.done.append(row[0])
            else:
                failures.append((row, exc))
                if row[4] is not None:
                    blocked.add(row[4])
        # Recorded once every listener ran, the batch rows of members locked first.
        self._lock_batches([row[0] for row, _ in failures] + outcome.done)
        for row, exc in failures:
            outcome.failed.append(self._failed(row[0], row[2], exc))
        self._complete(outcome.done)
        self._give_back(outcome.returned)
        return outcome

    def _attempt(self, row: tuple[Any, ...]) -> BaseException | None:
        """Run one message's listeners in a savepoint; the exception if they failed.

        Its statements are waited for before the savepoint ends (the writes of
        a batch are pipelined): a write that fails is charged to its own
        message, and the next listener runs only once this one's writes held.
        """
        session = self.session
        try:
            with session.atomic():
                try:
                    self._handle(row)
                finally:
                    session.sync()
        # SystemExit, KeyboardInterrupt, CancelledError from a listener fail
        # its message too: they must not end the processor's thread.
        except BaseException as exc:
            if session.broken(exc):
                raise
            return exc
        return None

    def _one_by_one(
        self, rows: list[tuple[Any, ...]], error: Exception, known: dict[int, BaseException]
    ) -> None:
        """After the batch's transaction failed: each message alone, in its own transaction.

        Nothing of the batch committed, so its listeners run again (see the
        durable guide), but for a message whose listener failed already. A
        message whose own transaction fails at COMMIT is charged that failure.
        Each message is counted as its transaction commits.
        """
        session = self.session
        log.warning(
            "durable channel %s: the transaction of a batch of %d failed (%s); running each "
            "of its messages again in a transaction of its own",
            self.spec.path,
            len(rows),
            one_line(error),
            extra={"channel": self.spec.name},
        )
        blocked: set[str] = set()
        for row in rows:
            mid, attempt, key = row[0], row[2], row[4]
            alone = _Outcome()
            if key in blocked:
                with session.atomic():
                    self._give_back([mid])
                continue
            try:
                with session.atomic():
                    if self._still_ours(mid, attempt):
                        exc = known.get(mid) or self._attempt(row)
                        if exc is None:
                            self._complete([mid])
                            alone.done.append(mid)
                        else:
                            alone.failed.append(self._failed(mid, attempt, exc))
            except Exception as exc:
                if session.broken(exc):
                    raise
                alone = _Outcome()
                with session.atomic():
                    if self._still_ours(mid, attempt):
                        alone.failed.append(self._failed(mid, attempt, exc))
            if alone.failed and key is not None:
                blocked.add(key)
            self._count(alone)  # committed: counted now, whatever happens to the next one

    def _lock(self, ids: list[int]) -> dict[int, int]:
        """Lock rows in hand; their attempt counts (batch members noted in ``_members``)."""
        rows = self.session.fetch(self._in_parts(LOCK_SQL, ids), (ids,))
        self._members.update((r[0], r[2]) for r in rows if r[2] is not None)
        return {r[0]: r[1] for r in rows}

    def _lock_batches(self, settling: list[int]) -> None:
        """Lock the batch rows of the members among ``settling``, in id order, at once.

        Settling a member updates its batch's row (schema: batch_member_settled);
        taken one by one in the order a statement visits its rows, two
        transactions with members of the same batches could deadlock. An
        operator's transaction may still lock them in another order (a cancel
        of a member of one batch, then of another): the locks are taken in a
        savepoint, and a deadlock detected there gives up only these locks
        and tries again (the operator, waiting longer, is the next victim),
        so the worker's batch is never undone and its listeners never run twice.
        """
        if not self._members:
            return
        batches = sorted({b for mid in settling if (b := self._members.get(mid)) is not None})
        if not batches:
            return
        for tried in range(LOCK_BATCHES_TRIES):
            try:
                with self.session.atomic():
                    self.session.execute(LOCK_BATCHES_SQL, (batches,))
                    self.session.sync()
                return
            except Exception as exc:
                if sqlstate(exc) != "40P01" or tried == LOCK_BATCHES_TRIES - 1:
                    raise
                log.info(
                    "durable channel %s: a deadlock over batch rows (%s); locking them again",
                    self.spec.path,
                    one_line(exc),
                    extra={"channel": self.spec.name},
                )

    def _still_ours(self, mid: int, attempt: int) -> bool:
        return self._lock([mid]).get(mid) == attempt

    def _count(self, outcome: _Outcome) -> None:
        """Count a committed outcome."""
        self.processed += len(outcome.done)
        self.failed += len(outcome.failed)
        self.dead += sum(outcome.failed)

    def _give_back(self, ids: list[int]) -> None:
        """Messages claimed behind a failed one of their key: pending again, unrun, uncharged."""
        if ids:
            self.session.execute(self._in_parts(GIVE_BACK_SQL, ids), (ids,))

    def _complete(self, ids: list[int]) -> None:
        """Complete messages: deleted, or kept as done (with their results, on a results channel).

        A batch member is always kept as done (swept after the retention, or a
        day): its batch counts its members by their status when the last one
        settles, and a member gone counts as cancelled (schema:
        pgpubsub.batch_member_settled).
        """
        if not ids:
            return
        if self.results:
            values = [self._values.get(mid, "null") for mid in ids]
            keep = self._in_parts(KEEP_RESULTS_SQL, ids)
            self.session.execute(keep, (ids, values, DONE_CHANNEL))
        elif self.retention:
            self.session.execute(self._in_parts(KEEP_SQL, ids), (ids,))
        else:
            members = [mid for mid in ids if mid in self._members]
            if members:
                self.session.execute(self._in_parts(KEEP_SQL, members), (members,))
                ids = [mid for mid in ids if mid not in self._members]
            if ids:
                self.session.execute(self._in_parts(DELETE_SQL, ids), (ids,))

    def _failed(self, mid: int, attempt: int, exc: BaseException) -> bool:
        """Record a failed attempt in a savepoint of its own; return whether it is now dead.

        A message cancelled while its listener ran ends cancelled (deleted, as a
        pending message that is cancelled): never run again.
        """
        if isinstance(exc, MessageCancelled):
            with self.session.atomic():
                self.session.execute(self._in_parts(DELETE_SQL, [mid]), ([mid],))
                if self.results:  # a waiting handle finds it gone: cancelled
                    self.session.execute(SETTLED_SQL, (DONE_CHANNEL, mid))
                self.session.sync()
            log.info(
                "message %s on %s was cancelled while it ran (attempt %d): its writes undone",
                mid,
                self.spec.path,
                attempt,
                extra={"channel": self.spec.name, "message_id": mid, "attempt": attempt},
            )
            return False
        error = storable("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        delay = self.backoff.delay(attempt - 1)
        # A payload that does not decode never will: dead at once, kept with its error.
        limit = 0 if isinstance(exc, SchemaMismatch) else self.max_attempts
        try:
            final = self._record(mid, error, delay, limit)
        except Exception as trouble:
            if self.session.broken(trouble):
                raise
            # The library's own bookkeeping failed: store what can be stored.
            error = storable(
                f"{type(exc).__module__}.{type(exc).__qualname__} (its text could not be "
                f"stored: {one_line(trouble)})"
            )
            final = self._record(mid, error, delay, limit)
        self._retried = self._retried or not final
        log.log(
            logging.ERROR if final else logging.WARNING,
            "message %s on %s failed (attempt %d of %d): %r%s",
            mid,
            self.spec.path,
            attempt,
            limit or attempt,
            exc,
            "; now dead" if final else f"; retry in {delay:.1f}s",
            extra={"channel": self.spec.name, "message_id": mid, "attempt": attempt},
        )
        return final

    def _record(self, mid: int, error: str, delay: float, limit: int) -> bool:
        """Store a failed attempt; whether the message is now dead."""
        with self.session.atomic():
            retry = self._in_parts(RETRY_SQL, [mid])
            rows = self.session.fetch(retry, (error, delay, limit, mid))
            dead = bool(rows and rows[0][0])
            if dead and self.results:  # a waiting handle raises its error
                self.session.execute(SETTLED_SQL, (DONE_CHANNEL, mid))
        return dead


def _recovery(in_hand: dict[int, int], ran_alone: bool) -> list[tuple[str, Any]]:
    """The statements that give back the rows of a failed round (``in_hand``: id ->
    attempt), with their parameters: those cancelled while they ran end cancelled
    (pgpubsub.cancel_request); the others are given back uncharged, but for a message
    claimed alone whose listener began (``ran_alone``): it may have ended its session
    itself (a query that crashes its server process), and keeps its attempt."""
    ids = list(in_hand)
    statements: list[tuple[str, Any]] = [(CANCELLED_SQL, (ids,))]
    if not ran_alone:
        statements.append((RECOVER_SQL, (ids, list(in_hand.values()))))
    return statements


def _backend_pid(session: Session) -> int | None:
    """The server process of ``session``'s connection (psycopg 3 or 2, or Django's), if known."""
    conn = session.connection
    raw = getattr(conn, "connection", conn)  # Django's wrapper holds the driver's connection
    info = getattr(raw, "info", None)  # psycopg 3: no round trip
    if info is not None:
        return int(info.backend_pid)
    get = getattr(raw, "get_backend_pid", None)  # psycopg 2
    return int(get()) if callable(get) else None


@dataclass
class _Outcome:
    """What one processing transaction did: completed ids, and per failure whether it died."""

    done: list[int] = field(default_factory=list)
    failed: list[bool] = field(default_factory=list)
    returned: list[int] = field(default_factory=list)  # given back unrun (behind a failure)
    cut: list[tuple[Any, ...]] = field(default_factory=list)  # left in hand unrun (_cut)


#: The longest error text stored (characters): its head and its end are kept.
MAX_ERROR = 65_536


def storable(text: str) -> str:
    """``text`` as PostgreSQL can store it: no NUL, no lone surrogate (escaped instead).

    Cut to :data:`MAX_ERROR` characters, its start and its end kept (where a
    traceback says what went wrong): a huge error text would also stall the
    pipeline that sends it.
    """
    if len(text) > MAX_ERROR:
        cut = len(text) - MAX_ERROR
        head, tail = text[: MAX_ERROR // 8], text[-(MAX_ERROR // 8 * 7) :]
        text = f"{head}\n[... {cut} characters cut ...]\n{tail}"
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
