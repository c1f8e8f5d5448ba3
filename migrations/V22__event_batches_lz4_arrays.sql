-- v22: a batch's per-event arrays (seqs, types, runner_seqs) compress with lz4 too, as its
-- payloads already do (v19). A streamed batch of hundreds of deltas puts kilobytes in
-- each array, so the row is compressed to fit a page; with the server's default (pglz)
-- that compression was a quarter of PostgreSQL's time in a streaming benchmark. Only new
-- rows are affected. Servers built without lz4 keep their default.
DO $$
BEGIN
    ALTER TABLE event_batches
        ALTER COLUMN seqs SET COMPRESSION lz4,
        ALTER COLUMN types SET COMPRESSION lz4,
        ALTER COLUMN runner_seqs SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    NULL;
END $$;
