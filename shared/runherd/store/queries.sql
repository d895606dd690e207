-- Named queries of the store. Each block starts with "-- name: NAME"; shared/store/queries.py
-- loads them. Every status change goes through `transition`: a compare-and-set that also writes
-- the event log and the status outbox in the same statement.

-- name: transition
-- $1 run ids, $2 allowed from-statuses, $3 target status, $4 reason, $5 failure kind,
-- $6 attempt guard (NULL: any attempt), $7 source of the change
WITH target AS (
    SELECT run_id, status AS previous_status
    FROM runs
    WHERE run_id = ANY($1::uuid[]) AND status = ANY($2::text[])
      AND ($6::integer IS NULL OR attempt = $6::integer)
    ORDER BY run_id
    FOR UPDATE
), moved AS (
    UPDATE runs r
    SET status = $3::text,
        reason = $4::text,
        failure_kind = CASE WHEN $3::text = 'FAILURE' THEN $5::text ELSE r.failure_kind END,
        status_changed_at = clock_timestamp(),
        started_at = CASE WHEN $3::text = 'STARTED' THEN clock_timestamp() ELSE r.started_at END,
        ended_at = CASE WHEN $3::text IN ('SUCCESS', 'FAILURE', 'CANCELED')
                        THEN clock_timestamp() ELSE r.ended_at END
    FROM target t
    WHERE r.run_id = t.run_id
    RETURNING r.run_id, r.job, r.status, t.previous_status, r.attempt, r.tags, r.parent_run_id,
              r.status_changed_at
), logged AS (
    INSERT INTO events (run_id, attempt, source, type, message, data, ts)
    SELECT run_id, attempt, $7::text, 'RUN_STATUS', $4::text,
           jsonb_build_object('from', previous_status, 'to', status), status_changed_at
    FROM moved
), published AS (
    INSERT INTO status_outbox (run_id, routing_key, body)
    SELECT run_id, runherd_status_key(status, job),
           runherd_status_body(run_id, job, status, previous_status, attempt, $4::text, status_changed_at, tags,
                               parent_run_id)
    FROM moved
    ORDER BY run_id
), marked AS (
    -- A finished run's workers may still be alive: the reap rule stops any left after its grace.
    UPDATE attempts a SET reap_after = coalesce(a.reap_after, m.status_changed_at)
    FROM moved m
    WHERE a.run_id = m.run_id AND a.exited_at IS NULL AND m.status IN ('SUCCESS', 'FAILURE', 'CANCELED')
)
SELECT run_id, job, status, previous_status, attempt FROM moved;

