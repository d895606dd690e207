"""What a lifecycle event does to its run: a pure decision, applied by the monitor's ingest.

Worker events of the run's current attempt move the run along; events of an older attempt, or for
a run that is already finished, are refused (and that worker is fenced off: terminated).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from runherd.contract import Event, EventType, RunStatus


class Action(enum.StrEnum):
    MARK_STARTED = "MARK_STARTED"  # STARTING -> STARTED: any event proves the worker runs
    STEP_START = "STEP_START"
    STEP_END = "STEP_END"
    SUCCEED = "SUCCEED"
    FAIL = "FAIL"
    CANCELED = "CANCELED"
    CRASHED = "CRASHED"  # resume or fail, by the resume budget
    MAX_RUNTIME = "MAX_RUNTIME"  # the launcher stopped it at the run's max runtime: fail, never resume
    FAIL_BEFORE_START = "FAIL_BEFORE_START"


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...] = ()
    refused: str | None = None  # a sentence for the event log; the worker is terminated

    @property
    def fence(self) -> bool:
        return self.refused is not None


_STEP = {
    EventType.STEP_START: Action.STEP_START,
    EventType.STEP_SUCCESS: Action.STEP_END,
    EventType.STEP_FAILURE: Action.STEP_END,
    EventType.STEP_SKIPPED: Action.STEP_END,
    EventType.STEP_UP_FOR_RETRY: Action.STEP_END,  # the step waits for its next try
    EventType.STEP_RESTARTED: Action.STEP_START,
}


def on_worker_event(status: RunStatus, current_attempt: int, event: Event) -> Decision:
    if event.attempt != current_attempt:
        return Decision(refused=f"attempt {event.attempt} is not the current attempt ({current_attempt})")
    if status.terminal:
        return Decision(refused=f"run is already {status.value}")
    if status is RunStatus.QUEUED:
        return Decision(refused="run has not been launched")
    actions: list[Action] = []
    if status is RunStatus.STARTING:
        actions.append(Action.MARK_STARTED)
    if event.type in _STEP:
        actions.append(_STEP[event.type])
    elif event.type is EventType.RUN_SUCCESS and status is not RunStatus.CANCELING:
        actions.append(Action.SUCCEED)
    elif event.type is EventType.RUN_FAILURE and status is not RunStatus.CANCELING:
        actions.append(Action.FAIL)
    elif event.type is EventType.RUN_CANCELED and status is RunStatus.CANCELING:
        actions.append(Action.CANCELED)
    # RUN_CANCELED of a run nobody canceled: the worker was stopped from outside runherd; its exit
    # (reported by the launcher) is then handled as a crash, never as a user's cancel.
    if status is RunStatus.CANCELING and Action.MARK_STARTED in actions:
        actions.remove(Action.MARK_STARTED)
    return Decision(actions=tuple(actions))


# The exit reason of a worker its launcher stopped at the run's max runtime (the Kubernetes Job's
# activeDeadlineSeconds, which the launcher sets from it).
DEADLINE_EXCEEDED = "DeadlineExceeded"


def on_worker_exit(status: RunStatus, current_attempt: int, exited_attempt: int, reason: str | None = None) -> Decision:
    """A worker process/container/Job has exited (reported by the launcher's watch)."""
    if exited_attempt != current_attempt or status.terminal:
        return Decision()
    if status is RunStatus.STARTED:
        # Not a crash: the backend enforced the run's max runtime, counted from before the worker
        # started, so a hair before the monitor's own check would have. A resumed attempt would
        # have no runtime left (and would cost a resume, or, with none left, the wrong reason).
        if reason == DEADLINE_EXCEEDED:
            return Decision(actions=(Action.MAX_RUNTIME,))
        return Decision(actions=(Action.CRASHED,))
    if status is RunStatus.STARTING:
        return Decision(actions=(Action.FAIL_BEFORE_START,))
    if status is RunStatus.CANCELING:
        # A user's cancel: the worker is gone, so the cancel is done. Never a crash to resume.
        return Decision(actions=(Action.CANCELED,))
    return Decision()


def describe_exit(exit_code: int | None, signal: int | None, reason: str | None) -> str:
    """'exit code 3', 'killed by signal 9 (SIGKILL)', 'OOMKilled (exit code 137)'."""
    import signal as signals

    if signal:
        try:
            name = signals.Signals(signal).name
        except ValueError:
            name = f"signal {signal}"
        text = f"killed by signal {signal} ({name})"
    elif exit_code is None:
        text = "exit status unknown"
    else:
        text = f"exit code {exit_code}"
    if reason and reason not in text:
        text = f"{reason} ({text})"
    return text
