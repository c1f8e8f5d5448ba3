-- v20: room on each page of `runs` for the row's next versions. A run row is updated
-- several times in its life, and an update that changes no indexed column (the event
-- counter, the lease's progress) can then stay on its page as a heap-only tuple: no new
-- entry in any of the table's indexes.
ALTER TABLE runs SET (fillfactor = 70);