-- name: dequeue
-- Picks the next queued runs that fit every limit, in priority order (FIFO within), exactly as
-- rules/coordinator.py `pick` walks them: a run that fits takes its slots, so the runs behind it see
-- them taken, and a run held by a limit never holds back the runs behind it. $1 global limit (-1:
-- none), $2 tag limits as JSON, $3 how many at most. Runs whose retry backoff (not_before) has not
-- passed are skipped. Returns the picked runs in order, each with `slots`: how many could start
-- (the free global slots, at most $3).
-- One walk down the `runs_queued` index (a recursive CTE): each step seeks, from the last run taken,
-- the next queued run that fits the counts so far (the in-flight runs' groups plus those of the runs
-- taken before it, carried as one jsonb object {"<limit>:<group>": n}) and takes it; the walk stops
-- when the slots are filled or the queue ends. Each queued run is read at most once per call,
-- however many are taken, and no candidate window is needed: the decision is exact in one pass.
-- {held} is the test "this queued run is held by a limit", written out per limit by
-- store/queries.py `dequeue_query` (one plain expression per limit, its key, value and cap read once
-- from `lim`): a blocked run at the head of the queue is read on every call, so its test must be
-- cheap, and a subquery over `lim` per queued run costs twice the plain expressions.
WITH RECURSIVE lim AS (
    SELECT ord::integer AS i, l->>'key' AS key, l->>'value' AS value,
           coalesce((l->>'per_unique_value')::boolean, false) AS per_unique, (l->>'limit')::integer AS cap
    FROM jsonb_array_elements($2::jsonb) WITH ORDINALITY AS x(l, ord)
), slots AS (
    SELECT CASE WHEN $1::integer < 0 THEN $3::integer
                ELSE greatest(0, least($3::integer, $1::integer - (
                    SELECT count(*)::integer FROM runs WHERE status IN ('STARTING', 'STARTED', 'CANCELING'))))
           END AS n
), flight AS (
    -- A group is "<limit>:<value>" for a per-value limit, "<limit>:" otherwise. A JSON null tag
    -- value spells "null", as coordinator.tag_text spells it.
    SELECT coalesce(jsonb_object_agg(g, n), '{}'::jsonb) AS counts
    FROM (
        SELECT lim.i || ':' || CASE WHEN lim.per_unique THEN coalesce(r.tags->>lim.key, 'null') ELSE '' END AS g,
               count(*) AS n
        FROM runs r
        JOIN lim ON r.tags ? lim.key AND (lim.value IS NULL OR coalesce(r.tags->>lim.key, 'null') = lim.value)
        WHERE r.status IN ('STARTING', 'STARTED', 'CANCELING')
        GROUP BY 1
    ) f
), clock AS (
    SELECT clock_timestamp() AS ts  -- read once, not once per queued run
), walk AS (
    -- The cursor starts before the first run: the highest priority, from the beginning of time.
    SELECT NULL::uuid AS run_id, 2147483647 AS priority, '-infinity'::timestamptz AS created_at,
           '00000000-0000-0000-0000-000000000000'::uuid AS after_id, 0 AS taken,
           (SELECT counts FROM flight) AS counts
    UNION ALL
    SELECT nx.run_id, nx.priority, nx.created_at, nx.run_id, w.taken + 1,
           w.counts || coalesce((
               SELECT jsonb_object_agg(g.k, coalesce((w.counts->>g.k)::integer, 0) + 1)
               FROM (SELECT lim.i || ':' || CASE WHEN lim.per_unique THEN coalesce(nx.tags->>lim.key, 'null') ELSE '' END
                            AS k
                     FROM lim
                     WHERE nx.tags ? lim.key
                       AND (lim.value IS NULL OR coalesce(nx.tags->>lim.key, 'null') = lim.value)) g),
               '{}'::jsonb)
    FROM walk w
    CROSS JOIN LATERAL (
        -- The next run that fits: in the rest of the cursor's priority, else in the lower ones. Two
        -- index range scans (the index is priority DESC, created_at, run_id), so the walk never
        -- reads a run it has passed again.
        (SELECT r.run_id, r.priority, r.created_at, r.tags
         FROM runs r
         WHERE r.status = 'QUEUED' AND r.priority = w.priority
           AND (r.created_at, r.run_id) > (w.created_at, w.after_id)
           AND (r.not_before IS NULL OR r.not_before <= (SELECT ts FROM clock))
           AND NOT ({held})
         ORDER BY r.priority DESC, r.created_at, r.run_id
         LIMIT 1)
        UNION ALL
        (SELECT r.run_id, r.priority, r.created_at, r.tags
         FROM runs r
         WHERE r.status = 'QUEUED' AND r.priority < w.priority
           AND (r.not_before IS NULL OR r.not_before <= (SELECT ts FROM clock))
           AND NOT ({held})
         ORDER BY r.priority DESC, r.created_at, r.run_id
         LIMIT 1)
        LIMIT 1
    ) nx
    WHERE w.taken < (SELECT n FROM slots)
)
SELECT run_id, (SELECT n FROM slots) AS slots
FROM walk
WHERE run_id IS NOT NULL
ORDER BY taken;

-- name: in_flight_by_limit
-- What each limit group holds now: for `runherd runs --status QUEUED` to say why a run waits.
SELECT r.status, r.tags FROM runs r WHERE r.status IN ('STARTING', 'STARTED', 'CANCELING');

-- name: new_attempts
-- The first attempt of runs just dequeued (STARTING), waiting for a launcher.
INSERT INTO attempts (run_id, attempt, launcher)
SELECT run_id, 1, NULL FROM unnest($1::uuid[]) AS u(run_id)
ON CONFLICT DO NOTHING;

-- name: bump_first_attempt
UPDATE runs SET attempt = 1 WHERE run_id = ANY($1::uuid[]) AND attempt = 0;

