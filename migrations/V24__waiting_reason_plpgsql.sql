-- v24: `run_waiting_reason` in PL/pgSQL, unchanged in what it answers. A SQL function
-- whose body has subqueries is never inlined, and PostgreSQL then plans that body again
-- on every execution of the query calling it: about half a millisecond of each GetRun,
-- WatchRun and ListRuns, whose own lookup takes a few microseconds. PL/pgSQL keeps its
-- statements' plans for the session.
CREATE OR REPLACE FUNCTION run_waiting_reason(r runs) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF r.status <> 'pending' THEN
        RETURN '';
    ELSIF r.held IS NOT NULL THEN
        RETURN r.held;
    ELSIF r.scheduled_at > now() THEN
        RETURN 'scheduled';
    ELSIF EXISTS (SELECT 1 FROM rate_limits l
                  WHERE l.tenant_id = r.tenant_id
                    AND (l.scope = 'tenant'
                         OR (l.scope = 'queue' AND l.key = r.queue)
                         OR (l.scope = 'concurrency_key' AND l.key = r.concurrency_key))
                    AND rate_limit_tokens(l) < 1) THEN
        RETURN 'rate_limit';
    ELSIF EXISTS (SELECT 1 FROM tenant_limits tl
                  WHERE tl.tenant_id = r.tenant_id AND tl.max_active_runs IS NOT NULL
                    AND (SELECT count(*) FROM (SELECT 1 FROM runs a
                                               WHERE a.tenant_id = r.tenant_id
                                                 AND a.status IN ('claimed', 'running', 'waiting')
                                               LIMIT tl.max_active_runs) full_up)
                        >= tl.max_active_runs) THEN
        RETURN 'tenant_limit';
    END IF;
    RETURN '';
END
$$;
