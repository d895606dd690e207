"""Which monitor rules a sweep runs, and how long it may then sleep: pure decisions over the rule
deadlines that one statement reads (``rule_deadlines`` in shared/store/queries.sql).

Each deadline is its rule's own predicate solved for the time, so a rule is due exactly when its
violator query would find a row. A sweep therefore runs only the rules that are due: with 10,000
healthy runs in flight the steady state is one statement (the deadlines) and the reap claim, not a
locking transaction per rule. The heartbeat rule's deadline is the expensive one to read (it looks
at every STARTED run's last heartbeat, a column kept unindexed so that heartbeat writes stay HOT
updates); reading it once per sweep, for the decision and the sleep together, halves that cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# The monitoring rules, in the order a sweep runs them.
MONITORING_RULES = ("start_timeout", "cancel_timeout", "max_runtime", "heartbeat_timeout")
# Woken at a deadline, the sweep lands this much past it, so the row is past it too.
PAST_DEADLINE = 0.02
SHORTEST_SLEEP = 0.05
# The pass over the STARTED runs (their last heartbeats and start times) is reused while no run has
# become STARTED since, but only if none had for SETTLED_SECONDS when it was read: a transaction that
# made a run STARTED a moment before another may commit after it, and would not move the version. A
# pass is read afresh when a deadline it gave comes within REREAD_MARGIN, and at least every
# PASS_MAX_AGE seconds whatever happens.
SETTLED_SECONDS = 10.0
REREAD_MARGIN = 2.0
PASS_MAX_AGE = 120.0


@dataclass(frozen=True)
class StartedPass:
    """What the pass over the STARTED runs found: the minima their deadlines are computed from, and
    the version of the set (the latest status_changed_at among them) they were read at."""

    read_afresh: bool
    version: datetime | None
    version_age: float | None  # seconds from the version to the read
    beat: datetime | None
    unheard: datetime | None
    untagged: datetime | None
    tagged: datetime | None


@dataclass(frozen=True)
class Deadlines:
    """Seconds from the database's now until each rule has a violator (negative: overdue; None:
    nothing can fall due, e.g. no run in that status, or the workers not heard at all)."""

    start_timeout: float | None = None
    cancel_timeout: float | None = None
    max_runtime: float | None = None
    heartbeat_timeout: float | None = None
    heard_lag: float | None = None  # how far behind the workers are heard; None: not heard yet
    retries_pending: bool = False  # a failed run awaits its retry decision
    started: StartedPass | None = None

    def of(self, rule: str) -> float | None:
        return getattr(self, rule)


def due_rules(deadlines: Deadlines) -> list[str]:
    """The monitoring rules that have a violator now."""
    return [rule for rule in MONITORING_RULES if (s := deadlines.of(rule)) is not None and s <= 0]


def is_deaf(deadlines: Deadlines, heartbeat_timeout: float) -> bool:
    """The heartbeat pipeline is not heard (stalled heartbeat service, broker or event consumer)."""
    lag = deadlines.heard_lag
    return lag is None or lag > heartbeat_timeout


def sleep_seconds(deadlines: Deadlines, elapsed: float, heartbeat_timeout: float, ceiling: float) -> float:
    """How long the sweep loop may sleep, ``elapsed`` seconds after the deadlines were read: until
    the earliest deadline (a little past it), at most ``ceiling``. While the pipeline is deaf the
    heartbeat deadline slides with the watermark and cannot fire: it sets no wake-up (else the loop
    would wake every 50 ms for a rule that is held)."""
    times = [deadlines.of(rule) for rule in MONITORING_RULES if rule != "heartbeat_timeout"]
    if not is_deaf(deadlines, heartbeat_timeout):
        times.append(deadlines.heartbeat_timeout)
    known = [t for t in times if t is not None]
    if not known:
        return ceiling
    return min(ceiling, max(SHORTEST_SLEEP, min(known) - elapsed + PAST_DEADLINE))


def keep_pass(found: StartedPass) -> bool:
    """Whether a fresh pass may be reused by later sweeps: the set had settled when it was read."""
    return (
        found.read_afresh
        and found.version is not None
        and found.version_age is not None
        and found.version_age >= SETTLED_SECONDS
    )


def reuse_pass(last: Deadlines, since_last: float, pass_age: float) -> bool:
    """Whether the next read may reuse the kept pass: it is young enough, and no deadline it gave
    (the hang rule's, the max runtime's) is near; a due rule reads afresh, so it acts on exact
    minima, never on a lower bound."""
    if pass_age >= PASS_MAX_AGE:
        return False
    return all(s is None or s - since_last > REREAD_MARGIN for s in (last.heartbeat_timeout, last.max_runtime))
