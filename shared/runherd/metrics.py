"""Prometheus metrics of runherd (served on `metrics_port` when it is set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RUNS_BY_STATUS = Gauge("runherd_runs", "Runs by status (in-flight and queued)", ["status"])
QUEUE_DEPTH = Gauge(
    "runherd_queue_depth", "Messages in a runherd queue: ready plus delivered and not yet acknowledged", ["queue"]
)
QUEUE_MESSAGES = Gauge(
    "runherd_queue_messages", "Messages in a runherd queue by state (ready, unacked)", ["queue", "state"]
)
OLDEST_QUEUED = Gauge(
    "runherd_oldest_queued_run_age_seconds", "How long the oldest run QUEUED and past any retry backoff has waited"
)
OUTBOX_BACKLOG = Gauge("runherd_outbox_backlog", "Status messages committed and not yet published")
HEARD_THROUGH_LAG = Gauge(
    "runherd_heard_through_lag_seconds",
    "How far behind now the monitor hears heartbeats and events (+Inf: no heartbeat replica alive)",
)
SERVICE_REPLICAS = Gauge("runherd_service_replicas", "Service replicas running in this process", ["service"])
HEARTBEAT_LAG = Histogram(
    "runherd_heartbeat_lag_seconds",
    "How far the heard-through watermark (heartbeat canaries) trails the database's clock, sampled every 0.5 s",
    # Fine below 1 s: with canaries every 0.1 s the watermark sits between 0.1 and 0.5 s behind.
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2, 5, 10, 30),
)
LOOP_LAG = Histogram(
    "runherd_event_loop_lag_seconds",
    "How late a timer of an event loop fires: time the loop spends on other callbacks",
    ["loop"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
GC_PAUSE = Histogram(
    "runherd_gc_pause_seconds",
    "One collection of Python's cyclic garbage collector, by generation: the whole process stops for it",
    ["process", "generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
)
SWEEP_DURATION = Histogram(
    "runherd_sweep_duration_seconds", "One rule of a monitor sweep (deadlines: the probe that picks them)", ["rule"]
)
SWEEP_SECONDS = Histogram(
    "runherd_sweep_seconds",
    "One whole monitor sweep: its deadline probe and every rule it ran",
    buckets=(0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10),
)
DETECTION_LATENCY = Histogram(
    "runherd_detection_latency_seconds",
    "From a worker's exit (or heartbeat deadline) to the monitor's decision",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
EVENTS_APPLIED = Counter("runherd_events_applied_total", "Lifecycle events applied", ["type"])
EVENTS_REFUSED = Counter("runherd_events_refused_total", "Lifecycle events refused (stale attempt...)")
FORGED = Counter(
    "runherd_forged_total",
    "Events and heartbeats refused because their token does not prove their source (runherd.auth)",
    ["kind"],
)
DEAD_LETTERS = Counter("runherd_dead_letters_total", "Messages dead-lettered", ["queue"])
MONITOR_ACTIONS = Counter("runherd_monitor_actions_total", "Monitor actions taken", ["action"])
LAUNCHES = Counter("runherd_launches_total", "Workers launched", ["launcher", "outcome"])
CONSUMER_HELD = Gauge(
    "runherd_consumer_held_deliveries", "Deliveries held unacked while the database is unavailable", ["queue"]
)
STATUS_PUBLISHED = Counter("runherd_status_published_total", "Status messages published")


def touch(service: str, queue: str, launcher: str) -> None:
    """Create the labelled series the alerts read at 0, so the first launch failure or dead
    letter is an increase (a series that appears at 1 is not one to ``increase()``)."""
    DEAD_LETTERS.labels(queue)
    CONSUMER_HELD.labels(queue).set(0)
    if service == "launcher":
        LAUNCHES.labels(launcher, "ok")
        LAUNCHES.labels(launcher, "error")
    if service == "monitor":
        DETECTION_LATENCY.labels("exit")
        DETECTION_LATENCY.labels("heartbeat")
        MONITOR_ACTIONS.labels("resume")
        MONITOR_ACTIONS.labels("retry")
