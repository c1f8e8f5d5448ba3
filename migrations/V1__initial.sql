-- agentrun schema v1: tenants, projects, sessions, runs, commands, events, requests, runners.
--
-- Every row is scoped by tenant_id (and project_id where it applies). Statuses are text
-- with CHECK constraints that list the same values as agentrun_shared::state, so a row
-- can never hold a state the code does not know.

CREATE TABLE tenants (
    id          text PRIMARY KEY,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
    tenant_id   text NOT NULL REFERENCES tenants (id),
    id          text NOT NULL,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE sessions (
    id                  uuid PRIMARY KEY,
    tenant_id           text NOT NULL,
    project_id          text NOT NULL,
    backend_profile     text NOT NULL,
    title               text NOT NULL DEFAULT '',
    provider_thread_id  text,
    last_run_id         uuid,
    active_run_id       uuid,
    -- Bumped on every user-visible change; the cursor of list pages and read state.
    version             bigint NOT NULL DEFAULT 1,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sessions_by_tenant ON sessions (tenant_id, project_id, updated_at DESC);

-- Per-reader attention state: the session version the reader has seen.
CREATE TABLE session_read_cursors (
    session_id    uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    reader        text NOT NULL,
    read_version  bigint NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, reader)
);

CREATE TABLE runs (
    id                uuid PRIMARY KEY,
    tenant_id         text NOT NULL,
    project_id        text NOT NULL,
    session_id        uuid REFERENCES sessions (id),
    backend_profile   text NOT NULL,
    queue             text NOT NULL,
    priority          integer NOT NULL DEFAULT 0,
    labels            text[] NOT NULL DEFAULT '{}',
    input             jsonb NOT NULL DEFAULT '{}',
    metadata          jsonb NOT NULL DEFAULT '{}',
    status            text NOT NULL CHECK (status IN
                        ('pending', 'claimed', 'running', 'waiting',
                         'completed', 'failed', 'cancelled', 'blocked', 'expired')),
    -- 1-based number of the current (or next) execution; rises on requeue.
    attempt           integer NOT NULL DEFAULT 1,
    max_attempts      integer NOT NULL CHECK (max_attempts >= 1),
    queue_timeout_ms  bigint,
    run_timeout_ms    bigint,
    -- When a pending run expires / an active run times out (derived from the timeouts).
    queue_deadline    timestamptz,
    run_deadline      timestamptz,
    idempotency_key   text,
    -- sha256 of the canonical request, to tell a retry from a conflicting reuse of a key.
    request_hash      bytea,
    -- The lease. lease_epoch rises by one on every claim and fences every runner write.
    lease_runner_id   uuid,
    lease_epoch       bigint NOT NULL DEFAULT 0,
    lease_expires_at  timestamptz,
    -- Highest runner_seq stored in the current epoch (resent events at or below it are skipped).
    lease_runner_seq  bigint NOT NULL DEFAULT 0,
    cancel_requested  boolean NOT NULL DEFAULT false,
    failure_kind      text,
    failure_message   text,
    -- Per-run counters, advanced under the row lock: this is what keeps seq gapless.
    last_event_seq    bigint NOT NULL DEFAULT 0,
    last_command_seq  bigint NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    claimed_at        timestamptz,
    finished_at       timestamptz
);
CREATE UNIQUE INDEX runs_idempotency ON runs (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The claim path: pending runs by queue, highest priority, then oldest.
CREATE INDEX runs_claim ON runs (queue, priority DESC, created_at, id)
    WHERE status = 'pending';
-- The sweeper: leases that can expire, pending runs with a queue deadline.
CREATE INDEX runs_lease_expiry ON runs (lease_expires_at)
    WHERE status IN ('claimed', 'running', 'waiting');
CREATE INDEX runs_run_deadline ON runs (run_deadline)
    WHERE status IN ('claimed', 'running', 'waiting') AND run_deadline IS NOT NULL;
CREATE INDEX runs_queue_deadline ON runs (queue_deadline)
    WHERE status = 'pending' AND queue_deadline IS NOT NULL;
-- Listing: newest first (run ids are time-ordered UUIDv7) within a tenant, and per session.
CREATE INDEX runs_by_tenant ON runs (tenant_id, id DESC);
CREATE INDEX runs_by_session ON runs (session_id, id DESC) WHERE session_id IS NOT NULL;

CREATE TABLE commands (
    run_id           uuid NOT NULL REFERENCES runs (id),
    seq              bigint NOT NULL,
    id               uuid NOT NULL UNIQUE,
    kind             text NOT NULL CHECK (kind IN ('turn', 'steer', 'interrupt', 'cancel', 'resolve')),
    payload          jsonb NOT NULL,
    status           text NOT NULL CHECK (status IN
                       ('pending', 'delivered', 'acknowledged', 'completed', 'failed', 'cancelled')),
    delivery_policy  text CHECK (delivery_policy IN ('queue', 'interrupt', 'steer', 'reject')),
    idempotency_key  text,
    payload_hash     bytea NOT NULL,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);
CREATE UNIQUE INDEX commands_idempotency ON commands (run_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX commands_open ON commands (run_id, seq)
    WHERE status IN ('pending', 'delivered', 'acknowledged');

CREATE TABLE events (
    run_id      uuid NOT NULL,
    seq         bigint NOT NULL,
    type        text NOT NULL,
    payload     jsonb NOT NULL,
    producer    text NOT NULL CHECK (producer IN ('manager', 'runner')),
    runner_id   uuid,
    epoch       bigint,
    -- Runner-side sequence within (run, epoch); NULL for manager events.
    runner_seq  bigint,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);
-- A runner event is stored at most once per (run, epoch, runner_seq): a resent batch can
-- never be stored twice, even if the row-counter check were bypassed.
CREATE UNIQUE INDEX events_runner_dedup ON events (run_id, epoch, runner_seq)
    WHERE runner_seq IS NOT NULL;

CREATE TABLE requests (
    id           uuid PRIMARY KEY,
    tenant_id    text NOT NULL,
    run_id       uuid NOT NULL REFERENCES runs (id),
    kind         text NOT NULL CHECK (kind IN ('command', 'file_read', 'file_change', 'tool', 'user_input')),
    detail       jsonb NOT NULL DEFAULT '{}',
    status       text NOT NULL CHECK (status IN ('open', 'resolved', 'cancelled', 'expired')),
    resolution   jsonb,
    deadline     timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz
);
CREATE INDEX requests_open ON requests (run_id) WHERE status = 'open';

CREATE TABLE runners (
    id                 uuid PRIMARY KEY,
    name               text NOT NULL,
    labels             text[] NOT NULL DEFAULT '{}',
    backend_profiles   text[] NOT NULL DEFAULT '{}',
    queues             text[] NOT NULL DEFAULT '{}',
    max_concurrency    integer NOT NULL DEFAULT 1,
    version            text NOT NULL DEFAULT '',
    draining           boolean NOT NULL DEFAULT false,
    connected_at       timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at  timestamptz NOT NULL DEFAULT now()
);
