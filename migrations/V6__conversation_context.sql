-- v6: conversation context.
--
-- A run handed to a runner carries the conversation so far (its session's earlier turns
-- and its own completed turns), read from the log: each turn's start and end, and the
-- completed assistant messages between them. This partial index holds just those
-- events, a few per turn, so building the context never scans a run's deltas; the
-- provider thread id reported in `turn.completed` is read through it too.
CREATE INDEX events_conversation ON events (run_id, seq)
    WHERE type IN ('turn.started', 'turn.completed')
       OR (type = 'item.completed' AND payload->>'kind' = 'assistant_message');
