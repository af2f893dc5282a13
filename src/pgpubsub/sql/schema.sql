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

-- Run again on a live queue (an upgrade), this script takes the message
-- table's strongest lock first: it would otherwise take a weaker one (an
-- index) and later the exclusive one (a column), and a worker that had read
-- the table, waiting to write it, would deadlock with it. Only a role that
-- acts as the table's owner (the one that can change it) takes it: another
-- one fails further on, and must not first queue for it behind a transaction
-- on the table, with every publish and claim queued behind it.
DO $lock$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_class c
               WHERE c.oid = pg_catalog.to_regclass('pgpubsub.message')
                 AND pg_catalog.pg_has_role(c.relowner, 'USAGE')) THEN
        LOCK TABLE pgpubsub.message IN ACCESS EXCLUSIVE MODE;
    END IF;
END
$lock$;

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
-- claimed_alone: its last attempt ran alone (marked as its listener started,
-- nothing else of its process in a listener). Only a message whose process
-- stopped while it ran alone is charged crashes to death; one whose batch was
-- cut short, or that waited for its turn alone, may be innocent, and is run
-- alone first.
ALTER TABLE pgpubsub.message ADD COLUMN IF NOT EXISTS claimed_alone boolean NOT NULL DEFAULT false;

-- Version 7 (storage). A message is an insert, a claim's update and a
-- completion's delete: row versions that only vacuum reclaims, and vacuum
-- reclaims none deleted after the oldest transaction still open anywhere in
-- the database began (a report, a session idle in a transaction, a backup).
-- Meanwhile every claim walked the dead index entries of every message
-- completed since: the queue slowed down with each message processed.
--
-- So pending messages are stored in a ring of four segments, partitions of
-- pgpubsub.message. Publishers store into the current one (pgpubsub.ring);
-- once it has had SEGMENT_SIZE new messages the ring moves on to the next,
-- and a segment whose messages are all gone is emptied by TRUNCATE, which
-- frees its rows and index entries at once, whatever transaction is open
-- (pgpubsub.rotate, run by workers). Claims and completions never wait for
-- vacuum: they walk at most the entries of the segments not yet emptied.
--
-- Rows that stay are kept apart, so that they never hold a segment back:
-- dead, done (kept for a retention) and spill rows in pgpubsub.message_kept,
-- pending messages with a dedupe_key in pgpubsub.message_deduped (its unique
-- index decides the key, race-free; vacuum reclaims this one's rows, as
-- before), and messages not due for a while that rotate() moved out of a
-- segment it empties, in pgpubsub.message_later (segment -3: a reminder for
-- tomorrow, a retry in an hour), so that they do not pin a segment; vacuum
-- reclaims those too. The partition follows from the row (status, dedupe_key and
-- segment): a message that dies or is kept moves to message_kept in the same
-- statement, and one replayed moves back.
CREATE TABLE IF NOT EXISTS pgpubsub.ring (
    one       boolean  PRIMARY KEY DEFAULT true CHECK (one),
    segment   smallint NOT NULL DEFAULT 0 CHECK (segment BETWEEN 0 AND 3),
    -- the id sequence's value when the segment became the current one
    first_id  bigint   NOT NULL DEFAULT 0
);
-- The live partitions: each segment that became current and has not been
-- emptied since, message_deduped (-2) while it holds a message, and
-- message_later (-3) while it holds one due within a minute (the only
-- ones that may hold pending rows, but for a publisher that read the ring
-- before it moved, see rotate). Claims read only those
-- (ChannelProcessor._claim_parts): a claim's cost follows the number of
-- tables it reads, and most of the time that is the current segment alone.
-- Every one at first (and on the upgrade of a ring without the column):
-- rotate takes the empty ones out.
ALTER TABLE pgpubsub.ring ADD COLUMN IF NOT EXISTS live smallint[] NOT NULL DEFAULT '{-3,-2,0,1,2,3}';
INSERT INTO pgpubsub.ring DEFAULT VALUES ON CONFLICT (one) DO NOTHING;
REVOKE ALL ON pgpubsub.ring FROM PUBLIC;
GRANT SELECT ON pgpubsub.ring TO PUBLIC;  -- a segment number: what every publisher reads

-- The segment new messages go to (the default of pgpubsub.message.segment).
CREATE OR REPLACE FUNCTION pgpubsub.current_segment() RETURNS smallint
LANGUAGE sql STABLE SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
    SELECT r.segment FROM pgpubsub.ring r
$body$;
REVOKE ALL ON FUNCTION pgpubsub.current_segment() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgpubsub.current_segment() TO PUBLIC;

-- From a table as versions 1 to 6 made it: one transaction, holding the
-- table's lock while its rows are copied (publishers and workers wait for it:
-- its duration follows the rows kept, mostly dead letters and done ones).
-- Ids are kept, and so are the table's owner and the privileges roles held on
-- it and on its columns, each granted by the role that had granted it (a
-- grantor can still revoke it): the new table and its partitions are created
-- as the old table's owner (run by a superuser, they were the superuser's, and
-- the application's role lost its table: hostile review of issue 26, findings
-- 4 and 7). A grant whose grantor this role may not act as (a migrate run by
-- the owner, not a superuser, of a table where another role passed a grant
-- option on) is granted by the owner, with a warning.
DO $convert$
DECLARE
    old_seq regclass;
    last_id bigint;
    todo jsonb;
    item jsonb;
    i integer;
    done integer[] := '{}';
    grantor oid;
    me name := current_user;
    owner name;
    owner_id oid;
    granted boolean;
    progress boolean := true;
