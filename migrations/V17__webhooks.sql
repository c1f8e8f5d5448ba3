-- Webhooks: HTTP endpoints told about a tenant's run events, and their deliveries.
--
-- A delivery row is written in the transaction that appends its event (one
-- INSERT ... SELECT joining the new events to the tenant's webhooks), so every
-- deliverable event yields exactly one delivery per matching webhook: UNIQUE
-- (webhook_id, run_id, seq). Its id is the stable delivery id receivers deduplicate by.

CREATE TABLE webhooks (
    id           uuid PRIMARY KEY,
    tenant_id    text NOT NULL,
    -- '' means every project of the tenant.
    project_id   text NOT NULL DEFAULT '',
    url          text NOT NULL,
    event_types  text[] NOT NULL CHECK (cardinality(event_types) > 0),
    -- The HMAC key, kept as given: it must be readable to sign.
    secret       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Soft delete: appends racing a delete may still reference the row (never blocked by
    -- it); the delivery worker skips deliveries of deleted webhooks.
    deleted      boolean NOT NULL DEFAULT false
);
CREATE INDEX webhooks_by_tenant ON webhooks (tenant_id, created_at) WHERE NOT deleted;

CREATE TABLE webhook_deliveries (
    -- The stable delivery id (agentrun-delivery-id).
    id               uuid PRIMARY KEY,
    webhook_id       uuid NOT NULL REFERENCES webhooks (id),
    tenant_id        text NOT NULL,
    run_id           uuid NOT NULL,
    seq              bigint NOT NULL,
    event_type       text NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'delivered', 'failed')),
    -- Attempts started; the worker counts one before it sends.
    attempts         integer NOT NULL DEFAULT 0,
    -- When a pending delivery is next due. While an attempt is in flight it is pushed
    -- past the request timeout, so no other replica sends the same attempt meanwhile.
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    -- Listing order (newest first) and page cursor.
    position         bigint GENERATED ALWAYS AS IDENTITY,
    UNIQUE (webhook_id, run_id, seq)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, position DESC);
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (created_at)
    WHERE status <> 'pending';
