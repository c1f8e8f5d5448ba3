-- v18: re-runs and forks (RunService.RerunRun, ForkRun).
--
-- A run made from another names it (`rerun_of_run_id`, or `forked_from_run_id` and the
-- turn), and says where its conversation context comes from: the turns of
-- `context_run_id` completed before its event `context_before_seq` (and, in turn, that
-- run's own context source), then its session's runs before those. Set only on such
-- runs, in the transaction that creates them.
ALTER TABLE runs
    ADD COLUMN rerun_of_run_id uuid,
    ADD COLUMN forked_from_run_id uuid,
    ADD COLUMN forked_from_turn_id uuid,
    ADD COLUMN context_run_id uuid,
    ADD COLUMN context_before_seq bigint;
