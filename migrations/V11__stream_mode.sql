-- v11: how each run's streamed output is kept (CreateRunRequest.stream_mode): every
-- delta stored, deltas coalesced per runner batch, or only the completed item stored.
-- Runs from before keep every delta.
ALTER TABLE runs ADD COLUMN stream_mode text NOT NULL DEFAULT 'deltas'
    CHECK (stream_mode IN ('deltas', 'coalesced', 'final'));