-- name: claim_launches
-- Attempts with no worker yet; a claim older than $2 seconds is a launcher that died mid-launch.
WITH claimed AS (
    SELECT a.run_id, a.attempt
    FROM attempts a
    WHERE a.handle IS NULL AND a.exited_at IS NULL
      AND (a.launch_claimed_at IS NULL OR a.launch_claimed_at < clock_timestamp() - make_interval(secs => $2))
    ORDER BY a.created_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE attempts a SET launch_claimed_at = clock_timestamp()
FROM claimed c, runs r
WHERE a.run_id = c.run_id AND a.attempt = c.attempt AND r.run_id = a.run_id
RETURNING a.run_id, a.attempt, r.job, r.status, r.attempt AS current_attempt, r.tags, r.steps, r.env,
          r.launcher, r.max_runtime_seconds;

-- name: completed_steps
SELECT run_id, step_key, output FROM steps WHERE run_id = ANY($1::uuid[]) AND status = 'SUCCESS';

-- name: step_tries
-- Steps with failed tries, from their applied STEP_UP_FOR_RETRY events: a resumed attempt goes on at
-- the next try (after what is left of its delay), not from the first.
SELECT DISTINCT ON (run_id, step_key) run_id, step_key,
       (data->>'try')::integer AS failed_tries, (data->>'retry_at_epoch')::double precision AS retry_at
FROM events
WHERE run_id = ANY($1::uuid[]) AND type = 'STEP_UP_FOR_RETRY' AND refused IS NULL AND seq IS NOT NULL
ORDER BY run_id, step_key, (data->>'try')::integer DESC;

-- name: record_launches
-- Records the workers' handles of a batch of launches in one statement ($1 run ids, $2 attempts, $3
-- handles, $4 launcher names) and says what became of each run meanwhile (a cancel that arrived
-- while the worker was starting found no handle to stop). Attempts are locked in (run_id, attempt)
-- order, the order every statement locks them in.
WITH launched AS (
    SELECT DISTINCT ON (run_id, attempt) run_id, attempt, handle, launcher
    FROM unnest($1::uuid[], $2::integer[], $3::jsonb[], $4::text[]) AS x(run_id, attempt, handle, launcher)
), locked AS (
    SELECT a.run_id, a.attempt
    FROM attempts a JOIN launched l ON a.run_id = l.run_id AND a.attempt = l.attempt
    ORDER BY a.run_id, a.attempt
    FOR UPDATE OF a
)
UPDATE attempts a SET handle = l.handle, launcher = l.launcher, launched_at = clock_timestamp()
FROM locked k JOIN launched l ON l.run_id = k.run_id AND l.attempt = k.attempt JOIN runs r ON r.run_id = k.run_id
WHERE a.run_id = k.run_id AND a.attempt = k.attempt
RETURNING a.run_id, a.attempt, r.status, r.attempt AS current_attempt;

-- name: record_exit
-- The first report of an exit wins; later duplicates change nothing.
UPDATE attempts
SET exited_at = coalesce(exited_at, clock_timestamp()),
    exit_code = coalesce(exit_code, $3), exit_reason = coalesce(exit_reason, $4)
WHERE run_id = $1 AND attempt = $2
RETURNING handle;

-- name: record_heartbeats
-- One statement per batch. A heartbeat's last-seen time is the database's time of writing, never the
-- worker's `ts` (its clock may be off by minutes either way). Heartbeats of an attempt that is no
-- longer current match no row. Canaries (run_id nil, attempt = nonce; see heartbeat/watermark.py)
-- written in this batch advance the writing replica $3's watermark to their stamp: everything
-- published before a canary reached this replica before it, so it is in this batch or an earlier one.
WITH beats AS (
    SELECT run_id, attempt FROM unnest($1::uuid[], $2::integer[]) AS x(run_id, attempt)
), locked AS (
    -- Rows locked in (run_id, attempt) order, the order every statement locks attempts in: a batch
    -- and an exit report (ingest) locking the same attempts can then never deadlock.
    SELECT a.run_id, a.attempt
    FROM attempts a
    JOIN (SELECT DISTINCT run_id, attempt FROM beats
          WHERE run_id <> '00000000-0000-0000-0000-000000000000') u
      ON a.run_id = u.run_id AND a.attempt = u.attempt
    JOIN runs r ON r.run_id = u.run_id AND r.attempt = u.attempt
    WHERE r.status IN ('STARTING', 'STARTED', 'CANCELING')
    ORDER BY a.run_id, a.attempt
    FOR UPDATE OF a
), touched AS (
    UPDATE attempts a
    SET last_heartbeat_at = clock_timestamp()
    FROM locked l
    WHERE a.run_id = l.run_id AND a.attempt = l.attempt
    RETURNING a.run_id
), canaries AS (
    DELETE FROM heartbeat_canaries c
    USING beats b
    WHERE $3::text IS NOT NULL AND b.run_id = '00000000-0000-0000-0000-000000000000' AND c.nonce = b.attempt
    RETURNING c.stamp
), heard AS (
    -- Only a registered replica (issue_canaries) is credited: one that left cleanly stays gone.
    UPDATE heartbeat_replicas h
    SET heard_through = greatest(h.heard_through, (SELECT max(stamp) FROM canaries)), seen_at = clock_timestamp()
    WHERE h.replica = $3::text AND EXISTS (SELECT 1 FROM canaries)
)
SELECT count(*) AS touched FROM touched;

