-- The W3C trace context (`traceparent`) of the call that created the run: runners
-- continue that trace, so a run is one trace from the client's CreateRun on. NULL: none.
ALTER TABLE runs ADD COLUMN trace_parent text;
