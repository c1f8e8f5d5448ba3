-- v29: a log batch's per-event arrays are written only where they say something. A
-- streamed batch holds hundreds of deltas of one type, numbered on from the run's and
-- the runner's counters; building, compressing and logging an array element per event
-- for each of `seqs`, `types` and `runner_seqs` was about 40 % of PostgreSQL's time per
-- stored event (pgbench, 1,400-event batches: 2,400 → 8,200 batches/s without them).
--
-- * `seqs` NULL: the batch holds every seq from `first_seq` to `last_seq`, as every
--   append writes it. Retention, which leaves gaps, writes them out.
-- * `types` of one element: every event of the batch has that type.
-- * `runner_seqs` of one element: the events are the runner's, numbered on from it.
--
-- Each array otherwise has one element per event, as before (so a one-event batch reads
-- the same either way, and rows written before read as they did). `event_batch_events`
-- is the one place that unpacks a batch; every reader goes through it.
ALTER TABLE event_batches ALTER COLUMN seqs DROP NOT NULL;

-- A batch's events in seq order. Plain SQL, not strict, immutable: the planner inlines
-- it into the query that reads the batch, as if its `ROWS FROM` were written there.
-- Each array is read whole once per batch (unnested; `one` is computed once, behind
-- its `OFFSET 0` fence): an array referenced in a per-event expression would be
-- decompressed again for every event, quadratic in a long mixed batch.
CREATE FUNCTION event_batch_events(batch_first_seq bigint, batch_seqs bigint[],
                                   batch_types text[], batch_runner_seqs bigint[],
                                   batch_payloads text)
RETURNS TABLE (seq bigint, type text, runner_seq bigint, payload json)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT coalesce(e.seq, batch_first_seq + e.n - 1),
           -- Only a one-type batch has no type after its first event.
           coalesce(e.type, one.type),
           CASE WHEN one.runner_seq IS NULL THEN e.runner_seq
                ELSE one.runner_seq + e.n - 1 END,
           e.payload
    FROM (SELECT batch_types[1] AS type,
                 CASE WHEN cardinality(batch_runner_seqs) = 1 THEN batch_runner_seqs[1] END
                     AS runner_seq
          OFFSET 0) one,
         ROWS FROM (unnest(batch_seqs), unnest(batch_types), unnest(batch_runner_seqs),
                    json_array_elements(batch_payloads::json))
             WITH ORDINALITY AS e (seq, type, runner_seq, payload, n)
$$;

CREATE OR REPLACE VIEW events AS
SELECT b.run_id, e.seq, e.type, e.payload::jsonb AS payload,
       CASE WHEN e.runner_seq IS NULL THEN 'manager' ELSE b.producer END AS producer,
       CASE WHEN e.runner_seq IS NOT NULL THEN b.runner_id END AS runner_id,
       CASE WHEN e.runner_seq IS NOT NULL THEN b.epoch END AS epoch,
       e.runner_seq, b.created_at
FROM event_batches b
CROSS JOIN LATERAL event_batch_events(b.first_seq, b.seqs, b.types, b.runner_seqs,
                                      b.payloads) AS e;

CREATE OR REPLACE VIEW conversation_events AS
SELECT b.run_id, e.seq, e.type, e.payload::jsonb AS payload, b.created_at
FROM event_batches b
CROSS JOIN LATERAL event_batch_events(b.first_seq, b.seqs, b.types, NULL,
                                      b.payloads) AS e
WHERE b.types && ARRAY['turn.started', 'turn.completed', 'item.completed']
  AND (e.type IN ('turn.started', 'turn.completed')
       OR (e.type = 'item.completed' AND e.payload->>'kind' = 'assistant_message'));
