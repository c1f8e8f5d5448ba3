-- v12: retention of terminal runs' content deltas (see `store::events::compact_due`).
--
-- A tenant's row in tenant_limits may now hold only a retention override, so its limit
-- on active runs becomes optional (NULL: the manager's default, as an absent row).
ALTER TABLE tenant_limits ALTER COLUMN max_active_runs DROP NOT NULL;
-- How long a terminal run keeps every content.delta before they are compacted, in ms:
-- NULL follows the manager's --event-retention-ms, 0 keeps them forever.
ALTER TABLE tenant_limits ADD COLUMN event_retention_ms bigint
    CHECK (event_retention_ms >= 0);

-- Set once a terminal run's deltas were compacted: its event seqs may have gaps from
-- then on (only content.delta rows are missing).
ALTER TABLE runs ADD COLUMN events_compacted_at timestamptz;
-- The compactor's work list: terminal runs not compacted yet, per tenant, oldest first.
-- Compacted runs leave it, so finding due runs never scans work already done.
CREATE INDEX runs_compaction_due ON runs (tenant_id, finished_at)
    WHERE finished_at IS NOT NULL AND events_compacted_at IS NULL;
