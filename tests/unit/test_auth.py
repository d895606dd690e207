"""runherd.auth: which tokens prove which claims (a pure table), and what a step's env keeps."""

from __future__ import annotations

import pytest

from runherd import auth
from runherd.launchers.process import inherited
from runherd.worker.main import step_environment

KEY, OLD, OTHER = b"k" * 32, b"o" * 32, b"x" * 32
RUN, RUN_B = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"
WORKER_A1 = auth.token(KEY, auth.WORKER, RUN, 1)


@pytest.mark.parametrize(
    ("source", "run_id", "attempt", "presented", "refused"),
    [
        ("worker:abc", RUN, 1, WORKER_A1, None),
        ("worker", RUN, 1, WORKER_A1, None),
        ("launcher", RUN, 1, auth.token(KEY, auth.LAUNCHER, RUN, 1), None),
        ("worker", RUN, 1, auth.token(OLD, auth.WORKER, RUN, 1), None),  # launched before a rotation
        ("launcher", RUN, 1, WORKER_A1, "does not prove source launcher"),  # a worker as the launcher
        ("worker", RUN_B, 1, WORKER_A1, "does not prove source worker"),  # another run
        ("worker", RUN, 2, WORKER_A1, "attempt 2"),  # another attempt
        ("worker", RUN, 1, auth.token(OTHER, auth.WORKER, RUN, 1), "does not prove"),  # another key
        ("monitor", RUN, 1, WORKER_A1, "no such source"),
        ("workerx", RUN, 1, WORKER_A1, "no such source"),
        ("worker", RUN, 1, None, "no x-runherd-token header"),
        ("worker", RUN, 1, "", "no x-runherd-token header"),
        ("worker", RUN, 1, 42, "no x-runherd-token header"),
        ("worker", RUN, 1, "é" * 64, "does not prove"),  # not ASCII: refused, not a crash
    ],
)
def test_refusal(source: str, run_id: str, attempt: int, presented: object, refused: str | None) -> None:
    reason = auth.refusal(auth.Keys(KEY, OLD), auth.role_of(source), run_id, attempt, presented)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason and reason.startswith("unauthenticated")


def test_keys_never_print() -> None:
    assert "k" * 8 not in repr(auth.Keys(KEY, OLD)) and "k" * 8 not in str(auth.Keys(KEY))


def test_a_steps_environment_leaves_out_the_workers_secrets() -> None:
    worker = {
        "PATH": "/bin",
        "USER_VAR": "1",
        "RUNHERD_AMQP_URL": "amqp://w:pw@h/",
        "RUNHERD_PLAN": "{}",
        "RUNHERD_PLAN_FILE": "/p",
        "RUNHERD_WORKER_RECORD": "/r",
        "RUNHERD_LOG_MAX_BYTES": "1",
    }
    kept = {"PATH": "/bin", "USER_VAR": "1", "RUNHERD_WORKER_RECORD": "/r", "RUNHERD_LOG_MAX_BYTES": "1"}
    assert step_environment(worker) == kept


def test_the_process_launcher_inherits_only_harmless_names() -> None:
    launcher = {
        "PATH": "/bin",
        "LC_ALL": "C",
        "PYTHONPATH": "/src",
        "RUNHERD_DATABASE_URL": "postgresql://u:pw@h/db",
        "RUNHERD_AMQP_URL": "amqp://u:pw@h/",
        "AWS_SECRET_ACCESS_KEY": "s",
        "EXTRA": "e",
    }
    assert inherited(launcher) == {"PATH": "/bin", "LC_ALL": "C", "PYTHONPATH": "/src"}
    assert inherited(launcher, frozenset({"EXTRA"}))["EXTRA"] == "e"
