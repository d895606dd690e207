"""The launch contract's validation, tags and status bodies: pure, no I/O."""

from __future__ import annotations

import pytest

from runherd import contract
from runherd.contract import RunStatus, can_transition
from runherd.errors import InvalidMessage


def launch(**fields: object) -> dict[str, object]:
    return {"v": 1, "job": "j", "steps": [{"key": "a", "command": ["true"]}], **fields}


def test_valid_launch_gets_a_run_id_and_keeps_steps_in_order() -> None:
    parsed = contract.parse_launch(
        launch(
            steps=[{"key": "a", "command": ["true"]}, {"key": "b", "call": "m:f", "deps": ["a"], "timeout_seconds": 5}]
        )
    )
    assert len(parsed.run_id) == 36
    assert [s.key for s in parsed.steps] == ["a", "b"] and parsed.steps[1].timeout_seconds == 5


@pytest.mark.parametrize(
    ("steps", "error"),
    [
        ([{"key": "a", "command": ["true"], "deps": ["a"]}], "cycle: a -> a"),
        (
            [
                {"key": "a", "command": ["t"], "deps": ["c"]},
                {"key": "b", "command": ["t"], "deps": ["a"]},
                {"key": "c", "command": ["t"], "deps": ["b"]},
            ],
            "cycle",
        ),
        ([{"key": "a", "call": "nocolon"}], "module:function"),
        ([{"key": "a", "command": []}], "non-empty list"),
        ([{"key": "a", "command": ["x", 1]}], "list of strings"),
        ([{"key": "", "command": ["x"]}], "must not be empty"),
        ([{"key": "a", "command": ["x"], "timeout_seconds": -1}], "positive"),
        ([{"key": "a", "command": ["x"], "deps": "b"}], "deps: expected a list"),
        (["a"], "steps[0]: expected an object"),
        ([], "at least one step"),
    ],
)
def test_bad_steps_are_refused_with_a_reason(steps: list[object], error: str) -> None:
    with pytest.raises(InvalidMessage, match=None) as info:
        contract.parse_launch(launch(steps=steps))
    assert error in str(info.value)


def test_decode_refuses_non_objects_and_other_versions() -> None:
    with pytest.raises(InvalidMessage, match="not valid JSON"):
        contract.decode(b"{")
    with pytest.raises(InvalidMessage, match="must be a JSON object"):
        contract.decode(b"3")
    with pytest.raises(InvalidMessage, match="v: expected 1"):
        contract.decode(b'{"v": 2}')


def test_tags_accept_both_spellings_and_runherd_wins() -> None:
    assert contract.priority({"dagster/priority": "7"}) == 7
    assert contract.priority({"dagster/priority": 1, "runherd/priority": 3}) == 3
    assert contract.max_runtime({}, 30) == 30 and contract.max_runtime({"runherd/max_runtime": 5}, 30) == 5
    with pytest.raises(InvalidMessage, match="runherd/max_retries"):
        contract.validate_tags({"dagster/max_retries": "many"})
    with pytest.raises(InvalidMessage, match="retry_strategy"):
        contract.validate_tags({"runherd/retry_strategy": "SOMETIMES"})
    with pytest.raises(InvalidMessage, match="retry_on_step_failure"):
        contract.validate_tags({"runherd/retry_on_step_failure": "maybe"})


@pytest.mark.parametrize(
    ("current", "target", "allowed"),
    [
        (RunStatus.QUEUED, RunStatus.STARTING, True),
        (RunStatus.STARTING, RunStatus.STARTED, True),
        (RunStatus.STARTING, RunStatus.FAILURE, True),
        (RunStatus.STARTED, RunStatus.SUCCESS, True),
        (RunStatus.QUEUED, RunStatus.CANCELED, True),
        (RunStatus.STARTED, RunStatus.CANCELING, True),
        (RunStatus.CANCELING, RunStatus.CANCELED, True),
        (RunStatus.QUEUED, RunStatus.SUCCESS, False),
        (RunStatus.STARTED, RunStatus.CANCELED, False),
        (RunStatus.SUCCESS, RunStatus.FAILURE, False),
        (RunStatus.FAILURE, RunStatus.SUCCESS, False),
        (RunStatus.CANCELED, RunStatus.STARTED, False),
        (RunStatus.CANCELING, RunStatus.SUCCESS, False),
    ],
)
def test_state_machine(current: RunStatus, target: RunStatus, allowed: bool) -> None:
    assert can_transition(current, target) is allowed


def test_terminal_statuses_never_change() -> None:
    for terminal in (RunStatus.SUCCESS, RunStatus.FAILURE, RunStatus.CANCELED):
        assert not any(can_transition(terminal, target) for target in RunStatus)


def test_parse_tag_args() -> None:
    assert contract.parse_tag_args(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(InvalidMessage, match="key=value"):
        contract.parse_tag_args(["novalue"])


def test_events_and_heartbeats_refuse_out_of_range_numbers_and_bad_timestamps() -> None:
    base = {"v": 1, "run_id": "6f1c1b3e-0000-4000-8000-000000000000", "attempt": 1, "seq": 1, "type": "RUN_START"}
    assert contract.parse_event(base).attempt == 1
    with pytest.raises(InvalidMessage, match="attempt: expected an integer from 0"):
        contract.parse_event({**base, "attempt": 2**40})
    with pytest.raises(InvalidMessage, match="ts: expected an RFC 3339"):
        contract.parse_event({**base, "ts": "yesterday"})
    with pytest.raises(InvalidMessage, match="type: unknown event type"):
        contract.parse_event({**base, "type": "RUN_EXPLODED"})
    with pytest.raises(InvalidMessage, match="attempt: expected an integer from 1"):
        contract.parse_heartbeat({"v": 1, "run_id": base["run_id"], "attempt": 0})


def test_a_long_chain_is_ordered_and_a_long_cycle_refused_without_recursion() -> None:
    """5,000 steps listed against their order: deps first, and a cycle through all of them named."""
    n = 5000
    steps = [{"key": f"s{i}", "command": ["true"], "deps": [f"s{i + 1}"] if i < n - 1 else []} for i in range(n)]
    parsed = contract.parse_launch({"job": "chain", "steps": steps})
    assert contract.check_graph(parsed.steps) == [f"s{i}" for i in reversed(range(n))]
    steps[-1]["deps"] = ["s0"]
    with pytest.raises(InvalidMessage, match=r"steps form a cycle: s0 -> s1 -> .* -> s4999 -> s0"):
        contract.parse_launch({"job": "chain", "steps": steps})
