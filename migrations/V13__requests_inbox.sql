-- v13: the approvals inbox (ListRequests): a tenant's requests in a status, newest first.
-- The only request indexes so far are by run (requests_open) and by deadline (the
-- sweeper), so listing across a tenant's runs would scan every request it ever had.
CREATE INDEX requests_inbox ON requests (tenant_id, status, created_at DESC, id DESC);
