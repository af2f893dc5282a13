"""Durable-channel benchmark (P6, P7).

    python -m pip install -e '.[bench]'
    python benchmarks/durable.py [--n 50000] [--backlog 1000000]

Uses ``$PGPUBSUB_DSN`` or starts an embedded server.

* P6: two ``pgpubsub listen`` worker processes on one durable channel; the
  handler writes one row in the claim transaction. N messages are published
  in one transaction while both listen; rate = N / (commit to last effect).
  Then the effects are counted: lost and duplicated must both be 0.
* P7: the per-message cost of claiming and processing (same handler, one
  in-process processor) with an empty table beside 1M messages already
  pending on the channel: the ratio should stay under 1.2.
* Ordering keys (P11): P6 again with every message carrying one of 20
  ordering keys, then with N/2 keys of 2 messages each (each key one at a
  time, in order, keys in parallel); each key's order is checked afterwards.
  And P7 for keys: the per-message cost with 1M keyed messages pending.
* Concurrency: one in-process worker, a listener sleeping 5 ms (an API call),
  ``concurrency=1`` vs ``concurrency=16``.
* Rate limit (issue 28): a channel with ``rate_limit="1000/s"``, 4 worker
  processes, 30 s of backlog (30,100 messages published at once); the rate
  achieved (starts after the bucket's first 100, over the time from the first
  start to the last) must be within 2% of the limit, and no window of one
  second may hold more than 1000 + 100 (the bucket's capacity) starts.
* Rate limit per key: ``key_rate_limit="100/s"``, 10 limit keys published
  interleaved (1,000/s in all), 4 worker processes, ~10 s of backlog: per key
  the rate achieved and the most starts in any second (100 + 10).

Figures measured elsewhere for the same kind of work (SPEC.md anchors):
django-pgpubsub about 200 messages/s on locked channels, pgqueuer 5.8k
jobs/s, procrastinate 0.4-0.6k jobs/s.
"""

from __future__ import annotations

import argparse
import bisect
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).parent))

from bench_jobs import BenchJob, BenchKeyPaced, BenchOrdered, BenchPaced  # noqa: E402

import pgpubsub  # noqa: E402
from pgpubsub import durable  # noqa: E402
from pgpubsub._processor import ChannelProcessor  # noqa: E402
from pgpubsub.channel import Channel, spec_of  # noqa: E402
from pgpubsub.embedded import EmbeddedServer  # noqa: E402
from pgpubsub.listen import Registry, registry  # noqa: E402
from pgpubsub.session import PsycopgSession  # noqa: E402

HERE = Path(__file__).parent


def worker_env() -> dict[str, str]:
    """The environment of a worker process: this directory on its path, before the
    caller's (a checkout's ``src`` given in PYTHONPATH is the code measured, not the
    installed one)."""
    path = [str(HERE), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))


def reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_effects")
        conn.execute("CREATE TABLE bench_effects (n bigint, at bigserial)")  # at: handling order
        conn.execute("TRUNCATE pgpubsub.message")


