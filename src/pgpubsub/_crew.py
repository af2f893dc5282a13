"""The processors of one durable channel in one worker process: one wake-up, one claim.

A worker runs ``concurrency`` processors per durable channel. A wake-up (a
NOTIFY, a key or slot given back, a reconnect) wakes one idle processor, not
all of them; a processor that claimed a full batch wakes the next one (more may
be waiting), so work spreads as fast as it comes and one published message
costs one claim. Of the idle processors only one, the poller, looks at the
clock: it asks when the next delayed or retried message is due and claims then
(or after the poll interval); the others sleep until woken and cost the
database nothing. After a wake-up (the new message may be due later), a
registration (messages published before it sent none) or a retry, the idle
poller is woken to ask again, or else the next processor to rest asks and
becomes the poller (either once :data:`ASK_AGAIN` seconds have passed since the
last question); the poller before it sleeps once its wait ends. A question
counts the messages due since the server's now() of the crew's last claim that
came back short of its size (:meth:`Crew.claimed`): a message that came due after
the claim that could have taken it is due to the next question, whoever asks it
and however late. The poller off to claim what is due keeps its role until its
claim has rows to run (a successor asking before the claim took them would claim
for nothing). The crew's claim statements run one at a time (:meth:`Crew.take_turn`):
processors woken together, or done with their batches together, claim one after
the other, so that a worker keeps one backend per channel busy claiming however
many processors it runs (at concurrency=32 and 400 messages/s, up to 16 claims
ran at once, each slower for the others). A turn runs from the claim's BEGIN to
its statement's rows: the claims' COMMITs, and what follows the statement, go
side by side. A wake-up that comes while a claim waits for its turn is left to
that claim, which will see its message, as long as the claim may take more
messages than it has been left; it wakes an idle processor only beyond that (at
concurrency=32 and 400 messages/s, 11.6 claims waited for the turn on average,
one for each wake-up, though the first of them would see every one of their
messages). A claim of several messages hands them out to the idle processors
(:meth:`Crew.hand_out`), so that they start at once instead of one after
another in the claimer's transaction; a processor handed rows runs them and
rests again without a claim.

A crew with nothing to do registers as asleep (``pgpubsub.sleep``) before its
last look at the queue, so that publishers wake it (``pgpubsub.wake``: a NOTIFY
only then). A wake-up may have taken the registration: the next processor to
rest registers again. A publisher in a transaction when the crew registers may
have checked before it and commit after the last look: until a registration
finds no publisher in a transaction, the crew also looks again, after
:data:`BUSY_POLL_FIRST` seconds, then twice as long each time up to
:data:`BUSY_POLL` (the publishers that check after the registration wake it at
once). A publisher's check comes just before its commit in a short transaction:
the first look finds its message; the longer waits are for publishers that hold
their transactions open. After :data:`BUSY_PATIENCE` seconds of such
registrations with no wake-up, the crew stops looking for them (a session left
idle in its transaction would keep it looking 20 times a second for hours):
their messages wait for the poller, at most the poll interval. A wake-up or a
registration that finds no publisher in a transaction starts the schedule
again. A member that starts on the messages a wake-up brought wakes the idle
poller to register again (:meth:`Crew.working`): publishers wake the crew while
it is busy; the poller, back from its last look with messages to run, hands its
role on to an idle processor. Messages published while the crew was not
registered sent no wake-up: a look, or a processor woken to lend a hand
(:meth:`Crew.lent`), whose first claim comes back full asks for another hand at
once, so that a burst spreads over the idle processors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = ["ASK_AGAIN", "BUSY_PATIENCE", "BUSY_POLL", "BUSY_POLL_FIRST", "Crew"]

#: Seconds before the first look at the queue after a registration beside a
#: publisher in a transaction (which may have missed it).
BUSY_POLL_FIRST = 0.005
#: The longest wait between such looks, while registrations keep finding one.
BUSY_POLL = 0.05
#: Seconds of such looks without a wake-up, after which only the poller looks.
BUSY_PATIENCE = 2.0
#: Seconds between checks for a stop while waiting for the crew's turn to claim.
CLAIM_WAIT = 0.1
#: The least seconds between two questions of when the next message is due after
#: changes (a processor that comes to rest sooner asks once they have passed).
ASK_AGAIN = 0.05


class _Member(Protocol):
    wake: threading.Event
    stopping: threading.Event

    def accept(self, share: Any) -> None:
        """Take ``share``, rows another processor of the crew claimed, to run next."""


class _Waiting:
    """A claim waiting for its turn: how many more wake-ups may be left to it."""

    __slots__ = ("room",)

    def __init__(self, room: int) -> None:
        self.room = room


class Crew:
    """Wake-ups for the processors of one channel (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: list[_Member] = []  # asleep, the most recent last
        self._poller: _Member | None = None  # the idle one that polls
        self._handed: set[int] = set()  # woken only to become the poller
        self._nudged: set[int] = set()  # the poller, woken only to rest again (_nudge)
        self._lent: set[int] = set()  # woken to lend a hand (wake_one(more=True))
        self._missed = False  # a wake-up came while none was idle
        self._registered = False  # publishers know the crew sleeps (pgpubsub.sleeper)
        self._registering = False
        self._wakes = 0  # wake-ups so far: one may have taken the registration
        self._changes = 0  # events since which the poller's due time may be too late
        self._polled = 0  # _changes when the poller last asked when the next one is due
        self._asked = float("-inf")  # when it asked (the crew's clock)
        # The server's now() when the crew's last claim began, in UTC (a question of when the
        # next message is due counts those due since); None: as of the question's own.
        self.since: Any = None
        # The crew's last claim took all the channel's tokens (short_keys: the limit_keys
        # whose tokens it took all of): the poller waits for the next token, whichever
        # processor claimed.
        self.short_of_tokens = False
        self.short_keys: list[str] = []
        self._busy_wait = BUSY_POLL_FIRST  # the next look's wait beside a publisher
        self._busy_since: float | None = None  # the first such look since a wake-up
        self._claim = threading.Lock()  # held by the processor whose claim is in flight
        self._waiting: list[_Waiting] = []  # the claims waiting for their turn
        self.left = 0  # wake-ups left to the claim in turn (read by its processor)

    def take_turn(self, proc: _Member, room: int = 0) -> bool:
        """The crew's turn to claim, once the claim statement in flight has returned;
        False, without the turn, when ``proc`` is stopped meanwhile (a claim held up by
        the database must not keep the others from stopping).

        ``room``: how many more messages than one the claim may take (0 for a claim
        of one message, or of one chosen message): while it waits for its turn, up to
        that many wake-ups are left to it instead of waking another processor
        (:attr:`left`, once it has the turn: how many were).
        """
        waiting = _Waiting(room)
        with self._lock:
            self._waiting.append(waiting)
        turn = False
        try:
            while not turn and not proc.stopping.is_set():
                turn = self._claim.acquire(timeout=CLAIM_WAIT)
            return turn
        finally:
            with self._lock:
                # This claim's own entry (the turn is not first come, first served),
                # and only its own: another's stays until it has its turn.
                self._waiting = [w for w in self._waiting if w is not waiting]
                if turn:
                    self.left = room - waiting.room
            if not turn and room > waiting.room:  # stopped: the wake-ups go on
                self.wake_one()

    def claimed(self, at: Any) -> None:
        """A member's claim came back short of its size; ``at``: the server's now() when
        it began. What was due by then it took, or left to what frees it (a wake-up, a
        token): a question of when the next message is due counts those due since
        (NEXT_DUE_SQL); a full claim says nothing of what else was due. Counting only
        messages still to come, a message that came due during the claim before, or
        while the poller was nudged to ask again at its due time, was due to no
        question and waited for the poll (reviews 11 and 15 of issue 26)."""
        with self._lock:
            if self.since is None or at > self.since:
                self.since = at

    def held(self) -> None:
        """A member could not claim (no max_in_flight slot, no token): what is due waits
        for a give-back's wake-up or the next token, not for a question, which counts
        only messages still to come until the next claim. Nor are keys short of tokens
        any more (a claim that reaches the key limits says again): a key that
        refilled meanwhile was due now to every question, while every claim found no
        channel token (about 330 of each a second: review 18 of issue 26)."""
        with self._lock:
            self.since = None
            self.short_keys = []

    def end_turn(self) -> None:
        """The claim statement of the turn has returned: the next processor's turn."""
        self._claim.release()

    def wake_one(self, *, more: bool = False) -> None:
        """Wake one idle processor; when none is idle, the next to rest claims again.

        ``more``: a processor that claimed a full batch asks for a hand; when
        none is idle nothing is kept (the busy ones claim again anyway).
        """
        with self._lock:
            if not more:  # (a hand asked for is the crew's own: it took no registration)
                self._wakes += 1
                self._changes += 1  # a new message may be due later
                self._registered = False
                self._busy_wait, self._busy_since = BUSY_POLL_FIRST, None
                for waiting in self._waiting:
                    if waiting.room > 0:  # a claim yet to begin: it will see the message
                        waiting.room -= 1
                        return
            proc = self._take()
            if proc is None:
                self._missed = self._missed or not more
                return
            if more:
                self._lent.add(id(proc))
        proc.wake.set()

    def lent(self, proc: _Member) -> bool:
        """Whether ``proc`` was last woken to lend a hand (``wake_one(more=True)``): its
        claim, like a look, is for messages no wake-up counted; a full one asks for
        another hand at once."""
        with self._lock:
            lent = id(proc) in self._lent
            self._lent.discard(id(proc))
            return lent

    def working(self, proc: _Member) -> None:
        """``proc`` is about to run the listeners of the rows it claimed (after
        :meth:`hand_out`): when a wake-up took the registration, the idle poller
        registers again at once, so that publishers wake the crew while ``proc`` is
        busy (they sent none until it rested: a message published meanwhile waited for
        its listeners, other processors idle: review 12 of issue 26). The poller itself,
        back from its last look with rows to run, hands its role on to an idle
        processor (which registers again if need be): busy, it would act on no change
        and claim nothing when due (review 13 of issue 26)."""
        with self._lock:
            if self._poller is proc:
                poller = self._poller = self._take(poller_ok=False)
                if poller is not None:
                    self._handed.add(id(poller))
            else:
                poller = None if self._registered or self._registering else self._nudge()
        if poller is not None:
            poller.wake.set()

    def rescheduled(self) -> None:
        """A member's committed transaction set a message to run later (a retry), or its
        claim ran out of tokens: the poller's due time may be too late; the idle
        poller asks again (or the next processor to rest)."""
        with self._lock:
            self._changes += 1
            poller = self._nudge()
        if poller is not None:
            poller.wake.set()

    def _nudge(self) -> _Member | None:
        """The idle poller, to be woken to rest again (under the lock): to register again
        after a wake-up took the registration, to ask again after a change. The others
        may be busy for as long as their listeners run (review 12 of issue 26)."""
        poller = self._poller
        if poller is None or poller not in self._idle:
            return None
        self._idle.remove(poller)
        self._nudged.add(id(poller))
        return poller

    def idle(self) -> int:
        """How many processors are idle now (:meth:`hand_out` may find fewer)."""
        with self._lock:
            return len(self._idle)

    def hand_out(self, shares: Sequence[Any]) -> int:
        """Hand ``shares`` to idle processors, one each, in order (``accept``), and wake
        them; how many were handed (the first ones: the caller keeps the others).

        Rows of a batch go to processors with nothing to do rather than wait for
        the claimer's listeners one after another. The poller is handed one last
        (it hands its role on as it wakes); a processor stopping, none (its stop
        may be giving up what it holds).
        """
        takers = []
        with self._lock:
            for share in shares:
                proc = self._take(ready=True)
                if proc is None:
                    break
                proc.accept(share)
                takers.append(proc)
        for proc in takers:
            proc.wake.set()
        return len(takers)

    def rest(
        self, proc: _Member, next_due: Callable[[], float], asleep: Callable[[], bool]
    ) -> bool:
        """``proc`` found nothing to claim: sleep until woken (the poller: until due).

        Returns when ``proc`` should claim: True when it is to look for messages
        published while the crew was busy (no wake-up for them), False when a
        wake-up woke it (a new message, a key or slot given back) or its poll
        is due. It looks when the crew has just registered as asleep (its last look)
        (``asleep()``: False while a publisher is in a transaction, which may
        have missed the registration: the crew then also looks again soon,
        from :data:`BUSY_POLL_FIRST` up to :data:`BUSY_POLL` seconds, for at
        most :data:`BUSY_PATIENCE` seconds without a wake-up).
        """
        while not proc.stopping.is_set():
            with self._lock:
                if self._missed:
                    self._missed = False
                    return False
                register = not self._registered and not self._registering
                self._registering = self._registering or register
                wakes = self._wakes
            busy = 0.0  # seconds until a look for a publisher that missed the registration
            if register:
                done = False
                try:
                    done = asleep()
                finally:
                    with self._lock:
                        self._registering = False
                        self._registered = done and wakes == self._wakes
                        if done:
                            self._busy_wait, self._busy_since = BUSY_POLL_FIRST, None
                            # Messages published while it was not registered sent no
                            # wake-up: some may be due before the poller's time.
                            self._changes += 1
                        else:
                            now = self._clock()
                            if self._busy_since is None:
                                self._busy_since = now
                            if now - self._busy_since < BUSY_PATIENCE:
                                busy = self._busy_wait
                                self._busy_wait = min(busy * 2, BUSY_POLL)
                if done:
                    return True  # the last look, now that publishers will wake the crew
            soon = None  # seconds until this one may ask again (ASK_AGAIN)
            with self._lock:
                now = self._clock()
                stale = self._polled != self._changes
                ready = now - self._asked >= ASK_AGAIN
                if self._poller is None or stale and ready:
                    # The poller's due time may be too late: this one asks again and
                    # polls (the one before sleeps once its wait ends).
                    self._poller = proc
                polling = self._poller is proc
                asking = polling and (ready or not stale)
                if asking:
                    self._polled, self._asked = self._changes, now
                elif stale:
                    soon = max(0.001, self._asked + ASK_AGAIN - now)
            try:
                wait = next_due() if asking else soon
                if busy:
                    wait = busy if wait is None else min(wait, busy)
            except BaseException:
                with self._lock:
                    if self._poller is proc:
                        self._poller = None
                raise
            with self._lock:
                if self._missed:  # a wake-up came meanwhile, none idle to take it
                    self._missed = False
                    return False
                if asking and self._polled != self._changes:
                    continue  # a change while it asked: ask again (after ASK_AGAIN)
                self._idle.append(proc)
            woken = proc.wake.wait(wait)
            proc.wake.clear()
            with self._lock:
                if proc in self._idle:
                    self._idle.remove(proc)
                handed = id(proc) in self._handed
                self._handed.discard(id(proc))
                nudged = id(proc) in self._nudged and not handed
                self._nudged.discard(id(proc))
                look = not woken and busy > 0 and wait == busy
                # a processor that waited for its turn to ask (ASK_AGAIN) asks now
                again = nudged or not (handed or look or woken or asking) and wait is not None
                successor = None
                if self._poller is proc and woken and not handed and not again:
                    # Woken to work: another idle processor polls meanwhile. (Off to
                    # claim what is due, it polls until its claim has rows to run,
                    # :meth:`working`: a successor that asked before the claim took them
                    # would find them due now and claim for nothing.)
                    self._poller = successor = self._take(poller_ok=False)
                    if successor is not None:
                        self._handed.add(id(successor))
            if successor is not None:
                successor.wake.set()
            if again:
                continue
            if not handed:
                return look  # a look beside a publisher in a transaction, when its wait ran out
        return False

    def _take(self, poller_ok: bool = True, ready: bool = False) -> _Member | None:
        """An idle processor to wake (the poller last: waking it hands its role on);
        ``ready``: not one that is stopping."""
        idle = [p for p in self._idle if not (ready and p.stopping.is_set())]
        for proc in reversed(idle):
            if proc is not self._poller or (poller_ok and len(idle) == 1):
                self._idle.remove(proc)
                return proc
        return None
