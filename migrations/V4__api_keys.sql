-- API keys: each bound to a tenant (and optionally projects) and a role. Only a
-- SHA-256 hash of the secret is stored; the key text is shown once, when it is created.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    tenant_id   text NOT NULL,
    -- Empty: every project of the tenant.
    project_ids text[] NOT NULL DEFAULT '{}',
    role        text NOT NULL CHECK (role IN ('client', 'runner', 'admin')),
    secret_hash bytea NOT NULL,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at);