def scalar(dsn: str, query: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()  # type: ignore[arg-type]
        assert row is not None
        return int(row[0])


def p6(dsn: str, n: int, keys: int = 0) -> float:
    """Run P6 (with ``keys`` ordering keys, or none); return the rate in messages/s."""
    what = f", {keys} ordering keys" if keys else ""
    print(f"\n== P6: {n:,} durable messages, 2 worker processes, one row per message{what}")
    reset(dsn)
    env = worker_env()
    channel = "bench_jobs.BenchOrdered" if keys else "bench_jobs.BenchJob"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgpubsub", "listen", "bench_jobs", "--processes", "2",
         "--channels", channel, "--dsn", dsn, "--log-level", "WARNING"],
        env=env,
    )  # fmt: skip
    try:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgpubsub'"
        deadline = time.monotonic() + 30
        while scalar(dsn, query) < 4:  # a listening and a claiming connection each
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        with psycopg.connect(dsn) as conn:
            if keys:
                for k in range(keys):
                    batch = [{"key": k, "n": i} for i in range(n // keys)]
                    pgpubsub.notify_many(BenchOrdered, batch, conn=conn, ordering_key=str(k))
                conn.commit()
            else:
                pgpubsub.notify_many(BenchJob, [{"n": i} for i in range(n)], conn=conn)
            conn.commit()
            t0 = time.perf_counter()
        while scalar(dsn, "SELECT count(*) FROM bench_effects") < n:
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    total = scalar(dsn, "SELECT count(*) FROM bench_effects")
    distinct = scalar(dsn, "SELECT count(DISTINCT n) FROM bench_effects")
    print(f"processed {n:,} in {seconds:.2f} s: {n / seconds:,.0f} messages/s")
    print(f"lost {n - distinct}, duplicated {total - distinct}")
    if keys:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT n FROM bench_effects ORDER BY at").fetchall()
        per_key: dict[int, list[int]] = {}
        for (v,) in rows:
            per_key.setdefault(v // 1_000_000, []).append(v % 1_000_000)
        in_order = sum(seq == sorted(seq) for seq in per_key.values())
        print(f"keys whose messages were handled in publish order: {in_order} of {keys}")
    return n / seconds


def rate_limited(dsn: str, seconds: int = 30, processes: int = 4) -> float:
    """The rate-limit row; return the achieved rate as a fraction of the limit."""
    from pgpubsub.channel import rate_of

    rate = rate_of(BenchPaced)
    assert rate is not None
    n = int(rate.per_second * seconds) + rate.capacity
    print(f"\n== rate limit: {rate.count}/{rate.period:g}s, {processes} worker processes, "
          f"{n:,} messages (~{seconds} s)")  # fmt: skip
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_starts")
        conn.execute("CREATE TABLE bench_starts (n bigint, at timestamptz, key text)")
        conn.execute("TRUNCATE pgpubsub.message, pgpubsub.rate_bucket")
    env = worker_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgpubsub", "listen", "bench_jobs", "--processes", str(processes),
         "--channels", "bench_jobs.BenchPaced", "--dsn", dsn, "--log-level", "WARNING"],
        env=env,
    )  # fmt: skip
    try:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgpubsub'"
        deadline = time.monotonic() + 30
        while scalar(dsn, query) < 2 * processes:
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        with psycopg.connect(dsn) as conn:
            pgpubsub.notify_many(BenchPaced, [{"n": i} for i in range(n)], conn=conn)
        while scalar(dsn, "SELECT count(*) FROM bench_starts") < n:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    with psycopg.connect(dsn) as conn:
        times = [
            r[0] for r in conn.execute(
                "SELECT extract(epoch FROM at)::float8 FROM bench_starts ORDER BY at")
        ]  # fmt: skip
    distinct = scalar(dsn, "SELECT count(DISTINCT n) FROM bench_starts")
    span = times[-1] - times[0]
    achieved = (len(times) - rate.capacity) / span
    most = max(
        bisect.bisect_right(times, t + rate.period) - i for i, t in enumerate(times)
    )
    print(f"started {len(times):,} in {span:.2f} s: {achieved:,.1f}/s "
          f"({achieved / rate.per_second:.4f} of the limit); the most in any "
          f"{rate.period:g} s window: {most:,} (limit {rate.count:,} + bucket {rate.capacity})")
    print(f"lost {n - distinct}, duplicated {len(times) - distinct}")  # fmt: skip
    return achieved / rate.per_second


def key_rate_limited(dsn: str, seconds: int = 10, processes: int = 4, keys: int = 10) -> float:
    """The per-key rate-limit row; return the lowest key's rate as a fraction of the limit."""
    from pgpubsub.channel import key_rate_of

    rate = key_rate_of(BenchKeyPaced)
    assert rate is not None
    per_key = int(rate.per_second * seconds) + rate.capacity
    n = per_key * keys
    print(f"\n== rate limit per key: {rate.count}/{rate.period:g}s per key, {keys} keys, "
          f"{processes} worker processes, {n:,} messages (~{seconds} s)")  # fmt: skip
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_starts")
        conn.execute("CREATE TABLE bench_starts (n bigint, at timestamptz, key text)")
        conn.execute("TRUNCATE pgpubsub.message, pgpubsub.key_bucket")
    env = worker_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgpubsub", "listen", "bench_jobs", "--processes", str(processes),
         "--channels", "bench_jobs.BenchKeyPaced", "--dsn", dsn, "--log-level", "WARNING"],
        env=env,
    )  # fmt: skip
    try:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgpubsub'"
        deadline = time.monotonic() + 30
        while scalar(dsn, query) < 2 * processes:
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        with psycopg.connect(dsn) as conn:
            # Interleaved: each key's messages spread over the whole backlog.
            for i in range(per_key):
                for k in range(keys):
                    pgpubsub.notify(
                        BenchKeyPaced(n=i * keys + k, key=f"k{k}"), conn=conn, limit_key=f"k{k}"
                    )
        while scalar(dsn, "SELECT count(*) FROM bench_starts") < n:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    worst = float("inf")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT key, extract(epoch FROM at)::float8 FROM bench_starts ORDER BY at"
        ).fetchall()
    by_key: dict[str, list[float]] = {}
    for key, at in rows:
        by_key.setdefault(key, []).append(at)
    for key, times in sorted(by_key.items()):
        achieved = (len(times) - rate.capacity) / (times[-1] - times[0])
        most = max(bisect.bisect_right(times, t + rate.period) - i for i, t in enumerate(times))
        worst = min(worst, achieved / rate.per_second)
        print(f"{key}: {len(times):,} started, {achieved:,.1f}/s "
              f"({achieved / rate.per_second:.4f} of the limit), the most in any "
              f"{rate.period:g} s window: {most} "
              f"(limit {rate.count} + bucket {rate.capacity})")  # fmt: skip
    distinct = scalar(dsn, "SELECT count(DISTINCT n) FROM bench_starts")
    span = rows[-1][1] - rows[0][1]
    print(f"all keys: {len(rows):,} in {span:.2f} s ({len(rows) / span:,.0f}/s); "
          f"lost {n - distinct}, duplicated {len(rows) - distinct}")  # fmt: skip
    return worst


