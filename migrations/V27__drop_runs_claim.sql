-- v27: one index entry fewer per run. `runs_claim` held every pending run by queue.
-- Claims read pending runs by tenant (`runs_claim_by_tenant`, the claimable ones), and
-- reads of all open runs go through that index and `runs_held_by_key` (the held ones),
-- so nothing read it; each run paid an entry in it when it was created.
DROP INDEX runs_claim;
