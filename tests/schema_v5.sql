-- pgpubsub schema: stored messages and the trigger helper. The one source:
-- `pgpubsub migrate` and the Django migration both apply this file as is, and
-- every statement is idempotent.
--
-- Safe in a shared database: every function pins its search_path (names
-- resolve in pg_catalog and pgpubsub only, never in a schema another role can
-- create objects in), built-ins are schema-qualified, the one trigger function
-- that runs as the schema's owner (pgpubsub.send_captured, SECURITY DEFINER: a
-- role that only writes to a watched table needs no privilege on
-- pgpubsub.message) evaluates nothing the writer controls, and no function
-- that could inject events is executable by PUBLIC.
CREATE SCHEMA IF NOT EXISTS pgpubsub;

-- status: pending (waiting or being retried), dead (attempts exhausted, kept
-- with its error), done (completed, kept only when the channel has a
-- retention), spill (a plain trigger channel's row too wide for NOTIFY, kept
-- for its listeners to read by id).
CREATE TABLE IF NOT EXISTS pgpubsub.message (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel       text        NOT NULL,
    payload       text        NOT NULL,
    status        text        NOT NULL DEFAULT 'pending'
                              CHECK (status IN ('pending', 'dead', 'done', 'spill')),
    attempts      integer     NOT NULL DEFAULT 0,
    run_at        timestamptz NOT NULL DEFAULT pg_catalog.now(),
    last_error    text,
    context       jsonb       DEFAULT NULLIF(pg_catalog.current_setting('pgpubsub.notification_context', true), '')::jsonb,
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    completed_at  timestamptz
);

-- Claiming reads only pending rows of one channel that are due, oldest first:
-- a partial index keeps that cheap whatever the backlog of dead or done rows.
CREATE INDEX IF NOT EXISTS message_claim_idx
    ON pgpubsub.message (channel, run_at, id) WHERE status = 'pending';

-- Retention sweeps and spill clean-up read only their own rows.
CREATE INDEX IF NOT EXISTS message_kept_idx
    ON pgpubsub.message (channel, status, created_at) WHERE status IN ('done', 'spill');

-- OpenTelemetry: the trace context of the publish (W3C traceparent headers),
-- so the span of the worker that handles the message joins the publisher's trace.
ALTER TABLE pgpubsub.message ADD COLUMN IF NOT EXISTS trace jsonb;

-- Job-queue options of durable channels (pgpubsub.notify(..., priority=,
-- dedupe_key=, ordering_key=, delay= or run_at=)). Higher priorities are
-- claimed first among due messages; at most one pending message per
-- (channel, dedupe_key); messages of one (channel, ordering_key) run one at a
-- time, in id order.
ALTER TABLE pgpubsub.message ADD COLUMN IF NOT EXISTS priority integer NOT NULL DEFAULT 0;
ALTER TABLE pgpubsub.message ADD COLUMN IF NOT EXISTS dedupe_key text;
ALTER TABLE pgpubsub.message ADD COLUMN IF NOT EXISTS ordering_key text;
CREATE INDEX IF NOT EXISTS message_due_idx
    ON pgpubsub.message (channel, priority DESC, run_at, id) WHERE status = 'pending';
CREATE UNIQUE INDEX IF NOT EXISTS message_dedupe_idx
    ON pgpubsub.message (channel, dedupe_key) WHERE status = 'pending' AND dedupe_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS message_ordering_idx
    ON pgpubsub.message (channel, ordering_key, id)
    WHERE status = 'pending' AND ordering_key IS NOT NULL;

-- Periodic channels (schedule="*/5 * * * *"): the last tick that was stored,
-- advanced by exactly one worker per tick.
CREATE TABLE IF NOT EXISTS pgpubsub.schedule (
    channel    text        PRIMARY KEY,
    last_tick  timestamptz NOT NULL
);