-- name: issue_canaries
-- Canaries for replica $1 to publish: nonces $2, each stamped with the database's time now, which
-- they will carry through the queue (the stamp stays here). Returns the nonces issued (a taken one is
-- not) and how many replicas are alive, which is how many canaries the replica sends next time (one
-- for each, back to back: RabbitMQ deals adjacent messages to different consumers). Also marks the
-- replica alive (a new one starts at -infinity: it may already hold heartbeats it has not written)
-- and forgets canaries lost on the way (the queue drops its oldest messages when full) and replicas
-- long gone.
WITH alive AS (
    INSERT INTO heartbeat_replicas AS h (replica) VALUES ($1::text)
    ON CONFLICT (replica) DO UPDATE SET seen_at = clock_timestamp()
), lost AS (
    DELETE FROM heartbeat_canaries WHERE stamp < clock_timestamp() - interval '1 hour'
), gone AS (
    DELETE FROM heartbeat_replicas WHERE seen_at < clock_timestamp() - interval '1 day'
), issued AS (
    INSERT INTO heartbeat_canaries (nonce) SELECT DISTINCT unnest($2::integer[])
    ON CONFLICT (nonce) DO NOTHING
    RETURNING nonce
)
SELECT coalesce((SELECT array_agg(nonce) FROM issued), '{}') AS nonces,
       (SELECT count(*) FROM heartbeat_replicas
        WHERE seen_at > clock_timestamp() - interval '2 seconds')::integer AS replicas;

-- name: forget_replica
-- A replica that stops cleanly holds nothing any more: it no longer holds the watermark back.
DELETE FROM heartbeat_replicas WHERE replica = $1::text;

-- name: issue_event_canary
-- A canary for a monitor to publish on runherd.events: nonce $1, stamped with the database's time now.
WITH lost AS (
    DELETE FROM event_canaries WHERE stamp < clock_timestamp() - interval '1 hour'
)
INSERT INTO event_canaries (nonce) VALUES ($1::integer)
ON CONFLICT (nonce) DO NOTHING
RETURNING stamp;

-- name: record_event_canaries
-- The events before these canaries are applied: the event watermark moves to their latest stamp.
WITH applied AS (
    DELETE FROM event_canaries WHERE nonce = ANY($1::integer[]) RETURNING stamp
)
UPDATE event_watermark w
SET applied_through = greatest(w.applied_through, (SELECT max(stamp) FROM applied))
WHERE EXISTS (SELECT 1 FROM applied);

-- name: heard_lag
-- How far behind the workers are heard (heartbeats and events), in seconds; NULL: not heard at all.
SELECT extract(epoch FROM clock_timestamp() - runherd_heard_through())::float8 AS seconds;

-- name: insert_event
INSERT INTO events (run_id, attempt, source, seq, type, step_key, message, data, refused, ts)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (run_id, attempt, source, seq) WHERE seq IS NOT NULL DO NOTHING
RETURNING id;

-- name: log_event
INSERT INTO events (run_id, attempt, source, type, step_key, message, data)
SELECT u.run_id, u.attempt, $4, $5, NULL, u.message, coalesce(u.data, '{}')
FROM unnest($1::uuid[], $2::integer[], $3::text[], $6::jsonb[]) AS u(run_id, attempt, message, data);

-- name: run_for_update
SELECT run_id, job, status, attempt, resumes, tags FROM runs WHERE run_id = $1 FOR UPDATE;

-- name: runs_for_update
-- Lock order, everywhere: runs before attempts, each by (run_id, attempt). The heartbeat batch
-- locks only attempts, in the same order, so the two never deadlock.
SELECT run_id, job, status, attempt, resumes, tags, max_runtime_seconds FROM runs
WHERE run_id = ANY($1::uuid[]) ORDER BY run_id FOR UPDATE;

-- name: current_attempts_for_update
SELECT a.run_id FROM attempts a JOIN runs r ON r.run_id = a.run_id AND r.attempt = a.attempt
WHERE a.run_id = ANY($1::uuid[]) ORDER BY a.run_id, a.attempt FOR UPDATE OF a;

