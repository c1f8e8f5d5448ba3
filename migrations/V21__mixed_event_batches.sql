-- v21: one log batch holds all the events of an append, the manager's among the
-- runner's (an append's `run.started`, `command.completed`), instead of a batch per
-- producer. The batch's `producer`, `runner_id` and `epoch` are its runner events'; an
-- event is the manager's when it has no runner seq, as a batch of the manager's events
-- only (no `runner_seqs` at all) always was.
CREATE OR REPLACE VIEW events AS
SELECT b.run_id, e.seq, e.type, e.payload,
       CASE WHEN e.runner_seq IS NULL THEN 'manager' ELSE b.producer END AS producer,
       CASE WHEN e.runner_seq IS NOT NULL THEN b.runner_id END AS runner_id,
       CASE WHEN e.runner_seq IS NOT NULL THEN b.epoch END AS epoch,
       e.runner_seq, b.created_at
FROM event_batches b
CROSS JOIN LATERAL ROWS FROM (unnest(b.seqs), unnest(b.types), unnest(b.runner_seqs),
                              jsonb_array_elements(b.payloads))
    AS e (seq, type, runner_seq, payload);
