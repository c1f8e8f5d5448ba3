-- v10: the payload bytes each run's runners have appended, for the per-run quota
-- (--max-run-event-bytes). Runs from before start at 0.
ALTER TABLE runs ADD COLUMN event_bytes bigint NOT NULL DEFAULT 0;
