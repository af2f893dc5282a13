"""The flow-control statements of a durable channel (see :mod:`pgpubsub._processor`).

Rate limits (a token bucket per channel and per limit key), when the next
message is due, ``key_concurrency`` slots, and the sweeps of their rows.
Constant SQL: values are bound parameters.
"""

from __future__ import annotations

from ._claim_sql import CLAIM_PARTS, CLAIM_SQL, PART, UNPAUSED, _part
from ._leases import LIVE

# A rate-limited channel's token bucket (pgpubsub.rate_bucket, see
# channel.Rate): its tokens refilled by the time elapsed, measured by the
# server's clock (clock_timestamp: workers' clocks may disagree, and the claim
# transaction's start would count a wait for the row lock twice).
REFILLED = (
    "LEAST(%(capacity)s::float8, b.tokens + %(per_second)s::float8 * "
    "GREATEST(0, pg_catalog.date_part('epoch', "
    "pg_catalog.clock_timestamp() - b.updated_at)))"
)
# The claim's first statement on a rate-limited channel: the bucket row locked
# (created full) and refilled; the claim then takes at most its whole tokens,
# and SPEND_SQL takes one per message claimed, in the same transaction, so
# that two workers never spend the same token.
TAKE_SQL = f"""
INSERT INTO pgpubsub.rate_bucket AS b (channel, tokens, updated_at)
VALUES (%(channel)s, %(capacity)s, pg_catalog.clock_timestamp())
ON CONFLICT (channel) DO UPDATE SET tokens = {REFILLED},
    updated_at = pg_catalog.clock_timestamp()
RETURNING b.tokens
"""  # noqa: S608 - constant fragments
SPEND_SQL = "UPDATE pgpubsub.rate_bucket SET tokens = tokens - %s WHERE channel = %s"
# Seconds until the channel's earliest claimable message is due (None: none;
# 0 or less: claim now). Only a time after the now() of the crew's last claim
# that came back short of its size counts (``since``, Crew.since; None: the
# question's own now()): a message
# due by then that the claim did not take is in another worker's hands
# (locked), held by a limit (given back due at that now()) or passed over, and
# waiting for it in a loop would spin; it comes back with a due time of its
# own, or a wake-up. One that came due after it had no claim yet: counted only
# from the question's own now(), it waited for the poll (hostile review 15 of
# issue 26). A claim that could not run (no max_in_flight slot, no token)
# counts from the question's now(): what is due waits for a give-back's
# wake-up or the next token (below). A message behind an older one of its
# ordering key does not count either.
# On a rate-limited channel, when a message is claimable now (due; without a
# key, or the head of its key with no live lease; a max_in_flight slot free):
# the time its next token is due (0: a whole token is there, claim again), the
# bucket refilled to now as the claim refills it. Tokens refill while a batch
# runs: the worker that ran it claims again. Nothing claimable, no token wait
# (a message held by its key or a full max_in_flight comes with a wake-up,
# and waiting for it by the clock would spin). The bucket is read once another
# worker's claim in progress has committed (FOR SHARE): its tokens before that
# claim would be spent already. A paused channel has nothing due: its workers
# sleep until resume's wake-up or a poll.
# The now() of the crew's last claim, as the claim returned it (None: NULL).
SINCE = "pg_catalog.timezone('UTC', %(since)s::timestamp)"
NEXT_DUE_SQL = f"""
SELECT CASE WHEN NOT {UNPAUSED} THEN NULL ELSE LEAST(
    (SELECT pg_catalog.date_part('epoch', pg_catalog.min(run_at) - pg_catalog.now())
     FROM pgpubsub.message m WHERE channel = %(channel)s AND status = 'pending'
     AND run_at > COALESCE({SINCE}, pg_catalog.now())
     AND (m.ordering_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM pgpubsub.message o WHERE o.channel = m.channel
        AND o.ordering_key = m.ordering_key AND o.status = 'pending' AND o.id < m.id))),
    -- Until the next token, when tokens held the last claim back (one that
    -- took fewer than its tokens found nothing more claimable: a due message
    -- is in another worker's hands, and tokens are not what it waits for).
    (SELECT GREATEST(0, 1 - {REFILLED}) / %(per_second)s
     FROM pgpubsub.rate_bucket b WHERE b.channel = %(channel)s AND %(short)s AND EXISTS (
        SELECT 1 FROM pgpubsub.message d WHERE d.channel = %(channel)s
        AND d.status = 'pending' AND d.run_at <= pg_catalog.now()
        AND (d.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM pgpubsub.message o WHERE o.channel = d.channel
            AND o.ordering_key = d.ordering_key AND o.status = 'pending' AND o.id < d.id)
          AND NOT EXISTS (
            SELECT 1 FROM pgpubsub.lease l WHERE l.channel = d.channel AND l.kind = 'key'
            AND l.name = d.ordering_key AND {LIVE})))
     AND (%(slots)s::integer IS NULL OR %(slots)s > (
        SELECT pg_catalog.count(*) FROM pgpubsub.lease l
        WHERE l.channel = %(channel)s AND l.kind = 'slot' AND {LIVE}))
     FOR SHARE OF b)
) END
"""  # noqa: S608 - constant fragments
# -- flow control per key (key_rate_limit, key_concurrency; schema version 6) --
#
# A limit_key's token bucket (pgpubsub.key_bucket), refilled as the channel's.
KEY_REFILLED = (
    "LEAST(%(key_capacity)s::float8, b.tokens + %(key_per_second)s::float8 * "
    "GREATEST(0, pg_catalog.date_part('epoch', "
    "pg_catalog.clock_timestamp() - b.updated_at)))"
)
# The same, as of the now() of the crew's last claim (as of now without one).
KEY_REFILLED_SINCE = KEY_REFILLED.replace(
    "pg_catalog.clock_timestamp()",
    f"COALESCE({SINCE}, pg_catalog.clock_timestamp())",
)


