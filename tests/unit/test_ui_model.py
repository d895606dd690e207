"""The UI's pure decisions (services/runherd/ui/model.py): the run list's query string and cursor,
how an attempt ended, and where the timeline draws each step."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from runherd.ui import model

T0 = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_the_query_string_becomes_a_filter_and_back() -> None:
    q = model.parse_list_query(
        {"status": "failure", "job": " etl ", "tag": "team=data, gpu", "from": "2026-11-29T07:00", "limit": "25"}, T0
    )
    assert q.filter.status == "FAILURE" and q.filter.job == "etl"
    assert list(q.filter.tags) == [("team", "data"), ("gpu", None)]
    assert q.filter.created_from == datetime(2026, 11, 29, 7, 0, tzinfo=UTC) and q.filter.created_to is None
    assert q.limit == 25 and q.problems == ()
    assert q.params() == {
        "status": "FAILURE",
        "job": "etl",
        "tag": "team=data gpu",
        "from": "2026-11-29T07:00",
        "limit": "25",
    }
    assert q.params(status=None, after="x") == {
        "job": "etl",
        "tag": "team=data gpu",
        "from": "2026-11-29T07:00",
        "limit": "25",
        "after": "x",
    }


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ({"status": "DONE"}, "unknown status 'DONE'"),
        ({"within": "3y"}, "unknown period '3y'"),
        ({"from": "yesterday"}, "from: expected a date and time"),
        ({"after": "garbage!"}, "after: not a page position"),
    ],
)
def test_a_bad_value_is_left_out_and_said(query: dict[str, str], problem: str) -> None:
    q = model.parse_list_query(query, T0)
    assert any(problem in p for p in q.problems), q.problems
    assert q.filter.status is None and q.filter.created_from is None and q.older_than is None


def test_within_is_relative_to_now_and_the_limit_is_bounded() -> None:
    q = model.parse_list_query({"within": "1h", "from": "2020-01-01T00:00", "limit": "100000"}, T0)
    assert q.filter.created_from == T0 - timedelta(hours=1) and q.within == "1h"
    assert q.limit == max(model.PAGE_SIZES)
    assert q.params()["within"] == "1h" and "from" not in q.params()


def test_a_cursor_round_trips() -> None:
    row = {"created_at": at(1.234567), "run_id": uuid.uuid4()}
    cursor = model.decode_cursor(model.encode_cursor(row))
    assert cursor is not None and cursor.created_at == row["created_at"] and cursor.run_id == row["run_id"]
    q = model.parse_list_query({"after": model.encode_cursor(row)}, T0)
    assert q.older_than == cursor and q.newer_than is None


def _attempt(
    n: int, *, exited: float | None = None, handle: bool = True, exit_code: int | None = None
) -> dict[str, Any]:
    return {
        "attempt": n,
        "launcher": "process",
        "handle": {"pid": 100 + n, "host": "h1"} if handle else None,
        "created_at": at(10 * (n - 1)),
        "launched_at": at(10 * (n - 1) + 0.1),
        "last_heartbeat_at": None,
        "exited_at": at(exited) if exited is not None else None,
        "exit_code": exit_code,
        "exit_reason": None,
    }


def _event(i: int, attempt: int, type_: str, ts: float, *, step: str | None = None, message: str | None = None,
           data: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    return {"id": i, "attempt": attempt, "type": type_, "ts": at(ts), "step_key": step, "message": message,
            "data": data or {}, "source": "x", "refused": None}  # fmt: skip


def _exit(i: int, attempt: int, ts: float, **data: Any) -> dict[str, Any]:
    from runherd.rules.events import describe_exit

    message = describe_exit(data.get("exit_code"), data.get("signal"), data.get("reason"))
    return _event(i, attempt, "WORKER_EXITED", ts, message=message, data={"debug_info": "a\nb\n", **data})


def _status(i: int, attempt: int, ts: float, to: str, message: str | None = None) -> dict[str, Any]:
    return _event(i, attempt, "RUN_STATUS", ts, message=message, data={"from": "STARTED", "to": to})


CRASH = "worker crashed: killed by signal 9 (SIGKILL); resume attempt 1 of 3"


@pytest.mark.parametrize(
    ("events", "kind", "says"),
    [
        ([_status(1, 1, 5, "SUCCESS")], "success", "succeeded"),
        (
            [_exit(1, 1, 5, exit_code=137, signal=9), _event(2, 1, "RUN_RESUMED", 5.1, message=CRASH)],
            "crashed",
            CRASH,
        ),
        ([_exit(1, 1, 5, exit_code=137, reason="OOMKilled")], "oom", "OOMKilled (exit code 137)"),
        (
            [
                _event(
                    1, 1, "RUN_RESUMED", 5, message="no heartbeat for 31 s: worker hung or dead; resume attempt 1 of 3"
                )
            ],
            "hang",
            "no heartbeat for 31 s",
        ),
        ([_status(1, 1, 5, "FAILURE", "exceeded max runtime of 2 s")], "timeout", "exceeded max runtime of 2 s"),
        ([_status(1, 1, 5, "FAILURE", "run did not start within 10 s (start_timeout_seconds)")], "timeout", "did not"),
        ([_status(1, 1, 5, "FAILURE", "step failed: b (exited with code 3)")], "failure", "step failed: b"),
        ([_status(1, 1, 5, "CANCELED", "canceled")], "canceled", "canceled"),
        ([_exit(1, 1, 5, exit_code=3)], "crashed", "exit code 3"),
    ],
)
def test_how_an_attempt_ended(events: list[dict[str, Any]], kind: str, says: str) -> None:
    run = {"attempt": 2, "status": "STARTED"}
    (view,) = model.attempt_views(run, [_attempt(1, exited=5)], events)
    assert view.kind == kind and says in view.outcome, (view.kind, view.outcome)
    assert view.worker == "pid 101 on h1"


def test_a_current_attempt_is_running_or_waiting_for_its_worker() -> None:
    run = {"attempt": 1, "status": "STARTED"}
    assert model.attempt_views(run, [_attempt(1)], [])[0].kind == "running"
    assert model.attempt_views(run, [_attempt(1, handle=False)], [])[0].kind == "waiting"
    finished = {"attempt": 1, "status": "SUCCESS"}
    assert model.attempt_views(finished, [_attempt(1, exited=3)], [])[0].kind == "exited"


def _crash_and_resume() -> tuple[list[model.AttemptView], list[dict[str, Any]]]:
    events = [
        _event(1, 1, "STEP_START", 1, step="one"),
        _event(2, 1, "STEP_SUCCESS", 3, step="one"),
        _event(3, 1, "STEP_START", 3, step="two"),
        _exit(4, 1, 6, exit_code=137, signal=9),
        _event(5, 1, "RUN_RESUMED", 6.1, message=CRASH),
        _event(6, 2, "RUN_START", 11, data={"reused": ["one"]}),
        _event(7, 2, "STEP_START", 11, step="two"),
        _event(8, 2, "STEP_SUCCESS", 15, step="two"),
        _status(9, 2, 15.5, "SUCCESS"),
    ]
    run = {"attempt": 2, "status": "SUCCESS"}
    attempts = model.attempt_views(run, [_attempt(1, exited=6), _attempt(2, exited=16)], events)
    return attempts, events


def test_the_timeline_draws_a_crash_where_the_interrupted_step_ends_and_the_resume_after_it() -> None:
    attempts, events = _crash_and_resume()
    tl = model.timeline(attempts, events, [], now=at(100))
    assert tl is not None and tl.start == at(0.1) and tl.end == at(15.5)  # the run ended at its SUCCESS
    first, second = tl.lanes
    bars = {b.step: b for b in first.bars}
    assert bars["one"].status == "SUCCESS" and bars["two"].status == "INTERRUPTED"
    assert first.kind == "crashed" and first.end_mark == pytest.approx(bars["two"].start + bars["two"].width)
    assert first.end_mark == pytest.approx(100 * (6 - 0.1) / 15.4)
    assert second.reused == ("one",) and [b.step for b in second.bars] == ["two"]
    assert second.bars[0].start > first.end_mark and second.end_mark is None  # a success draws no end mark
    assert tl.ticks[0] == (0.0, "0 s") and tl.ticks[-1][0] <= 100


def test_a_running_attempt_reaches_now_and_nothing_started_has_no_timeline() -> None:
    attempts = model.attempt_views(
        {"attempt": 1, "status": "STARTED"}, [_attempt(1)], [_event(1, 1, "STEP_START", 1, step="a")]
    )
    tl = model.timeline(attempts, [_event(1, 1, "STEP_START", 1, step="a")], [], now=at(4))
    assert tl is not None and tl.end == at(4)
    (bar,) = tl.lanes[0].bars
    assert bar.status == "RUNNING" and bar.start + bar.width == pytest.approx(100)
    assert model.timeline([], [], [], now=at(1)) is None


@pytest.mark.parametrize(("seconds", "text"), [(3.21, "3.2 s"), (125, "2 min 5 s"), (7260, "2 h 1 min")])
def test_duration(seconds: float, text: str) -> None:
    assert model.duration(T0, at(seconds), now=at(0)) == text
    assert model.duration(None, None, now=T0) == ""


def test_a_retried_step_is_one_bar_per_try() -> None:
    events = [
        _event(1, 1, "STEP_START", 1, step="flaky"),
        _event(2, 1, "STEP_UP_FOR_RETRY", 2, step="flaky", message="exited with code 1"),
        _event(3, 1, "STEP_RESTARTED", 4, step="flaky"),
        _event(4, 1, "STEP_SUCCESS", 5, step="flaky"),
        _status(5, 1, 5, "SUCCESS"),
    ]
    attempts = model.attempt_views({"attempt": 1, "status": "SUCCESS"}, [_attempt(1, exited=5)], events)
    tl = model.timeline(attempts, events, [], now=at(9))
    assert tl is not None
    assert [(b.step, b.status) for b in tl.lanes[0].bars] == [("flaky", "RETRY"), ("flaky", "SUCCESS")]
    first, second = tl.lanes[0].bars
    assert first.start + first.width < second.start  # the wait before the retry is a gap
