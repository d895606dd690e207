"""What each lifecycle event does to its run (shared/rules/events.py): a table, no I/O."""

from __future__ import annotations

import pytest

from runherd.contract import Event, EventType, RunStatus
from runherd.rules.events import Action, describe_exit, on_worker_event, on_worker_exit


def ev(kind: EventType, attempt: int = 1) -> Event:
    return Event(run_id="r", attempt=attempt, seq=1, type=kind)


@pytest.mark.parametrize(
    ("status", "kind", "actions"),
    [
        (RunStatus.STARTING, EventType.RUN_START, (Action.MARK_STARTED,)),
        (RunStatus.STARTING, EventType.RUN_SUCCESS, (Action.MARK_STARTED, Action.SUCCEED)),
        (RunStatus.STARTED, EventType.STEP_START, (Action.STEP_START,)),
        (RunStatus.STARTED, EventType.STEP_FAILURE, (Action.STEP_END,)),
        (RunStatus.STARTED, EventType.RUN_FAILURE, (Action.FAIL,)),
        (RunStatus.CANCELING, EventType.RUN_CANCELED, (Action.CANCELED,)),
        (RunStatus.CANCELING, EventType.RUN_SUCCESS, ()),  # a cancel wins over a late success
        (RunStatus.STARTED, EventType.RUN_CANCELED, ()),  # nobody canceled: the exit decides (a crash)
    ],
)
def test_current_attempt_events(status: RunStatus, kind: EventType, actions: tuple[Action, ...]) -> None:
    decision = on_worker_event(status, 1, ev(kind))
    assert decision.refused is None and decision.actions == actions


@pytest.mark.parametrize("status", [RunStatus.SUCCESS, RunStatus.FAILURE, RunStatus.CANCELED])
def test_terminal_run_refuses_late_events(status: RunStatus) -> None:
    decision = on_worker_event(status, 1, ev(EventType.RUN_SUCCESS))
    assert decision.fence and "already" in (decision.refused or "")


def test_older_attempt_is_refused_and_fenced() -> None:
    decision = on_worker_event(RunStatus.STARTED, 2, ev(EventType.STEP_SUCCESS, attempt=1))
    assert decision.fence and "attempt 1 is not the current attempt (2)" in (decision.refused or "")


@pytest.mark.parametrize(
    ("status", "current", "exited", "actions"),
    [
        (RunStatus.STARTED, 1, 1, (Action.CRASHED,)),
        (RunStatus.STARTING, 1, 1, (Action.FAIL_BEFORE_START,)),
        (RunStatus.CANCELING, 1, 1, (Action.CANCELED,)),  # a user's cancel is never a crash
        (RunStatus.STARTED, 2, 1, ()),  # an old attempt's exit: already resumed
        (RunStatus.SUCCESS, 1, 1, ()),
        (RunStatus.FAILURE, 1, 1, ()),
    ],
)
def test_worker_exit(status: RunStatus, current: int, exited: int, actions: tuple[Action, ...]) -> None:
    assert on_worker_exit(status, current, exited).actions == actions


@pytest.mark.parametrize(
    ("status", "reason", "actions"),
    [
        (RunStatus.STARTED, "DeadlineExceeded", (Action.MAX_RUNTIME,)),  # never resumed
        (RunStatus.STARTED, "OOMKilled", (Action.CRASHED,)),
        (RunStatus.CANCELING, "DeadlineExceeded", (Action.CANCELED,)),  # the user's cancel is done
        (RunStatus.STARTING, "DeadlineExceeded", (Action.FAIL_BEFORE_START,)),
        (RunStatus.FAILURE, "DeadlineExceeded", ()),  # the sweep's max runtime came first
    ],
)
def test_a_worker_stopped_at_its_deadline_is_over_max_runtime(
    status: RunStatus, reason: str, actions: tuple[Action, ...]
) -> None:
    assert on_worker_exit(status, 1, 1, reason).actions == actions


def test_describe_exit() -> None:
    assert describe_exit(137, 9, "SIGKILL") == "killed by signal 9 (SIGKILL)"
    assert describe_exit(3, None, None) == "exit code 3"
    assert describe_exit(137, None, "OOMKilled") == "OOMKilled (exit code 137)"
    assert describe_exit(None, None, None) == "exit status unknown"