-- name: step_events
-- Steps' events (a batch's run of them between two run-changing events), appended and applied in one
-- statement: each event is appended once (a redelivery inserts nothing), and each step takes its
-- latest new event (keeping the start time of a start in the same batch). A step that succeeded
-- stays SUCCESS: a resumed attempt never re-runs it, and a late event of an older attempt cannot
-- undo it. Returns how many new events of each type there were.
WITH input AS (
    -- data and output arrive as JSON text: an array of JSON values of any shape is not an SQL array
    SELECT run_id, attempt, source, seq, type, step_key, message, data::jsonb AS data, ts, status,
           output::jsonb AS output, ord
    FROM unnest($1::uuid[], $2::integer[], $3::text[], $4::integer[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::timestamptz[], $10::text[], $11::text[])
        WITH ORDINALITY AS x(run_id, attempt, source, seq, type, step_key, message, data, ts, status, output, ord)
), logged AS (
    INSERT INTO events (run_id, attempt, source, seq, type, step_key, message, data, ts)
    SELECT run_id, attempt, source, seq, type, step_key, message, data, ts FROM input ORDER BY ord
    ON CONFLICT (run_id, attempt, source, seq) WHERE seq IS NOT NULL DO NOTHING
    RETURNING run_id, attempt, source, seq, type
), fresh AS (
    SELECT i.* FROM input i JOIN logged l USING (run_id, attempt, source, seq)
), latest AS (
    SELECT DISTINCT ON (run_id, step_key) run_id, step_key, attempt, status, output, message, ts,
           max(ts) FILTER (WHERE status = 'RUNNING') OVER (PARTITION BY run_id, step_key) AS started
    FROM fresh
    ORDER BY run_id, step_key, ord DESC
), applied AS (
    INSERT INTO steps (run_id, step_key, status, attempt, output, error, started_at, ended_at)
    SELECT run_id, step_key, status, attempt, output,
           CASE WHEN status = 'RUNNING' THEN NULL ELSE message END, started,
           CASE WHEN status = 'RUNNING' THEN NULL ELSE ts END
    FROM latest
    ON CONFLICT (run_id, step_key) DO UPDATE
    SET status = excluded.status, attempt = excluded.attempt, error = excluded.error,
        output = CASE WHEN excluded.status = 'RUNNING' THEN steps.output ELSE excluded.output END,
        started_at = coalesce(excluded.started_at, steps.started_at),
        ended_at = excluded.ended_at
    WHERE steps.status <> 'SUCCESS'
)
SELECT type, count(*) AS n FROM logged GROUP BY type;

-- name: resume
-- Crash resume as one compare-and-set: only the current attempt of a STARTED run with resumes
-- left moves on. $1 run ids, $2 their crashed attempts, $3 max resumes, $4 why (per run).
-- The run stays STARTED, but subscribers must learn that its worker was replaced: the same
-- statement writes a STARTED -> STARTED status message with the new attempt and the reason.
WITH crashed AS (
    SELECT r.run_id, r.attempt, u.why
    FROM runs r
    JOIN unnest($1::uuid[], $2::integer[], $4::text[]) AS u(run_id, attempt, why)
      ON r.run_id = u.run_id AND r.attempt = u.attempt
    WHERE r.status = 'STARTED' AND r.resumes < $3
    ORDER BY r.run_id
    FOR UPDATE OF r
), resumed AS (
    UPDATE runs r SET attempt = r.attempt + 1, resumes = r.resumes + 1
    FROM crashed c WHERE r.run_id = c.run_id
    RETURNING r.run_id, r.job, r.attempt, r.resumes, r.tags, r.parent_run_id, clock_timestamp() AS ts,
              c.why || '; resume attempt ' || r.resumes || ' of ' || $3 AS reason
), new_attempt AS (
    INSERT INTO attempts (run_id, attempt) SELECT run_id, attempt FROM resumed
), superseded AS (
    UPDATE attempts a SET reap_after = '-infinity'
    FROM resumed s WHERE a.run_id = s.run_id AND a.attempt = s.attempt - 1
), logged AS (
    INSERT INTO events (run_id, attempt, source, type, message, data)
    SELECT run_id, attempt - 1, 'monitor', 'RUN_RESUMED', reason,
           jsonb_build_object('resume', resumes, 'max_resumes', $3, 'new_attempt', attempt)
    FROM resumed
), published AS (
    INSERT INTO status_outbox (run_id, routing_key, body)
    SELECT run_id, runherd_status_key('STARTED', job),
           runherd_status_body(run_id, job, 'STARTED', 'STARTED', attempt, reason, ts, tags, parent_run_id)
    FROM resumed
    ORDER BY run_id
)
SELECT run_id, attempt, resumes FROM resumed;

-- name: stuck_starting
-- STARTING for $1 seconds up to where events are heard (the event watermark of migration 0005),
-- not up to now: a worker's RUN_START still queued behind a database outage or an event backlog
-- does not make its run look stuck. No canary applied yet: nothing is decided.
SELECT r.run_id, r.attempt FROM runs r, event_watermark w
WHERE r.status = 'STARTING' AND r.status_changed_at < w.applied_through - make_interval(secs => $1)
ORDER BY r.status_changed_at
LIMIT $2
FOR UPDATE OF r SKIP LOCKED;

-- name: stuck_canceling
SELECT run_id, attempt FROM runs
WHERE status = 'CANCELING' AND status_changed_at < clock_timestamp() - make_interval(secs => $1)
ORDER BY status_changed_at
LIMIT $2
FOR UPDATE SKIP LOCKED;

-- name: over_max_runtime
-- $1 the config's max runtime (0: none) for runs without the tag.
SELECT run_id, attempt, coalesce(max_runtime_seconds, $1) AS limit_seconds FROM runs
WHERE status = 'STARTED'
  AND coalesce(max_runtime_seconds, $1) > 0
  AND started_at < clock_timestamp() - make_interval(secs => coalesce(max_runtime_seconds, $1))
ORDER BY started_at
LIMIT $2
FOR UPDATE SKIP LOCKED;

-- name: silent_workers
-- STARTED runs whose current attempt has not been heard for $1 seconds (an attempt never heard is
-- measured from its launch, against $3, the start grace) *while the workers could be heard*:
-- silence is measured up to runherd_heard_through(), not up to now, so a stalled heartbeat service,
-- broker, queue or event consumer makes no worker look silent (a worker whose RUN_SUCCESS is still
-- queued neither), and with no heartbeat replica alive none is.
-- Every time here is the database's: last_heartbeat_at is written with its clock.
WITH heard AS (
    SELECT runherd_heard_through() AS through
)
SELECT r.run_id, r.attempt,
       extract(epoch FROM h.through - coalesce(a.last_heartbeat_at, a.launched_at, a.created_at))::float8
           AS silent_seconds,
       a.last_heartbeat_at IS NULL AS never_heartbeated
FROM heard h, runs r
JOIN attempts a ON a.run_id = r.run_id AND a.attempt = r.attempt
WHERE r.status = 'STARTED'
  AND (a.last_heartbeat_at < h.through - make_interval(secs => $1)
       OR (a.last_heartbeat_at IS NULL
           AND coalesce(a.launched_at, a.created_at) < h.through - make_interval(secs => $3)))
LIMIT $2
FOR UPDATE OF r SKIP LOCKED;

-- name: claim_reaps
-- Workers that must not be running: attempts superseded by a resume (at once), and workers of
-- finished runs still alive $1 seconds after the end (both marked by reap_after when it happened).
-- A claim lasts $2 seconds, so a monitor that dies mid-way leaves its work to the others; for a
-- worker still not gone it lasts longer each time (half its time since it was due, up to 60 s): a
-- launcher that is behind on kill requests is not sent the same ones again every few seconds, which
-- would only put it further behind.
WITH due AS (
    SELECT a.run_id, a.attempt
    FROM attempts a
    WHERE a.exited_at IS NULL AND a.reap_after IS NOT NULL AND a.handle IS NOT NULL
      AND a.reap_after < clock_timestamp() - make_interval(secs => $1)
      AND (a.reap_claimed_at IS NULL OR a.reap_claimed_at < clock_timestamp() - make_interval(
            secs => least(60, greatest($2, CASE WHEN isfinite(a.reap_after)
                                                THEN extract(epoch FROM clock_timestamp() - a.reap_after)::float8 / 2
                                                ELSE 0 END))))
    LIMIT $3
    FOR UPDATE OF a SKIP LOCKED
)
UPDATE attempts a SET reap_claimed_at = clock_timestamp()
FROM due WHERE a.run_id = due.run_id AND a.attempt = due.attempt
RETURNING a.run_id, a.attempt, a.handle;

-- name: attempt_handles
SELECT run_id, attempt, handle FROM attempts
WHERE run_id = ANY($1::uuid[]) AND handle IS NOT NULL AND exited_at IS NULL;

-- name: live_handles
SELECT run_id, attempt, handle FROM attempts WHERE exited_at IS NULL AND handle IS NOT NULL;

-- name: outbox_batch
SELECT id, routing_key, body::text AS body FROM status_outbox ORDER BY id LIMIT $1;

-- name: outbox_delete
DELETE FROM status_outbox WHERE id = ANY($1::bigint[]);

-- name: get_run
SELECT r.*, (SELECT handle FROM attempts a WHERE a.run_id = r.run_id AND a.attempt = r.attempt) AS handle
FROM runs r WHERE r.run_id = $1;

-- name: get_steps
SELECT step_key, status, attempt, output, error, reused, started_at, ended_at
FROM steps WHERE run_id = $1;

-- name: list_runs
SELECT run_id, job, status, attempt, tags, reason, created_at, parent_run_id, root_run_id, retry_number
FROM runs
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR job = $2)
ORDER BY created_at DESC
LIMIT $3;

