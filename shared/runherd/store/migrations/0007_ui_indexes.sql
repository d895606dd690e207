-- runherd ui (services/runherd/ui): the run list is filtered by status, job, tag and time, newest
-- first, and paged by keyset on (created_at, run_id), so every page is an index range scan however
-- many runs there are. runs_keyset replaces runs_listing (created_at alone), which it covers.
CREATE INDEX runs_keyset ON runs (created_at DESC, run_id DESC);
-- Finished runs only: the in-flight and queued ones are few and have their partial indexes already
-- (runs_in_flight, runs_queued), which the monitor's rules keep reading; a run enters this index once,
-- when it finishes.
CREATE INDEX runs_status_keyset ON runs (status, created_at DESC, run_id DESC)
    WHERE status IN ('SUCCESS', 'FAILURE', 'CANCELED');
-- `tags @> {"team": "data"}` and `tags ? 'team'`: a run's tags never change after its insert, so
-- the GIN index costs one insert per run and nothing on status changes or heartbeats.
CREATE INDEX runs_tags ON runs USING gin (tags);
DROP INDEX runs_listing;
