"""docs/asyncapi.yaml agrees with the validator (runherd.contract), in both directions.

- Every body the validator accepts validates against its schema: hypothesis-drawn valid bodies,
  mutants of them that the validator still accepts, and a corpus.
- A body the schema accepts is accepted by the validator too, except for what JSON Schema cannot
  say (UNSAYABLE below: the step graph, calendar dates, integer text out of range, 1.0 as an
  integer); checked over the same mutants, which are mostly invalid.
- A corpus of bad bodies is refused by both (the graph cases by the validator only, on purpose).
"""

from __future__ import annotations

import copy
import random
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from runherd import broker as topology
from runherd import contract
from runherd.errors import InvalidMessage
from tests import harness
from tests.faults import fuzz_bodies as fb

DOC = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml").read_text())
_REGISTRY = Registry().with_resource("urn:runherd", Resource.from_contents(DOC, default_specification=DRAFT7))
SCHEMA_OF = {
    "launch": "Launch",
    "terminate": "Terminate",
    "reexecute": "Reexecute",
    "event": "Event",
    "heartbeat": "Heartbeat",
    "status": "Status",
}
VALIDATORS = {
    kind: Draft7Validator({"$ref": f"urn:runherd#/components/schemas/{name}"}, registry=_REGISTRY)
    for kind, name in SCHEMA_OF.items()
}

# What the validator refuses and JSON Schema cannot express (reason prefixes).
UNSAYABLE = (
    "duplicate step key",
    "steps form a cycle",
    # "step 'x' depends on unknown step": matched below
    "ts: expected an RFC 3339 timestamp",  # 30 February; a UTC date before year 1
    "tag runherd/",  # "99999999999" is 10 digits of text, past PostgreSQL's integer
    "attempt: expected an integer",  # 1.0 is an integer to JSON Schema
    "seq: expected an integer",
)

UUID = "6f1c9b1e-2d4b-4c1e-9a8e-1c2b3d4e5f60"


