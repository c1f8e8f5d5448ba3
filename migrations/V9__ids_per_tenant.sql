-- v9: runner, session and request ids are per tenant.
--
-- These ids are chosen by callers (a runner's id, a session id passed to CreateRun, a
-- request id a runner opens). While they were unique across tenants, naming another
-- tenant's id was answered differently from naming a fresh one, which told the caller
-- the id exists, and a runner naming another tenant's runner id took over its row. Now
-- each tenant has its own: the key is (tenant_id, id) everywhere.

-- Runners: '' is the tenant of a runner without an API key (authentication disabled),
-- which serves every tenant.
ALTER TABLE runners ADD COLUMN tenant_id text NOT NULL DEFAULT '';
ALTER TABLE runners DROP CONSTRAINT runners_pkey, ADD PRIMARY KEY (tenant_id, id);

-- Sessions, and what refers to them.
ALTER TABLE runs DROP CONSTRAINT runs_session_id_fkey;
ALTER TABLE session_read_cursors DROP CONSTRAINT session_read_cursors_session_id_fkey;
ALTER TABLE session_read_cursors ADD COLUMN tenant_id text;
UPDATE session_read_cursors c SET tenant_id = s.tenant_id FROM sessions s WHERE s.id = c.session_id;
ALTER TABLE session_read_cursors ALTER COLUMN tenant_id SET NOT NULL;
ALTER TABLE session_read_cursors DROP CONSTRAINT session_read_cursors_pkey,
    ADD PRIMARY KEY (tenant_id, session_id, reader);
ALTER TABLE sessions DROP CONSTRAINT sessions_pkey, ADD PRIMARY KEY (tenant_id, id);
ALTER TABLE runs ADD CONSTRAINT runs_session_fkey
    FOREIGN KEY (tenant_id, session_id) REFERENCES sessions (tenant_id, id);
ALTER TABLE session_read_cursors ADD CONSTRAINT session_read_cursors_session_fkey
    FOREIGN KEY (tenant_id, session_id) REFERENCES sessions (tenant_id, id) ON DELETE CASCADE;
DROP INDEX runs_by_session;
CREATE INDEX runs_by_session ON runs (tenant_id, session_id, id DESC) WHERE session_id IS NOT NULL;

-- Requests.
ALTER TABLE requests DROP CONSTRAINT requests_pkey, ADD PRIMARY KEY (tenant_id, id);
