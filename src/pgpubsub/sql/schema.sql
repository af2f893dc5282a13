-- pgpubsub durable-channel schema. The one source: `pgpubsub migrate` applies
-- it as is, and every statement is idempotent.
CREATE SCHEMA IF NOT EXISTS pgpubsub;

CREATE TABLE IF NOT EXISTS pgpubsub.message (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel     text        NOT NULL,
    payload     text        NOT NULL,
    status      text        NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'dead')),
    attempts    integer     NOT NULL DEFAULT 0,
    run_at      timestamptz NOT NULL DEFAULT now(),
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Claiming reads only pending rows of one channel that are due, oldest first:
-- a partial index keeps that cheap whatever the backlog of dead rows.
CREATE INDEX IF NOT EXISTS message_claim_idx
    ON pgpubsub.message (channel, run_at, id) WHERE status = 'pending';