BEGIN
    IF (SELECT c.relkind FROM pg_catalog.pg_class c
        WHERE c.oid = 'pgpubsub.message'::pg_catalog.regclass) <> 'r' THEN
        RETURN;
    END IF;
    SELECT c.relowner, pg_catalog.pg_get_userbyid(c.relowner) INTO owner_id, owner
    FROM pg_catalog.pg_class c WHERE c.oid = 'pgpubsub.message'::pg_catalog.regclass;
    ALTER TABLE pgpubsub.message RENAME TO message_v5;
    old_seq := pg_catalog.pg_get_serial_sequence('pgpubsub.message_v5', 'id')::pg_catalog.regclass;
    EXECUTE pg_catalog.format('SET LOCAL ROLE %I', owner);
    CREATE TABLE pgpubsub.message (
        LIKE pgpubsub.message_v5 INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING CONSTRAINTS,
        segment smallint NOT NULL DEFAULT pgpubsub.current_segment()
    ) PARTITION BY LIST ((CASE WHEN status <> 'pending' THEN -1
                               WHEN dedupe_key IS NOT NULL THEN -2 ELSE segment END));
    CREATE TABLE pgpubsub.message_0 PARTITION OF pgpubsub.message FOR VALUES IN (0);
    CREATE TABLE pgpubsub.message_1 PARTITION OF pgpubsub.message FOR VALUES IN (1);
    CREATE TABLE pgpubsub.message_2 PARTITION OF pgpubsub.message FOR VALUES IN (2);
    CREATE TABLE pgpubsub.message_3 PARTITION OF pgpubsub.message FOR VALUES IN (3);
    CREATE TABLE pgpubsub.message_kept PARTITION OF pgpubsub.message FOR VALUES IN (-1);
    CREATE TABLE pgpubsub.message_deduped PARTITION OF pgpubsub.message FOR VALUES IN (-2);
    CREATE TABLE pgpubsub.message_later PARTITION OF pgpubsub.message FOR VALUES IN (-3);
    INSERT INTO pgpubsub.message OVERRIDING SYSTEM VALUE
        SELECT v.*, (SELECT r.segment FROM pgpubsub.ring r) FROM pgpubsub.message_v5 v;
    last_id := GREATEST(COALESCE(pg_catalog.pg_sequence_last_value(old_seq), 0),
                        (SELECT COALESCE(pg_catalog.max(v.id), 0) FROM pgpubsub.message_v5 v));
    IF last_id > 0 THEN  -- new ids after the old ones (a fresh table's start at 1)
        PERFORM pg_catalog.setval(
            pg_catalog.pg_get_serial_sequence('pgpubsub.message', 'id'), last_id);
    END IF;
    -- What roles held on the table and on its columns (pgpubsub grant: a
    -- publisher's INSERT names columns) they hold on the new one, from the
    -- same grantor: the owner's grants first, then each one whose grantor
    -- holds the grant option by then (a chain of grant options, in order).
    -- Held in a variable (a temporary table needs TEMP on the database), each
    -- with its GRANT statement.
    SELECT COALESCE(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
               'priv', x.priv, 'grantee', x.grantee, 'grantor', x.grantor, 'col', x.col,
               'grant', pg_catalog.format('GRANT %s %s ON pgpubsub.message TO %s %s',
                   x.priv,
                   CASE WHEN x.col IS NULL THEN '' ELSE pg_catalog.format('(%I)', x.col) END,
                   CASE WHEN x.grantee = 0 THEN 'PUBLIC'
                        ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(x.grantee)) END,
                   CASE WHEN x.is_grantable THEN 'WITH GRANT OPTION' ELSE '' END))), '[]')
    INTO todo FROM (
        SELECT a.privilege_type AS priv, a.is_grantable, a.grantee, a.grantor,
               NULL::name AS col
        FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
        WHERE c.oid = 'pgpubsub.message_v5'::pg_catalog.regclass
          AND NOT (a.grantee = c.relowner AND a.grantor = c.relowner)
        UNION ALL
        SELECT a.privilege_type, a.is_grantable, a.grantee, a.grantor, t.attname
        FROM pg_catalog.pg_attribute t, pg_catalog.aclexplode(t.attacl) a
        WHERE t.attrelid = 'pgpubsub.message_v5'::pg_catalog.regclass AND t.attacl IS NOT NULL
    ) x;
    WHILE progress LOOP
        progress := false;
        FOR i IN 0 .. pg_catalog.jsonb_array_length(todo) - 1 LOOP
            CONTINUE WHEN i = ANY(done);
            item := todo -> i;
            grantor := (item ->> 'grantor')::oid;
            granted := grantor = owner_id OR CASE WHEN item ->> 'col' IS NULL
                THEN pg_catalog.has_table_privilege(grantor, 'pgpubsub.message',
                                                    (item ->> 'priv') || ' WITH GRANT OPTION')
                ELSE pg_catalog.has_column_privilege(grantor, 'pgpubsub.message',
                    item ->> 'col', (item ->> 'priv') || ' WITH GRANT OPTION') END;
            CONTINUE WHEN NOT granted;
            BEGIN
                EXECUTE pg_catalog.format('SET LOCAL ROLE %I', pg_catalog.pg_get_userbyid(grantor));
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE WARNING 'pgpubsub.message: % on % to % is granted by %, not by % as before '
                    '(this role may not act as %)', item ->> 'priv',
                    COALESCE(item ->> 'col', 'the table'),
                    (item ->> 'grantee')::oid::pg_catalog.regrole, owner,
                    pg_catalog.pg_get_userbyid(grantor), pg_catalog.pg_get_userbyid(grantor);
                EXECUTE pg_catalog.format('SET LOCAL ROLE %I', owner);
            END;
            EXECUTE item ->> 'grant';
            EXECUTE pg_catalog.format('SET LOCAL ROLE %I', owner);
            done := done || i;
            progress := true;
        END LOOP;
    END LOOP;
    -- A grant whose grantor never held the option (none in a consistent ACL).
    FOR i IN 0 .. pg_catalog.jsonb_array_length(todo) - 1 LOOP
        CONTINUE WHEN i = ANY(done);
        item := todo -> i;
        RAISE WARNING 'pgpubsub.message: % on % to % is granted by %, not by % as before',
            item ->> 'priv', COALESCE(item ->> 'col', 'the table'),
            (item ->> 'grantee')::oid::pg_catalog.regrole, owner,
            pg_catalog.pg_get_userbyid((item ->> 'grantor')::oid);
        EXECUTE item ->> 'grant';
    END LOOP;
    EXECUTE pg_catalog.format('SET LOCAL ROLE %I', me);
    UPDATE pgpubsub.ring SET first_id = last_id;
    DROP TABLE pgpubsub.message_v5;
