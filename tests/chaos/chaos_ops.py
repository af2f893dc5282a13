"""Operation sequences for the chaos tier: what users and faults do, generated from a seed.

A sequence is a list of small dataclasses, each printed as one readable line
(a failing run prints the sequence). :func:`generate` draws one from a seed,
deterministically; :mod:`chaos_run` executes it against real workers and
records every outcome; :mod:`chaos_check` judges the record.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

CHANNELS = ("chaos_work", "chaos_crew", "chaos_limited")
MAX_ATTEMPTS = 3  # the channels' max_attempts (chaos_listeners.RETRY)
POISON = 99  # fails every attempt
CREW_BURST = 16  # messages published to chaos_crew before each sequence (see generate)
TIMEOUT = 2.0  # chaos_limited's timeout (seconds)
# A listener this close to the timeout may or may not be stopped (the timer
# starts a moment before it): neither outcome is a violation.
TIMEOUT_SLACK = 0.1


@dataclass(frozen=True)
class Msg:
    """One message as published: its channel, behaviour and publishing options."""

    n: int
    channel: str = "chaos_work"
    behaviour: str = "ok"
    until: int = 0  # attempts that fail (POISON: all)
    sleep: float = 0.0
    delay: float | None = None
    run_at: float | None = None  # seconds after the call, as an absolute instant
    dedupe_key: str | None = None
    ordering_key: str | None = None
    priority: int = 0
    limit_key: str | None = None  # chaos_limited's key_concurrency

    @property
    def poison(self) -> bool:
        """It fails every attempt: by its behaviour, or by outlasting chaos_limited's timeout."""
        return (self.behaviour in FAILING and self.until >= MAX_ATTEMPTS) or self.times_out

    @property
    def times_out(self) -> bool:
        return (
            self.channel == "chaos_limited"
            and self.behaviour == "slow"
            and self.sleep >= TIMEOUT + TIMEOUT_SLACK
        )

    def __str__(self) -> str:
        parts = [f"n={self.n}", self.channel.removeprefix("chaos_"), self.behaviour]
        if self.behaviour in FAILING:
            parts.append("always" if self.poison else f"until={self.until}")
        if self.sleep:
            parts.append(f"sleep={self.sleep:.2f}")
        for name in ("delay", "run_at", "dedupe_key", "ordering_key", "limit_key"):
            value = getattr(self, name)
            if value is not None:
                parts.append(
                    f"{name}={value!r}" if isinstance(value, str) else f"{name}={value:.2f}"
                )
        if self.priority:
            parts.append(f"priority={self.priority}")
        return "(" + " ".join(parts) + ")"


FAILING = ("raise", "nul", "commit_fail", "crash")


@dataclass(frozen=True)
class Publish:
    msgs: tuple[Msg, ...]
    commit: bool = True
    pause: float = 0.0  # seconds inside the transaction, after its first message

    def __str__(self) -> str:
        end = "COMMIT" if self.commit else "ROLLBACK"
        pause = f" pause {self.pause:.2f}s," if self.pause else ""
        return f"publish[{', '.join(map(str, self.msgs))}]{pause} {end}"


@dataclass(frozen=True)
class Interleaved:
    """Two transactions on one key: ``first`` publishes first, ``second`` tries to commit first."""

    first: Msg
    second: Msg

    def __str__(self) -> str:
        return f"interleaved: BEGIN {self.first}; BEGIN {self.second}; COMMIT 2nd (try); COMMIT 1st"


@dataclass(frozen=True)
class Concurrent:
    """Publisher threads at once, each committing its messages one transaction each."""

    lanes: tuple[tuple[Msg, ...], ...]

    def __str__(self) -> str:
        return "concurrent publishers: " + " | ".join(
            "[" + ", ".join(map(str, lane)) + "]" for lane in self.lanes
        )


@dataclass(frozen=True)
class Wait:
    seconds: float
    paused: bool = False  # chaos_limited paused meanwhile (messages.pause, then resume)

    def __str__(self) -> str:
        return f"wait {self.seconds:.2f}s" + (" (chaos_limited paused)" if self.paused else "")


@dataclass(frozen=True)
class Kill:
    """A signal to a worker child (``target="worker"``) or to the supervisor."""

    target: str
    sig: str  # KILL or TERM
    pick: int = 0

    def __str__(self) -> str:
        return f"SIG{self.sig} {self.target}" + (
            f" #{self.pick}" if self.target == "worker" else ""
        )


@dataclass(frozen=True)
class Fault:
    """``terminate``: pg_terminate_backend of every worker session; ``restart``: the server."""

    kind: str

    def __str__(self) -> str:
        return {"terminate": "pg_terminate_backend(worker sessions)", "restart": "server restart"}[
            self.kind
        ]


@dataclass(frozen=True)
class Admin:
    """``replay`` / ``purge`` the dead messages, or ``cancel`` one published message."""

    kind: str
    pick: int = 0

    def __str__(self) -> str:
        return f"cancel published #{self.pick}" if self.kind == "cancel" else f"{self.kind} dead"


Op = Publish | Interleaved | Concurrent | Wait | Kill | Fault | Admin