def concurrency(dsn: str, n: int) -> None:
    """The same backlog drained by one worker at concurrency 1 and 16."""
    from pgpubsub._loopthread import LoopThread
    from pgpubsub.worker import Worker

    print("\n== Concurrency: a listener sleeping 5 ms, one worker process")
    rates = {}
    for level in (1, 16):

        @dataclass
        class Slow(Channel, name=f"bench_slow_{level}", lock_notifications=True, concurrency=level):
            n: int

        done: list[int] = []
        reg = Registry()
        reg.add(Slow, lambda n, done=done: (time.sleep(0.005), done.append(n)))
        count = n if level > 1 else n // 8
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgpubsub.notify_many(Slow, [{"n": i} for i in range(count)], conn=conn)
        worker = Worker(dsn, registry=reg, register=False)
        loop = LoopThread("bench")
        t0 = time.perf_counter()
        loop.run(worker.start(), timeout=30)
        while len(done) < count:
            time.sleep(0.005)
        rates[level] = count / (time.perf_counter() - t0)
        loop.run(worker.stop(), timeout=30)
        loop.close()
        print(f"concurrency={level:<2}: {count:,} messages, {rates[level]:,.0f} messages/s")
    print(f"ratio: x{rates[16] / rates[1]:.1f} (ideal x16)")


def timed_processing(dsn: str, n: int, channel: type = BenchJob) -> float:
    """Seconds per message to claim and process ``n`` messages in one processor."""
    spec = spec_of(channel)
    proc = ChannelProcessor(PsycopgSession(dsn), spec, registry.listeners(spec))
    proc.session.open()
    t0 = time.perf_counter()
    while proc.processed < n:
        got, _ = proc._batch()
        proc._release(wake=False)  # the keys it held, as drain_once gives them back
        if not got:
            raise RuntimeError(f"only {proc.processed} of {n} messages were there")
    seconds = time.perf_counter() - t0
    proc.session.close()
    return seconds / proc.processed


def p7(dsn: str, n: int, backlog: int, rounds: int = 3) -> None:
    print(f"\n== P7: per-message cost over {n:,} messages, empty table vs {backlog:,} pending")
    empty = []
    for _ in range(rounds):
        reset(dsn)
        with psycopg.connect(dsn) as conn:
            pgpubsub.notify_many(BenchJob, [{"n": i} for i in range(n)], conn=conn)
        empty.append(timed_processing(dsn, n))
    reset(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgpubsub.message (channel, payload) "
            "SELECT %s, json_build_object('n', i)::text FROM generate_series(1, %s) i",
            (spec_of(BenchJob).name, backlog),
        )
        conn.execute("VACUUM ANALYZE pgpubsub.message")
    full = [timed_processing(dsn, n) for _ in range(rounds)]  # the backlog stays near 1M
    e, f = statistics.median(empty), statistics.median(full)
    print(f"empty table:  median {e * 1e6:6.1f} µs/message  (runs: {fmt(empty)})")
    print(f"{backlog:,} pending: median {f * 1e6:6.1f} µs/message  (runs: {fmt(full)})")
    print(f"ratio: x{f / e:.2f}")