END
$convert$;

-- Claiming reads only pending rows of one channel that are due, oldest first:
-- a partial index keeps that cheap whatever the backlog of dead or done rows.
CREATE INDEX IF NOT EXISTS message_claim_idx
    ON pgpubsub.message (channel, run_at, id) WHERE status = 'pending';
-- Messages by id: no primary key (a partitioned table's unique index must
-- hold its partition key; ids come from the identity sequence), but a unique
-- index on id in each partition, which is also the partition's replica
-- identity. Logical replication needs one on every table it publishes updates
-- and deletes of: under a publication FOR ALL TABLES (change data capture,
-- logical-replication upgrades) a partition without one failed every claim
-- and completion (hostile review of issue 26, finding 3). REPLICA IDENTITY
-- FULL would do too, but it writes each old row whole, payload included, to
-- the WAL at every claim and completion, and a subscriber without an index
-- finds each row by a scan. Set once: ALTER TABLE waits for the partition's
-- readers. (A draft of this version indexed id on the parent instead.)
DROP INDEX IF EXISTS pgpubsub.message_id_idx;
DO $identity$
DECLARE
    part text;
BEGIN
    FOREACH part IN ARRAY ARRAY['message_0', 'message_1', 'message_2', 'message_3',
                                'message_kept', 'message_deduped', 'message_later'] LOOP
        EXECUTE pg_catalog.format(
            'CREATE UNIQUE INDEX IF NOT EXISTS %I ON pgpubsub.%I (id)', part || '_id_key', part);
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_index i
                       WHERE i.indrelid = ('pgpubsub.' || part)::pg_catalog.regclass
                         AND i.indisreplident) THEN
            EXECUTE pg_catalog.format('ALTER TABLE pgpubsub.%I REPLICA IDENTITY USING INDEX %I',
                part, part || '_id_key');
        END IF;
    END LOOP;
END
$identity$;
-- Whether message_later holds a message due soon (rotate: claims then read it).
CREATE INDEX IF NOT EXISTS message_later_due_idx ON pgpubsub.message_later (run_at);
-- Retention sweeps and spill clean-up read only their own rows.
CREATE INDEX IF NOT EXISTS message_kept_idx
    ON pgpubsub.message (channel, status, created_at) WHERE status IN ('done', 'spill');
-- Job-queue options of durable channels (pgpubsub.notify(..., priority=,
-- dedupe_key=, ordering_key=, delay= or run_at=)). Higher priorities are
-- claimed first among due messages; at most one pending message per
-- (channel, dedupe_key): every one is in message_deduped, whose unique index
-- decides (publishers insert with ON CONFLICT DO NOTHING); messages of one
-- (channel, ordering_key) run one at a time, in id order.
CREATE UNIQUE INDEX IF NOT EXISTS message_dedupe_idx
    ON pgpubsub.message_deduped (channel, dedupe_key)
    WHERE status = 'pending' AND dedupe_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS message_ordering_idx
    ON pgpubsub.message (channel, ordering_key, id)
    WHERE status = 'pending' AND ordering_key IS NOT NULL;
-- Messages without an ordering key are claimed through an index of their own
-- (the keyed ones, through message_ordering_idx, head by head), so that
-- neither kind is scanned to find the other.
CREATE INDEX IF NOT EXISTS message_unkeyed_idx
    ON pgpubsub.message (channel, priority DESC, run_at, id)
    WHERE status = 'pending' AND ordering_key IS NULL;
-- Dead messages of a channel, newest first, and the channels that have any,
-- read through an index whatever the size of the table.
CREATE INDEX IF NOT EXISTS message_dead_idx
    ON pgpubsub.message (channel, id) WHERE status = 'dead';
