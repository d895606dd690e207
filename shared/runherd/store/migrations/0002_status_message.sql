-- The status message of DESIGN.md and its routing key, built in one place for every statement
-- that writes the outbox (a transition, a new run, a retry).

CREATE FUNCTION runherd_status_body(p_run_id uuid, p_job text, p_status text, p_previous text, p_attempt integer,
                                    p_reason text, p_ts timestamptz, p_tags jsonb, p_parent uuid)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'v', 1, 'run_id', p_run_id, 'job', p_job, 'status', p_status, 'previous_status', p_previous,
        'attempt', p_attempt, 'reason', p_reason,
        'ts', to_char(p_ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'tags', p_tags, 'parent_run_id', p_parent)
$$;

CREATE FUNCTION runherd_status_key(p_status text, p_job text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT p_status || '.' || replace(p_job, '.', '_')
$$;
