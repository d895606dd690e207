"""The invariant checks find what they are meant to find (a checker that always says 0 proves
nothing): each is fed a small made-up history with one violation, and a clean one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.faults import invariants as inv
from tests.faults.invariants import Limits, Recorded, Recorder, Report

T0 = datetime(2026, 11, 29, 6, 0, tzinfo=UTC)
LIMITS = Limits(start_timeout=10, cancel_timeout=5, heartbeat_timeout=3, poll_interval=0.5)
RUN = "11111111-1111-1111-1111-111111111111"


def _report() -> Report:
    return Report(scenario="unit", load="none")


def _status_event(frm: str | None, to: str, attempt: int, seconds: float) -> dict[str, Any]:
    return {
        "type": "RUN_STATUS",
        "run_id": RUN,
        "attempt": attempt,
        "data": {"from": frm, "to": to},
        "ts": T0 + timedelta(seconds=seconds),
        "message": None,
    }


def _status_message(n: int, previous: str | None, status: str, attempt: int) -> Recorded:
    body = {"run_id": RUN, "previous_status": previous, "status": status, "attempt": attempt}
    return Recorded(body, f"status-{n}", 0.0)


HISTORY = [
    _status_event(None, "QUEUED", 0, 0),
    _status_event("QUEUED", "STARTING", 1, 1),
    _status_event("STARTING", "STARTED", 1, 2),
    _status_event("STARTED", "SUCCESS", 1, 3),
]


def _published(*extra: Recorded) -> Recorder:
    recorder = Recorder()
    recorder.status = [
        _status_message(1, None, "QUEUED", 0),
        _status_message(2, "QUEUED", "STARTING", 1),
        _status_message(3, "STARTING", "STARTED", 1),
        _status_message(4, "STARTED", "SUCCESS", 1),
        *extra,
    ]
    return recorder


def test_every_transition_published_once_and_a_redelivery_is_allowed() -> None:
    report = _report()
    inv._published_once(report, _published(_status_message(4, "STARTED", "SUCCESS", 1)), HISTORY)
    assert report.violations() == {} and report.status_redelivered == 1 and report.transitions == 4


def test_a_missing_a_doubled_and_an_invented_status_are_found() -> None:
    recorder = _published(_status_message(9, "STARTED", "SUCCESS", 1), _status_message(10, "STARTED", "FAILURE", 1))
    recorder.status = [r for r in recorder.status if r.message_id != "status-2"]
    report = _report()
    inv._published_once(report, recorder, HISTORY)
    assert report.violations() == {"status_missing": 1, "status_published_twice": 1, "status_without_transition": 1}


def test_a_status_after_the_end_is_a_terminal_change() -> None:
    report = _report()
    inv._terminal_changed(report, _published(_status_message(5, "SUCCESS", "STARTED", 1)), HISTORY)
    report_log = _report()
    inv._terminal_changed(report_log, _published(), [*HISTORY, _status_event("SUCCESS", "FAILURE", 1, 4)])
    assert report.terminal_changed == 1 and report_log.terminal_changed == 1
    clean = _report()
    inv._terminal_changed(clean, _published(), HISTORY)
    assert clean.violations() == {}


def _resume(seconds: float) -> dict[str, Any]:
    return {
        "type": "RUN_RESUMED",
        "run_id": RUN,
        "attempt": 1,
        "data": {},
        "ts": T0 + timedelta(seconds=seconds),
        "message": "no heartbeat for 3 s",
    }


def _heard(kind: str, seconds: float, **body: Any) -> Recorded:
    at = T0 + timedelta(seconds=seconds)
    ts = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    body = {"run_id": RUN, "attempt": 1, "ts": ts, **({"type": kind} if kind else {}), **body}
    return Recorded(body, None, at.timestamp())  # arrived when it was sent


def test_a_resume_of_a_worker_that_kept_talking_or_had_finished_is_spurious() -> None:
    talking = Recorder()
    talking.heartbeats = [_heard("", 9.0), _heard("", 10.5)]
    report = _report()
    inv._spurious_resumes(report, talking, [_resume(10)])
    assert report.spurious_resumes == 1

    finished = Recorder()
    finished.events = [_heard("RUN_SUCCESS", 6.0)]
    report = _report()
    inv._spurious_resumes(report, finished, [_resume(10)])
    assert report.spurious_resumes == 1


def test_a_resume_of_a_dead_worker_is_not_spurious() -> None:
    dead = Recorder()
    dead.heartbeats = [_heard("", 6.0), _heard("", 6.5)]
    dead.events = [_heard("RUN_CANCELED", 10.4)]  # on its way out after the resume: not "alive"
    report = _report()
    inv._spurious_resumes(report, dead, [_resume(10)])
    assert report.violations() == {} and report.resumes == 1


def test_two_worker_pids_for_one_attempt_are_found() -> None:
    recorder = Recorder()
    recorder.events = [_heard("RUN_START", 1, data={"pid": 100}), _heard("RUN_START", 2, data={"pid": 200})]
    report = _report()
    inv._two_workers(report, recorder, [{"run_id": RUN, "attempt": 1, "handle": {"pid": 100}}])
    assert report.two_workers == 1
    recorder.events = recorder.events[:1]
    clean = _report()
    inv._two_workers(clean, recorder, [{"run_id": RUN, "attempt": 1, "handle": {"pid": 100}}])
    assert clean.violations() == {}


def test_a_run_held_starting_past_its_timeout_is_stuck() -> None:
    late = [
        _status_event(None, "QUEUED", 0, 0),
        _status_event("QUEUED", "STARTING", 1, 1),
        _status_event("STARTING", "FAILURE", 1, 30),
    ]
    report = _report()
    inv._stuck_on_the_way(report, late, LIMITS)
    assert report.stuck == 1
    clean = _report()
    inv._stuck_on_the_way(clean, HISTORY, LIMITS)
    assert clean.violations() == {}


def test_a_start_said_in_time_but_applied_late_is_not_stuck() -> None:
    """The start timeout is measured up to what the monitor heard: a RUN_START sent at 5 s and applied
    at 30 s (its monitor was restarting) was on time; one first sent at 25 s was not."""
    history = [
        _status_event(None, "QUEUED", 0, 0),
        _status_event("QUEUED", "STARTING", 1, 1),
        _status_event("STARTING", "STARTED", 1, 30),
    ]
    on_time = Recorder()
    on_time.events = [_heard("RUN_START", 5)]
    clean = _report()
    inv._stuck_on_the_way(clean, history, LIMITS, on_time)
    assert clean.violations() == {}
    late = Recorder()
    late.events = [_heard("RUN_START", 25)]
    report = _report()
    inv._stuck_on_the_way(report, history, LIMITS, late)
    assert report.stuck == 1
    unheard = _report()
    inv._stuck_on_the_way(unheard, history, LIMITS, Recorder())
    assert unheard.stuck == 1
