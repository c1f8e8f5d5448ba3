-- v16: schedules (ScheduleService): runs created on a cron expression or a fixed
-- interval. Each due time is fired by one replica in one transaction that locks the
-- schedule row (`FOR UPDATE SKIP LOCKED`), creates the run and advances next_run_at.
CREATE TABLE schedules (
    id               uuid PRIMARY KEY,
    tenant_id        text NOT NULL,
    project_id       text NOT NULL,
    name             text NOT NULL,
    -- Exactly one of cron (read in time_zone) and interval_ms.
    cron             text,
    time_zone        text NOT NULL DEFAULT 'UTC',
    interval_ms      bigint CHECK (interval_ms >= 1000),
    -- The validated CreateRunRequest each due time creates, as the store's JSON.
    run_template     jsonb NOT NULL,
    overlap_policy   text NOT NULL CHECK (overlap_policy IN ('skip', 'queue', 'cancel_previous')),
    catch_up_policy  text NOT NULL CHECK (catch_up_policy IN ('one', 'none')),
    paused           boolean NOT NULL DEFAULT false,
    -- The next due time; NULL while paused.
    next_run_at      timestamptz,
    last_run_at      timestamptz,
    last_run_id      uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- Tells a retried CreateSchedule (same definition) from a name clash.
    request_hash     bytea NOT NULL,
    CHECK ((cron IS NULL) <> (interval_ms IS NULL)),
    UNIQUE (tenant_id, name)
);
-- The firing loop's work list: due schedules, soonest first.
CREATE INDEX schedules_due ON schedules (next_run_at) WHERE NOT paused;
-- ListSchedules: the tenant's schedules, oldest first (ids are v7, time-ordered).
CREATE INDEX schedules_by_tenant ON schedules (tenant_id, id);

-- The schedule that created a run, and the due time it stands for (NULL for a run made
-- by TriggerSchedule). No schedule has two runs for one due time, whatever fires it.
ALTER TABLE runs ADD COLUMN schedule_id uuid;
ALTER TABLE runs ADD COLUMN schedule_due_at timestamptz;
CREATE UNIQUE INDEX runs_schedule_due ON runs (schedule_id, schedule_due_at)
    WHERE schedule_due_at IS NOT NULL;
