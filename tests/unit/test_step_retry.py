"""Step retry policies, executors and resume-time overrides: the pure parts (issue 11)."""

from __future__ import annotations

from typing import Any

import pytest

from runherd import contract, execution, overrides, step_retry
from runherd.errors import InvalidMessage
from runherd.step_retry import Backoff, Jitter, RetryPolicy

UUID = "6f1c9b1e-2d4b-4c1e-9a8e-1c2b3d4e5f60"


@pytest.mark.parametrize(
    ("backoff", "jitter", "n", "rand", "expected"),
    [
        (Backoff.CONSTANT, None, 1, 0.5, 2.0),
        (Backoff.CONSTANT, None, 5, 0.5, 2.0),
        (Backoff.LINEAR, None, 1, 0.5, 2.0),
        (Backoff.LINEAR, None, 3, 0.5, 6.0),
        (Backoff.EXPONENTIAL, None, 1, 0.5, 2.0),  # 2 * (2**1 - 1)
        (Backoff.EXPONENTIAL, None, 2, 0.5, 6.0),  # 2 * (2**2 - 1)
        (Backoff.EXPONENTIAL, None, 3, 0.5, 14.0),
        (Backoff.EXPONENTIAL, Jitter.FULL, 3, 0.25, 3.5),  # rand * 14
        (Backoff.EXPONENTIAL, Jitter.FULL, 3, 0.0, 0.0),
        (Backoff.CONSTANT, Jitter.PLUS_MINUS, 1, 0.0, 0.0),  # 2 - 2
        (Backoff.CONSTANT, Jitter.PLUS_MINUS, 1, 0.75, 3.0),  # 2 + (3 - 2)
        (Backoff.LINEAR, Jitter.PLUS_MINUS, 2, 0.5, 4.0),
    ],
)
def test_delay_is_dagsters_calculate_delay(
    backoff: Backoff, jitter: Jitter | None, n: int, rand: float, expected: float
) -> None:
    policy = RetryPolicy(max_retries=9, delay_seconds=2, backoff=backoff, jitter=jitter)
    assert step_retry.delay_seconds(policy, n, rand) == pytest.approx(expected)


def test_delay_is_never_negative_nor_past_the_cap() -> None:
    assert step_retry.delay_seconds(RetryPolicy(9, 2, Backoff.CONSTANT, Jitter.PLUS_MINUS), 1, 0.0) == 0.0
    huge = RetryPolicy(100, 86_400, Backoff.EXPONENTIAL)
    assert step_retry.delay_seconds(huge, 100, 0.5) == step_retry.MAX_DELAY_SECONDS


def test_after_failure_retries_until_max_retries_then_gives_up() -> None:
    policy = RetryPolicy(max_retries=2, delay_seconds=1, backoff=Backoff.LINEAR)
    assert step_retry.after_failure(policy, 1, 0.5) == step_retry.NextTry(True, 2, 1.0)
    assert step_retry.after_failure(policy, 2, 0.5) == step_retry.NextTry(True, 3, 2.0)
    assert step_retry.after_failure(policy, 3, 0.5) == step_retry.NextTry(False)
    assert step_retry.after_failure(step_retry.NO_RETRY, 1, 0.5) == step_retry.NextTry(False)


def test_remaining_delay_after_a_crash() -> None:
    assert step_retry.remaining_delay(None, 100.0) == 0.0
    assert step_retry.remaining_delay(103.5, 100.0) == 3.5
    assert step_retry.remaining_delay(90.0, 100.0) == 0.0


def test_parse_policy_defaults_and_both_spellings() -> None:
    assert step_retry.parse_policy({}, "r") == RetryPolicy(max_retries=1)
    got = step_retry.parse_policy(
        {"max_retries": 3.0, "delay_seconds": 1.5, "backoff": "EXPONENTIAL", "jitter": "full"}, "r"
    )
    assert got == RetryPolicy(3, 1.5, Backoff.EXPONENTIAL, Jitter.FULL)
    assert step_retry.parse_policy(got.to_json(), "r") == got


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ([], "r: expected an object"),
        ({"tries": 1}, "r.tries: unknown field"),
        ({"max_retries": -1}, "r.max_retries: expected an integer from 0 to 100"),
        ({"max_retries": 101}, "r.max_retries"),
        ({"max_retries": True}, "r.max_retries"),
        ({"delay_seconds": -1}, "r.delay_seconds: expected a number from 0"),
        ({"delay_seconds": "5"}, "r.delay_seconds"),
        ({"backoff": "Exponential"}, "r.backoff: expected constant | linear | exponential"),
        ({"jitter": True}, "r.jitter: expected full | plus_minus"),
    ],
)
def test_bad_policies_are_refused_with_a_reason(raw: Any, reason: str) -> None:
    with pytest.raises(InvalidMessage) as err:
        step_retry.parse_policy(raw, "r")
    assert str(err.value).startswith(reason), str(err.value)


def test_the_run_level_tag_takes_a_number_an_object_or_json_text() -> None:
    assert step_retry.parse_tag(None) is None
    assert step_retry.parse_tag(2) == RetryPolicy(max_retries=2)
    assert step_retry.parse_tag("2") == RetryPolicy(max_retries=2)
    assert step_retry.parse_tag('{"max_retries": 1, "delay_seconds": 3}') == RetryPolicy(1, 3.0)
    assert step_retry.parse_tag({"backoff": "linear"}) == RetryPolicy(1, 0.0, Backoff.LINEAR)
    for bad in ("often", True, 2.5, "[1]"):
        with pytest.raises(InvalidMessage, match="tag runherd/step_retry"):
            step_retry.parse_tag(bad)