# The limit_keys with every key_concurrency slot live: found once per claim
# (one index range over the channel's slot leases: about as many as messages
# in listeners, whatever the keys' backlogs and slots; a slot past
# key_concurrency, taken under a larger setting, does not count), then each
# scanned row's key looked up in them (hashed). A key out of tokens is found by
# its bucket, one index probe per scanned row of a keyed message (the channel's
# buckets are every key active within about a period: reading them all would
# cost each claim that many). Both read without locks, to pass over such keys'
# messages (no head-of-line blocking); what holds the limits is the claim's
# locked bucket rows and slot leases (see ChannelProcessor._limit).
_SLOT_OF = "pg_catalog.strpos(l.name, E'\\x1f')"
HELD_KEYS = f"""held(key) AS MATERIALIZED (
    SELECT pg_catalog.substr(l.name, {_SLOT_OF} + 1) FROM pgpubsub.lease l
    WHERE %(key_slots)s::integer IS NOT NULL AND l.channel = %(channel)s
      AND l.kind = 'limit' AND {LIVE}
      AND pg_catalog.substr(l.name, 1, {_SLOT_OF} - 1)::integer < %(key_slots)s
    GROUP BY 1 HAVING pg_catalog.count(*) >= %(key_slots)s
)"""  # noqa: S608 - constant fragments


def _free_key(m: str) -> str:
    """SQL: the message aliased ``m`` may start as far as its limit_key goes."""
    return (
        f"({m}.limit_key IS NULL OR ({m}.limit_key NOT IN (SELECT key FROM held) "  # noqa: S608
        "AND NOT (%(key_per_second)s::float8 IS NOT NULL AND EXISTS (SELECT 1 FROM "
        f"pgpubsub.key_bucket b WHERE b.channel = %(channel)s AND b.key = {m}.limit_key "
        f"AND {KEY_REFILLED} < 1))))"
    )  # constant fragments; m is an alias of ours, never input


