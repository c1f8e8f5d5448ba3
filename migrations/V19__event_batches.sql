-- v19: the lean log. The events of one append of one run are stored as one row holding
-- their seq range, like a history batch, instead of a row (and two index entries) per
-- event: a streaming reply of thousands of deltas is tens of rows.
--
-- Per-event fields are parallel arrays, in seq order. `seqs` is explicit because
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
    payloads    jsonb[] NOT NULL,
    -- Runner-side sequence of each event within (run, epoch); NULL for manager batches.
    runner_seqs bigint[],
    PRIMARY KEY (run_id, last_seq)
);

-- The few batches holding conversation events (turn boundaries, completed items), so
-- building a run's context never unpacks a run's deltas (see `conversation_events`).
CREATE INDEX event_batches_conversation ON event_batches (run_id, last_seq)
    WHERE types && ARRAY['turn.started', 'turn.completed', 'item.completed'];

INSERT INTO event_batches (run_id, first_seq, last_seq, producer, runner_id, epoch,
                           created_at, seqs, types, payloads, runner_seqs)
SELECT run_id, seq, seq, producer, runner_id, epoch, created_at, ARRAY[seq], ARRAY[type],
       ARRAY[payload], CASE WHEN runner_seq IS NOT NULL THEN ARRAY[runner_seq] END
FROM events;

DROP TABLE events;

-- One row per event, as the log's readers (and operators) see it.
CREATE VIEW events AS
SELECT b.run_id, e.seq, e.type, e.payload, b.producer, b.runner_id, b.epoch, e.runner_seq,
       b.created_at
FROM event_batches b
CROSS JOIN LATERAL unnest(b.seqs, b.types, b.payloads, b.runner_seqs)
    AS e (seq, type, payload, runner_seq);

-- The events a conversation is built from: turn boundaries and completed assistant
-- messages, read through `event_batches_conversation`.
CREATE VIEW conversation_events AS
SELECT b.run_id, e.seq, e.type, e.payload, b.created_at
FROM event_batches b
CROSS JOIN LATERAL unnest(b.seqs, b.types, b.payloads) AS e (seq, type, payload)
WHERE b.types && ARRAY['turn.started', 'turn.completed', 'item.completed']
  AND (e.type IN ('turn.started', 'turn.completed')
       OR (e.type = 'item.completed' AND e.payload->>'kind' = 'assistant_message'));
