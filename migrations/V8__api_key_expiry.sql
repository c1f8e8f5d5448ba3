-- API keys may expire, and record when they were last used.
-- expires_at: NULL never expires; the key is refused from that instant on.
-- last_used_at: NULL never used. Written when a manager verifies the key against the
-- database (a cache miss), at most once a minute per key: an approximation, not an audit.
ALTER TABLE api_keys
    ADD COLUMN expires_at   timestamptz,
    ADD COLUMN last_used_at timestamptz;
