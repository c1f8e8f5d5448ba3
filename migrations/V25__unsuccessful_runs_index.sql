-- v25: the runs that ended without completing, per tenant, newest first: ListRuns
-- filtered by such a status ("failed", "cancelled", ...) reads them through this index
-- instead of walking the tenant's whole history. Only a run's final row version enters
-- it, and only for these outcomes, so the dispatch path writes nothing more for a run
-- that completes.
CREATE INDEX runs_ended_unsuccessfully ON runs (tenant_id, id DESC)
    WHERE status IN ('failed', 'cancelled', 'blocked', 'expired');
