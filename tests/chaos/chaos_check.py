"""The contract of durable channels, checked against the record of one chaos run.

:func:`check` returns the violations, each a line starting with its kind:

* ``duplicate`` / ``lost`` / ``ran-uncommitted``: every committed message's
  effect exactly once, unless it was cancelled before running, ended cancelled
  after its cancel found it in a worker's hands (its listener asked to stop), or
  is dead;
  nothing of a rolled-back or deduplicated publish ever runs.
* ``early``: no listener starts before the message's ``delay``/``run_at``,
  counted from the publishing call.
* ``ordering-overlap`` / ``ordering-order``: per ordering key, never two
  messages in listeners at once, and completions in the order the publishers
  committed (messages that were dead at some point excepted from the order).
* ``double-run``: one message in two listeners at once (a worker whose session
  died still running it when another claims it).
* ``max-in-flight``: never more than ``max_in_flight`` listeners of the
  limited channel at once.
* ``key-concurrency``: never more than ``key_concurrency`` listeners of one
  limit_key of the limited channel at once (a slot outlives a killed session).
* ``rate``: never more claims of the limited channel in any period than its
  ``rate_limit`` and its bucket's capacity, nor of one limit_key than its
  ``key_rate_limit`` and bucket (claims that reached a listener: each start
  says when its message was claimed).
* ``paused-start``: no message of the limited channel claimed while it was
  paused (from a moment after the pause's commit to the resume).
* ``charged-innocent``: only a message that fails on its own reaches
  ``max_attempts``: a message that never reached a listener is never dead, and
  one that fails fewer times than the limit dies only when injected faults (a
  kill, a killed session, a restart) during its life make up the difference.
* ``cancelled-ran``: a cancelled message never takes effect.
* ``stuck``: every message done, dead or cancelled within the settle bound.
* ``batch``: each batch (publishes without options) has one callback once its
  members settled, its counts adding up (done at most the members that took
  effect, dead at most those ever dead).
* ``result``: a done message of the results channel (chaos_work) has the result
  its committed attempt returned (that attempt's process), and no other has one.
* timeouts: a chaos_limited listener past the channel's ``timeout`` is
  stopped; one that always outlasts it must end dead (``lost`` otherwise),
  and a stopped attempt is its own failure.
* ``tick``: each schedule tick stored once, never run before its instant.
* ``shutdown``: a supervisor stopped by SIGTERM exits 0.
* ``orphan``: no worker outlives its supervisor (SIGKILLed or not).
"""

from __future__ import annotations

import bisect
import datetime
from collections import Counter, defaultdict
from dataclasses import dataclass

from chaos_ops import MAX_ATTEMPTS, TIMEOUT, TIMEOUT_SLACK
from chaos_run import Published, Record

LIMIT = 2  # chaos_channels.Limited.max_in_flight
KEY_LIMIT = 1  # chaos_channels.Limited.key_concurrency
RATE = (20, 1.0, 2)  # chaos_channels.Limited.rate_limit: N, period, capacity
KEY_RATE = (4, 1.0, 1)  # chaos_channels.Limited.key_rate_limit, per limit_key
# The instant a claim records is its UPDATE's, a moment after it took its token
# (a claim slowed down by a loaded machine): one claim of slack.
RATE_SLACK = 1
# A claim whose statement began before the pause committed may record an
# instant after it (its snapshot did not see the pause).
PAUSE_SLACK = datetime.timedelta(milliseconds=250)
EPSILON = datetime.timedelta(milliseconds=1)
LEASE = datetime.timedelta(seconds=2)  # longer than any retry delay of the chaos channels


@dataclass
class Attempt:
    channel: str
    n: int
    pid: int
    start: datetime.datetime
    end: datetime.datetime
    ended: bool  # an end record exists (else: cut at the fault that killed its process)
    outcome: str | None


