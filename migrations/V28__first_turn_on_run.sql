-- v28: a run's first turn (command seq 1, its input's prompt) is carried by the run's
-- own row instead of a row of `commands`. A run's row is written when it is created,
-- claimed and finished anyway; the first turn's row was one more insert and two more
-- row versions (delivered, completed), each with its index entries, on every run. With
-- the data model's dispatch SQL (`agentrun-bench limit`) PostgreSQL CPU per run went
-- from 99–140 to 75–99 µs.
--
-- Runs created before keep their first turn in `commands` (`first_turn_id` NULL), as
-- does a run created without a prompt (it has no first turn). Every reader of a run's
-- commands reads `run_commands`, which shows both.
ALTER TABLE runs
    ADD COLUMN first_turn_id uuid,
    ADD COLUMN first_turn_status text CHECK (first_turn_status IN
        ('pending', 'delivered', 'acknowledged', 'completed', 'failed', 'cancelled')),
    ADD COLUMN first_turn_error text,
    ADD COLUMN first_turn_updated_at timestamptz,
    ADD CONSTRAINT runs_first_turn_check CHECK ((first_turn_id IS NULL) = (first_turn_status IS NULL));

-- A run's commands, whichever row holds them. A read that names its runs (`run_id = ...`)
-- reads the first turns through the runs' key.
CREATE VIEW run_commands AS
SELECT run_id, seq, id, kind, payload, status, delivery_policy, idempotency_key, payload_hash,
       error, created_at, updated_at
FROM commands
UNION ALL
SELECT id, 1::bigint, first_turn_id, 'turn'::text, jsonb_build_object('prompt', input -> 'prompt'),
       first_turn_status, 'queue'::text, NULL::text, NULL::bytea, first_turn_error, created_at,
       first_turn_updated_at
FROM runs
WHERE first_turn_id IS NOT NULL;