-- The ring moves on (called by workers about once a second while they claim
-- messages; one call at a time, the others return at once). Every segment
-- but the current one is emptied once its rows are gone: TRUNCATE frees its
-- rows and index entries whatever transaction is open, where a DELETE's wait
-- for vacuum. A segment with a few messages still pending (delayed, waiting
-- for a retry: at most 1,000, none in a worker's hands) has them moved to the
-- current one first; a backlog stays where it is. Messages not due within a
-- minute go to message_later first, up to 10,000 a call (those would pin the
-- segment until due: a reminder for tomorrow, a retry in an hour, after
-- three hand-overs every other segment was pinned and the current one grew
-- without bound under a held transaction; hostile review of the ring,
-- finding 2). The current segment hands
-- over to an empty one once it has had 10,000 new messages and at most 1,000
-- of its messages are due (the workers have nearly caught up; the segment
-- left is then emptied at once if it can be, and workers call this as a drain
-- empties the queue, so a burst drained in less than a second frees its
-- segment without waiting for more traffic): a backlog
-- drains from one segment, which claims read alone (a claim's cost follows
-- the number of tables it reads), and the segment left drains in a moment
-- and is emptied. A backlog that never shrinks hands over after 100,000 new
-- messages, so that the segment's dead rows stay bounded under a held
-- transaction. The empty segment taken is the first one after the current
-- one: a segment pinned by more than 1,000 messages (delayed for a day, say)
-- is passed over until they are processed, and the ring goes round the
-- others. Emptying takes the segment's lock, which claims and completions
-- take too: it is waited for 20 ms at most (claims wait behind it
-- meanwhile), and tried again at the next call. Runs as the schema's owner
-- (TRUNCATE); it takes no argument and reads nothing the caller controls.
-- Only in READ COMMITTED: an older snapshot could miss committed messages
-- and empty a segment that holds them.
-- It keeps pgpubsub.ring.live: the current segment, each one not emptied,
-- message_deduped (-2) while it holds a message, and message_later (-3) while
-- it holds one due within a minute (its rows are claimed from there). A publisher whose statement
-- read the ring before it moved on may store into a segment emptied since
-- (the INSERT locks the partition after reading the ring), and a deduped
-- message may be stored after this found message_deduped empty: a segment
-- found holding rows that are not moved on joins it again, message_deduped
-- joins it once it holds one, and a claim reads every partition after its
-- processor rested and once a poll interval (ChannelProcessor._claim_parts),
-- so such a message waits for a wake-up or a poll at most.
CREATE OR REPLACE FUNCTION pgpubsub.rotate() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
DECLARE
    cur smallint;
    first bigint;
    last bigint;
    seg smallint;
    nxt smallint;
    due bigint;
    was smallint[];
    now_live smallint[];
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgpubsub.rotate() runs only in a READ COMMITTED transaction';
    END IF;
    IF NOT pg_catalog.pg_try_advisory_xact_lock(
            pg_catalog.hashtextextended('pgpubsub.rotate', 0)) THEN
        RETURN;
    END IF;
    SELECT r.segment, r.first_id, r.live INTO cur, first, was FROM pgpubsub.ring r FOR UPDATE;
    now_live := '{}';
    PERFORM pg_catalog.set_config('lock_timeout', '20ms', true);
    FOR step IN 1..3 LOOP
        seg := (cur + step) % 4;
        IF pgpubsub.empty_segment(seg, cur) THEN
            nxt := COALESCE(nxt, seg);
        ELSE
            now_live := now_live || seg;
        END IF;
    END LOOP;
    last := COALESCE(pg_catalog.pg_sequence_last_value(pg_catalog.pg_get_serial_sequence(
        'pgpubsub.message', 'id')::pg_catalog.regclass), 0);
    IF nxt IS NOT NULL AND last - first >= 10000 THEN
        EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM (SELECT FROM pgpubsub.%I m '
            'WHERE m.run_at <= pg_catalog.now() LIMIT 1001) x', 'message_' || cur) INTO due;
        IF due <= 1000 OR last - first >= 100000 THEN
            UPDATE pgpubsub.ring SET segment = nxt, first_id = last;
            -- the segment left is emptied now if it can be (the queue drained)
            IF due > 1000 OR NOT pgpubsub.empty_segment(cur, nxt) THEN
                now_live := now_live || cur;
            END IF;
            cur := nxt;
        END IF;
    END IF;
    now_live := now_live || cur;
    IF EXISTS (SELECT FROM pgpubsub.message_deduped) THEN
        now_live := now_live || (-2)::smallint;
    END IF;
    IF EXISTS (SELECT FROM pgpubsub.message_later l
               WHERE l.run_at <= pg_catalog.now() + interval '1 minute') THEN
        now_live := now_live || (-3)::smallint;
    END IF;
    now_live := ARRAY(SELECT DISTINCT s FROM pg_catalog.unnest(now_live) s ORDER BY s);
    IF now_live IS DISTINCT FROM was THEN
        UPDATE pgpubsub.ring SET live = now_live;
    END IF;
END
$body$;
REVOKE ALL ON FUNCTION pgpubsub.rotate() FROM PUBLIC;

-- Empty segment seg (true: it is empty), its messages not due within a minute
-- moved to message_later and its few others to segment cur first (see rotate). Under the segment's lock (the caller's
-- lock_timeout): no publisher is storing into it, and the check sees every
-- row committed.
CREATE OR REPLACE FUNCTION pgpubsub.empty_segment(seg integer, cur integer) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
DECLARE
    part text := 'message_' || seg;
    left_over bigint;
BEGIN
    IF pg_catalog.pg_relation_size(('pgpubsub.' || part)::pg_catalog.regclass) = 0 THEN
        RETURN true;  -- emptied already, nothing stored since
    END IF;
    BEGIN
        -- Not those in a worker's hands (unfinished, or locked by a claim).
        EXECUTE pg_catalog.format(
            'UPDATE pgpubsub.message m SET segment = -3 WHERE m.id IN ('
            'SELECT s.id FROM pgpubsub.%I s WHERE NOT s.unfinished '
            'AND s.run_at > pg_catalog.now() + interval ''1 minute'' '
            'LIMIT 10000 FOR UPDATE SKIP LOCKED)', part);
    EXCEPTION WHEN lock_not_available OR serialization_failure THEN
        RETURN false;  -- (as below)
    END;
    EXECUTE pg_catalog.format(
        'SELECT pg_catalog.count(*) FROM (SELECT FROM pgpubsub.%I LIMIT 1001) x', part)
        INTO left_over;
    IF left_over > 1000 THEN
        RETURN false;
    END IF;
    -- Any lock waited for longer than the caller's lock_timeout gives up (a
    -- batch's row, locked by a batch member's trigger as it moves): this
    -- yields, never a worker.
    BEGIN
        IF left_over > 0 THEN
            -- Not those in a worker's hands (unfinished, or locked by a claim).
            EXECUTE pg_catalog.format(
                'UPDATE pgpubsub.message m SET segment = %s WHERE m.id IN ('
                'SELECT s.id FROM pgpubsub.%I s WHERE NOT s.unfinished FOR UPDATE SKIP LOCKED)',
                cur, part);
        END IF;
        EXECUTE pg_catalog.format('LOCK TABLE pgpubsub.%I IN ACCESS EXCLUSIVE MODE', part);
        EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM pgpubsub.%I', part)
            INTO left_over;
        IF left_over > 0 THEN
            RETURN false;
        END IF;
        EXECUTE pg_catalog.format('TRUNCATE pgpubsub.%I', part);
        RETURN true;
    EXCEPTION WHEN lock_not_available OR serialization_failure THEN
        -- (serialization_failure: a row to move was moved meanwhile, to
        -- message_kept by its outcome or deleted: tried again at the next call)
        RETURN false;
    END;