def schema_ok(kind: str, body: bytes) -> bool:
    """A body that is not JSON (to orjson: depth over 1024, numbers past a double) fails its schema."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return VALIDATORS[kind].is_valid(data)


def unsayable(reason: str) -> bool:
    return reason.startswith(UNSAYABLE) or " depends on unknown step " in reason


def agree(kind: str, body: bytes) -> None:
    reason = fb.verdict(kind, body)
    valid = schema_ok(kind, body)
    if reason is None:
        errors = [e.message[:300] for e in VALIDATORS[kind].iter_errors(orjson.loads(body))]
        assert valid, f"validator accepts, schema refuses {body[:300]!r}: {errors}"
    elif valid:
        assert unsayable(reason), f"schema accepts, validator refuses ({reason}): {body[:300]!r}"


# --- the validator's accepted bodies validate ----------------------------------------------------

FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.mark.parametrize("kind", fb.KINDS)
def test_every_valid_body_validates_and_mutants_agree(kind: str) -> None:
    seen = {"valid": 0, "mutants": 0}

    @FAST
    @given(body=fb.VALID[kind](), rnd=st.randoms(use_true_random=False))
    def check(body: dict[str, Any], rnd: random.Random) -> None:
        raw = orjson.dumps(body)
        assert fb.verdict(kind, raw) is None, fb.verdict(kind, raw)
        agree(kind, raw)
        seen["valid"] += 1
        for _ in range(10):
            # depth 1100 and 5000 are not JSON; 20 keeps jsonschema within Python's recursion limit
            agree(kind, fb.mutate(kind, body, rnd, depths=(20, 1100, 5000)))
            seen["mutants"] += 1

    check()
    assert seen["valid"] >= 10


GOOD = [
    (
        "launch",
        {
            "v": 1,
            "run_id": UUID,
            "job": "nightly-etl",
            "steps": [
                {"key": "extract", "command": ["python", "-c", "print('hi')"]},
                {"key": "transform", "call": "mypkg.etl:transform", "deps": ["extract"], "timeout_seconds": 600},
                {"key": "load", "command": ["sh", "-c", "./load.sh"], "deps": ["transform"]},
            ],
            "tags": {"runherd/max_runtime": 3600, "runherd/priority": 5, "runherd/max_retries": 2, "team": "data"},
            "launcher": "process",
            "env": {"K": "V"},
        },
    ),
    ("launch", {"v": 1, "job": "j", "steps": [{"key": "a", "call": "m:f:g", "command": None, "deps": None}]}),
    ("launch", {"v": 1.0, "job": " j", "steps": [{"key": "a", "command": ["x"]}], "tags": {"dagster/priority": "-5"}}),
    ("launch", {"v": 1, "job": "j", "steps": [{"key": "a", "command": ["x"]}], "tags": {"runherd/priority": 5.0}}),
    ("launch", {"v": 1, "job": "j", "steps": [{"key": "a", "command": ["x"]}], "tags": None, "env": None}),
    ("launch", {"v": 1, "job": "j", "steps": [{"key": "a", "command": ["x"]}], "run_id": UUID.upper()}),
    ("terminate", {"v": 1, "run_id": UUID, "reason": "any extra field is ignored"}),
    ("reexecute", {"v": 1, "run_id": UUID}),
    ("reexecute", {"v": 1, "run_id": UUID, "strategy": "ALL_STEPS", "tags": {"a": 1}, "new_run_id": UUID}),
    ("reexecute", {"v": 1, "run_id": UUID, "strategy": None, "tags": {"runherd/retry_on_step_failure": "FALSE"}}),
    ("event", {"v": 1, "run_id": UUID, "attempt": 0, "seq": 0, "type": "WORKER_EXITED"}),
    (
        "event",
        {
            "v": 1,
            "run_id": UUID,
            "attempt": 1,
            "seq": 3,
            "type": "STEP_SUCCESS",
            "source": "worker",
            "step_key": "a",
            "message": None,
            "data": {"output": [1, {"x": None}]},
            "ts": "2026-01-02T03:04:05.123456Z",
        },
    ),
    ("event", {"v": 1, "run_id": UUID, "attempt": 1, "seq": 1, "type": "RUN_START", "ts": "2026-01-02 03:04:05+02:00"}),
    ("event", {"v": 1, "run_id": UUID, "attempt": 1, "seq": 1, "type": "RUN_START", "ts": ""}),
    ("heartbeat", {"v": 1, "run_id": UUID, "attempt": 1, "ts": "2026-01-02T03:04:05"}),
    ("heartbeat", {"v": 1, "run_id": UUID, "attempt": 2147483647, "ts": None}),
]


@pytest.mark.parametrize(("kind", "body"), GOOD)
def test_corpus_of_good_bodies_is_accepted_by_both(kind: str, body: dict[str, Any]) -> None:
    raw = orjson.dumps(body)
    assert fb.verdict(kind, raw) is None
    assert schema_ok(kind, raw), [e.message for e in VALIDATORS[kind].iter_errors(body)]


# --- bad bodies are refused by both ------------------------------------------------------------------


def _launch(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(GOOD[0][1])
    for key, value in changes.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    return body


def _step(**fields: Any) -> dict[str, Any]:
    return _launch(steps=[{"key": "a", **fields}])


EVENT = {"v": 1, "run_id": UUID, "attempt": 1, "seq": 1, "type": "RUN_START"}
BEAT = {"v": 1, "run_id": UUID, "attempt": 1}

BAD: list[tuple[str, Any, str]] = [
    # (kind, body as an object or raw bytes, the validator's reason starts with)
    ("launch", b"not json", "body is not valid JSON"),
    ("launch", b"[" * 1100 + b"]" * 1100, "body is not valid JSON"),
    ("launch", b'["launch"]', "body must be a JSON object"),
    ("launch", _launch(v=2), "v: expected 1"),
    ("launch", _launch(v="1"), "v: expected 1"),
    ("launch", _launch(v=True), "v: expected 1"),
    ("launch", _launch(v=...), "v: expected 1"),
    ("launch", _launch(job=...), "job: missing"),
    ("launch", _launch(job=5), "job: expected a job name"),
    ("launch", _launch(job=" \u2003 "), "job: must be a non-empty name"),
    ("launch", _launch(job="j" * 201), "job: must be a non-empty name"),
    ("launch", _launch(steps=...), "steps: missing"),
    ("launch", _launch(steps=[]), "steps: a run needs at least one step"),
    ("launch", _launch(steps={"key": "a"}), "steps: expected a list"),
    ("launch", _launch(surprise=1), "surprise: unknown field"),
    ("launch", _launch(run_id="12345678123456781234567812345678"), "run_id: expected a UUID"),
    ("launch", _launch(run_id="{" + UUID + "}"), "run_id: expected a UUID"),
    ("launch", _launch(run_id=5), "run_id: expected a UUID"),
    ("launch", _step(command=["x"], call="m:f"), "step 'a': needs exactly one of command or call"),
    ("launch", _step(), "step 'a': needs exactly one of command or call"),
    ("launch", _step(command=[]), "step 'a': command must be a non-empty list"),
    ("launch", _step(command=["x", 1]), "step 'a': command must be a non-empty list"),
    ("launch", _step(call="nocolon"), "step 'a': call must be 'module:function'"),
    ("launch", _step(call=":f"), "step 'a': call must be 'module:function'"),
    ("launch", _step(command=["x"], timeout_seconds=0), "step 'a': timeout_seconds must be positive"),
    ("launch", _step(command=["x"], timeout_seconds="9"), "steps[0].timeout_seconds: expected a number"),
    ("launch", _step(command=["x"], deps="b"), "steps[0].deps: expected a list"),
    ("launch", _step(command=["x"], retries=1), "steps[0].retries: unknown field"),
    ("launch", _launch(steps=[{"key": "", "command": ["x"]}]), "steps[0].key: must not be empty"),
    ("launch", _launch(tags=[]), "tags: expected an object"),
    ("launch", _launch(tags={"runherd/priority": "high"}), "tag runherd/priority: expected an integer"),
    ("launch", _launch(tags={"runherd/priority": 2**40}), "tag runherd/priority: expected an integer"),
    ("launch", _launch(tags={"runherd/priority": 5.5}), "tag runherd/priority: expected an integer"),
    ("launch", _launch(tags={"runherd/priority": " 5"}), "tag runherd/priority: expected an integer"),
    ("launch", _launch(tags={"runherd/priority": 1, "dagster/priority": "x"}), "tag runherd/priority"),
    ("launch", _launch(tags={"runherd/retry_strategy": [1]}), "tag runherd/retry_strategy"),
    ("launch", _launch(tags={"dagster/retry_strategy": "SOMETIMES"}), "tag runherd/retry_strategy"),
    ("launch", _launch(tags={"runherd/retry_on_step_failure": "yes"}), "tag runherd/retry_on_step_failure"),
    ("launch", _launch(env={"K": 1}), "env: keys and values must be strings"),
    ("launch", _launch(launcher=7), "launcher: expected a launcher name"),
    ("launch", _launch(job="a\x00b"), "strings must not contain NUL"),
    ("launch", _launch(tags={"k\x00": 1}), "strings must not contain NUL"),
    ("terminate", {"v": 1}, "run_id: missing"),
    ("terminate", {"v": 1, "run_id": 5}, "run_id: expected a UUID"),
    ("terminate", {"run_id": UUID}, "v: expected 1"),
    ("reexecute", {"v": 1, "run_id": UUID, "strategy": "SOMETIMES"}, "strategy: expected"),
    ("reexecute", {"v": 1, "run_id": UUID, "strategy": 0}, "strategy: expected"),
    ("reexecute", {"v": 1, "run_id": UUID, "strategy": [1]}, "strategy: expected"),
    ("reexecute", {"v": 1, "run_id": UUID, "new_run_id": ""}, "new_run_id: expected a UUID"),
    ("reexecute", {"v": 1, "run_id": UUID, "tags": {"runherd/max_retries": True}}, "tag runherd/max_retries"),
    ("event", {**EVENT, "type": "RUN_EXPLODED"}, "type: unknown event type"),
    ("event", {**EVENT, "type": None}, "type: expected an event type"),
    ("event", {**EVENT, "attempt": -1}, "attempt: expected an integer from 0"),
    ("event", {**EVENT, "seq": 2**31}, "seq: expected an integer from 0"),
    ("event", {**EVENT, "seq": True}, "seq: expected an integer"),
    ("event", {**EVENT, "run_id": None}, "run_id: expected a UUID"),
    ("event", {**EVENT, "data": []}, "data: expected an object"),
    ("event", {**EVENT, "ts": "yesterday"}, "ts: expected an RFC 3339 timestamp"),
    ("event", {**EVENT, "ts": "2024-01-01"}, "ts: expected an RFC 3339 timestamp"),
    ("event", {**EVENT, "ts": "2024-W01-1T00:00:00"}, "ts: expected an RFC 3339 timestamp"),
    ("event", {**EVENT, "ts": "2024-01-01T00:00:00.1234567Z"}, "ts: expected an RFC 3339 timestamp"),
    ("event", {**EVENT, "source": 5}, "source: expected a string"),
    ("heartbeat", {**BEAT, "attempt": 0}, "attempt: expected an integer from 1"),
    ("heartbeat", {**BEAT, "attempt": "1"}, "attempt: expected an integer"),
    ("heartbeat", {**BEAT, "ts": 1700000000}, "ts: expected a timestamp"),
    ("heartbeat", {k: v for k, v in BEAT.items() if k != "run_id"}, "run_id: expected a UUID"),
]

# Refused by the validator only: JSON Schema cannot see the step graph.
GRAPH = [
    (_launch(steps=[{"key": "a", "command": ["x"], "deps": ["b"]}]), "step 'a' depends on unknown step 'b'"),
    (_launch(steps=[{"key": "a", "command": ["x"]}, {"key": "a", "call": "m:f"}]), "duplicate step key 'a'"),
    (_launch(steps=[{"key": "a", "command": ["x"], "deps": ["a"]}]), "steps form a cycle: a -> a"),
    (
        _launch(steps=[{"key": "a", "command": ["x"], "deps": ["b"]}, {"key": "b", "command": ["x"], "deps": ["a"]}]),
        "steps form a cycle",
    ),
    # and the calendar
    (_launch(), None),
]


@pytest.mark.parametrize(("kind", "body", "reason"), BAD)
def test_corpus_of_bad_bodies_is_refused_by_both(kind: str, body: Any, reason: str) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    refused = fb.verdict(kind, raw)
    assert refused is not None and refused.startswith(reason), refused
    assert not schema_ok(kind, raw)


@pytest.mark.parametrize(("body", "reason"), [g for g in GRAPH if g[1] is not None])
def test_the_step_graph_is_the_validators_alone(body: dict[str, Any], reason: str) -> None:
    """Unique keys, known deps and no cycle are not expressible in JSON Schema: the schema accepts
    these, the validator refuses them (the doc's description says so)."""
    raw = orjson.dumps(body)
    refused = fb.verdict("launch", raw)
    assert refused is not None and refused.startswith(reason), refused
    assert schema_ok("launch", raw)


def test_calendar_dates_are_the_validators_alone() -> None:
    for ts in ("2024-02-30T00:00:00Z", "0001-01-01T00:00:00+01:00"):
        raw = orjson.dumps({**EVENT, "ts": ts})
        assert fb.verdict("event", raw) is not None
        assert schema_ok("event", raw)


# --- the validator's own fixes ---------------------------------------------------------------------


def test_validator_no_longer_crashes_or_lets_through() -> None:
    """Each of these crashed a consumer (TypeError, OverflowError) or was accepted before."""
    cases = [
        ("reexecute", {"v": 1, "run_id": UUID, "strategy": [1]}),  # TypeError: unhashable
        ("launch", _launch(tags={"runherd/retry_strategy": {"a": 1}})),  # TypeError: unhashable
        ("event", {**EVENT, "ts": "0001-01-01T00:00:00+01:00"}),  # OverflowError
        ("heartbeat", {**BEAT, "ts": "9999-12-31T23:59:59-01:00"}),  # OverflowError, later in the store
        ("launch", _launch(v=True)),  # True == 1
        ("reexecute", {"v": 1, "run_id": UUID, "strategy": ""}),  # defaulted to FROM_FAILURE
        ("launch", _launch(tags={"runherd/priority": 2**40})),  # failed the insert, retried 5 times
        ("launch", _launch(job="a\x00b")),  # failed the insert
        ("terminate", {"v": 1, "run_id": "urn:uuid:" + UUID}),
    ]
    for kind, body in cases:
        with pytest.raises(InvalidMessage):
            fb.PARSERS[kind](contract.decode(orjson.dumps(body)))


def test_heartbeat_times_are_utc() -> None:
    beat = contract.parse_heartbeat({**BEAT, "ts": "2026-01-01 01:00:00+01:00"})
    assert beat.ts.isoformat() == "2026-01-01T00:00:00+00:00"


def test_a_string_that_spells_a_nul_escape_is_not_a_nul() -> None:
    raw = orjson.dumps({**BEAT, "note": "\\u0000"})
    assert b"\\\\u0000" in raw
    assert fb.verdict("heartbeat", raw) is None


# --- status, built by SQL ------------------------------------------------------------------------------


async def test_status_bodies_built_by_postgresql_validate(env: harness.Env) -> None:
    rows = await env.store.fetch(
        "SELECT runherd_status_body($1, 'nightly.etl', 'STARTED', 'STARTING', 1, NULL, now(), $2, NULL) AS a,"
        " runherd_status_body($1, 'j', 'QUEUED', NULL, 0, 'queued', '0001-01-01 00:00:00+00', '{}', $1) AS b,"
        " runherd_status_body($1, 'j', 'FAILURE', 'STARTED', 2147483647, 'a sentence', now(), '{}', NULL) AS c",
        uuid.UUID(UUID),
        {"team": "data", "runherd/priority": 5},
    )
    for body in rows[0].values():
        data = body if isinstance(body, dict) else orjson.loads(body)
        assert VALIDATORS["status"].is_valid(data), [e.message for e in VALIDATORS["status"].iter_errors(data)]
    bad = {**orjson.loads(orjson.dumps(rows[0]["a"])), "status": "RUNNING"}
    assert not VALIDATORS["status"].is_valid(bad)


# --- the topology ------------------------------------------------------------------------------------


def test_the_document_names_the_brokers_exchanges_and_queues() -> None:
    bindings = [c["bindings"]["amqp"] for c in DOC["channels"].values()]
    exchanges = {b["exchange"]["name"]: b["exchange"]["type"] for b in bindings if "exchange" in b}
    assert exchanges == {
        topology.COMMANDS: "direct",
        topology.EVENTS: "topic",
        topology.HEARTBEATS: "direct",
        topology.STATUS: "topic",
    }
    assert [b["queue"]["name"] for b in bindings if "queue" in b] == [topology.DEAD_QUEUE]
    assert {DOC["channels"][k]["address"] for k in ("launch", "terminate", "reexecute")} == {
        "launch",
        "terminate",
        "reexecute",
    }
    header = DOC["components"]["messages"]["deadLetter"]["headers"]
    assert topology.ERROR_HEADER in header["required"]
    for message in DOC["components"]["messages"].values():
        ref = message["payload"].get("$ref")
        assert ref is None or ref.split("/")[-1] in DOC["components"]["schemas"]