-- Live workers (`pgpubsub status`): each worker process registers here at
-- start, heartbeats every few seconds with its counts, and removes its row
-- when it stops; a row whose heartbeat stopped is a worker that is gone.
CREATE TABLE IF NOT EXISTS pgpubsub.worker (
    id          text        PRIMARY KEY,
    host        text        NOT NULL,
    pid         integer     NOT NULL,
    version     text        NOT NULL,
    channels    text[]      NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    last_seen   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    processed   bigint      NOT NULL DEFAULT 0,
    failed      bigint      NOT NULL DEFAULT 0
);

-- Version 3 (the dashboard). Each worker's counts per channel, with the
-- channel's kind: {"<channel>": {"kind": "plain|durable|trigger", "durable":
-- bool, "processed": n, "failed": n}}.
ALTER TABLE pgpubsub.worker ADD COLUMN IF NOT EXISTS stats jsonb NOT NULL DEFAULT '{}';
-- Dead messages of a channel, newest first, and the channels that have any,
-- read through an index whatever the size of the table.
CREATE INDEX IF NOT EXISTS message_dead_idx
    ON pgpubsub.message (channel, id) WHERE status = 'dead';
-- Channel and status are correlated: joint statistics make the planner's
-- estimate of "messages of this channel with this status" (what the dashboard
-- shows when an exact count would be slow) close to the truth.
CREATE STATISTICS IF NOT EXISTS pgpubsub.message_channel_status (mcv)
    ON channel, status FROM pgpubsub.message;

-- Version 4 (grants): what `pgpubsub grant` gave each role, so that
-- `--revoke` gives back exactly what the role held before: the kinds granted,
-- and the privileges the role held in this schema before its first grant.
CREATE TABLE IF NOT EXISTS pgpubsub.role_grant (
    role  text NOT NULL,
    kind  text NOT NULL,
    PRIMARY KEY (role, kind)
);
CREATE TABLE IF NOT EXISTS pgpubsub.role_baseline (
    role  text  PRIMARY KEY,
    held  jsonb NOT NULL
);
REVOKE ALL ON pgpubsub.role_grant, pgpubsub.role_baseline FROM PUBLIC;

-- Version 4 (failure isolation). unfinished: an attempt was claimed and its
-- outcome never recorded (the process handling it stopped mid-batch). Such a
-- message may be the one that kills its worker, so it is claimed alone, one
-- per transaction, and charges no other message an attempt.
ALTER TABLE pgpubsub.message ADD COLUMN IF NOT EXISTS unfinished boolean NOT NULL DEFAULT false;
-- claimed_alone: its last attempt was claimed alone. Only a message whose
-- process stopped while it ran alone is charged crashes to death; one whose
-- batch was cut short may be innocent, and is first run alone.
ALTER TABLE pgpubsub.message ADD COLUMN IF NOT EXISTS claimed_alone boolean NOT NULL DEFAULT false;

-- Version 4 (leases): an ordering key in a listener and a max_in_flight slot
-- are held in the name of a worker (its registry row's id, '#', its
-- processor), live while expires_at is to come or the worker's heartbeat is
-- fresh, so that a session that dies frees nothing while its listener may
-- still run (src/pgpubsub/_leases.py).
CREATE TABLE IF NOT EXISTS pgpubsub.lease (
    channel     text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('key', 'slot')),
    name        text        NOT NULL,
    holder      text        NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (channel, kind, name)
);

-- Version 4 (claims): messages without an ordering key are claimed through an
-- index of their own (the keyed ones, through message_ordering_idx, head by
-- head), so that neither kind is scanned to find the other.
CREATE INDEX IF NOT EXISTS message_unkeyed_idx
    ON pgpubsub.message (channel, priority DESC, run_at, id)
    WHERE status = 'pending' AND ordering_key IS NULL;
DROP INDEX IF EXISTS pgpubsub.message_due_idx;

