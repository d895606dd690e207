"""The plan as a file (plain or gzip) and the worker's identity (issue 8 items 4 and 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runherd.contract import parse_steps
from runherd.errors import InvalidMessage
from runherd.plan import PLAN_ENV, PLAN_FILE_ENV, Plan, compress, from_env

PLAN = Plan(
    run_id="r",
    attempt=2,
    job="j",
    steps=parse_steps([{"key": "a", "command": ["true"]}]),
    completed={"a": "x" * 300_000},
    worker_id="w1",
)


@pytest.mark.parametrize("encode", [lambda t: t.encode(), compress], ids=["plain", "gzip"])
def test_a_plan_file_is_read_plain_or_compressed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encode) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "plan.json"
    path.write_bytes(encode(PLAN.to_json()))
    monkeypatch.setenv(PLAN_FILE_ENV, str(path))
    monkeypatch.delenv(PLAN_ENV, raising=False)
    assert from_env() == PLAN


def test_the_file_wins_over_the_inline_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "plan.json"
    path.write_text(PLAN.to_json())
    monkeypatch.setenv(PLAN_FILE_ENV, str(path))
    monkeypatch.setenv(PLAN_ENV, "not json")
    assert from_env().worker_id == "w1"


def test_a_missing_plan_file_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLAN_FILE_ENV, "/nonexistent/plan.json")
    with pytest.raises(InvalidMessage, match="cannot read the plan /nonexistent/plan.json"):
        from_env()


def test_the_worker_identity_is_its_events_source() -> None:
    assert PLAN.source == "worker:w1"
    assert Plan(run_id="r", attempt=1, job="j", steps=()).source == "worker"  # a plan from before worker ids