@dataclass
class _Gen:
    rng: random.Random
    next_n: int = 1
    keys: tuple[str, ...] = ("k0", "k1", "k2")
    counts: dict[str, int] = field(default_factory=dict)

    def msg(self, key: str | None = None, channel: str | None = None) -> Msg:
        r = self.rng
        n, self.next_n = self.next_n, self.next_n + 1
        channel = channel or ("chaos_limited" if r.random() < 0.25 else "chaos_work")
        if key is None and r.random() < 0.4:
            key = r.choice(self.keys)
        # Keyed messages are slower and fail more: the interleavings that matter
        # for ordering (a retry, a dead head replayed) need time to overlap in.
        weights = [25, 35, 20, 5, 5, 5] if key else [45, 14, 12, 6, 6, 7]
        behaviour = r.choices(["ok", "slow", "raise", "nul", "commit_fail", "crash"], weights)[0]
        until = (
            r.choice([1, 2, POISON] if key else [1, 1, 2, POISON]) if behaviour in FAILING else 0
        )
        sleep = round(r.uniform(0.5, 2.5) if key else r.uniform(0.3, 1.5), 2)
        sleep = sleep if behaviour == "slow" else 0.0
        delay = run_at = None
        roll = r.random()
        if roll < 0.15:
            delay = round(r.uniform(0.2, 1.5), 2)
        elif roll < 0.2:
            run_at = round(r.uniform(0.2, 1.5), 2)
        return Msg(
            n=n,
            channel=channel,
            behaviour=behaviour,
            until=until,
            sleep=sleep,
            delay=delay,
            run_at=run_at,
            dedupe_key=r.choice(["d0", "d1"]) if r.random() < 0.1 else None,
            ordering_key=key,
            priority=r.randint(-5, 5) if r.random() < 0.2 else 0,
            # Drawn from n, not the generator: the seeds' sequences stay as they were.
            # Half of them (a key_concurrency slot of a killed worker holds its key
            # for the lease's 10 s: the others keep the run short).
            limit_key=f"L{n // 2 % 2}" if channel == "chaos_limited" and n % 2 else None,
        )

    def op(self) -> Op:
        r = self.rng
        kind = r.choices(
            [
                "publish", "wait", "interleaved", "concurrent", "kill_worker", "term_worker",
                "kill_supervisor", "term_supervisor", "terminate", "restart", "replay",
                "cancel", "purge",
            ],
            [30, 16, 4, 4, 5, 3, 2, 2, 5, 2, 14, 4, 2],
        )[0]  # fmt: skip
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind == "publish":
            size = r.choice([1, 1, 2, 3, 5, 8, 12])
            msgs = tuple(self.msg() for _ in range(size))
            if msgs[0].n % 3:
                # Two publishes in three (drawn from n, not the generator: the seeds'
                # sequences stay as they were) go to the channel whose batches are
                # handed out, their chaos_work messages all there.
                msgs = tuple(
                    dataclasses.replace(m, channel="chaos_crew") if m.channel == "chaos_work" else m
                    for m in msgs
                )
            return Publish(
                msgs,
                commit=r.random() < 0.85,
                pause=round(r.uniform(0.3, 0.6), 2) if size > 1 and r.random() < 0.25 else 0.0,
            )
        if kind == "wait":
            seconds = round(r.uniform(0.1, 1.5), 2)
            # Paused or not drawn from the seconds, not the generator: the seeds'
            # sequences stay as they were.
            return Wait(seconds, paused=round(seconds * 100) % 3 == 0)
        if kind == "interleaved":
            key = r.choice(self.keys)
            first, second = self.msg(key, "chaos_work"), self.msg(key, "chaos_work")
            # One thread holds both transactions: a shared dedupe key would wait forever.
            return Interleaved(first, dataclasses.replace(second, dedupe_key=None))
        if kind == "concurrent":
            return Concurrent(
                tuple(
                    tuple(self.msg(f"c{lane}" if r.random() < 0.5 else None) for _ in range(4))
                    for lane in range(3)
                )
            )
        if kind in ("kill_worker", "term_worker"):
            return Kill("worker", "KILL" if kind == "kill_worker" else "TERM", r.randrange(8))
        if kind in ("kill_supervisor", "term_supervisor"):
            return Kill("supervisor", "KILL" if kind == "kill_supervisor" else "TERM")
        if kind in ("terminate", "restart"):
            return Fault(kind)
        return Admin(kind, r.randrange(1000))


def generate(seed: int, steps: int) -> list[Op]:
    """The operation sequence of ``seed``: the same seed always gives the same sequence."""
    gen = _Gen(random.Random(seed))
    ops = [gen.op() for _ in range(steps)]
    # First, a burst on chaos_crew (its numbers after the sequence's, drawn from nothing:
    # the seeds' sequences stay as they were): its processors learn their listeners'
    # pace and grow their claims (one message at first), so that later claims are
    # handed out among them.
    burst = tuple(Msg(n=gen.next_n + i, channel="chaos_crew") for i in range(CREW_BURST))
    return [Publish(burst), *ops]