-- name: list_events
SELECT id, run_id, attempt, source, seq, type, step_key, message, data, refused, ts
FROM events WHERE run_id = $1 AND id > $2 ORDER BY id;

-- name: count_attempts
SELECT run_id, count(*) AS n FROM attempts WHERE run_id = ANY($1::uuid[]) GROUP BY run_id;

-- name: count_active
-- Queued and in-flight runs by status (partial indexes); for the runs-by-status gauge.
SELECT status, count(*) AS n FROM runs
WHERE status IN ('QUEUED', 'STARTING', 'STARTED', 'CANCELING')
GROUP BY status;

-- name: rule_deadlines
-- Seconds until each monitor rule has a violator (negative: it has one now; NULL: none can), in one
-- statement (shared/rules/sweeps.py): a sweep runs only the rules that are due and sleeps until the
-- earliest deadline. Each column is its rule's predicate solved for the time, so it is due exactly
-- when the rule's query finds a row: silent_workers (silence measured up to the heard-through
-- watermark, so its deadline moves by the watermark's lag), over_max_runtime (both read in one pass
-- over the STARTED runs), stuck_starting (up to the event watermark), stuck_canceling.
-- The pass reaches the STARTED runs' attempts through attempts_live (not through every attempt ever
-- made, which a hash join would read whole); only when some STARTED run's current attempt has
-- already exited (a worker killed, its run not yet moved on) do all of them take the join that
-- silent_workers makes (the one-time filter: otherwise that part is not executed at all).
-- The pass is skipped when the caller holds its minima from an earlier pass ($6, the STARTED runs'
-- version then: their latest status_changed_at; $7-$10 the minima) and no run has become STARTED
-- since (the version is unchanged): the minima only grow while no run joins (heartbeats move later,
-- runs leave), so the cached ones are a lower bound, and the caller reads afresh once one falls due.
-- $1 heartbeat timeout, $2 start grace of a silent attempt, $3 start timeout, $4 cancel timeout,
-- $5 the config's max runtime (0: none); $6 cached version (NULL: read), $7 beat, $8 unheard,
-- $9 untagged, $10 tagged.
WITH heard AS (
    SELECT clock_timestamp() AS now, clock_timestamp() - runherd_heard_through() AS lag,
           (SELECT max(status_changed_at) FROM runs WHERE status = 'STARTED') AS version
), pass AS (
    SELECT $6::timestamptz IS NULL OR h.version IS DISTINCT FROM $6::timestamptz AS needed FROM heard h
), live AS (
    -- Bare minima per row (this pass is most of a sweep); the intervals are added once, below.
    SELECT count(*) AS n,
           min(a.last_heartbeat_at) AS beat,
           min(coalesce(a.launched_at, a.created_at)) FILTER (WHERE a.last_heartbeat_at IS NULL) AS unheard,
           min(r.started_at) FILTER (WHERE r.max_runtime_seconds IS NULL) AS untagged,
           min(r.started_at + r.max_runtime_seconds * interval '1 second')
               FILTER (WHERE r.max_runtime_seconds > 0) AS tagged
    FROM runs r JOIN attempts a ON a.run_id = r.run_id AND a.attempt = r.attempt AND a.exited_at IS NULL
    WHERE r.status = 'STARTED' AND (SELECT needed FROM pass)
), every AS (
    SELECT min(a.last_heartbeat_at) AS beat,
           min(coalesce(a.launched_at, a.created_at)) FILTER (WHERE a.last_heartbeat_at IS NULL) AS unheard,
           min(r.started_at) FILTER (WHERE r.max_runtime_seconds IS NULL) AS untagged,
           min(r.started_at + r.max_runtime_seconds * interval '1 second')
               FILTER (WHERE r.max_runtime_seconds > 0) AS tagged
    FROM runs r JOIN attempts a ON a.run_id = r.run_id AND a.attempt = r.attempt
    WHERE r.status = 'STARTED' AND (SELECT needed FROM pass)
      AND (SELECT count(*) FROM runs WHERE status = 'STARTED') > (SELECT n FROM live)
), s AS (
    SELECT p.needed AS read_afresh,
           CASE WHEN p.needed THEN least(l.beat, e.beat) ELSE $7::timestamptz END AS beat,
           CASE WHEN p.needed THEN least(l.unheard, e.unheard) ELSE $8::timestamptz END AS unheard,
           CASE WHEN p.needed THEN least(l.untagged, e.untagged) ELSE $9::timestamptz END AS untagged,
           CASE WHEN p.needed THEN least(l.tagged, e.tagged) ELSE $10::timestamptz END AS tagged
    FROM pass p, live l, every e
)
SELECT extract(epoch FROM least(s.beat + make_interval(secs => $1), s.unheard + make_interval(secs => $2))
                          + h.lag - h.now)::float8 AS heartbeat_timeout,
       extract(epoch FROM least(CASE WHEN $5 > 0 THEN s.untagged + make_interval(secs => $5) END, s.tagged)
                          - h.now)::float8 AS max_runtime,
       extract(epoch FROM (SELECT min(status_changed_at) FROM runs WHERE status = 'STARTING')
                          + make_interval(secs => $3) - (SELECT applied_through FROM event_watermark))::float8
           AS start_timeout,
       extract(epoch FROM (SELECT min(status_changed_at) FROM runs WHERE status = 'CANCELING')
                          + make_interval(secs => $4) - h.now)::float8 AS cancel_timeout,
       extract(epoch FROM h.lag)::float8 AS heard_lag,
       EXISTS (SELECT 1 FROM runs WHERE status = 'FAILURE' AND NOT retried) AS retries_pending,
       s.read_afresh, h.version, extract(epoch FROM h.now - h.version)::float8 AS version_age,
       s.beat, s.unheard, s.untagged, s.tagged