def _limited_claim_sql() -> str:
    """CLAIM_SQL for a channel with key limits: messages of held keys passed over.

    A key's messages in a batch are at most ``per_limit_key`` (its bucket's
    capacity: more could never start), and its ordering keys' messages stop at
    the first one of a held key (none runs before an older one). The rows also
    say their limit_key (last column). Held keys' due messages are passed over
    row by row (HELD_KEYS: a hash lookup and a bucket probe each): a claim
    costs the due backlog of held keys ahead of what it takes (a loose index
    scan over limit keys, as for ordering keys, would not read them; the
    messages without a limit_key would then need an index of their own).
    """
    sql = CLAIM_SQL
    edits = [
        ("WITH RECURSIVE later(key) AS (", f"WITH RECURSIVE {HELD_KEYS}, later(key) AS ("),
        (
            "SELECT m.id, m.run_at FROM pgpubsub.message m",
            "SELECT m.id, m.run_at, m.limit_key FROM pgpubsub.message m",
        ),
        (
            "pg_catalog.bool_and(f.run_at <= pg_catalog.now()) OVER (ORDER BY f.id) AS due",
            "pg_catalog.bool_and(f.run_at <= pg_catalog.now() AND "
            f"{_free_key('f')}) OVER (ORDER BY f.id) AS due",
        ),
        (
            """unkeyed AS (
    SELECT id, unfinished, ordering_key, priority, run_at FROM pgpubsub.message
    WHERE channel = %(channel)s AND status = 'pending' AND ordering_key IS NULL
      AND run_at <= pg_catalog.now() AND {UNPAUSED} AND {PART} IN ({CLAIM_PARTS})
      AND id <> ALL(%(passed)s::bigint[])
    ORDER BY priority DESC, run_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)""".replace("{UNPAUSED}", UNPAUSED)
            .replace("{PART}", PART)
            .replace("{CLAIM_PARTS}", CLAIM_PARTS),
            f"""unkeyed AS (
    SELECT m.id, m.unfinished, m.ordering_key, m.priority, m.run_at FROM (
        SELECT c.id, c.limit_key, pg_catalog.row_number() OVER (
            PARTITION BY c.limit_key ORDER BY c.priority DESC, c.run_at, c.id) AS nth
        FROM (
            SELECT u.id, u.limit_key, u.priority, u.run_at FROM pgpubsub.message u
            WHERE channel = %(channel)s AND status = 'pending' AND ordering_key IS NULL
              AND run_at <= pg_catalog.now() AND {UNPAUSED}
              AND {_free_key("u")} AND {_part("u")} IN ({CLAIM_PARTS})
              AND u.id <> ALL(%(passed)s::bigint[])
            ORDER BY priority DESC, run_at, id LIMIT %(scan)s
        ) c
    ) c
    JOIN pgpubsub.message m ON m.id = c.id
    WHERE (c.limit_key IS NULL OR c.nth <= %(per_limit_key)s)
      AND m.status = 'pending' AND m.run_at <= pg_catalog.now()
      AND {_part("m")} IN ({CLAIM_PARTS})
    ORDER BY m.priority DESC, m.run_at, m.id LIMIT %(limit)s
    FOR UPDATE OF m SKIP LOCKED
)""",  # noqa: S608 - constant fragments
        ),
        (
            "AS alone,\n    m.ordering_key, (CASE",
            "AS alone,\n    m.ordering_key, m.limit_key, (CASE",
        ),
    ]
    for old, new in edits:
        assert sql.count(old) == 1, old
        sql = sql.replace(old, new)
    return sql


