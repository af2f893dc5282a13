"""The chaos tier: model-based fault injection against real workers and a real server.

Each seed draws a sequence of operations (:mod:`chaos_ops`: publishes of every
kind, listeners that fail in every way, killed workers and supervisors, killed
sessions, a server restart, replay, cancel and purge), runs it on a fresh
database (:mod:`chaos_run`) and checks the contract on what happened
(:mod:`chaos_check`). A failing seed is shrunk (operations removed while the
same kind of violation still shows) and the shortest failing sequence printed.

CI runs :data:`CI_SEEDS`; ``--chaos-budget=30m`` runs random seeds for that
long and prints the operation and fault counts.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from chaos_check import check, kinds
from chaos_ops import POISON, Admin, Fault, Kill, Msg, Op, Publish, Wait, generate
from chaos_run import Record, Run
from helpers import Server

pytestmark = pytest.mark.chaos

#: Fixed seeds for CI: on the code before the fixes 2 found crash-charges-the-batch,
#: 3 and 5 the ordering and delay defects, 18 and 19 (supervisor kills) the
#: supervisor's start races; they pass on the fixed code.
CI_SEEDS = [2, 3, 5, 18, 19]
CI_STEPS = 20
LONG_STEPS = 40
#: Seconds spent shrinking a failure (CI / long mode).
SHRINK_CI = 60.0
SHRINK_LONG = 300.0

_databases = itertools.count()


def run_ops(server: Server, logdir: Path, ops: list[Op]) -> tuple[Record, list[str]]:
    run = Run.create(server, f"pgpubsub_chaos_{os.getpid()}_{next(_databases)}", logdir)
    try:
        record = run.execute(ops)
    finally:
        run.close()
    return record, check(record)


def shrink(
    server: Server, logdir: Path, ops: list[Op], wanted: set[str], budget: float
) -> tuple[list[Op], list[str]]:
    """Remove chunks of operations, then messages of publishes, while a ``wanted`` kind shows.

    Runs are real (processes, timing), so a smaller sequence is kept only when
    it failed when run; the time budget bounds the search.
    """
    deadline = time.monotonic() + budget
    best, best_violations = ops, []
    size = max(1, len(ops) // 2)
    while size >= 1 and time.monotonic() < deadline:
        start, changed = 0, False
        while start < len(best) and time.monotonic() < deadline:
            candidate = best[:start] + best[start + size :]
            if not candidate:
                start += size
                continue
            _, violations = run_ops(server, logdir, candidate)
            if kinds(violations) & wanted:
                best, best_violations, changed = candidate, violations, True
            else:
                start += size
        if not changed:
            size //= 2
    # Then the messages of each publish, one at a time.
    i = 0
    while i < len(best) and time.monotonic() < deadline:
        op = best[i]
        j = 0
        while isinstance(op, Publish) and len(op.msgs) > 1 and j < len(op.msgs):
            if time.monotonic() >= deadline:
                break
            smaller = dataclasses.replace(op, msgs=op.msgs[:j] + op.msgs[j + 1 :])
            candidate = [*best[:i], smaller, *best[i + 1 :]]
            _, violations = run_ops(server, logdir, candidate)
            if kinds(violations) & wanted:
                best, best_violations, op = candidate, violations, smaller
            else:
                j += 1
        i += 1
    return best, best_violations


#: The kind a failure is shrunk for: the first of these it shows.
SEVERITY = [
    "duplicate", "lost", "ran-uncommitted", "cancelled-ran", "charged-innocent",
    "ordering-overlap", "double-run", "max-in-flight", "key-concurrency", "rate", "paused-start",
    "ordering-order", "tick", "stuck",
    "early", "shutdown", "orphan",
]  # fmt: skip


def explain(label: str, ops: list[Op], violations: list[str]) -> str:
    lines = [f"{label}: {len(violations)} violation(s)"]
    lines += [f"  {v}" for v in violations[:30]]
    lines.append(f"operations ({len(ops)}):")
    lines += [f"  {i:2}. {op}" for i, op in enumerate(ops, 1)]
    return "\n".join(lines)


def fail_with(server: Server, logdir: Path, seed: int, ops: list[Op], violations: list[str],
              budget: float) -> None:  # fmt: skip
    report = explain(f"seed {seed}", ops, violations)
    found = kinds(violations)
    target = next(k for k in [*SEVERITY, *sorted(found)] if k in found)
    small, small_violations = shrink(server, logdir, ops, {target}, budget)
    if small_violations and len(small) < len(ops):
        shrunk = explain(f"seed {seed}", small, small_violations)
        report += f"\n\nshrunk for {target!r} to:\n{shrunk}"
    pytest.fail(report, pytrace=False)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", CI_SEEDS)
def test_durable_contract_under_chaos(
    seed: int, pg_server: Server, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ops = generate(seed, CI_STEPS)
    _, violations = run_ops(pg_server, tmp_path, ops)
    if violations:
        fail_with(pg_server, tmp_path, seed, ops, violations, shrink_budget(request, SHRINK_CI))


def shrink_budget(request: pytest.FixtureRequest, default: float) -> float:
    option = request.config.getoption("--chaos-shrink")
    return default if option is None else parse_budget(option, "--chaos-shrink")


#: Failures found by the generator, shrunk and kept as fixed sequences: they run
#: whatever the seeds draw. Timing assumes the workers listen when the first
#: operation runs (chaos_run waits for that).
REGRESSIONS: dict[str, list[Op]] = {
    # Crash-charges-the-batch: a listener that kills its process, in a batch of
    # innocent messages (seed 2, shrunk).
    "crash-in-a-batch": [
        Publish((Msg(1), Msg(2, behaviour="crash", until=POISON), Msg(3), Msg(4))),
    ],
    # Shutdown-as-it-starts: a supervisor SIGTERMed as soon as it handles the
    # signal, while it still imports pgpubsub (the new one started after a
    # SIGKILL, then after a SIGTERM); it exited -15 (by hand, after the long run's
    # `shutdown` seeds; on the old code it failed every run before chaos_run waited
    # for the handler, see catches_sigterm).
    "term-as-it-starts": [
        Kill("supervisor", "KILL"),
        Kill("supervisor", "TERM"),
        Kill("supervisor", "TERM"),
    ],
    # Ordering-under-replay: the dead head of a key is replayed while the next
    # message of the key is in its listener (seed 7, shrunk by hand).
    "replay-under-ordering": [
        Publish(
            (
                Msg(1, behaviour="raise", until=POISON, ordering_key="k"),
                Msg(2, behaviour="slow", sleep=4.0, ordering_key="k"),
            )
        ),
        Wait(2.5),
        Admin("replay"),
    ],
    # Hand-out under faults (written by hand, not found): claims of chaos_crew handed
    # out among its processors while a share's listener kills its process, one raises,
    # one fails at COMMIT, the sessions are ended, a worker is killed.
    "hand-out-under-faults": [
        Publish(tuple(Msg(n, "chaos_crew") for n in range(1, 17))),  # the claims grow
        Wait(1.0),
        Publish(
            tuple(Msg(n, "chaos_crew") for n in range(17, 29))
            + (
                Msg(29, "chaos_crew", behaviour="crash", until=1),
                Msg(30, "chaos_crew", behaviour="raise", until=1),
                Msg(31, "chaos_crew", behaviour="commit_fail", until=1),
            )
        ),
        Wait(1.0),
        Publish(tuple(Msg(n, "chaos_crew", behaviour="slow", sleep=0.3) for n in range(32, 44))),
        Fault("terminate"),
        Wait(0.5),
        Publish(tuple(Msg(n, "chaos_crew") for n in range(44, 56))),
        Kill("worker", "KILL"),
    ],
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", REGRESSIONS)
def test_durable_contract_on_found_sequences(name: str, pg_server: Server, tmp_path: Path) -> None:
    ops = REGRESSIONS[name]
    _, violations = run_ops(pg_server, tmp_path, ops)
    assert not violations, explain(f"sequence {name!r}", ops, violations)


def parse_budget(text: str, option: str = "--chaos-budget") -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not match:
        raise pytest.UsageError(f"{option}: a duration like 90s, 30m or 2h, not {text!r}")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


@pytest.mark.timeout(0)  # bounded by --chaos-budget (and the shrinking budget)
def test_durable_contract_under_chaos_long(
    pg_server: Server, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    option = request.config.getoption("--chaos-budget")
    if not option:
        pytest.skip("the long mode runs by hand: pytest -m chaos --chaos-budget=30m")
    budget = parse_budget(option)
    deadline = time.monotonic() + budget
    ops_done: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    found: Counter[str] = Counter()
    failures: list[tuple[int, list[Op], list[str]]] = []
    runs = published = 0
    started = time.monotonic()
    while time.monotonic() < deadline:
        seed = random.randrange(2**32)
        ops = generate(seed, LONG_STEPS)
        record, violations = run_ops(pg_server, tmp_path, ops)
        runs += 1
        ops_done.update(record.counts)
        faults.update(f.kind for f in record.faults)
        faults["worker crashes (listener SIGKILLed itself)"] += sum(
            1 for kind, *_, detail in record.history if kind == "end" and detail == "crash"
        )
        published += len(record.published)
        if violations:
            failures.append((seed, ops, violations))
            found.update(kinds(violations))
            print(f"seed {seed}: {sorted(kinds(violations))}", flush=True)
    print(
        f"\nchaos long run: {runs} seeds ({len(failures)} failing), "
        f"{sum(ops_done.values())} operations, {published} messages published, "
        f"{time.monotonic() - started:.0f}s"
    )
    print("operations: " + ", ".join(f"{k} {v}" for k, v in sorted(ops_done.items())))
    print("faults survived: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())))
    print("seeds failing, by violation: " + ", ".join(f"{k} {v}" for k, v in sorted(found.items())))
    if failures:
        seed, ops, violations = failures[0]
        fail_with(pg_server, tmp_path, seed, ops, violations, shrink_budget(request, SHRINK_LONG))