def p7_keys(dsn: str, n: int, backlog: int, keys: int = 20, rounds: int = 3) -> None:
    """P7 for ordering keys: the same per-message cost with a keyed backlog pending."""
    print(
        f"\n== P7 (ordering keys): per-message cost over {n:,} messages of {keys} keys, "
        f"empty table vs {backlog:,} keyed messages pending"
    )

    def publish(count: int, key_count: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO pgpubsub.message (channel, payload, ordering_key) "
                "SELECT %s, json_build_object('key', i %% %s, 'n', i)::text, "
                "(i %% %s)::text FROM generate_series(1, %s) i",
                (spec_of(BenchOrdered).name, key_count, key_count, count),
            )
            conn.execute("VACUUM ANALYZE pgpubsub.message")

    empty = []
    for _ in range(rounds):
        reset(dsn)
        publish(n, keys)
        empty.append(timed_processing(dsn, n, BenchOrdered))
    reset(dsn)
    publish(backlog, keys)
    full = [timed_processing(dsn, n, BenchOrdered) for _ in range(rounds)]
    e, f = statistics.median(empty), statistics.median(full)
    print(f"empty table:  median {e * 1e6:6.1f} µs/message  (runs: {fmt(empty)})")
    print(f"{backlog:,} pending: median {f * 1e6:6.1f} µs/message  (runs: {fmt(full)})")
    print(f"ratio: x{f / e:.2f}")


def fmt(runs: list[float]) -> str:
    return ", ".join(f"{r * 1e6:.1f}" for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--skip-p6", action="store_true")
    parser.add_argument("--skip-p7", action="store_true")
    parser.add_argument("--skip-ordering", action="store_true")
    parser.add_argument("--skip-concurrency", action="store_true")
    parser.add_argument("--skip-rate", action="store_true")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the P6 rows")
    parser.add_argument(
        "--only",
        choices=["keys", "rate", "key-rate"],
        help="keys: plain P6, the two keyed P6 rows (each as a ratio of plain P6) and keyed P7;"
        " rate: the rate-limit row; key-rate: the per-key rate-limit row",
    )
    args = parser.parse_args()
    if args.only == "keys":
        args.skip_concurrency = True
    dsn = os.environ.get("PGPUBSUB_DSN")
    server = None if dsn else EmbeddedServer().start()
    dsn = dsn or server.conninfo  # type: ignore[union-attr]
    try:
        durable.migrate(dsn)
        with psycopg.connect(dsn) as conn:
            print(f"server: PostgreSQL {conn.info.server_version}, {os.cpu_count()} cores")
        if args.only == "rate":
            rate_limited(dsn)
            return
        if args.only == "key-rate":
            key_rate_limited(dsn)
            return
        # Rounds of the three P6 rows one after the other: on a shared machine a
        # ratio within one round means more than rates from different moments.
        ratios: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            plain = None if args.skip_p6 else p6(dsn, args.n)
            if not args.skip_ordering:
                few = p6(dsn, args.n, keys=20)
                many = p6(dsn, args.n, keys=args.n // 2)  # 2 messages per key
                if plain:
                    ratios.append((few / plain, many / plain))
                    print(f"\nkeyed P6 vs plain P6 ({plain:,.0f}/s): 20 keys x{few / plain:.2f}, "
                          f"{args.n // 2:,} keys x{many / plain:.2f}")  # fmt: skip
        if len(ratios) > 1:
            few_r, many_r = (statistics.median(r) for r in zip(*ratios, strict=True))
            print(f"median of {len(ratios)} rounds: 20 keys x{few_r:.2f}, "
                  f"{args.n // 2:,} keys x{many_r:.2f}")  # fmt: skip
        if not args.skip_concurrency:
            concurrency(dsn, 4000)
        if not args.skip_rate:
            rate_limited(dsn)
            key_rate_limited(dsn)
        if not args.skip_p7:
            if args.only != "keys":
                p7(dsn, args.n // 2, args.backlog)
            if not args.skip_ordering:
                p7_keys(dsn, args.n // 2, args.backlog)
    finally:
        if server:
            server.close()


if __name__ == "__main__":
    main()