LIMITED_CLAIM_SQL = _limited_claim_sql()
# The claim's own transaction, after LIMITED_CLAIM_SQL: the buckets of its
# batch's limit_keys locked (created full) and refilled, in key order (as
# every claim locks them: no deadlock); the claim keeps, per key, at most its
# whole tokens, and spends one per message kept.
TAKE_KEY_TOKENS_SQL = f"""
INSERT INTO pgpubsub.key_bucket AS b (channel, key, tokens, updated_at)
SELECT %(channel)s, k.key, %(key_capacity)s, pg_catalog.clock_timestamp()
FROM pg_catalog.unnest(%(keys)s::text[]) k(key) ORDER BY k.key
ON CONFLICT (channel, key) DO UPDATE SET tokens = {KEY_REFILLED},
    updated_at = pg_catalog.clock_timestamp()
RETURNING b.key, b.tokens
"""  # noqa: S608 - constant fragments
SPEND_KEY_TOKENS_SQL = (
    "UPDATE pgpubsub.key_bucket b SET tokens = b.tokens - s.n "
    "FROM ROWS FROM (pg_catalog.unnest(%s::text[]), pg_catalog.unnest(%s::int[])) AS s(key, n) "
    "WHERE b.channel = %s AND b.key = s.key"
)
# Messages a claim took and cannot start (their limit_key out of tokens or
# slots, after another claim's commit; or behind such a one of their ordering
# key): as if never claimed, uncharged; one claimed alone (suspected of
# stopping an earlier process: the second parameter) stays suspect. Due at the
# claim's now(): a question of when the next message is due, counting from it,
# does not count them as newly due (claimed again and given back in a loop).
UNCLAIM_SQL = (
    "UPDATE pgpubsub.message SET attempts = attempts - 1, unfinished = %s, "
    "claimed_alone = false, run_at = pg_catalog.now() "
    "WHERE id = ANY(%s) AND {in_parts}"
)
#: Seconds between sweeps of full key buckets while a processor claims without rest.
BUCKET_SWEEP_EVERY = 1.0
#: Buckets one sweep looks at: a slice in key order, from where the last one stopped.
BUCKET_SLICE = 1000
# Buckets refilled to their capacity (idle keys): a missing row is a full
# bucket, so they go; the table holds the keys active within about a period
# (a "1/d" limit: every key of the day), so a sweep reads a slice of them, and
# the slices go round. Returns the slice's last key and its size (a short
# slice: the next one starts again from the first key). A bucket a claim
# holds locked is left for next time, and so is one whose key has a message
# due: a question of when a key's token is due reads only keys with a bucket,
# and one the last claim passed over for its tokens, refilled and swept
# before the question, waited for the poll (hostile review 18 of issue 26).
_FULL_BUCKETS = f"""
WITH slice AS (
    SELECT b.key FROM pgpubsub.key_bucket b
    WHERE b.channel = %(channel)s{{after}} ORDER BY b.key LIMIT %(slice)s
), bound AS (
    SELECT pg_catalog.min(key) AS first, pg_catalog.max(key) AS until,
        pg_catalog.count(*) AS n FROM slice
), gone AS (
    DELETE FROM pgpubsub.key_bucket WHERE channel = %(channel)s AND key IN (
        SELECT b.key FROM pgpubsub.key_bucket b
        WHERE b.channel = %(channel)s AND b.key >= (SELECT bound.first FROM bound)
        AND b.key <= (SELECT bound.until FROM bound)
        AND {KEY_REFILLED} >= %(key_capacity)s
        -- kept while its key has a message due: a question reads it (KEY_TOKEN_DUE_SQL)
        AND NOT EXISTS (
            SELECT 1 FROM pgpubsub.message d WHERE d.channel = %(channel)s
            AND d.limit_key = b.key AND d.status = 'pending' AND d.limit_key IS NOT NULL
            AND d.run_at <= pg_catalog.now())
        FOR UPDATE OF b SKIP LOCKED)
)
SELECT until, n FROM bound
"""  # noqa: S608 - constant fragments
# (Two statements, from the first key and after one: a bound that may be NULL
# is no index bound in a prepared statement's generic plan.)
FULL_BUCKETS_SQL = _FULL_BUCKETS.replace("{after}", " AND b.key > %(after)s")
FULL_BUCKETS_FIRST_SQL = _FULL_BUCKETS.replace("{after}", "")
# Slot leases of processes that stopped long ago: expired for five lease
# periods. A process stopped for a while (SIGSTOP, a keeper that fell behind)
# renews its own expired leases when it comes back, its listeners still
# running: a lease deleted sooner would let another message of the key start
# beside them. (Until then an expired slot may be taken by a claim of its key:
# the lease's promise ends with it.)
EXPIRED_SLOTS_SQL = (
    "DELETE FROM pgpubsub.lease l WHERE l.channel = %s AND l.kind = 'limit' "
    "AND l.expires_at < pg_catalog.clock_timestamp() - pg_catalog.make_interval(secs => %s)"
)
#: Lease periods after which the expired slot leases of a stopped process are deleted.
SLOT_LEASE_KEPT = 5
# Seconds until the next token of a limit_key out of tokens with a message
# due; 0 for one with a whole token that the last claim left short of tokens
# (``key_short``: it refilled while the batch ran), or that was out of tokens at the
# now() of the crew's last claim (``since``, as NEXT_DUE_SQL: that claim passed
# its messages over, and it refilled before this question: counted only while
# still out of tokens, they waited for the poll, hostile review 15 of issue
# 26, finding 3). None: no such key. A key's due
# message held back by its ordering key still counts: the worker then wakes
# once for nothing (the key has its token, and nothing more is asked of it
# until the next claim is short), rather than a scan per key. The keys looked
# at: those of the due messages a claim would take but for their key's tokens
# (``scan`` without an ordering key, in the claim's order, passing over keys
# with all their slots in use as the claim does, and ``scan`` with one: a rest
# costs about what a claim does), and at most
# KEYS_PER_REST keys of pending messages visited by a loose index scan of
# message_limit_key_idx from after the key the last rest stopped at (the
# messages of ordering keys; the channel's buckets are every key active within
# a period, and its pending keys may be as many: scheduled work per customer).
# A key beyond both is found at a later rest; meanwhile the poll bounds its
# wait. The last columns: the last key visited, and whether the walk was cut
# short there (one key more is visited to know).
_NEXT_LIMIT_KEY = (
    "SELECT d.limit_key FROM pgpubsub.message d WHERE d.channel = %(channel)s "
    "AND d.status = 'pending' AND d.limit_key IS NOT NULL AND {after} "
    "ORDER BY d.limit_key LIMIT 1"
)
_KEY_TOKEN_DUE = f"""
WITH RECURSIVE k(key, n) AS (
    SELECT ({_NEXT_LIMIT_KEY.format(after="{after}")}), 1
    UNION ALL
    SELECT ({_NEXT_LIMIT_KEY.format(after="d.limit_key > k.key")}), k.n + 1
    FROM k WHERE k.key IS NOT NULL AND k.n <= %(keys)s
), walked AS (
    SELECT k.key, k.n FROM k WHERE k.key IS NOT NULL
), {HELD_KEYS}, head AS (
    SELECT DISTINCT h.limit_key AS key FROM (
        (SELECT u.limit_key FROM pgpubsub.message u
         WHERE u.channel = %(channel)s AND u.status = 'pending' AND u.ordering_key IS NULL
           AND u.run_at <= pg_catalog.now() AND u.limit_key IS NOT NULL
           AND u.limit_key NOT IN (SELECT key FROM held)
         ORDER BY u.priority DESC, u.run_at, u.id LIMIT %(scan)s)
        UNION ALL
        (SELECT o.limit_key FROM pgpubsub.message o
         WHERE o.channel = %(channel)s AND o.status = 'pending' AND o.ordering_key IS NOT NULL
           AND o.run_at <= pg_catalog.now() AND o.limit_key IS NOT NULL
           AND o.limit_key NOT IN (SELECT key FROM held)
         LIMIT %(scan)s)) h
), seen AS (
    SELECT w.key FROM walked w WHERE w.n <= %(keys)s UNION SELECT h.key FROM head h
)
SELECT (
    SELECT pg_catalog.min(CASE WHEN r.t < 1 THEN (1 - r.t) / %(key_per_second)s ELSE 0 END)
    FROM seen w CROSS JOIN LATERAL (
        SELECT {KEY_REFILLED} AS t, {KEY_REFILLED_SINCE} AS s FROM pgpubsub.key_bucket b
        WHERE b.channel = %(channel)s AND b.key = w.key) r
    WHERE {UNPAUSED} AND (r.s < 1 OR w.key = ANY(%(key_short)s::text[])) AND (
        SELECT pg_catalog.min(d.run_at) FROM pgpubsub.message d
        WHERE d.channel = %(channel)s AND d.limit_key = w.key AND d.limit_key IS NOT NULL
          AND d.status = 'pending') <= pg_catalog.now()
), (SELECT w.key FROM walked w WHERE w.n = %(keys)s),
   (SELECT pg_catalog.count(*) > %(keys)s FROM walked w)
"""  # noqa: S608 - constant fragments
KEY_TOKEN_DUE_SQL = _KEY_TOKEN_DUE.replace("{after}", "d.limit_key > %(after)s")
KEY_TOKEN_DUE_FIRST_SQL = _KEY_TOKEN_DUE.replace("{after}", "true")  # from the first key
#: Limit keys of pending messages one rest looks at for a token due (see KEY_TOKEN_DUE_SQL).
KEYS_PER_REST = 200