-- Version 5 (wake-ups). A durable publisher sends its NOTIFY (the wake-up)
-- only when a worker of the channel sleeps: a committing transaction that
-- notified holds a database-wide lock for its commit, so notifying publishers
-- commit one at a time. A worker with nothing to do registers here before its
-- last look at the queue (pgpubsub.sleep); the first publisher to find the row
-- takes it and notifies, the others do not (the woken workers register again
-- once they have nothing to do). Publishers hold a shared advisory lock on the
-- channel until they commit, and a worker registers only when it can take it
-- exclusively: so no publisher finds "nobody sleeps" and commits after the
-- worker's last look. Unlogged: lost in a crash, when workers register anew.
CREATE UNLOGGED TABLE IF NOT EXISTS pgpubsub.sleeper (
    channel  text        PRIMARY KEY,
    since    timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
REVOKE ALL ON pgpubsub.sleeper FROM PUBLIC;

-- Called by publishers after storing messages (any role that may store them).
-- Runs as the schema's owner: it reads and takes the channel's row, nothing else.
CREATE OR REPLACE FUNCTION pgpubsub.wake(channel text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock_shared(
        pg_catalog.hashtextextended('pgpubsub.sleeper' || channel, 0));
    -- A statement of its own: its snapshot is taken once the lock is held.
    DELETE FROM pgpubsub.sleeper s WHERE s.ctid = (
        SELECT t.ctid FROM pgpubsub.sleeper t WHERE t.channel = wake.channel
        FOR UPDATE SKIP LOCKED);
    IF FOUND THEN
        PERFORM pg_catalog.pg_notify(channel, '');
    END IF;
END
$body$;
REVOKE ALL ON FUNCTION pgpubsub.wake(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgpubsub.wake(text) TO PUBLIC;

-- Called by a worker with nothing to do, before its last look at the queue:
-- false while a publisher of the channel is in a transaction (the worker then
-- looks again shortly, without a wake-up).
CREATE OR REPLACE FUNCTION pgpubsub.sleep(channel text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
BEGIN
    IF NOT pg_catalog.pg_try_advisory_xact_lock(
            pg_catalog.hashtextextended('pgpubsub.sleeper' || channel, 0)) THEN
        RETURN false;
    END IF;
    INSERT INTO pgpubsub.sleeper (channel) VALUES (sleep.channel) ON CONFLICT DO NOTHING;
    RETURN true;
END
$body$;

-- Version 5 (cancelling running work): a message cancelled while a worker
-- handles it. The NOTIFY that tells workers to look here carries nothing (any
-- role can send one): only a row here, which only an operator can write, stops
-- a listener. No foreign key: its check would wait for the worker's row lock.
-- A request whose message is no longer pending is deleted by the next cancel.
CREATE TABLE IF NOT EXISTS pgpubsub.cancel_request (
    id            bigint      PRIMARY KEY,
    requested_at  timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
REVOKE ALL ON pgpubsub.cancel_request FROM PUBLIC;

-- Version 5 (flow control: pause and rate limits). A paused channel has a
-- row here: the claim takes none of its messages (they are kept); a pause
-- after a claim lets that batch finish. Written by operators, read by workers
-- (in the claim) and monitors. Logged: a pause survives a server restart.
CREATE TABLE IF NOT EXISTS pgpubsub.channel_pause (
    channel    text        PRIMARY KEY,
    paused_at  timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
REVOKE ALL ON pgpubsub.channel_pause FROM PUBLIC;

-- The token bucket of a rate-limited channel (rate_limit): tokens as of
-- updated_at, refilled by the time elapsed since, up to the bucket's capacity.
-- A claim locks the row, refills it, claims at most its whole tokens and takes
-- one per message claimed, in one transaction: the limit holds across every
-- worker. Logged: it survives worker and server restarts.
CREATE TABLE IF NOT EXISTS pgpubsub.rate_bucket (
    channel     text             PRIMARY KEY,
    tokens      double precision NOT NULL,
    updated_at  timestamptz      NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
REVOKE ALL ON pgpubsub.rate_bucket FROM PUBLIC;

-- The schema's version (one row): `pgpubsub status` compares it with the
-- version the installed library expects. Never lowered by an older library.
CREATE TABLE IF NOT EXISTS pgpubsub.version (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    version  integer NOT NULL
);
INSERT INTO pgpubsub.version (one, version) VALUES (true, 5)
    ON CONFLICT (one) DO UPDATE SET version = GREATEST(pgpubsub.version.version, EXCLUDED.version);

-- The JSON of one row event of a trigger channel.
CREATE OR REPLACE FUNCTION pgpubsub.event(
    operation text, tg_when text, tbl text, old_row jsonb, new_row jsonb
) RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
    SELECT pg_catalog.jsonb_build_object(
        'operation', operation, 'when', tg_when, 'table', tbl,
        'old', old_row, 'new', new_row,
        'context', NULLIF(pg_catalog.current_setting('pgpubsub.notification_context', true), '')::jsonb
    )::text
$body$;

-- Send row events of a trigger channel. Durable channels store them and send
-- one wake-up; plain channels send each in its NOTIFY, or, when it is over
-- PostgreSQL's 8000-byte limit, store it as 'spill' and send its id with the
-- SHA-256 of its text, so a wide row never makes the user's write fail, and a
-- reference that any session could forge with pg_notify reveals nothing
-- (listeners read only a spill row of their own channel whose digest matches).
CREATE OR REPLACE FUNCTION pgpubsub.send_events(
    channel text, durable boolean, payloads text[]
) RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
DECLARE
    wide text;
    spilled bigint;
BEGIN
    IF payloads IS NULL OR pg_catalog.cardinality(payloads) = 0 THEN
        RETURN;
    END IF;
    IF durable THEN
        INSERT INTO pgpubsub.message (channel, payload)
        SELECT channel, p FROM pg_catalog.unnest(payloads) p;
        PERFORM pgpubsub.wake(channel);
        RETURN;
    END IF;
    PERFORM pg_catalog.pg_notify(channel, p) FROM pg_catalog.unnest(payloads) p
        WHERE pg_catalog.octet_length(p) <= 7999;
    -- One at a time, so that the digest is of the text in hand: reading the
    -- stored payload back would need SELECT on it (a Django writer has none).
    FOR wide IN
        SELECT p FROM pg_catalog.unnest(payloads) p WHERE pg_catalog.octet_length(p) > 7999
    LOOP
        INSERT INTO pgpubsub.message (channel, payload, status)
        VALUES (channel, wide, 'spill') RETURNING id INTO spilled;
        PERFORM pg_catalog.pg_notify(channel, pg_catalog.format(
            '{"spill": %s, "sha256": "%s"}', spilled,
            pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(wide, 'UTF8')), 'hex')));
    END LOOP;
END
$body$;

-- One row event (row-level triggers; Django's pgtrigger bodies call it too).
CREATE OR REPLACE FUNCTION pgpubsub.notify_row(
    channel text, durable boolean, operation text, tg_when text, tbl text,
    old_row jsonb, new_row jsonb
) RETURNS void LANGUAGE sql SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
    SELECT pgpubsub.send_events(
        channel, durable, ARRAY[pgpubsub.event(operation, tg_when, tbl, old_row, new_row)]
    )
$body$;

-- Version 4 (security): the triggers of trigger channels installed without
-- Django come in pairs. The first, pgpubsub.notify_trigger('<channel>',
-- '<durable|plain>') or pgpubsub.notify_statement(...), runs as the role that
-- wrote the row (SECURITY INVOKER): it turns the rows into JSON, so a cast or
-- type the writer owns runs with the writer's rights only, and keeps them in
-- a transaction-local setting. The second, pgpubsub.send_captured('<channel>'),
-- fires right after it (trigger names sort it second) and is the only code
-- that runs as the schema's owner: it evaluates nothing the writer controls
-- (text and jsonb built-ins), publishes only for a (table, channel) pair that
-- an installer registered in pgpubsub.trigger_channel (the table is the
-- trigger's own, TG_RELID, which no caller can choose), and builds the event's
-- operation, timing and table itself. Neither function is executable by
-- PUBLIC, so no role can attach them to its own tables (PostgreSQL checks
-- EXECUTE when a trigger is created, not when it fires: writers of a watched
-- table need no grant).
CREATE TABLE IF NOT EXISTS pgpubsub.trigger_channel (
    relid    oid     NOT NULL,
    channel  text    NOT NULL,
    durable  boolean NOT NULL,
    PRIMARY KEY (relid, channel)
);

CREATE OR REPLACE FUNCTION pgpubsub.notify_trigger() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
BEGIN
    -- '{relid, channel, row, old row, new row}' (json text; NULL for a missing side)
    PERFORM pg_catalog.set_config('pgpubsub.captured', ARRAY[
        TG_RELID::text, TG_ARGV[0], 'row',
        CASE WHEN TG_OP <> 'INSERT' THEN pg_catalog.to_json(OLD)::text END,
        CASE WHEN TG_OP <> 'DELETE' THEN pg_catalog.to_json(NEW)::text END
    ]::text, true);
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$body$;

-- Statement level, for AFTER INSERT and AFTER DELETE: the statement's rows
-- come as a transition table (REFERENCING NEW TABLE AS pgpubsub_new, or OLD
-- TABLE AS pgpubsub_old), captured in one set-based call instead of a call per row.
CREATE OR REPLACE FUNCTION pgpubsub.notify_statement() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- '{relid, channel, new, new row 1, new row 2, ...}'
        PERFORM pg_catalog.set_config('pgpubsub.captured', (ARRAY[TG_RELID::text, TG_ARGV[0], 'new']
            || ARRAY(SELECT pg_catalog.to_json(r)::text FROM pgpubsub_new r))::text, true);
    ELSE
        PERFORM pg_catalog.set_config('pgpubsub.captured', (ARRAY[TG_RELID::text, TG_ARGV[0], 'old']
            || ARRAY(SELECT pg_catalog.to_json(r)::text FROM pgpubsub_old r))::text, true);
    END IF;
    RETURN NULL;
END
$body$;

-- Reads what the capturing trigger kept. The rows are only checked to be JSON
-- (json's input function: a scan, no evaluation) and put in an event built here.
CREATE OR REPLACE FUNCTION pgpubsub.send_captured() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
DECLARE
    registered record;
    captured text[] := NULLIF(pg_catalog.current_setting('pgpubsub.captured', true), '')::text[];
    tbl text := pg_catalog.concat(TG_TABLE_SCHEMA, '.', TG_TABLE_NAME);
    context json := NULLIF(pg_catalog.current_setting('pgpubsub.notification_context', true), '')::json;
    side text := captured[3];
BEGIN
    -- The table's own pair, or its partitioned parent's (row triggers of a
    -- partitioned table fire on the partition).
    SELECT t.durable INTO registered FROM pgpubsub.trigger_channel t
        WHERE (t.relid = TG_RELID OR t.relid = ANY(ARRAY(
                  SELECT a.relid FROM pg_catalog.pg_partition_ancestors(TG_RELID) a)))
          AND t.channel = TG_ARGV[0]
        LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgpubsub: no trigger channel % is installed on %', TG_ARGV[0], tbl
            USING HINT = 'install it with pgpubsub.install_triggers or `pgpubsub migrate`';
    END IF;
    IF captured[1] IS DISTINCT FROM TG_RELID::text OR captured[2] IS DISTINCT FROM TG_ARGV[0] THEN
        RAISE EXCEPTION 'pgpubsub: the rows of % for channel % were not captured', tbl, TG_ARGV[0]
            USING HINT = 'its pgpubsub.notify_trigger trigger is missing or disabled';
    END IF;
    PERFORM pg_catalog.set_config('pgpubsub.captured', '', true);
    IF side = 'row' THEN
        PERFORM pgpubsub.send_events(TG_ARGV[0], registered.durable, ARRAY[
            pg_catalog.json_build_object(
                'operation', TG_OP, 'when', TG_WHEN, 'table', tbl,
                'old', captured[4]::json, 'new', captured[5]::json, 'context', context
            )::text]);
    ELSE
        PERFORM pgpubsub.send_events(TG_ARGV[0], registered.durable, ARRAY(
            SELECT pg_catalog.json_build_object(
                'operation', TG_OP, 'when', TG_WHEN, 'table', tbl,
                'old', CASE WHEN side = 'old' THEN r.x::json END,
                'new', CASE WHEN side = 'new' THEN r.x::json END,
                'context', context
            )::text
            FROM pg_catalog.unnest(captured) WITH ORDINALITY AS r(x, k) WHERE r.k > 3
            ORDER BY r.k));
    END IF;
    IF TG_LEVEL = 'STATEMENT' THEN
        RETURN NULL;
    ELSIF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$body$;

-- Triggers installed by a version before 4 had one SECURITY DEFINER function,
-- executable by PUBLIC: any role could have attached it to its own table, so
-- no such trigger is trusted. Each well-formed one gets its sending half, not
-- a registration: its table's writes fail with "no trigger channel ... is
-- installed" (loudly, nothing lost) until `pgpubsub migrate <listener
-- modules>` installs the channel's triggers again and registers them.
-- Malformed ones (no channel, INSTEAD OF, TRUNCATE, a name too long for the
-- suffix, partition clones: their parent's gets its own) are left alone: the
-- function they call now only captures, as the writer, and publishes nothing.
CREATE OR REPLACE FUNCTION pgpubsub.upgrade_triggers_to_v4() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgpubsub, pg_temp AS $migrate$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT tg.tgrelid, tg.tgname, tg.tgtype, tg.tgargs
        FROM pg_catalog.pg_trigger tg
        WHERE tg.tgfoid IN ('pgpubsub.notify_trigger()'::pg_catalog.regprocedure,
                            'pgpubsub.notify_statement()'::pg_catalog.regprocedure)
          AND tg.tgnargs = 2 AND tg.tgparentid = 0
          AND tg.tgtype & (32 | 64) = 0                            -- no TRUNCATE, no INSTEAD OF
          AND (tg.tgtype & (4 | 8 | 16)) IN (4, 8, 16)             -- one of INSERT, DELETE, UPDATE
          AND pg_catalog.octet_length(tg.tgname::text) <= 58       -- room for '_send'
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger s
                          WHERE s.tgrelid = tg.tgrelid AND s.tgname = tg.tgname || '_send')
    LOOP
        -- tgargs: '<channel>\0<durable|plain>\0'
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER %I %s %s ON %s FOR EACH %s EXECUTE FUNCTION pgpubsub.send_captured(%L)',
            t.tgname || '_send',
            CASE WHEN t.tgtype & 2 <> 0 THEN 'BEFORE' ELSE 'AFTER' END,
            CASE WHEN t.tgtype & 4 <> 0 THEN 'INSERT'
                 WHEN t.tgtype & 8 <> 0 THEN 'DELETE' ELSE 'UPDATE' END,
            t.tgrelid::pg_catalog.regclass,
            CASE WHEN t.tgtype & 1 <> 0 THEN 'ROW' ELSE 'STATEMENT' END,
            pg_catalog.convert_from(substring(t.tgargs FROM 1 FOR
                position('\x00'::bytea IN t.tgargs) - 1), 'UTF8'));
    END LOOP;
END
$migrate$;
SELECT pgpubsub.upgrade_triggers_to_v4();
DROP FUNCTION pgpubsub.upgrade_triggers_to_v4();

-- The helpers could be called directly to inject events, so only the schema's
-- owner and roles granted EXECUTE (`pgpubsub grant ROLE --django-writer`, for
-- Django's pgtrigger triggers) may; the trigger functions cannot be attached
-- to a table by a role without EXECUTE (see version 4 above).
REVOKE ALL ON FUNCTION pgpubsub.event(text, text, text, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgpubsub.send_events(text, boolean, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgpubsub.notify_row(text, boolean, text, text, text, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgpubsub.notify_trigger() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgpubsub.notify_statement() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgpubsub.send_captured() FROM PUBLIC;
REVOKE ALL ON pgpubsub.trigger_channel FROM PUBLIC;
