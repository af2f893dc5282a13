-- pgpubsub schema: stored messages and the trigger helper. The one source:
-- `pgpubsub migrate` and the Django migration both apply this file as is, and
-- every statement is idempotent.
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
    run_at        timestamptz NOT NULL DEFAULT now(),
    last_error    text,
    context       jsonb       DEFAULT NULLIF(current_setting('pgpubsub.notification_context', true), '')::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz
);

-- Claiming reads only pending rows of one channel that are due, oldest first:
-- a partial index keeps that cheap whatever the backlog of dead or done rows.
CREATE INDEX IF NOT EXISTS message_claim_idx
    ON pgpubsub.message (channel, run_at, id) WHERE status = 'pending';

-- Retention sweeps and spill clean-up read only their own rows.
CREATE INDEX IF NOT EXISTS message_kept_idx
    ON pgpubsub.message (channel, status, created_at) WHERE status IN ('done', 'spill');

-- One row event of a trigger channel. Durable channels store it and send a
-- wake-up; plain channels send it in the NOTIFY, or, when it is over
-- PostgreSQL's 8000-byte limit, store it as 'spill' and send its id, so a
-- wide row never makes the user's write fail.
CREATE OR REPLACE FUNCTION pgpubsub.notify_row(
    channel text, durable boolean, operation text, tg_when text, tbl text,
    old_row jsonb, new_row jsonb
) RETURNS void LANGUAGE plpgsql AS $body$
DECLARE
    payload text := pg_catalog.jsonb_build_object(
        'operation', operation, 'when', tg_when, 'table', tbl,
        'old', old_row, 'new', new_row,
        'context', NULLIF(pg_catalog.current_setting('pgpubsub.notification_context', true), '')::jsonb
    )::text;
    spilled bigint;
BEGIN
    IF durable THEN
        INSERT INTO pgpubsub.message (channel, payload) VALUES (channel, payload);
        PERFORM pg_catalog.pg_notify(channel, '');
    ELSIF pg_catalog.octet_length(payload) > 7999 THEN
        INSERT INTO pgpubsub.message (channel, payload, status)
            VALUES (channel, payload, 'spill') RETURNING id INTO spilled;
        PERFORM pg_catalog.pg_notify(channel, '{"spill": ' || spilled || '}');
    ELSE
        PERFORM pg_catalog.pg_notify(channel, payload);
    END IF;
END
$body$;

-- The trigger function of trigger channels installed without Django:
-- EXECUTE FUNCTION pgpubsub.notify_trigger('<channel>', '<durable|plain>').
-- It never cancels the operation: BEFORE triggers return the row unchanged.
CREATE OR REPLACE FUNCTION pgpubsub.notify_trigger() RETURNS trigger
LANGUAGE plpgsql AS $body$
BEGIN
    PERFORM pgpubsub.notify_row(
        TG_ARGV[0], TG_ARGV[1] = 'durable', TG_OP, TG_WHEN,
        TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
        CASE WHEN TG_OP <> 'INSERT' THEN pg_catalog.to_jsonb(OLD) END,
        CASE WHEN TG_OP <> 'DELETE' THEN pg_catalog.to_jsonb(NEW) END
    );
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$body$;
