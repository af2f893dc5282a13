"""The claim statements of a durable channel (see :mod:`pgpubsub._processor`).

What a claim takes, from which partitions of the storage ring, and how the
ring's state comes back with it. Constant SQL: values are bound parameters, and
the partitions a claim reads are integers of ours (:func:`claim_on`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ._leases import EXPIRES, LIVE

# Claiming counts the attempt and commits at once, so a message whose worker
# dies in the handler (SIGKILL, OOM, power loss) still uses up its attempts.
# The row is leased until the retry delay of that attempt (the Backoff ceiling,
# computed per row in SQL): if the worker dies
# it is claimed again then; while the worker is alive it holds the row lock.
# Among due messages the higher priority goes first.
#
# Messages without an ordering key come from their own partial index. A
# message with one may run only when it is the head of its key (its oldest
# pending message: a message waiting for a retry or not due yet holds its key
# back) and no lease on the key is live (a message of the key is in a
# listener: a replayed older one waits for it); claiming it leases its key (a
# key another claim leased at the same moment is left alone): one at a time,
# in order. The keys are visited by a loose index scan of the channel's keyed
# pending messages (one index probe per key, its first messages another),
# starting after the key this processor claimed last and wrapping around, and
# stopping once enough are found and locked (a key another claim is taking at
# that moment is passed over): each claim costs the keys it looks at, not
# the backlog, and every key gets its turn. A key's first few messages are
# claimed together (as long as each is due): holding the key, the processor
# runs them one after the other, in order; when one fails, the ones after it
# are given back unrun and uncharged, to wait for its retry.
#
# A message whose last attempt never finished (``unfinished``: its worker
# stopped mid-batch) may be the one that kills its worker: it is claimed alone,
# so that a crash charges an attempt to no other message, and only a message
# whose process stopped while it ran alone dies of crashes. A claim that meets
# such suspects among its due messages takes the others (but for the keys a
# suspect heads) and says which suspect it met first, and its key (the columns
# before the ring's state). The processor claims that one alone (``suspect``)
# once nothing else of its process is in a listener (GATE), and marks it so
# (MARK_ALONE_SQL) just before its listener starts: a suspect waiting for its
# turn alone is neither charged nor leased, so the crash of another message of
# its process costs it nothing, and its channel goes on meanwhile (reviews of
# issue 26). A suspect whose turn does not come soon is passed over (``passed``:
# its id; a keyed one's key is blocked) for a while (PASSED_FOR): in the first rows
# of a claim, it kept the messages behind it from being claimed. The last
# columns of a claimed row say whether it was claimed alone, and the message's
# key.
# Dead of crashes: its process stopped while it ran alone, its attempts spent.
# A message whose process stopped during a batch may be innocent: it is run
# alone (charged one more attempt, even past max_attempts) before that.
CRASHED_OUT = "(m.unfinished AND m.claimed_alone AND m.attempts >= %(max)s)"
# A paused channel (messages.pause) has a row in pgpubsub.channel_pause: its
# messages, keyed or not, are not claimed. Checked once per claim (it names no
# row of the claim: an InitPlan, and nothing is scanned when it is false); a
# pause committed after a claim lets that batch finish.
UNPAUSED = "NOT EXISTS (SELECT 1 FROM pgpubsub.channel_pause z WHERE z.channel = %(channel)s)"
# The partition of a row of pgpubsub.message: the table's partition key
# (schema.sql, Version 7 storage), spelled as there, so that a statement whose
# WHERE compares it with constants is pruned by the planner before anything is
# locked. A statement through the parent otherwise locks every partition and
# their indexes until its transaction ends: a processing transaction, held
# while its listeners run, then kept pgpubsub.rotate() from emptying any
# segment (hostile review of issue 26, finding 1). The claim says each row's
# partition; every statement of the processing transaction names those of its
# rows (:meth:`ChannelProcessor._in_parts`). A row in hand stays in its
# partition until its outcome is recorded: rotate moves no row a claim left
# unfinished, and only the outcome moves one to message_kept.
PART = (
    "(CASE WHEN status <> 'pending' THEN -1 WHEN dedupe_key IS NOT NULL THEN -2 ELSE segment END)"
)
#: Where a statement restricted to its rows' partitions says which ones.
IN_PARTS = "{in_parts}"


def _part(alias: str) -> str:
    """PART of the row aliased ``alias`` (an alias of ours, never input)."""
    return (
        f"(CASE WHEN {alias}.status <> 'pending' THEN -1 "
        f"WHEN {alias}.dedupe_key IS NOT NULL THEN -2 ELSE {alias}.segment END)"
    )


# A claim reads only the partitions that may hold pending messages: the
# ring's live ones (pgpubsub.ring.live: the current segment, those not yet
# emptied, message_deduped while it holds a message), named as constants where
# this marker is, so that the planner prunes the others before locking them,
# whatever plan the driver prepares (through the parent, a claim planned and
# locked all six partitions and their indexes: about 190 relation locks,
# against about 40, and 15% of the drain rate). A claim's cost follows the
# number of tables it reads: most of the time this is one. The claim returns
# the ring's state (the last column, on every row, and on a row of NULLs when
# it claimed nothing), so the processor knows the next claim's partitions
# (ChannelProcessor._claim_parts).
CLAIM_PARTS = "<claim parts>"
# The claim's transaction plans its statements once (generic plans): under the
# default plan_cache_mode, PostgreSQL kept planning the prepared claim anew for
# each call's values (a custom plan), and planning a claim over the ring's
# partitions took longer than running it. The plan does not depend on the
# values: every path is an index on (channel, ...) of pending rows, and the
# partitions are constants (CLAIM_PARTS). Only for the claim's transaction
# (SET LOCAL): listeners' statements on the session are planned as the
# application set.
GENERIC_PLANS_SQL = "SET LOCAL plan_cache_mode = force_generic_plan"
# A claim that read only some partitions and took messages of ordering keys:
# the keys with an older pending message it did not take, wherever it is now
# (stored where claims did not yet look: a deduped one while message_deduped
# was not live, or a publisher's that read the ring before it moved on, see
# pgpubsub.rotate; or moved since the claim's snapshot into a partition it
# read, by rotate: hostile re-review of the ring, finding 1). Then the claim is
# rolled back and made again on every partition, so that no message of a key
# runs before an older one (hostile review of the ring, finding 1), and the
# processor's claims on some partitions pass over those keys until its next
# claim of every partition (one message waiting for another due in an hour
# made every claim roll back: re-review, finding 2), for a poll interval. A statement of its own,
# run only after a claim that took keyed messages: in the claim, the probe of
# the other partitions locked them for every claim, and cost a fifth of P6.
OLDER_ELSEWHERE_SQL = f"""
SELECT DISTINCT c.key FROM pgpubsub.message o
    JOIN ROWS FROM (pg_catalog.unnest(%(keys)s::text[]),
                    pg_catalog.unnest(%(last)s::bigint[])) AS c(key, last)
      ON o.ordering_key = c.key
    WHERE o.channel = %(channel)s AND o.status = 'pending' AND o.id < c.last
      AND o.id <> ALL(%(ids)s::bigint[]) AND {_part("o")} IN ({CLAIM_PARTS})
