-- v19: the lean log. The events of one append of one run are stored as one row holding
-- their seq range, like a history batch, instead of a row (and two index entries) per
-- event: a streaming reply of thousands of deltas is tens of rows.
--
-- Per-event fields are parallel arrays in seq order (the payloads one JSON array, read
-- with `jsonb_array_elements` alongside the others in one `ROWS FROM`, so a batch is
-- decompressed once however many events it holds). `seqs` is explicit because
-- retention may remove deltas from a batch (leaving gaps readers skip); `first_seq` and
-- `last_seq` keep the range the batch was written with, so batches never overlap and a
-- `seq > after` read starts at the primary key. A resent batch is stored once because
-- the writer numbers events from the run's locked counter and skips every `runner_seq`
-- the lease has already stored (`runs.lease_runner_seq`).
CREATE TABLE event_batches (
    run_id      uuid NOT NULL,
    first_seq   bigint NOT NULL,
    last_seq    bigint NOT NULL CHECK (last_seq >= first_seq),
    producer    text NOT NULL CHECK (producer IN ('manager', 'runner')),
    runner_id   uuid,
    epoch       bigint,
    created_at  timestamptz NOT NULL,
    seqs        bigint[] NOT NULL,
    types       text[] NOT NULL,
    payloads    jsonb NOT NULL CHECK (jsonb_typeof(payloads) = 'array'),
    -- Runner-side sequence of each event within (run, epoch); NULL for manager batches.
    runner_seqs bigint[],
    PRIMARY KEY (run_id, last_seq)
);

-- Stream content compresses well and must compress fast: lz4 where the server has it.
DO $$
BEGIN
    ALTER TABLE event_batches ALTER COLUMN payloads SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    NULL;
END $$;

-- The few batches holding conversation events (turn boundaries, completed items), so
-- building a run's context never unpacks a run's deltas (see `conversation_events`).
CREATE INDEX event_batches_conversation ON event_batches (run_id, last_seq)
    WHERE types && ARRAY['turn.started', 'turn.completed', 'item.completed'];

INSERT INTO event_batches (run_id, first_seq, last_seq, producer, runner_id, epoch,
                           created_at, seqs, types, payloads, runner_seqs)
SELECT run_id, seq, seq, producer, runner_id, epoch, created_at, ARRAY[seq], ARRAY[type],
       jsonb_build_array(payload), CASE WHEN runner_seq IS NOT NULL THEN ARRAY[runner_seq] END
FROM events;

DROP TABLE events;

-- One row per event, as the log's readers (and operators) see it.
CREATE VIEW events AS
SELECT b.run_id, e.seq, e.type, e.payload, b.producer, b.runner_id, b.epoch, e.runner_seq,
       b.created_at
FROM event_batches b
CROSS JOIN LATERAL ROWS FROM (unnest(b.seqs), unnest(b.types), unnest(b.runner_seqs),
                              jsonb_array_elements(b.payloads))
    AS e (seq, type, runner_seq, payload);

-- The events a conversation is built from: turn boundaries and completed assistant
-- messages, read through `event_batches_conversation`.
CREATE VIEW conversation_events AS
SELECT b.run_id, e.seq, e.type, e.payload, b.created_at
FROM event_batches b
CROSS JOIN LATERAL ROWS FROM (unnest(b.seqs), unnest(b.types),
                              jsonb_array_elements(b.payloads)) AS e (seq, type, payload)
WHERE b.types && ARRAY['turn.started', 'turn.completed', 'item.completed']
  AND (e.type IN ('turn.started', 'turn.completed')
       OR (e.type = 'item.completed' AND e.payload->>'kind' = 'assistant_message'));
