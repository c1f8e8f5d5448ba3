-- The reason a caller gave when cancelling an active run (CancelRun, or a cancel
-- command): the run's failure_message once its runner has stopped it.
ALTER TABLE runs ADD COLUMN cancel_reason text;
