-- v3: sessions' active run.
--
-- From here on the manager keeps sessions.active_run_id (the newest run of the session
-- that has not ended) whenever a run of the session is created or ends. Sessions with
-- runs in flight when this migration runs get it filled in now, so they show as active.

UPDATE sessions s
SET active_run_id = (
    SELECT r.id FROM runs r
    WHERE r.session_id = s.id
      AND r.status IN ('pending', 'claimed', 'running', 'waiting')
    ORDER BY r.id DESC
    LIMIT 1
)
WHERE s.active_run_id IS DISTINCT FROM (
    SELECT r.id FROM runs r
    WHERE r.session_id = s.id
      AND r.status IN ('pending', 'claimed', 'running', 'waiting')
    ORDER BY r.id DESC
    LIMIT 1
);
