"""Issue 5: why a queued run waits (shared/rules/coordinator.py), without a database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from runherd.config import RunCoordinator, TagConcurrencyLimit
from runherd.rules.coordinator import NEXT, group, pick, tag_text, why_waiting

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DATA = TagConcurrencyLimit(key="team", value="data", limit=2)
POOL = TagConcurrencyLimit(key="pool", limit=1)
DB = TagConcurrencyLimit(key="database", limit=1, per_unique_value=True)


def run(name: str, tags: dict[str, Any] | None = None, minute: int = 0, **extra: Any) -> dict[str, Any]:
    return {"run_id": name, "tags": tags or {}, "created_at": T0 + timedelta(minutes=minute), **extra}


def test_groups_follow_the_dequeue_query() -> None:
    assert group(DATA, {"team": "data"}) == ""
    assert group(DATA, {"team": "ml"}) is None
    assert group(POOL, {"pool": "x"}) == "" and group(POOL, {}) is None
    assert group(DB, {"database": "a"}) == "a"
    assert tag_text(True) == "true" and tag_text(5) == "5" and tag_text("x") == "x"  # as tags->>key


def test_each_limit_is_named_with_its_counts() -> None:
    coordinator = RunCoordinator(max_concurrent_runs=10, tag_concurrency_limits=(DATA, POOL, DB))
    in_flight = [run("f1", {"team": "data"}), run("f2", {"team": "data", "pool": "x"}), run("f3", {"database": "a"})]
    queued = [
        run("data", {"team": "data"}),
        run("pool", {"pool": "y"}),
        run("db-a", {"database": "a"}),
        run("db-b", {"database": "b"}),
        run("ml", {"team": "ml"}),
    ]
    why = why_waiting(queued, in_flight, coordinator, now=T0)
    assert why["data"] == "tag limit team=data: 2/2 in flight"
    assert why["pool"] == "tag limit pool: 1/1 in flight"
    assert why["db-a"] == "tag limit database=a: 1/1 in flight"
    assert why["db-b"] == NEXT and why["ml"] == NEXT


def test_global_limit_and_several_reasons_at_once() -> None:
    coordinator = RunCoordinator(max_concurrent_runs=2, tag_concurrency_limits=(DATA,))
    in_flight = [run("f1", {"team": "data"}), run("f2", {"team": "data"})]
    why = why_waiting([run("q", {"team": "data"}), run("r")], in_flight, coordinator, now=T0)
    assert why["q"] == "tag limit team=data: 2/2 in flight; max_concurrent_runs: 2/2 in flight"
    assert why["r"] == "max_concurrent_runs: 2/2 in flight"


def test_runs_ahead_take_the_free_slots_in_priority_then_fifo_order() -> None:
    coordinator = RunCoordinator(max_concurrent_runs=2, tag_concurrency_limits=(DATA,))
    queued = [
        run("old", minute=0),
        run("new", minute=1),
        run("urgent", {"runherd/priority": 5}, minute=2),
        run("data1", {"team": "data", "dagster/priority": "9"}, minute=3),
    ]
    why = why_waiting(queued, [], coordinator, now=T0)
    assert why["data1"] == NEXT and why["urgent"] == NEXT  # priority 9, then 5
    assert why["old"] == why["new"] == "max_concurrent_runs: 2/2 in flight"
    # An explicit priority column (from the database) wins over the tags.
    why = why_waiting(
        [run("a", minute=0), run("b", minute=1, priority=1)], [], RunCoordinator(max_concurrent_runs=1), now=T0
    )
    assert why == {"b": NEXT, "a": "max_concurrent_runs: 1/1 in flight"}


def test_a_retry_in_its_backoff_says_until_when_and_takes_no_slot() -> None:
    coordinator = RunCoordinator(max_concurrent_runs=1)
    queued = [run("retry", not_before=T0 + timedelta(seconds=30), priority=9), run("plain", minute=1)]
    why = why_waiting(queued, [], coordinator, now=T0)
    assert why["retry"] == "retry backoff: not before 12:00:30 UTC (30 s)"
    assert why["plain"] == NEXT
    assert why_waiting([run("due", not_before=T0)], [], coordinator, now=T0)["due"] == NEXT


def test_no_limits_means_next_in_line() -> None:
    why = why_waiting([run("a"), run("b")], [run("f")] * 50, RunCoordinator(), now=T0)
    assert set(why.values()) == {NEXT}


def test_pick_takes_the_runs_that_fit_in_order_and_stops_at_n() -> None:
    """What queries.sql `dequeue` must return: a held run holds back no one, a run taken fills its
    group for the runs behind it, a JSON null tag value is the group "null" (as `tags->>key` is
    coalesced there), and at most n."""
    coordinator = RunCoordinator(max_concurrent_runs=5, tag_concurrency_limits=(DATA, DB))
    in_flight = [run("f1", {"team": "data"}), run("f2", {"database": "a"})]
    queued = [
        run("db-a", {"database": "a"}, minute=0),  # held: database=a is full
        run("data1", {"team": "data"}, minute=1),  # takes the last team=data slot
        run("data2", {"team": "data"}, minute=2),  # held by data1, taken just ahead
        run("db-null", {"database": None}, minute=3),
        run("db-null2", {"database": None}, minute=4),  # held: group "null" taken by db-null
        run("plain", minute=5),
        run("late", minute=6),  # the global limit: 2 in flight + 3 taken = 5
    ]
    assert pick(queued, in_flight, coordinator, 10, now=T0) == ["data1", "db-null", "plain"]
    assert pick(queued, in_flight, coordinator, 2, now=T0) == ["data1", "db-null"]
    assert pick(queued, in_flight, RunCoordinator(max_concurrent_runs=0), 10, now=T0) == []
    assert group(DB, {"database": None}) == "null"
