-- Commands of kind `resume`: let turns queued before an interrupt start.
ALTER TABLE commands DROP CONSTRAINT IF EXISTS commands_kind_check;
ALTER TABLE commands ADD CONSTRAINT commands_kind_check
    CHECK (kind IN ('turn', 'steer', 'interrupt', 'cancel', 'resolve', 'resume'));
