-- v2: delayed starts, per-tenant limits, the active turn, request details, where runners are connected.

-- A run is not claimed before scheduled_at.
ALTER TABLE runs ADD COLUMN scheduled_at timestamptz;
-- The turn being executed (command_id of its turn command); set on turn.started, cleared
-- on turn.completed. Guards steers aimed at a turn that already ended.
ALTER TABLE runs ADD COLUMN active_turn_id text;
-- Fair claims look at each tenant's pending runs in order.
CREATE INDEX runs_claim_by_tenant ON runs (tenant_id, queue, priority DESC, created_at, id)
    WHERE status = 'pending';
CREATE INDEX runs_active_by_tenant ON runs (tenant_id)
    WHERE status IN ('claimed', 'running', 'waiting');

-- At most max_active_runs claimed/running/waiting runs per tenant (absent: no limit).
CREATE TABLE tenant_limits (
    tenant_id        text PRIMARY KEY,
    max_active_runs  integer NOT NULL CHECK (max_active_runs > 0),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE requests ADD COLUMN turn_id text;
ALTER TABLE requests ADD COLUMN options jsonb NOT NULL DEFAULT '[]';
CREATE INDEX requests_deadline ON requests (deadline) WHERE status = 'open' AND deadline IS NOT NULL;

-- The manager replica holding the runner's stream (for drain requests from any replica).
ALTER TABLE runners ADD COLUMN manager_id uuid;