def attempts(record: Record) -> list[Attempt]:
    """Each listener run, its start paired with the next end of the same message in its pid."""
    open_: dict[tuple[str, int, int], datetime.datetime] = {}
    done: list[Attempt] = []
    for kind, channel, n, pid, at, _, detail in record.history:
        if n is None:
            continue  # schedule ticks: checked through their effects
        key = (channel, n, pid)
        if kind == "start":
            open_[key] = at
        elif kind == "end" and key in open_:
            done.append(Attempt(channel, n, pid, open_.pop(key), at, True, detail))
    deaths: dict[int, list[datetime.datetime]] = defaultdict(list)
    last: dict[int, datetime.datetime] = {}
    for kind, _, _, pid, at, _, detail in record.history:
        last[pid] = max(at, last.get(pid, at))
        if kind == "end" and detail == "crash":
            deaths[pid].append(at)  # a listener of this process SIGKILLed it
    for (channel, n, pid), start in open_.items():
        # No end: its process died (a fault, or a crashing listener in another of
        # its threads). It ran until then; failing that, until the process's last record.
        cut = [f.end for f in record.faults if f.end >= start and (f.pids is None or pid in f.pids)]
        cut += [at for at in deaths[pid] if at >= start]
        end = min(cut) if cut else last.get(pid, start)
        done.append(Attempt(channel, n, pid, start, end, False, None))
    return done


def _charges_excused(
    record: Record, p: Published, tries: list[Attempt], runs: list[Attempt]
) -> int:
    """Attempts an injected fault, or another message's listener killing its process,
    may have cost the message (its own runs, or its claim).

    A fault while the message was claimed but not yet in a listener (a killed
    worker's batch) leaves no trace in the history: every fault from its
    publication to shortly after its last run counts, an upper bound. A
    batch-mate's crash may cost it one attempt (then it is claimed alone: the
    issue's "charged at most one extra attempt"): counted once.
    """
    start = p.called or datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    end = max((a.end for a in tries), default=start) + LEASE
    faults = sum(1 for f in record.faults if start <= f.end and f.start <= end)
    crashes = any(
        a.n != p.msg.n and a.outcome == "crash" and start <= a.end and a.start <= end
        for a in runs
    )
    return faults + crashes