"""  # noqa: S608 - constant fragments


#: The partitions of a claim that knows nothing of the ring: every segment,
#: message_later (-3) and message_deduped (-2) (a processor's first claim, the crew's
#: looks as it registers as asleep, a second claim after a wake-up or a poll when the
#: first found nothing, and one every poll interval).
EVERY_SEGMENT = (-3, -2, 0, 1, 2, 3)
#: How many segments the ring has (schema.sql, Version 7 storage).
SEGMENTS = 4


# Each claim template's statement for each set of partitions, made once.
_CLAIMS: dict[tuple[str, tuple[int, ...]], str] = {}
_TEMPLATE_OF: dict[str, str] = {}


def claim_on(template: str, parts: tuple[int, ...]) -> str:
    """The claim ``template`` (CLAIM_SQL, LIMITED_CLAIM_SQL) reading partitions ``parts``."""
    query = _CLAIMS.get((template, parts))
    if query is None:
        # The values are integers of ours (the ring's segments), never input.
        query = template.replace(CLAIM_PARTS, ", ".join(str(int(p)) for p in parts))
        _CLAIMS[(template, parts)] = query
        _TEMPLATE_OF[query] = template
    return query


def claim_template(query: str) -> str | None:
    """The claim template ``query`` was made from by :func:`claim_on`, if any."""
    return _TEMPLATE_OF.get(query)


def ring_state(code: int) -> tuple[int, tuple[int, ...]]:
    """(current segment, live partitions) from the claim's last column: the current
    segment times 64 plus a bit per live segment (1 << segment), 16 for
    message_deduped (-2) and 32 for message_later (-3)."""
    apart = ((-3,) if code & 32 else ()) + ((-2,) if code & 16 else ())
    return code >> 6, apart + tuple(s for s in range(SEGMENTS) if code >> s & 1)


def ring_parts(segment: int, live: Sequence[int]) -> tuple[int, ...]:
    """The partitions a claim reads when the ring's current segment is ``segment`` and
    its live partitions ``live``."""
    return tuple(sorted({segment, *live}))


_NEXT_KEY = (
    "SELECT n.ordering_key FROM pgpubsub.message n WHERE n.channel = %(channel)s "  # noqa: S608
    "AND n.status = 'pending' AND n.ordering_key IS NOT NULL AND n.ordering_key > {after} "
    f"AND {_part('n')} IN ({CLAIM_PARTS}) "
    "ORDER BY n.ordering_key LIMIT 1"
)
CLAIM_SQL = f"""
WITH RECURSIVE later(key) AS (
    ({_NEXT_KEY.format(after="%(after)s")})
    UNION ALL
    SELECT ({_NEXT_KEY.format(after="later.key")}) FROM later WHERE later.key IS NOT NULL
), earlier(key) AS (
    ({_NEXT_KEY.format(after="''")})
    UNION ALL
    SELECT ({_NEXT_KEY.format(after="earlier.key")}) FROM earlier
    WHERE earlier.key IS NOT NULL AND earlier.key <= %(after)s
), keyed AS (
    -- Each key's first messages are locked as its turn comes, and the limit
    -- counts locked rows: a key another claim is taking at this moment (its
    -- rows locked, its lease not yet committed) is passed over for the next
    -- ones, so that two processors claiming at once both fill their batches.
    SELECT h.id, h.unfinished, h.ordering_key, h.rank FROM (
        SELECT key FROM (
            SELECT key FROM later WHERE key IS NOT NULL
            UNION ALL
            SELECT key FROM earlier WHERE key IS NOT NULL AND key <= %(after)s
        ) u
        -- keys found held back by an older message where this claim does not
        -- look (see OLDER_ELSEWHERE_SQL) are passed over for a while
        WHERE u.key <> ALL(%(blocked)s::text[])
    ) k
    CROSS JOIN LATERAL (
        SELECT m.id, m.unfinished, m.ordering_key, p.rank FROM (
            SELECT f.id, pg_catalog.row_number() OVER (ORDER BY f.id) AS rank,
                pg_catalog.bool_and(f.run_at <= pg_catalog.now()) OVER (ORDER BY f.id) AS due
            FROM (
                SELECT m.id, m.run_at FROM pgpubsub.message m
                WHERE m.channel = %(channel)s AND m.status = 'pending'
                  AND m.ordering_key = k.key AND {_part("m")} IN ({CLAIM_PARTS})
                ORDER BY m.id LIMIT %(per_key)s
            ) f
        ) p
        -- checked again on the row locked: one another claim took since this
        -- one began (its run_at moved on) is passed over too
        JOIN pgpubsub.message m ON m.id = p.id
        WHERE p.due AND m.status = 'pending' AND m.run_at <= pg_catalog.now()
          AND {_part("m")} IN ({CLAIM_PARTS})
        ORDER BY p.rank
        FOR UPDATE OF m SKIP LOCKED
    ) h
    WHERE NOT EXISTS (
        SELECT 1 FROM pgpubsub.lease l
        WHERE l.channel = %(channel)s AND l.kind = 'key' AND l.name = k.key AND {LIVE})
      AND {UNPAUSED}
    LIMIT %(limit)s
), unkeyed AS (
    SELECT id, unfinished, ordering_key, priority, run_at FROM pgpubsub.message
    WHERE channel = %(channel)s AND status = 'pending' AND ordering_key IS NULL
      AND run_at <= pg_catalog.now() AND {UNPAUSED} AND {PART} IN ({CLAIM_PARTS})
      AND id <> ALL(%(passed)s::bigint[])
    ORDER BY priority DESC, run_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), due AS (
    SELECT id, unfinished, ordering_key FROM unkeyed
    UNION ALL
    -- a key's messages from its head on, up to the first one another
    -- transaction holds locked (no gap, so none runs before an older one) or
    -- that may have crashed its worker (unfinished: only a head is run alone)
    -- (counted by a window over the key's locked rows: one sort, not a
    -- scan of the batch per row)
    SELECT k.id, k.unfinished, k.ordering_key FROM (
        SELECT o.id, o.unfinished, o.ordering_key, o.rank,
            pg_catalog.count(*) FILTER (WHERE o.rank = 1 OR NOT o.unfinished)
                OVER (PARTITION BY o.ordering_key ORDER BY o.id) AS run
        FROM keyed o
    ) k WHERE k.rank = k.run
), pick AS (
    SELECT id, ordering_key, false AS alone FROM due
    WHERE %(suspect)s::bigint IS NULL AND NOT unfinished AND (ordering_key IS NULL
        OR ordering_key NOT IN (
            SELECT u.ordering_key FROM due u WHERE u.unfinished AND u.ordering_key IS NOT NULL))
    UNION ALL
    SELECT id, ordering_key, true FROM due WHERE unfinished AND id = %(suspect)s::bigint
), leased AS (
    INSERT INTO pgpubsub.lease AS l (channel, kind, name, holder, expires_at)
    SELECT %(channel)s, 'key', d.key, %(holder)s, {EXPIRES}
    FROM (SELECT DISTINCT ordering_key FROM pick WHERE ordering_key IS NOT NULL) d(key)
    ON CONFLICT (channel, kind, name) DO UPDATE SET holder = EXCLUDED.holder,
        expires_at = EXCLUDED.expires_at
    WHERE NOT {LIVE}
    RETURNING l.name
), claimed AS (
UPDATE pgpubsub.message m SET
    attempts = m.attempts + CASE WHEN {CRASHED_OUT} THEN 0 ELSE 1 END,
    run_at = pg_catalog.clock_timestamp() + pg_catalog.make_interval(
        secs => least(%(cap)s, %(base)s * pg_catalog.power(%(factor)s, least(m.attempts, 64)))),
    status = CASE WHEN {CRASHED_OUT} THEN 'dead' ELSE 'pending' END,
    unfinished = NOT ({CRASHED_OUT}),
    -- set when it runs alone (MARK_ALONE_SQL), not when a claim takes it alone
    claimed_alone = false,
    last_error = CASE WHEN {CRASHED_OUT}
        THEN pg_catalog.format(
            'the process handling it stopped before it completed (attempt %%s)', m.attempts)
        ELSE m.last_error END
-- The rows by their ids (an index probe each) and no join: statistics taken
-- while the queue was empty made the planner loop over the batch for each row.
-- A claim takes one message alone or none alone (pick), so alone is one value.
WHERE m.id = ANY(ARRAY(SELECT id FROM pick))
  AND (m.ordering_key IS NULL OR m.ordering_key IN (SELECT name FROM leased))
  AND {_part("m")} IN ({CLAIM_PARTS})
RETURNING m.id, m.payload, m.attempts, m.status, m.trace, m.priority,
    m.ordering_key IS NOT NULL, (SELECT pg_catalog.bool_or(alone) FROM pick) AS alone,
    m.ordering_key, {PART}
)
-- a suspect met and not taken (see CRASHED_OUT); the ring's state as one
-- integer (see ring_state): an array on every row cost the client a parse per
-- row (about 30%% more of its time at 250 rows a claim); the claim's now(), from
-- which the next question of when a message is due counts (NEXT_DUE_SQL), in UTC
-- without a zone (SINCE): a driver's zone (Django's without USE_TZ) never shifts it
SELECT c.*, s.id, s.ordering_key, (r.segment * 64 + (SELECT COALESCE(pg_catalog.sum(DISTINCT
        1 << CASE s WHEN -2 THEN 4 WHEN -3 THEN 5 ELSE s END), 0)
        FROM pg_catalog.unnest(r.live) s))::integer, pg_catalog.timezone('UTC', pg_catalog.now())
FROM pgpubsub.ring r LEFT JOIN claimed c ON true
LEFT JOIN LATERAL (
    SELECT d.id, d.ordering_key FROM due d
    WHERE d.unfinished AND %(suspect)s::bigint IS NULL ORDER BY d.id LIMIT 1
) s ON true
"""  # noqa: S608 - constant fragments
