"""The kill verdict (what the event log may say after a terminate) and the internal kill request."""

from __future__ import annotations

import uuid

import orjson
import pytest

from runherd.errors import InvalidMessage
from runherd.killing import parse_request, request_body, verdict
from runherd.launchers import Health, HealthStatus
from runherd.store import RunRef

RUNNING = Health(HealthStatus.RUNNING)
GONE = Health(HealthStatus.NOT_FOUND)
KILLED = Health(HealthStatus.FAILED, exit_code=137)
UNKNOWN = Health(HealthStatus.UNKNOWN, message="worker runs on host b, not on a")


@pytest.mark.parametrize(
    ("found", "health", "error", "confirmed", "exited", "says"),
    [
        (True, KILLED, None, True, True, "terminated worker of attempt 2: why"),
        (True, RUNNING, None, True, False, "terminated worker of attempt 2: why"),  # a pod still terminating
        (False, GONE, None, True, True, "worker of attempt 2 was already gone (why)"),
        (False, KILLED, None, True, True, "was already gone"),
        # Not found, yet not confirmed gone: another host's worker, an API that cannot say.
        (False, UNKNOWN, None, False, False, "not found, health UNKNOWN: worker runs on host b"),
        (False, RUNNING, None, False, False, "not found, health RUNNING"),
        (None, None, "TimeoutError()", False, False, "could not terminate the worker of attempt 2 (why): TimeoutError"),
    ],
)
def test_only_a_confirmed_kill_is_reported_done(
    found: bool | None, health: Health | None, error: str | None, confirmed: bool, exited: bool, says: str
) -> None:
    result = verdict(2, "why", found, health, error)
    assert (result.confirmed, result.exited) == (confirmed, exited)
    assert says in result.message


def test_kill_request_round_trips() -> None:
    run_id = str(uuid.uuid4())
    body = request_body(RunRef(run_id, 3, {"worker": 7, "host": "a"}), "max runtime", 0)
    request = parse_request(orjson.loads(body))
    assert (request.run_id, request.attempt, request.handle, request.reason) == (
        run_id,
        3,
        {"worker": 7, "host": "a"},
        "max runtime",
    )
    assert request.grace_seconds == 0.0
    assert parse_request({**orjson.loads(body), "grace_seconds": None}).grace_seconds is None


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"v": 2}, '"v": 1'),
        ({"run_id": "x"}, "run_id: expected a UUID"),
        ({"attempt": 0}, "attempt"),
        ({"attempt": True}, "attempt"),
        ({"handle": None}, "handle"),
        ({"reason": 5}, "reason"),
        ({"grace_seconds": -1}, "grace_seconds"),
    ],
)
def test_invalid_kill_requests_say_why(change: dict[str, object], says: str) -> None:
    body = orjson.loads(request_body(RunRef(str(uuid.uuid4()), 1, {"worker": 1}), "r", None))
    with pytest.raises(InvalidMessage, match=says):
        parse_request({**body, **change})