FROM heard h, s;

-- name: event_keys
-- The key that signs worker and launcher tokens, and the one before it (runherd.auth).
SELECT key, previous FROM runherd_keys WHERE name = 'events';
-- name: starting_due
-- Seconds until the earliest STARTING run is past the start timeout $1, before the event
-- watermark's lag: the monitor publishes an event canary right then, so the start-timeout rule
-- fires as soon as that canary is applied instead of at the next periodic one. NULL: none STARTING.
SELECT extract(epoch FROM min(status_changed_at) + make_interval(secs => $1) - clock_timestamp())::float8
FROM runs WHERE status = 'STARTING';

-- name: dequeue_move
-- One statement per batch: the runs `dequeue` picks (that statement is inlined below by
-- store/queries.py) move QUEUED -> STARTING on attempt 1 with their event-log and status-outbox rows
-- (as `transition` writes them) and their first attempt row. A run cancelled meanwhile is re-checked
-- by FOR UPDATE and left alone (the caller runs it under an advisory lock, so no other dequeue
-- moves runs meanwhile and the counts it walked stay exact). Returns the moved runs.
WITH picked AS (
{dequeue}
), target AS (
    SELECT r.run_id, r.status AS previous_status
    FROM runs r
    WHERE r.run_id IN (SELECT run_id FROM picked) AND r.status = 'QUEUED'
    ORDER BY r.run_id
    FOR UPDATE OF r
), moved AS (
    UPDATE runs r
    SET status = 'STARTING', reason = NULL, attempt = greatest(r.attempt, 1), status_changed_at = clock_timestamp()
    FROM target t
    WHERE r.run_id = t.run_id
    RETURNING r.run_id, r.job, r.status, t.previous_status, r.attempt, r.tags, r.parent_run_id,
              r.status_changed_at
), logged AS (
    INSERT INTO events (run_id, attempt, source, type, message, data, ts)
    SELECT run_id, attempt, 'launcher', 'RUN_STATUS', NULL,
           jsonb_build_object('from', previous_status, 'to', status), status_changed_at
    FROM moved
), published AS (
    INSERT INTO status_outbox (run_id, routing_key, body)
    SELECT run_id, runherd_status_key(status, job),
           runherd_status_body(run_id, job, status, previous_status, attempt, NULL, status_changed_at, tags,
                               parent_run_id)
    FROM moved
    ORDER BY run_id
), first_attempts AS (
    INSERT INTO attempts (run_id, attempt, launcher)
    SELECT run_id, 1, NULL FROM moved
    ON CONFLICT DO NOTHING
)
SELECT run_id FROM moved;

