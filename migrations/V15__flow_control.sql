-- v15: flow control — concurrency keys (admission) and rate limits (token buckets).
--
-- A run with a concurrency key is admitted while its key has fewer admitted, non-terminal
-- runs than its limit; otherwise it is held (`held = 'concurrency_key'`) and claims pass it
-- over. Admission is serialised per (tenant, key) by an advisory lock in the creating,
-- finishing and limit-setting transactions, so no replica can over-admit.

ALTER TABLE runs ADD COLUMN concurrency_key text;
ALTER TABLE runs ADD COLUMN held text CHECK (held IN ('concurrency_key'));

-- The claim path reads only runs that are not held.
DROP INDEX runs_claim_by_tenant;
CREATE INDEX runs_claim_by_tenant ON runs (tenant_id, queue, priority DESC, created_at, id)
    WHERE status = 'pending' AND held IS NULL;
-- Held runs of a key, in the order they are admitted.
CREATE INDEX runs_held_by_key ON runs (tenant_id, concurrency_key, created_at, id)
    WHERE status = 'pending' AND held IS NOT NULL;
-- Admitted runs of a key that have not ended (what its limit counts).
CREATE INDEX runs_admitted_by_key ON runs (tenant_id, concurrency_key)
    WHERE concurrency_key IS NOT NULL AND held IS NULL
      AND status IN ('pending', 'claimed', 'running', 'waiting');

-- Per key (or, with key '', the tenant's default): how many runs may be admitted at once.
-- Absent: 1.
CREATE TABLE concurrency_limits (
    tenant_id        text NOT NULL,
    concurrency_key  text NOT NULL,
    max_active       integer NOT NULL CHECK (max_active BETWEEN 1 AND 10000),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, concurrency_key)
);

-- Token buckets: at most `burst` claims at once, refilled at `runs` per `period_ms`.
-- `tokens` is the level at `refilled_at`; readers refill it to now() on the fly, and the
-- claim that takes tokens writes it back under the row lock.
CREATE TABLE rate_limits (
    tenant_id    text NOT NULL,
    scope        text NOT NULL CHECK (scope IN ('tenant', 'queue', 'concurrency_key')),
    key          text NOT NULL,
    runs         integer NOT NULL CHECK (runs BETWEEN 1 AND 100000),
    period_ms    bigint NOT NULL CHECK (period_ms BETWEEN 1000 AND 3600000),
    burst        integer NOT NULL CHECK (burst BETWEEN 1 AND 100000),
    tokens       double precision NOT NULL,
    refilled_at  timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, scope, key)
);

-- A bucket's level at the current statement's time (not the transaction's: a claim
-- reads its buckets after waiting for their locks, and its `run.claimed` events carry
-- the time of their statement too).
CREATE FUNCTION rate_limit_tokens(l rate_limits) RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT least(l.burst::double precision,
                 l.tokens + greatest(0, extract(epoch FROM statement_timestamp() - l.refilled_at) * 1000)
                            * l.runs / l.period_ms)
$$;

-- Why a pending run is not being claimed (Run.waiting_reason): '' when nothing holds it.
CREATE FUNCTION run_waiting_reason(r runs) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN r.status <> 'pending' THEN ''
        WHEN r.held IS NOT NULL THEN r.held
        WHEN r.scheduled_at > now() THEN 'scheduled'
        WHEN EXISTS (SELECT 1 FROM rate_limits l
                     WHERE l.tenant_id = r.tenant_id
                       AND (l.scope = 'tenant'
                            OR (l.scope = 'queue' AND l.key = r.queue)
                            OR (l.scope = 'concurrency_key' AND l.key = r.concurrency_key))
                       AND rate_limit_tokens(l) < 1) THEN 'rate_limit'
        WHEN EXISTS (SELECT 1 FROM tenant_limits tl
                     WHERE tl.tenant_id = r.tenant_id AND tl.max_active_runs IS NOT NULL
                       AND (SELECT count(*) FROM (SELECT 1 FROM runs a
                                                  WHERE a.tenant_id = r.tenant_id
                                                    AND a.status IN ('claimed', 'running', 'waiting')
                                                  LIMIT tl.max_active_runs) full_up)
                           >= tl.max_active_runs) THEN 'tenant_limit'
        ELSE ''
    END
$$;