def check(record: Record) -> list[str]:
    v: list[str] = []
    runs = attempts(record)
    by_n: dict[int, list[Attempt]] = defaultdict(list)
    for a in runs:
        by_n[a.n].append(a)
    effects = Counter(n for channel, n, *_ in record.effects if n is not None)
    effect_at = {n: at for channel, n, _, at, _ in record.effects if n is not None}
    id_of = record.by_id()
    final = {id_of[i]: status for i, _, status, _, _ in record.rows if i in id_of}
    errors = {id_of[i]: err for i, _, _, _, err in record.rows if i in id_of}
    dead = {n for n, s in final.items() if s == "dead"} | record.purged
    ever_dead = dead | record.replayed

    for n in effects:
        if n not in record.published:
            v.append(f"ran-uncommitted: an effect of n={n}, never published")
    for n, p in sorted(record.published.items()):
        m = p.msg
        if not p.committed or p.deduped:
            why = "rolled back" if not p.committed else f"deduplicated into id {p.id}"
            if effects[n] or by_n.get(n):
                v.append(f"ran-uncommitted: n={n} ({why}) ran {len(by_n.get(n, []))} time(s)")
            continue
        if effects[n] > 1:
            v.append(f"duplicate: n={n} {m} took effect {effects[n]} times")
        if n in record.cancelled:
            if effects[n]:
                v.append(f"cancelled-ran: n={n} was cancelled but took effect")
            continue
        if n in record.cancel_asked and not effects[n] and n not in final:
            continue  # asked to stop in a worker's hands, it ended cancelled
        if n in dead:
            if effects[n]:
                v.append(f"duplicate: n={n} is dead but took effect")
            tries = by_n.get(n, [])
            last = (errors.get(n) or "").strip().splitlines()[-1:]
            why = f"; its error: {last[0][:160]!r}" if last else ""
            if not tries:
                v.append(f"charged-innocent: n={n} {m} is dead but never reached a listener{why}")
            elif not m.poison:
                own = sum(1 for a in tries if a.outcome in ("raise", "commit_fail", "crash"))
                # Stopped by chaos_limited's timeout (its end may say so, or come
                # just before the timer fired).
                own += sum(
                    1
                    for a in tries
                    if a.outcome == "stopped"
                    or a.channel == "chaos_limited"
                    and a.ended
                    and a.outcome == "ok"
                    and a.end - a.start >= datetime.timedelta(seconds=TIMEOUT - TIMEOUT_SLACK)
                )
                excused = _charges_excused(record, p, tries, runs)
                if own + excused < MAX_ATTEMPTS:
                    v.append(
                        f"charged-innocent: n={n} {m} failed {own} of its {len(tries)} "
                        f"listener run(s) and is dead, with {excused} "
                        f"fault(s) injected in its lifetime{why}"
                    )
            continue
        if final.get(n) == "pending":
            v.append(f"stuck: n={n} {m} still pending after the settle bound")
        elif not effects[n]:
            v.append(f"lost: n={n} {m} is gone without its effect")
        elif m.poison:
            v.append(f"lost: n={n} {m} always fails but completed")

    # Nothing before its time (counted from the publishing call).
    for n, p in record.published.items():
        if p.not_before is None or n in record.replayed:
            continue
        for a in by_n.get(n, []):
            if a.start < p.not_before - EPSILON:
                early = (p.not_before - a.start).total_seconds()
                v.append(f"early: n={n} {p.msg} started {early:.3f}s before its time")

    # Per ordering key: one in a listener at once, in commit order.
    keyed: dict[tuple[str, str], list[int]] = defaultdict(list)  # per channel and key
    for n, p in record.published.items():
        if p.committed and not p.deduped and p.msg.ordering_key is not None:
            keyed[p.msg.channel, p.msg.ordering_key].append(n)
    for key, ns in sorted(keyed.items()):
        spans = sorted((a for n in ns for a in by_n.get(n, [])), key=lambda a: a.start)
        for i, a in enumerate(spans):
            for b in spans[i + 1 :]:
                if b.start >= a.end:
                    break
                if a.n == b.n:
                    v.append(
                        f"double-run: n={a.n} (key {key!r}) in two listeners at once "
                        f"(pids {a.pid} and {b.pid})"
                    )
                else:
                    v.append(
                        f"ordering-overlap: key {key!r}: n={a.n} (pid {a.pid}) and n={b.n} "
                        f"(pid {b.pid}) in listeners at once"
                    )
        order = sorted(
            (n for n in ns if effects[n] and n not in ever_dead and n not in record.cancelled),
            key=lambda n: record.published[n].seq or 0,
        )
        for x, y in zip(order, order[1:], strict=False):
            if effect_at[y] < effect_at[x]:
                v.append(
                    f"ordering-order: key {key!r}: n={y} completed before n={x}, "
                    "which its publisher committed first"
                )

    # max_in_flight across every worker.
    limited = [a for a in runs if a.channel == "chaos_limited" and a.end > a.start]
    # At one instant an end comes before a start: touching runs do not overlap.
    events = sorted([(a.start, 1, i) for i, a in enumerate(limited)]
                    + [(a.end, 0, i) for i, a in enumerate(limited)])  # fmt: skip
    inside: set[int] = set()
    worst = LIMIT
    for at, starting, i in events:
        if not starting:
            inside.discard(i)
            continue
        inside.add(i)
        if len(inside) > worst:
            worst = len(inside)
            who = sorted(f"n={limited[j].n}/pid {limited[j].pid}" for j in inside)
            v.append(f"max-in-flight: {len(inside)} > {LIMIT} in listeners at {at}: {who}")

    # Results (chaos_work keeps them): a done message's is the one its committed effect's
    # attempt returned (same process), stored in the same transaction; no other has one.
    effect_pid = {n: pid for channel, n, pid, _, _ in record.effects if n is not None}
    for mid, result in sorted(record.results.items()):
        n = id_of.get(mid)
        if n is None:
            continue
        if final.get(n) == "done":
            if result != {"n": n, "pid": effect_pid.get(n)}:
                v.append(f"result: n={n} is done with result {result!r}, its effect's pid "
                         f"{effect_pid.get(n)}")  # fmt: skip
        elif result is not None:
            v.append(f"result: n={n} is {final.get(n)} with result {result!r}")

    # Batches (publishes without options): once every member settled, one callback, whose
    # counts are the members' statuses when the last one settled (a dead member replayed
    # after that stays counted dead; one replayed before counts by its new outcome).
    for batch_id, ns in sorted(record.batches.items()) if record.settled is not None else []:
        got = [c for c in record.callbacks if c["id"] == batch_id]
        if len(got) != 1:
            v.append(f"batch: batch {batch_id} (n={list(ns)}) has {len(got)} callbacks")
            continue
        dead_ones = sum(1 for n in ns if n in ever_dead)
        done_ones = sum(1 for n in ns if effects[n])
        c = got[0]
        if (
            c["total"] != len(ns)
            or c["done"] + c["dead"] + c["cancelled"] != len(ns)
            or c["done"] > done_ones
            or c["dead"] > dead_ones
            or min(c["done"], c["dead"], c["cancelled"]) < 0
        ):
            v.append(f"batch: batch {batch_id} (n={list(ns)}) counted {c}, with "
                     f"{done_ones} member(s) that took effect, {dead_ones} ever dead")  # fmt: skip
    # key_concurrency across every worker: per limit_key, as max_in_flight.
    by_limit: dict[str, list[Attempt]] = defaultdict(list)
    for a in limited:
        p = record.published.get(a.n)
        if p is not None and p.msg.limit_key is not None:
            by_limit[p.msg.limit_key].append(a)
    for key, spans in sorted(by_limit.items()):
        events = sorted([(a.start, 1, i) for i, a in enumerate(spans)]
                        + [(a.end, 0, i) for i, a in enumerate(spans)])  # fmt: skip
        inside = set()
        for at, starting, i in events:
            if not starting:
                inside.discard(i)
                continue
            inside.add(i)
            if len(inside) > KEY_LIMIT:
                who = sorted(f"n={spans[j].n}/pid {spans[j].pid}" for j in inside)
                v.append(
                    f"key-concurrency: limit_key {key!r}: {len(inside)} > {KEY_LIMIT} "
                    f"in listeners at {at}: {who}"
                )

    # rate_limit and key_rate_limit across every worker: claims in any period, of
    # the channel and per limit_key; and none while the channel was paused.
    claims: dict[str | None, set[tuple[int, datetime.datetime]]] = defaultdict(set)
    for kind, channel, n, _, _, _, detail in record.history:
        p = record.published.get(n) if n is not None else None
        if kind == "start" and channel == "chaos_limited" and detail and p is not None:
            at = datetime.datetime.fromisoformat(detail)
            # A batch run again alone (its COMMIT failed) starts twice on one claim.
            claims[None].add((n, at))
            if p.msg.limit_key is not None:
                claims[p.msg.limit_key].add((n, at))
    for key, seen in sorted(claims.items(), key=lambda kv: kv[0] or ""):
        count, period, capacity = KEY_RATE if key is not None else RATE
        what = f"limit_key {key!r}" if key is not None else "chaos_limited"
        times = sorted(at for _, at in seen)
        span = datetime.timedelta(seconds=period)
        for i, first in enumerate(times):
            inside = bisect.bisect_right(times, first + span) - i
            if inside > count + capacity + RATE_SLACK:
                v.append(
                    f"rate: {what}: {inside} claims in {period:g}s from {first} "
                    f"(at most {count} + {capacity})"
                )
                break
    for paused_at, resumed_at in record.pauses:
        for n, at in sorted(claims[None]):
            if paused_at + PAUSE_SLACK < at < resumed_at:
                v.append(
                    f"paused-start: n={n} of chaos_limited claimed at {at}, while paused "
                    f"from {paused_at} to {resumed_at}"
                )

    if record.settled is None:
        v.append("stuck: messages still pending when the settle bound ran out")

    ticks = Counter(tick for channel, _, _, _, tick in record.effects if channel == "chaos_tick")
    for tick, count in ticks.items():
        if tick is not None and count > 1:
            v.append(f"tick: {tick} ran {count} times")
    for channel, _, _, at, tick in record.effects:
        if channel == "chaos_tick" and tick is not None and at < tick:
            v.append(f"tick: {tick} ran at {at}, before its instant")

    for pid in record.orphans:
        v.append(f"orphan: worker pid {pid} still ran after every supervisor had exited")
    for code in record.stop_codes:
        if code != 0:
            v.append(f"shutdown: a supervisor stopped with SIGTERM exited {code}")
    return list(dict.fromkeys(v))  # one line per distinct violation


def kinds(violations: list[str]) -> set[str]:
    return {line.split(":", 1)[0] for line in violations}
