-- v23: a batch's payloads are stored as `json`, the text the writer sent, not `jsonb`.
-- Every payload is written once and most are never read back from the database (watchers
-- get them in memory), and building `jsonb` was the largest part of storing a streamed
-- batch (`json` is only checked). The views still show each payload as `jsonb`, so
-- readers keep every operator; the manager's own hot reads take the text as it is.
DROP VIEW conversation_events;
DROP VIEW events;

ALTER TABLE event_batches
    DROP CONSTRAINT event_batches_payloads_check,
    ALTER COLUMN payloads TYPE json USING payloads::json,
    ADD CONSTRAINT event_batches_payloads_check CHECK (json_typeof(payloads) = 'array');
-- The type change keeps lz4 (v19) where the server has it; set it again to be sure.
DO $$
BEGIN
    ALTER TABLE event_batches ALTER COLUMN payloads SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    NULL;
END $$;

-- As in v21, with each payload read as `jsonb`.
CREATE VIEW events AS
SELECT b.run_id, e.seq, e.type, e.payload::jsonb AS payload,
       CASE WHEN e.runner_seq IS NULL THEN 'manager' ELSE b.producer END AS producer,
       CASE WHEN e.runner_seq IS NOT NULL THEN b.runner_id END AS runner_id,
       CASE WHEN e.runner_seq IS NOT NULL THEN b.epoch END AS epoch,
       e.runner_seq, b.created_at
FROM event_batches b
CROSS JOIN LATERAL ROWS FROM (unnest(b.seqs), unnest(b.types), unnest(b.runner_seqs),
                              json_array_elements(b.payloads))
    AS e (seq, type, runner_seq, payload);

-- As in v19, with each payload read as `jsonb` (only the events kept).
CREATE VIEW conversation_events AS
SELECT b.run_id, e.seq, e.type, e.payload::jsonb AS payload, b.created_at
FROM event_batches b
CROSS JOIN LATERAL ROWS FROM (unnest(b.seqs), unnest(b.types),
                              json_array_elements(b.payloads)) AS e (seq, type, payload)
WHERE b.types && ARRAY['turn.started', 'turn.completed', 'item.completed']
  AND (e.type IN ('turn.started', 'turn.completed')
       OR (e.type = 'item.completed' AND e.payload->>'kind' = 'assistant_message'));