-- name: exits_with_records
-- A batch's WORKER_EXITED events of crashed workers, appended and their attempts' exits recorded in
-- one statement (a crash storm is one statement, not two per exit). Each event is appended once (a
-- redelivery inserts nothing: its exit is not recorded or acted on again); the first report of an
-- exit wins. Returns the (run_id, attempt) of the events appended. data arrives as JSON text.
WITH input AS (
    SELECT run_id, attempt, source, seq, message, data::jsonb AS data, ts, exit_code, reason, ord
    FROM unnest($1::uuid[], $2::integer[], $3::text[], $4::integer[], $5::text[], $6::text[],
                $7::timestamptz[], $8::integer[], $9::text[])
        WITH ORDINALITY AS x(run_id, attempt, source, seq, message, data, ts, exit_code, reason, ord)
), logged AS (
    INSERT INTO events (run_id, attempt, source, seq, type, message, data, ts)
    SELECT run_id, attempt, source, seq, 'WORKER_EXITED', message, data, ts FROM input ORDER BY ord
    ON CONFLICT (run_id, attempt, source, seq) WHERE seq IS NOT NULL DO NOTHING
    RETURNING run_id, attempt, source, seq
), exited AS (
    UPDATE attempts a
    SET exited_at = coalesce(a.exited_at, clock_timestamp()),
        exit_code = coalesce(a.exit_code, i.exit_code), exit_reason = coalesce(a.exit_reason, i.reason)
    FROM input i JOIN logged l USING (run_id, attempt, source, seq)
    WHERE a.run_id = i.run_id AND a.attempt = i.attempt
)
SELECT run_id, attempt FROM logged;