def test_a_steps_own_policy_wins_over_the_tag_and_the_config() -> None:
    own, tag, conf = RetryPolicy(1), RetryPolicy(2), RetryPolicy(3)
    assert step_retry.effective(own, tag, conf) is own
    assert step_retry.effective(None, tag, conf) is tag
    assert step_retry.effective(None, None, conf) is conf
    assert step_retry.effective(None, None, None) == step_retry.NO_RETRY


def test_launch_carries_a_step_retry_policy_and_validates_the_new_tags() -> None:
    launch = contract.parse_launch(
        {
            "v": 1,
            "job": "j",
            "steps": [{"key": "a", "command": ["x"], "retry": {"max_retries": 2, "backoff": "linear"}}],
            "tags": {"runherd/executor": "in_process", "runherd/max_concurrent": "2", "runherd/step_retry": 1},
        }
    )
    assert launch.steps[0].retry == RetryPolicy(2, 0.0, Backoff.LINEAR)
    assert contract.parse_steps([launch.steps[0].to_json()]) == launch.steps
    for tags, reason in [
        ({"runherd/executor": "threads"}, "tag runherd/executor"),
        ({"dagster/max_concurrent": 0}, "tag runherd/max_concurrent"),
        ({"runherd/step_retry": {"max_retries": 1000}}, "tag runherd/step_retry.max_retries"),
    ]:
        with pytest.raises(InvalidMessage, match=reason):
            contract.parse_launch({"v": 1, "job": "j", "steps": [{"key": "a", "command": ["x"]}], "tags": tags})


def test_executor_choice_tag_over_config_and_in_process_is_one_at_a_time() -> None:
    assert execution.choose(None, None, "multiprocess", 4) == execution.Execution(
        execution.ExecutorName.MULTIPROCESS, 4
    )
    assert execution.choose("launcher", "8", "multiprocess", 4) == execution.Execution(
        execution.ExecutorName.LAUNCHER, 8
    )
    assert execution.choose("in_process", 8, "multiprocess", 4).max_concurrent == 1


# --- resume-time overrides -------------------------------------------------------------------------

STEPS = contract.parse_steps(
    [
        {"key": "a", "command": ["x"], "retry": {"max_retries": 1, "delay_seconds": 5}},
        {"key": "b", "command": ["x"], "timeout_seconds": 10},
    ]
)


def test_overrides_parse_and_apply_a_named_step_winning_over_star() -> None:
    given = overrides.parse_list(["a=retry:3", "*=retry:2", "*=timeout:600", "b=timeout:0.5"])
    a, b = overrides.apply(STEPS, given)
    assert a.retry == RetryPolicy(3, 5.0) and a.timeout_seconds == 600  # keeps the policy's delay
    assert b.retry == RetryPolicy(2) and b.timeout_seconds == 0.5


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("a", "with[0]: expected 'STEP=retry:N'"),
        ("a=retries:3", "with[0]: expected"),
        ("a=retry:x", "with[0] 'a=retry:x': retry takes a number of retries"),
        ("a=retry:101", "with[0] 'a=retry:101': retry takes"),
        ("a=timeout:0", "with[0] 'a=timeout:0': timeout takes a positive number"),
        ("a=timeout:-1", "with[0] 'a=timeout:-1': timeout takes"),
        (5, "with[0]: expected"),
    ],
)
def test_bad_overrides_are_refused_with_a_reason(spec: Any, reason: str) -> None:
    with pytest.raises(InvalidMessage) as err:
        overrides.parse_list([spec])
    assert str(err.value).startswith(reason), str(err.value)


def test_an_override_of_a_step_the_run_does_not_have_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="the run has no step 'c'"):
        overrides.apply(STEPS, overrides.parse_list(["c=retry:1"]))


def test_reexecute_carries_the_overrides() -> None:
    request = contract.parse_reexecute(
        {
            "v": 1,
            "run_id": UUID,
            "with": ["a=retry:3", "*=timeout:600"],
            "job_name": "again",
            "max_runtime": 60,
            "executor": "in_process",
        }
    )
    assert request.with_ == ("a=retry:3", "*=timeout:600")
    assert request.overrides() == {
        "with": ["a=retry:3", "*=timeout:600"],
        "job_name": "again",
        "max_runtime": 60,
        "executor": "in_process",
    }
    for body, reason in [
        ({"with": "a=retry:3"}, "with: expected a list"),
        ({"job_name": " "}, "job_name: must be"),
        ({"max_runtime": -1}, "max_runtime: expected an integer from 0"),
        ({"max_runtime": "60"}, "max_runtime: expected an integer"),
        ({"executor": "threads"}, "executor: expected in_process"),
    ]:
        with pytest.raises(InvalidMessage) as err:
            contract.parse_reexecute({"v": 1, "run_id": UUID, **body})
        assert str(err.value).startswith(reason), str(err.value)


def test_the_clients_reexecute_body_carries_the_overrides() -> None:
    from runherd import client

    raw, new_run_id = client._reexecute_body(UUID, "FROM_FAILURE", {}, with_=["a=retry:3"], executor="launcher")
    body = contract.decode(raw)
    assert body["with"] == ["a=retry:3"] and body["executor"] == "launcher" and body["new_run_id"] == new_run_id
    with pytest.raises(InvalidMessage, match="with\\[0\\]"):
        client._reexecute_body(UUID, "FROM_FAILURE", {}, with_=["a=retry"])


def test_an_override_spec_parses_back_to_itself() -> None:
    for spec in ("a=retry:3", "*=retry:0", "b=timeout:9999999", "b=timeout:0.001", "b=timeout:12.5"):
        parsed = overrides.parse_spec(spec)
        assert parsed.spec() == spec and overrides.parse_spec(parsed.spec()) == parsed
    assert overrides.parse_spec("b=timeout:600.0").spec() == "b=timeout:600"
