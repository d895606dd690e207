-- runherd schema, version 1. Statuses are Dagster's names; see shared/contract.py for the machine.

CREATE TABLE runs (
    run_id              uuid PRIMARY KEY,
    job                 text        NOT NULL,
    status              text        NOT NULL,
    attempt             integer     NOT NULL DEFAULT 0,   -- current attempt; 0 until first dequeued
    resumes             integer     NOT NULL DEFAULT 0,   -- crash resumes used
    priority            integer     NOT NULL DEFAULT 0,
    tags                jsonb       NOT NULL DEFAULT '{}',
    steps               jsonb       NOT NULL,             -- the plan, as validated
    env                 jsonb       NOT NULL DEFAULT '{}',
    launcher            text,
    max_runtime_seconds double precision,                 -- from the tag; NULL: the config's
    parent_run_id       uuid,
    root_run_id         uuid,
    retry_number        integer     NOT NULL DEFAULT 0,
    failure_kind        text,                             -- 'step' | 'infrastructure'
    retried             boolean     NOT NULL DEFAULT false,
    reason              text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    not_before          timestamptz,                      -- retry backoff: not dequeued before
    started_at          timestamptz,
    ended_at            timestamptz,
    status_changed_at   timestamptz NOT NULL DEFAULT now()
);

-- The dequeue order: priority first, FIFO within.
CREATE INDEX runs_queued ON runs (priority DESC, created_at, run_id) WHERE status = 'QUEUED';
-- Every monitor rule and every concurrency count reads in-flight runs only.
CREATE INDEX runs_in_flight ON runs (status, status_changed_at)
    WHERE status IN ('STARTING', 'STARTED', 'CANCELING');
-- Failed runs awaiting a retry decision.
CREATE INDEX runs_retry_pending ON runs (ended_at) WHERE status = 'FAILURE' AND NOT retried;
CREATE INDEX runs_listing ON runs (created_at DESC);
CREATE INDEX runs_job ON runs (job, created_at DESC);
CREATE INDEX runs_root ON runs (root_run_id) WHERE root_run_id IS NOT NULL;

CREATE TABLE attempts (
    run_id            uuid        NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    attempt           integer     NOT NULL,
    launcher          text,
    handle            jsonb,                  -- NULL until the launcher has started the worker
    created_at        timestamptz NOT NULL DEFAULT now(),
    launch_claimed_at timestamptz,
    launched_at       timestamptz,
    -- Not indexed on purpose: heartbeat writes stay HOT updates.
    last_heartbeat_at timestamptz,
    exited_at         timestamptz,
    exit_code         integer,
    exit_reason       text,
    reap_claimed_at   timestamptz,
    PRIMARY KEY (run_id, attempt)
);

-- Attempts waiting for a launcher, and attempts whose worker may still be alive.
CREATE INDEX attempts_to_launch ON attempts (created_at) WHERE handle IS NULL AND exited_at IS NULL;
CREATE INDEX attempts_live ON attempts (run_id) WHERE exited_at IS NULL;

CREATE TABLE steps (
    run_id     uuid    NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    step_key   text    NOT NULL,
    status     text    NOT NULL,
    attempt    integer NOT NULL,
    output     jsonb,
    error      text,
    reused     boolean NOT NULL DEFAULT false,   -- copied from the origin run by a re-execution
    started_at timestamptz,
    ended_at   timestamptz,
    PRIMARY KEY (run_id, step_key)
);

CREATE TABLE events (
    id       bigserial PRIMARY KEY,
    run_id   uuid        NOT NULL,
    attempt  integer     NOT NULL,
    source   text        NOT NULL,   -- worker | launcher | monitor | runherd
    seq      integer,                -- per-attempt sequence of the producer; NULL for runherd's own
    type     text        NOT NULL,
    step_key text,
    message  text,
    data     jsonb       NOT NULL DEFAULT '{}',
    refused  text,                   -- why the event was not applied (stale attempt, terminal run)
    ts       timestamptz NOT NULL DEFAULT now()
);
-- A redelivered event adds no row.
CREATE UNIQUE INDEX events_dedup ON events (run_id, attempt, source, seq) WHERE seq IS NOT NULL;
CREATE INDEX events_by_run ON events (run_id, id);

-- Transactional outbox: a status change and its message commit together; the relay publishes.
CREATE TABLE status_outbox (
    id          bigserial PRIMARY KEY,
    run_id      uuid  NOT NULL,
    routing_key text  NOT NULL,
    body        jsonb NOT NULL
);