END
$body$;
REVOKE ALL ON FUNCTION pgpubsub.empty_segment(integer, integer) FROM PUBLIC;

-- Channel and status are correlated: joint statistics make the planner's
-- estimate of "messages of this channel with this status" (what the dashboard
-- shows when an exact count would be slow) close to the truth. On the
-- partition where statuses mix (message_kept: dead, done, spill; the others
-- hold pending rows only): autovacuum analyzes partitions, never their
-- partitioned parent, so statistics on the parent were never built and the
-- estimates fell to about half (hostile review of issue 26, finding 6). The
-- planner estimates a query on the parent partition by partition.
DROP STATISTICS IF EXISTS pgpubsub.message_channel_status;
CREATE STATISTICS IF NOT EXISTS pgpubsub.message_kept_channel_status (mcv)
    ON channel, status FROM pgpubsub.message_kept;

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

-- Version 5 (wake-ups). A durable publisher sends its NOTIFY (the wake-up)
-- only when a worker of the channel sleeps: a committing transaction that
-- notified holds a database-wide lock for its commit, so notifying publishers
-- commit one at a time. A worker with nothing to do registers here before its
-- last look at the queue (pgpubsub.sleep); the first publisher to find the row
-- takes it and notifies, the others do not (the woken workers register again
-- once they have nothing to do), except while the one that took it is still in
-- its transaction. Publishers hold a shared advisory lock on the
-- channel until they commit, and a worker registers only when it can take it
-- exclusively: so no publisher finds "nobody sleeps" and commits after the
-- worker's last look. Unlogged: lost in a crash, when workers register anew.
CREATE UNLOGGED TABLE IF NOT EXISTS pgpubsub.sleeper (
    channel  text        PRIMARY KEY,
    since    timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
REVOKE ALL ON pgpubsub.sleeper FROM PUBLIC;

-- Called by publishers after storing messages (any role that may store them).
-- Runs as the schema's owner: it reads and takes the channel's row, nothing
-- else. Each statement after the lock takes its snapshot once the lock is
-- held (read committed). Most publishes find no registration (the workers
-- are busy): one index probe, nothing more. A registration another publisher
-- has taken in a transaction still open (the row locked) wakes the worker
-- too: that one's NOTIFY comes at its commit, however late, and none if it
-- rolls back (the registration is then back). (Before, a second function
-- took the registration on every publish: about 10 us of each, measured.)
-- A REPEATABLE READ or SERIALIZABLE publisher's snapshot may be older than a
-- registration, made after a last look that could not see this message: it
-- always wakes the channel's workers (its commit then waits its turn with
-- other notifying commits). It leaves registrations alone: the next read
-- committed publisher takes one, one wake-up more.
-- With pgpubsub.wake = 'off' (SET LOCAL by a transaction to be prepared:
-- PostgreSQL cannot PREPARE one that sent a NOTIFY) it does nothing, and the
-- message waits for the workers' poll.
CREATE OR REPLACE FUNCTION pgpubsub.wake(channel text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
BEGIN
    IF pg_catalog.current_setting('pgpubsub.wake', true) = 'off' THEN
        RETURN;
    END IF;
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM pg_catalog.pg_notify(channel, '');
        RETURN;
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock_shared(
        pg_catalog.hashtextextended('pgpubsub.sleeper' || channel, 0));
    IF NOT EXISTS (SELECT FROM pgpubsub.sleeper t WHERE t.channel = wake.channel) THEN
        RETURN;
    END IF;
    DELETE FROM pgpubsub.sleeper s WHERE s.ctid = (
        SELECT t.ctid FROM pgpubsub.sleeper t WHERE t.channel = wake.channel
        FOR UPDATE SKIP LOCKED);
    PERFORM pg_catalog.pg_notify(channel, '');
END
$body$;
REVOKE ALL ON FUNCTION pgpubsub.wake(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgpubsub.wake(text) TO PUBLIC;
DROP FUNCTION IF EXISTS pgpubsub.take_sleeper(text);

-- Called by a worker with nothing to do, before its last look at the queue.
-- It registers in any case, so that every publisher that checks from its
-- commit on wakes the worker; false while a publisher of the channel is in a
-- transaction: that one may have checked before and commit after the last
-- look, so the worker looks again shortly (version 6: before, it registered
-- only when no publisher was in a transaction, and publishers that were always
-- in one left every message waiting for that look).
-- The insert waits for a transaction that took or made the row and has not
-- ended: a publisher that took the registration may hold its transaction
-- open however long (publishers meanwhile wake the worker, see
-- pgpubsub.wake), and with one processor nothing on the channel would run
-- meanwhile. So it waits at most 10 ms, then says false: that transaction
-- may roll back and leave no row, and the worker looks again shortly and
-- registers anew. (Only INSERT on the table: what `grant --worker` gives.)
CREATE OR REPLACE FUNCTION pgpubsub.sleep(channel text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
DECLARE
    patience text := pg_catalog.current_setting('lock_timeout');
BEGIN
    BEGIN
        PERFORM pg_catalog.set_config('lock_timeout', '10ms', true);
        INSERT INTO pgpubsub.sleeper (channel) VALUES (sleep.channel)
        ON CONFLICT DO NOTHING;
        PERFORM pg_catalog.set_config('lock_timeout', patience, true);
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;  -- (the subtransaction's setting is undone with it)
    END;
    RETURN pg_catalog.pg_try_advisory_xact_lock(
        pg_catalog.hashtextextended('pgpubsub.sleeper' || channel, 0));
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

-- Version 6 (vacuum). Every message is an insert, a claim's update and a
-- completion's delete: three row versions for one live row (the segments are
-- emptied by TRUNCATE when they can be, but vacuum keeps them small while a
-- segment is current, and the kept and deduped rows rely on it). Autovacuum's
-- defaults wait for a fifth of a table to be dead and then vacuum it slowly,
-- so a busy queue's table and indexes grew to many times its live rows before
-- autovacuum had run once. Vacuum these tables after a few thousand changes,
-- not a fraction of their size, and without the cost delay on the small ones
-- (each is a few rows per worker or channel, rewritten constantly). Setting
-- storage parameters takes a lock that writers do not wait for.
ALTER TABLE pgpubsub.message_kept SET (
    autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_vacuum_cost_delay = 1
);
DO $vacuum$
DECLARE
    small text;
BEGIN
    -- The segments and the deduped messages: after a thousand changes too
    -- (a segment is emptied by TRUNCATE only once its rows are gone).
    FOREACH small IN ARRAY ARRAY['message_deduped', 'message_later', 'message_0', 'message_1',
                                 'message_2', 'message_3'] LOOP
        EXECUTE pg_catalog.format('ALTER TABLE pgpubsub.%I SET (autovacuum_vacuum_scale_factor '
            '= 0.01, autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 1)', small);
    END LOOP;
    FOREACH small IN ARRAY ARRAY['lease', 'worker', 'rate_bucket', 'schedule', 'sleeper'] LOOP
        EXECUTE pg_catalog.format('ALTER TABLE pgpubsub.%I SET (autovacuum_vacuum_scale_factor '
            '= 0, autovacuum_vacuum_threshold = 500, autovacuum_vacuum_cost_delay = 0)', small);
    END LOOP;
END
$vacuum$;

-- Version 6 (results). result: a results channel's listener's return value
-- (JSON), stored by the statement that completes the message, in the
-- transaction of the listener's writes; the error of a dead one stays in
-- last_error. batch_id: the batch (fan-in) a message belongs to.
ALTER TABLE pgpubsub.message ADD COLUMN IF NOT EXISTS result jsonb;
ALTER TABLE pgpubsub.message ADD COLUMN IF NOT EXISTS batch_id bigint;
CREATE INDEX IF NOT EXISTS message_batch_idx
    ON pgpubsub.message (batch_id, status) WHERE batch_id IS NOT NULL;

-- A batch (pgpubsub.batch()): its members' outcome counts, kept as each
-- member settles (pending: not settled yet), and the callback message
-- published, once, by the transaction that settles its last member. Made only
-- by pgpubsub.publish_batch (no role but the owner writes it).
CREATE TABLE IF NOT EXISTS pgpubsub.batch (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    total             integer     NOT NULL,
    pending           integer     NOT NULL DEFAULT 0,
    done              integer     NOT NULL DEFAULT 0,
    dead              integer     NOT NULL DEFAULT 0,
    cancelled         integer     NOT NULL DEFAULT 0,
    callback_channel  text        NOT NULL,
    callback_payload  jsonb       NOT NULL,
    callback_id       bigint,
    created_at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    completed_at      timestamptz
);
-- (A database that ran an earlier draft of this version: its open batches'
-- counts taken from their members once, as the column is added.)
DO $pending$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute
                   WHERE attrelid = 'pgpubsub.batch'::pg_catalog.regclass
                     AND attname = 'pending' AND NOT attisdropped) THEN
        ALTER TABLE pgpubsub.batch ADD COLUMN pending integer NOT NULL DEFAULT 0;
        UPDATE pgpubsub.batch b SET
            pending = (SELECT pg_catalog.count(*) FROM pgpubsub.message m
                       WHERE m.batch_id = b.id AND m.status = 'pending'),
            done = (SELECT pg_catalog.count(*) FROM pgpubsub.message m
                    WHERE m.batch_id = b.id AND m.status = 'done'),
            dead = (SELECT pg_catalog.count(*) FROM pgpubsub.message m
                    WHERE m.batch_id = b.id AND m.status = 'dead')
        WHERE b.callback_id IS NULL;
        UPDATE pgpubsub.batch b SET cancelled = b.total - b.pending - b.done - b.dead
        WHERE b.callback_id IS NULL;
    END IF;
END
$pending$;
REVOKE ALL ON pgpubsub.batch FROM PUBLIC;
CREATE INDEX IF NOT EXISTS batch_completed_idx
    ON pgpubsub.batch (completed_at) WHERE completed_at IS NOT NULL;

-- Publish a batch in one statement (whole or not at all, on an autocommit
-- connection too): its row, with total and pending counted here, and its
-- members (member i: channels[i], payloads[i]), each with the batch's id.
-- The only way a batch row or a member's batch_id is written (publishers
-- have no privilege on either), so no role can make the counts of a batch
-- wrong, join a batch, or make the trigger below fail. Returns the batch's
-- id and its members' ids (in order).
CREATE OR REPLACE FUNCTION pgpubsub.publish_batch(
    callback_channel text, callback_payload text, channels text[], payloads text[],
    OUT batch_id bigint, OUT members bigint[]
) LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
DECLARE
    body jsonb;
    n integer := pg_catalog.cardinality(channels);
BEGIN
    IF callback_channel IS NULL OR callback_channel = '' OR n IS NULL OR n = 0
            OR n IS DISTINCT FROM pg_catalog.cardinality(payloads)
            OR pg_catalog.array_position(channels, NULL) IS NOT NULL
            OR pg_catalog.array_position(payloads, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'a batch needs a callback channel and one channel and payload per member'
            USING ERRCODE = '22023';
    END IF;
    body := callback_payload::jsonb;
    IF body IS NULL OR pg_catalog.jsonb_typeof(body) <> 'object' THEN
        RAISE EXCEPTION 'a batch''s callback payload is a JSON object' USING ERRCODE = '22023';
    END IF;
    INSERT INTO pgpubsub.batch (total, pending, callback_channel, callback_payload)
    VALUES (n, n, callback_channel, body) RETURNING id INTO batch_id;
    WITH ins AS (
        INSERT INTO pgpubsub.message (channel, payload, batch_id)
        SELECT u.c, u.p, publish_batch.batch_id
        FROM ROWS FROM (pg_catalog.unnest(channels), pg_catalog.unnest(payloads))
            WITH ORDINALITY AS u(c, p, i)
        ORDER BY u.i
        RETURNING id
    )
    SELECT pg_catalog.array_agg(ins.id ORDER BY ins.id) INTO members FROM ins;
    PERFORM pgpubsub.wake(c) FROM (SELECT DISTINCT c FROM pg_catalog.unnest(channels) c) w;
END
$body$;
REVOKE ALL ON FUNCTION pgpubsub.publish_batch(text, text, text[], text[]) FROM PUBLIC;

-- A member's state changed (settled: done, dead, deleted while pending:
-- cancelled or purged; or a dead one replayed), in the statement that
-- changes it: its batch's counts move with it, under the batch row's lock,
-- by an UPDATE (under READ COMMITTED it waits for and reads the latest
-- counts; under REPEATABLE READ a concurrent change is a serialization
-- failure, never a lost count). The transaction whose update leaves none
-- pending publishes the callback, with the counts under the key "batch". A
-- member deleted once settled (the retention's sweep, a purge of a dead
-- one) changes nothing: its outcome was counted when it settled. A member
-- replayed after its batch finished is not counted again. The counts are
-- written by publish_batch and this function only, so the arithmetic
-- cannot fail. Runs as the schema's owner: workers and operators need no
-- privilege on pgpubsub.batch.
CREATE OR REPLACE FUNCTION pgpubsub.batch_member_settled() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
DECLARE
    bid bigint := OLD.batch_id;
    was text := OLD.status;
    now_is text;
    b pgpubsub.batch;
    callback bigint;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        now_is := NEW.status;
    ELSE
        -- pgpubsub.message is partitioned by status (see Version 7, storage):
        -- an UPDATE that moves a row to another partition fires this as a
        -- delete from the old one (AFTER UPDATE triggers are not fired then).
        -- At the statement's end a moved row is found again by its id, with
        -- the status it moved to; one not found was deleted (cancelled,
        -- purged, swept). A settling member is looked for in message_kept
        -- first, where it moves: a processing transaction locks no other
        -- partition for it.
        SELECT k.status INTO now_is FROM pgpubsub.message_kept k WHERE k.id = OLD.id;
        IF NOT FOUND THEN
            SELECT m.status INTO now_is FROM pgpubsub.message m WHERE m.id = OLD.id;
            IF NOT FOUND THEN
                now_is := 'cancelled';
            END IF;
        END IF;
    END IF;
    IF was = now_is OR (was <> 'pending' AND now_is <> 'pending')
            OR now_is NOT IN ('pending', 'done', 'dead', 'cancelled') THEN
        RETURN NULL;
    END IF;
    UPDATE pgpubsub.batch t SET
        pending = t.pending + CASE WHEN now_is = 'pending' THEN 1 ELSE -1 END,
        done = t.done + CASE WHEN now_is = 'done' THEN 1 WHEN was = 'done' THEN -1 ELSE 0 END,
        dead = t.dead + CASE WHEN now_is = 'dead' THEN 1 WHEN was = 'dead' THEN -1 ELSE 0 END,
        cancelled = t.cancelled + CASE WHEN now_is = 'cancelled' THEN 1 ELSE 0 END
    WHERE t.id = bid AND t.callback_id IS NULL
    RETURNING t.* INTO b;
    IF NOT FOUND OR b.pending > 0 THEN
        RETURN NULL;
    END IF;
    INSERT INTO pgpubsub.message (channel, payload)
    VALUES (b.callback_channel, (b.callback_payload || pg_catalog.jsonb_build_object(
        'batch', pg_catalog.jsonb_build_object('id', b.id, 'total', b.total,
            'done', b.done, 'dead', b.dead, 'cancelled', b.cancelled)))::text)
    RETURNING id INTO callback;
    UPDATE pgpubsub.batch t SET callback_id = callback,
        completed_at = pg_catalog.clock_timestamp()
    WHERE t.id = bid;
    PERFORM pgpubsub.wake(b.callback_channel);
    RETURN NULL;
END
$body$;
REVOKE ALL ON FUNCTION pgpubsub.batch_member_settled() FROM PUBLIC;

-- Called by a worker before it settles the batch members of a processing
-- transaction, and by operators before they cancel, purge or replay
-- messages: their batch rows locked at once, in id order, so that two
-- transactions settling members of the same batches never wait for each
-- other in a cycle (the trigger locks them in the order its statement
-- visits rows). Takes batch ids (`pgpubsub grant --worker`, `--operator`).
CREATE OR REPLACE FUNCTION pgpubsub.lock_batches(ids bigint[]) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
    SELECT FROM pgpubsub.batch b WHERE b.id = ANY(ids) ORDER BY b.id FOR UPDATE OF b;
$body$;
REVOKE ALL ON FUNCTION pgpubsub.lock_batches(bigint[]) FROM PUBLIC;

-- A message's outcome, for a waiting handle: one message, by id and channel
-- (a handle of one channel never reads another's), never its payload
-- (`pgpubsub grant --awaiter`: results and errors are as private as payloads).
CREATE OR REPLACE FUNCTION pgpubsub.outcome(message_id bigint, channel_name text)
RETURNS TABLE (status text, result text, last_error text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
    SELECT m.status, m.result::text, m.last_error FROM pgpubsub.message m
    WHERE m.id = message_id AND m.channel = channel_name AND m.status <> 'spill';
$body$;
REVOKE ALL ON FUNCTION pgpubsub.outcome(bigint, text) FROM PUBLIC;

-- The batches finished more than ``secs`` seconds ago whose members are all
-- gone (swept, purged): deleted (workers call it with their sweep, with a day).
CREATE OR REPLACE FUNCTION pgpubsub.sweep_batches(secs double precision) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgpubsub, pg_temp AS $body$
    DELETE FROM pgpubsub.batch b
    WHERE b.completed_at < pg_catalog.now() - pg_catalog.make_interval(secs => secs)
      AND NOT EXISTS (SELECT FROM pgpubsub.message m WHERE m.batch_id = b.id);
$body$;
REVOKE ALL ON FUNCTION pgpubsub.sweep_batches(double precision) FROM PUBLIC;

-- Only members fire it (the WHEN is checked without calling the function):
-- deleted (a move between partitions too), or moved into or out of the pending state. Created
-- once: dropping and creating again would lock the table at each migrate
-- (the two triggers of an earlier draft of this version are dropped once).
DO $do$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgname = 'batch_member_moved'
               AND tgrelid = 'pgpubsub.message'::pg_catalog.regclass) THEN
        DROP TRIGGER batch_member_moved ON pgpubsub.message;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgname = 'batch_member_updated'
               AND tgrelid = 'pgpubsub.message'::pg_catalog.regclass) THEN
        DROP TRIGGER batch_member_updated ON pgpubsub.message;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgname = 'batch_member_gone'
                   AND tgrelid = 'pgpubsub.message'::pg_catalog.regclass) THEN
        CREATE TRIGGER batch_member_gone
            AFTER DELETE ON pgpubsub.message FOR EACH ROW
            WHEN (OLD.batch_id IS NOT NULL AND OLD.status <> 'spill')
            EXECUTE FUNCTION pgpubsub.batch_member_settled();
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgname = 'batch_member_changed'
                   AND tgrelid = 'pgpubsub.message'::pg_catalog.regclass) THEN
        CREATE TRIGGER batch_member_changed
            AFTER UPDATE OF status ON pgpubsub.message FOR EACH ROW
            WHEN (OLD.batch_id IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status
                  AND (OLD.status = 'pending' OR NEW.status = 'pending'))
            EXECUTE FUNCTION pgpubsub.batch_member_settled();
    END IF;
