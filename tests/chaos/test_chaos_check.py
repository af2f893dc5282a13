"""The chaos checker on histories written by hand: it flags each broken rule, and only those."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from chaos_check import check, kinds
from chaos_ops import POISON, Msg
from chaos_run import FaultRecord, Published, Record

pytestmark = pytest.mark.unit

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
WORK, LIMITED = "chaos_work", "chaos_limited"


def t(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


class History:
    """A record being written: publishes, listener runs, effects, final rows."""

    def __init__(self) -> None:
        self.record = Record(settled=1.0)

    def publish(self, n: int, committed: bool = True, **fields: Any) -> None:
        msg = Msg(n, **fields)
        self.record.published[n] = Published(
            msg, id=n, committed=committed, called=t(0), seq=n if committed else None
        )

    def run(self, n: int, start: float, end: float | None, pid: int = 1, channel: str = WORK,
            outcome: str = "ok", effect: bool = True) -> None:  # fmt: skip
        self.record.history.append(("start", channel, n, pid, t(start), None, None))
        if end is not None:
            self.record.history.append(("end", channel, n, pid, t(end), None, outcome))
            if outcome == "ok" and effect:
                self.record.effects.append((channel, n, pid, t(end), None))

    def dead(self, n: int, error: str = "RuntimeError") -> None:
        self.record.rows.append((n, WORK, "dead", 3, error))

    def check(self) -> list[str]:
        return check(self.record)


def test_a_clean_history_passes() -> None:
    h = History()
    h.publish(1, ordering_key="k")
    h.publish(2, ordering_key="k")
    h.publish(3, channel=LIMITED)
    h.publish(4, behaviour="raise", until=POISON)
    h.publish(5, committed=False)
    h.run(1, 0.0, 1.0)
    h.run(2, 1.0, 2.0)  # touching is not overlapping
    h.run(3, 0.5, 0.7, channel=LIMITED)
    for start in (0.0, 0.3, 0.8):
        h.run(4, start, start + 0.1, outcome="raise")
    h.dead(4)
    assert h.check() == []


def test_an_effect_twice_a_missing_effect_and_a_rolled_back_run_are_flagged() -> None:
    h = History()
    h.publish(1)
    h.publish(2)
    h.publish(3, committed=False)
    h.run(1, 0.0, 0.1)
    h.run(1, 0.2, 0.3)
    h.run(3, 0.0, 0.1)
    assert kinds(h.check()) == {"duplicate", "lost", "ran-uncommitted"}


def test_two_messages_of_a_key_at_once_and_one_message_twice_at_once() -> None:
    h = History()
    h.publish(1, ordering_key="k")
    h.publish(2, ordering_key="k")
    h.run(1, 0.0, 1.0, pid=1)
    h.run(2, 0.5, 1.5, pid=2)
    assert kinds(h.check()) == {"ordering-overlap"}

    h = History()
    h.publish(1, ordering_key="k")
    h.run(1, 0.0, 1.0, pid=1, effect=False)
    h.run(1, 0.5, 1.5, pid=2)
    assert kinds(h.check()) == {"double-run"}


def test_completions_out_of_commit_order_are_flagged() -> None:
    h = History()
    h.publish(1, ordering_key="k")
    h.publish(2, ordering_key="k")
    h.record.published[1].seq, h.record.published[2].seq = 2, 1  # 2 committed first
    h.run(1, 0.0, 0.1)
    h.run(2, 0.2, 0.3)
    assert kinds(h.check()) == {"ordering-order"}


def test_more_than_max_in_flight_is_flagged_and_a_killed_run_ends_at_its_crash() -> None:
    h = History()
    for n in (1, 2, 3):
        h.publish(n, channel=LIMITED)
    h.run(1, 0.0, 1.0, channel=LIMITED)
    h.run(2, 0.1, 1.0, channel=LIMITED)
    h.run(3, 0.9, 1.2, channel=LIMITED)
    assert kinds(h.check()) == {"max-in-flight"}

    h = History()
    for n in (1, 2, 3):
        h.publish(n, channel=LIMITED)
    # Run 1 never ended: a listener of its process crashed at 0.2, so it ran until then.
    h.run(1, 0.0, None, pid=7, channel=LIMITED)
    h.record.history.append(("end", WORK, 99, 7, t(0.2), None, "crash"))
    h.run(1, 0.5, 1.0, pid=8, channel=LIMITED)
    h.run(2, 0.5, 1.0, channel=LIMITED)
    h.run(3, 0.6, 1.0, channel=LIMITED)
    assert kinds(h.check()) == {"max-in-flight"}  # 1, 2 and 3 from 0.6 on; not before


def test_only_failing_messages_may_be_dead() -> None:
    h = History()
    h.publish(1)  # innocent, never run, dead: charged for a neighbour
    h.publish(2, behaviour="raise", until=1)  # failed once, ran twice, dead
    h.run(2, 0.0, 0.1, outcome="raise")
    h.run(2, 0.3, 0.4, outcome="ok", effect=False)
    h.dead(1, "the process handling it stopped before it completed, 3 times")
    h.dead(2)
    found = h.check()
    assert kinds(found) == {"charged-innocent"} and len(found) == 2
    assert "never reached a listener" in found[0]

    # Two faults injected in its life may each have cost message 2 an attempt.
    for at in (0.05, 0.35):
        h.record.faults.append(FaultRecord("SIGKILL worker", t(at), t(at), frozenset([1])))
    assert len(h.check()) == 1  # message 1 never ran: no fault excuses that


def test_early_start_and_stuck_messages() -> None:
    h = History()
    h.publish(1, delay=1.0)
    h.record.published[1].not_before = t(1.0)
    h.run(1, 0.5, 0.6)
    h.publish(2)
    h.record.rows.append((2, WORK, "pending", 1, None))
    assert kinds(h.check()) == {"early", "stuck"}


def test_a_result_other_than_the_committed_attempts_is_flagged() -> None:
    h = History()
    for n in (1, 2, 3, 4):
        h.publish(n)
        h.run(n, 0.0, 1.0, pid=7)
        h.record.rows.append((n, WORK, "done", 1, None))
    h.publish(5, behaviour="raise", until=POISON)
    h.run(5, 0.0, 1.0, pid=7, outcome="raise")
    h.dead(5)
    h.record.results = {1: {"n": 1, "pid": 7}, 2: None, 3: {"n": 3, "pid": 8}}
    h.record.results |= {4: {"n": 4, "pid": 7}, 5: {"n": 5, "pid": 7}}
    found = h.check()
    assert kinds(found) == {"result"}
    assert [line.split()[1] for line in found] == ["n=2", "n=3", "n=5"]


def test_a_batch_without_one_callback_or_with_wrong_counts_is_flagged() -> None:
    h = History()
    for n in range(1, 7):
        h.publish(n)
    for n in (1, 2, 4, 5):
        h.run(n, 0.0, 1.0)
    h.run(3, 0.0, 1.0, outcome="raise")
    h.dead(3)
    h.record.replayed.add(5)  # dead once, then replayed and done: either
    h.record.batches = {10: (1, 2, 3), 11: (4, 5), 12: (6,), 13: (3,)}
    h.record.callbacks = [
        {"id": 10, "total": 3, "done": 2, "dead": 1, "cancelled": 0},
        {"id": 11, "total": 2, "done": 1, "dead": 1, "cancelled": 0},
        {"id": 13, "total": 1, "done": 1, "dead": 0, "cancelled": 0},  # 3 took no effect
        {"id": 12, "total": 1, "done": 0, "dead": 0, "cancelled": 1},
        {"id": 12, "total": 1, "done": 0, "dead": 0, "cancelled": 1},  # twice
    ]
    found = [line for line in h.check() if line.startswith("batch")]
    assert [line.split()[2] for line in found] == ["12", "13"], found
def test_more_than_key_concurrency_of_one_limit_key_is_flagged() -> None:
    h = History()
    for n, key in ((1, "L1"), (2, "L0"), (3, "L1")):
        h.publish(n, channel=LIMITED, limit_key=key)
    h.run(1, 0.0, 1.0, channel=LIMITED)
    h.run(2, 0.1, 0.5, channel=LIMITED)  # another key: allowed
    h.run(3, 1.0, 1.5, channel=LIMITED)  # touching: allowed
    assert h.check() == []
    h.run(3, 0.9, 1.0, pid=2, channel=LIMITED, effect=False, outcome="raise")
    assert kinds(h.check()) == {"key-concurrency"}


def test_more_claims_of_one_limit_key_than_its_rate_are_flagged() -> None:
    def claims(h: History, key: str, at: list[float], first: int) -> None:
        for i, c in enumerate(at):
            n = first + i
            h.publish(n, channel=LIMITED, limit_key=key)
            h.record.history.append(
                ("start", LIMITED, n, 1, t(c + 0.01), None, t(c).isoformat())
            )
            h.record.history.append(("end", LIMITED, n, 1, t(c + 0.02), None, "ok"))
            h.record.effects.append((LIMITED, n, 1, t(c + 0.02), None))

    h = History()
    claims(h, "L0", [i * 0.25 for i in range(12)], 1)  # 4/s: 5 in a second, at most
    claims(h, "L1", [i * 0.25 for i in range(12)], 100)  # another key: its own bucket
    assert h.check() == []
    h = History()
    claims(h, "L0", [i * 0.15 for i in range(12)], 1)  # 6.7/s
    assert kinds(h.check()) == {"rate"}
    h = History()  # the channel: 20/s, a bucket of 2
    for k in range(6):
        claims(h, f"K{k}", [k * 0.04 + i * 0.25 for i in range(4)], 100 * (k + 1))
    assert kinds(h.check()) == {"rate"}  # 24 a second


def test_a_claim_while_the_channel_was_paused_is_flagged() -> None:
    def history(second: float) -> History:
        h = History()
        for n, claimed in ((1, 0.5), (2, second), (3, 2.6)):
            h.publish(n, channel=LIMITED)
            at = t(claimed).isoformat()
            h.record.history.append(("start", LIMITED, n, 1, t(claimed), None, at))
            h.record.history.append(("end", LIMITED, n, 1, t(claimed + 0.01), None, "ok"))
            h.record.effects.append((LIMITED, n, 1, t(claimed + 0.01), None))
        h.record.pauses.append((t(1.0), t(2.5)))
        return h

    assert kinds(history(1.5).check()) == {"paused-start"}  # n=2; n=1 before, n=3 after
    # A claim whose statement began before the pause's commit: within the slack.
    assert history(1.1).check() == []


def test_a_message_whose_cancel_found_it_in_a_workers_hands_may_end_cancelled() -> None:
    """A cancel that finds its message in a worker's hands asks its listener to stop (it
    returns 0, the message in ``stopping``): the message then ends cancelled (gone, no
    effect, perhaps before its listener started) or completes first, once. The run
    recorded only cancels of pending messages, and the crew channel's seed 5 was
    flagged lost for a message that ended cancelled as documented."""
    h = History()
    for n in (1, 2, 3, 4):
        h.publish(n)
    h.record.cancel_asked.update({1, 2, 3})
    h.run(2, 0.0, 1.0)  # completed before the stop came: once
    h.run(3, 0.0, 0.5)
    h.run(3, 0.6, 1.0)  # ... but not twice
    assert sorted(h.check()) == [
        "duplicate: n=3 (n=3 work ok) took effect 2 times",
        "lost: n=4 (n=4 work ok) is gone without its effect",
    ]