END
$do$;
-- Version 6 (flow control per key). A message's limit_key (notify(...,
-- limit_key=)): the key of its channel's key_rate_limit and key_concurrency.
-- Indexed among pending messages: a worker whose due messages are all of
-- exhausted keys finds, per key bucket, whether the key has a due message.
ALTER TABLE pgpubsub.message ADD COLUMN IF NOT EXISTS limit_key text;
-- At most 1,024 bytes, as notify() checks, whoever stores it: a key_concurrency
-- slot's lease is named after it, and a lease name too wide for its index
-- failed every claim of the channel. Added once (the ALTER takes the table's
-- lock); NOT VALID: the column is new with this version.
DO $limit_key$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_constraint c
                   WHERE c.conrelid = 'pgpubsub.message'::pg_catalog.regclass
                     AND c.conname = 'message_limit_key_size') THEN
        ALTER TABLE pgpubsub.message ADD CONSTRAINT message_limit_key_size
            CHECK (pg_catalog.octet_length(limit_key) <= 1024) NOT VALID;
    END IF;
END
$limit_key$;
CREATE INDEX IF NOT EXISTS message_limit_key_idx
    ON pgpubsub.message (channel, limit_key, run_at)
    WHERE status = 'pending' AND limit_key IS NOT NULL;
-- The token bucket of one limit_key (key_rate_limit), as rate_bucket is the
-- channel's: locked, refilled and spent in the claim transaction. A row whose
-- bucket refilled to its capacity means what no row means: workers delete
-- those, so the table holds only keys active within about a period.
CREATE TABLE IF NOT EXISTS pgpubsub.key_bucket (
    channel     text             NOT NULL,
    key         text             NOT NULL,
    tokens      double precision NOT NULL,
    updated_at  timestamptz      NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    PRIMARY KEY (channel, key)
);
REVOKE ALL ON pgpubsub.key_bucket FROM PUBLIC;
-- A key_concurrency slot of a limit_key in a listener is a lease of kind
-- 'limit', named '<slot>' || E'\x1f' || key (src/pgpubsub/_leases.py). The
-- check is replaced once (an ALTER TABLE at every migrate would wait for
-- running workers' leases).
DO $v6$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_constraint c
        WHERE c.conrelid = 'pgpubsub.lease'::pg_catalog.regclass AND c.conname = 'lease_kind_check'
          AND pg_catalog.strpos(pg_catalog.pg_get_constraintdef(c.oid), '''limit''') > 0
    ) THEN
        ALTER TABLE pgpubsub.lease DROP CONSTRAINT IF EXISTS lease_kind_check;
        ALTER TABLE pgpubsub.lease ADD CONSTRAINT lease_kind_check
            CHECK (kind IN ('key', 'slot', 'limit'));
    END IF;
END
$v6$;

-- The schema's version (one row): `pgpubsub status` compares it with the
-- version the installed library expects. Never lowered by an older library.
CREATE TABLE IF NOT EXISTS pgpubsub.version (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    version  integer NOT NULL
);
INSERT INTO pgpubsub.version (one, version) VALUES (true, 7)
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
