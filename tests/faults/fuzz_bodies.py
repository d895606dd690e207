"""Message bodies for fuzzing: hypothesis strategies of valid bodies, a mutation engine that breaks
them, and the oracle (the contract's own validator) that says which are valid and why not.

Shared by tests/unit/test_asyncapi.py (schema against validator) and tests/faults/test_fuzz.py
(bodies through the real services). The mutation engine takes a ``random.Random`` that hypothesis
draws (``st.randoms(use_true_random=False)``), so a derandomized run is reproducible.
"""

from __future__ import annotations

import copy
import random
import string
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from hypothesis import strategies as st

from runherd import contract, limits
from runherd.errors import InvalidMessage

KINDS = ("launch", "terminate", "reexecute", "event", "heartbeat")
INT32 = 2**31 - 1

PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "launch": contract.parse_launch,
    "terminate": contract.parse_terminate,
    "reexecute": contract.parse_reexecute,
    "event": contract.parse_event,
    "heartbeat": contract.parse_heartbeat,
}

REQUIRED = {
    "launch": ("v", "job", "steps"),
    "terminate": ("v", "run_id"),
    "reexecute": ("v", "run_id"),
    "event": ("v", "run_id", "attempt", "seq", "type"),
    "heartbeat": ("v", "run_id", "attempt"),
}


def verdict(kind: str, body: bytes) -> str | None:
    """None if the contract accepts ``body`` as a ``kind``, else its reason (the dead letter's header)."""
    try:
        PARSERS[kind](contract.decode(body))
    except InvalidMessage as exc:
        return str(exc)
    return None


def at_the_door(kind: str, body: bytes) -> str | None:
    """What a service with the default ``limits`` does with ``body``: the limits first (as the
    launcher checks them before validating a command), then the contract."""
    if kind in ("launch", "reexecute"):
        try:
            limits.check_command(kind, contract.decode(body), limits.DEFAULT)
        except InvalidMessage as exc:
            return str(exc)
    return verdict(kind, body)


# --- valid bodies -----------------------------------------------------------------------------------

text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)
names = st.text(string.ascii_letters + string.digits + "_-. ", min_size=1, max_size=12)
identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
uuids = st.uuids().map(str)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
int_tags = st.integers(-INT32 - 1, INT32) | st.integers(-999, 999).map(str) | st.just(5.0)
bool_tags = st.booleans() | st.sampled_from(["true", "FALSE", "True", "false"])
strategies_ = st.sampled_from(["FROM_FAILURE", "ALL_STEPS"])


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    ts = draw(st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9998, 12, 31)))
    frac = draw(st.sampled_from(["", ".5", ".123", ".123456"]))
    offset = draw(
        st.sampled_from(["", "Z"])
        | st.builds(
            lambda s, h, m: f"{s}{h:02d}:{m:02d}", st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59)
        )
    )
    return ts.strftime("%Y-%m-%d") + draw(st.sampled_from("T ")) + ts.strftime("%H:%M:%S") + frac + offset


@st.composite
def tags(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = draw(st.dictionaries(names.filter(lambda k: "/" not in k), json_values, max_size=3))
    for prefix in draw(st.lists(st.sampled_from(contract.TAG_PREFIXES), unique=True)):
        for name in draw(st.lists(st.sampled_from(["max_runtime", "priority", "max_retries"]), unique=True)):
            out[prefix + name] = draw(int_tags)
        if draw(st.booleans()):
            out[prefix + "retry_on_step_failure"] = draw(bool_tags)
        if draw(st.booleans()):
            out[prefix + "retry_strategy"] = draw(strategies_)
    return out


@st.composite
def steps(draw: st.DrawFn) -> list[dict[str, Any]]:
    keys = draw(st.lists(text.filter(bool), min_size=1, max_size=5, unique=True))
    out = []
    for i, key in enumerate(keys):
        step: dict[str, Any] = {"key": key}
        if draw(st.booleans()):
            step["command"] = draw(st.lists(text, min_size=1, max_size=3))
        else:
            step["call"] = f"{draw(identifiers)}.{draw(identifiers)}:{draw(identifiers)}"
        deps = draw(st.lists(st.sampled_from(keys[:i]), unique=True)) if i else []
        if deps or draw(st.booleans()):
            step["deps"] = deps
        if draw(st.booleans()):
            step["timeout_seconds"] = draw(st.integers(1, 10**6) | st.floats(0.001, 1e6))
        out.append(step)
    return draw(st.permutations(out))


@st.composite
def launches(draw: st.DrawFn, run_ids: st.SearchStrategy[str] = uuids, launcher: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "run_id": draw(run_ids),
        "job": draw(text.filter(lambda j: bool(j.strip())) | names.filter(lambda j: bool(j.strip()))),
        "steps": draw(steps()),
    }
    if draw(st.booleans()):
        body["tags"] = draw(tags())
    if draw(st.booleans()):
        body["env"] = draw(st.dictionaries(text, text, max_size=3))
    if launcher or draw(st.booleans()):
        body["launcher"] = "process" if not launcher else draw(st.sampled_from([None, "process"]))
    return body


def _maybe(draw: st.DrawFn, body: dict[str, Any], key: str, values: st.SearchStrategy[Any]) -> None:
    if draw(st.booleans()):
        body[key] = draw(values)


@st.composite
def terminates(draw: st.DrawFn, run_ids: st.SearchStrategy[str] = uuids) -> dict[str, Any]:
    body = {"v": 1, "run_id": draw(run_ids)}
    _maybe(draw, body, "note", json_values)  # unknown fields are allowed (and ignored)
    return body


@st.composite
def reexecutes(draw: st.DrawFn, run_ids: st.SearchStrategy[str] = uuids) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "run_id": draw(run_ids), "new_run_id": draw(uuids)}
    _maybe(draw, body, "strategy", st.none() | strategies_)
    _maybe(draw, body, "tags", st.none() | tags())
    return body


@st.composite
def events(draw: st.DrawFn, run_ids: st.SearchStrategy[str] = uuids) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "run_id": draw(run_ids),
        "attempt": draw(st.integers(0, INT32)),
        "seq": draw(st.integers(0, INT32)),
        "type": draw(st.sampled_from(list(contract.EventType))).value,
    }
    for key in ("source", "step_key", "message"):
        _maybe(draw, body, key, st.none() | text)
    _maybe(draw, body, "data", st.none() | st.dictionaries(text, json_values, max_size=3))
    _maybe(draw, body, "ts", st.none() | st.just("") | timestamps())
    return body


@st.composite
def heartbeats(draw: st.DrawFn, run_ids: st.SearchStrategy[str] = uuids) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "run_id": draw(run_ids), "attempt": draw(st.integers(1, INT32))}
    _maybe(draw, body, "ts", st.none() | st.just("") | timestamps())
    return body


VALID: dict[str, Callable[..., st.SearchStrategy[dict[str, Any]]]] = {
    "launch": launches,
    "terminate": terminates,
    "reexecute": reexecutes,
    "event": events,
    "heartbeat": heartbeats,
}


# --- mutations ------------------------------------------------------------------------------------

WRONG = [None, 0, -1, 1.5, True, False, "", "x", [], {}, [1], {"a": 1}, 2**31, -(2**31) - 1, 10**19]
BAD_UUIDS = [
    "12345678123456781234567812345678",
    "{12345678-1234-5678-1234-567812345678}",
    "urn:uuid:12345678-1234-5678-1234-567812345678",
    "12345678-1234-5678-1234-56781234567",
    " 12345678-1234-5678-1234-567812345678",
    "not-a-uuid",
    12345678,
]
BAD_TS = [
    "yesterday",
    "2024-01-01",
    "2024-02-30T00:00:00Z",
    "2024-01-01T25:00:00Z",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "2024-01-01T00:00:00.1234567Z",
    "2024-W01-1T00:00:00",
    "20240101T000000",
    "2024-01-01x00:00:00",
    1700000000,
]
NOT_JSON = [b"", b"{", b"\xff\xfe", b"not json", b'{"v": 1,}', b"[" * 2000 + b"]" * 2000, b"NaN", b"1e400"]
DEEP = "\x01deep\x01"


def huge(rnd: random.Random) -> str:
    return rnd.choice(string.ascii_letters) * rnd.choice([2_000, 20_000, 20_000, 150_000])


def _string_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, str):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _string_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _string_paths(v, (*path, i))]
    return []


def _set(body: Any, path: tuple[Any, ...], value: Any) -> None:
    for part in path[:-1]:
        body = body[part]
    body[path[-1]] = value


def _launch_mutation(body: dict[str, Any], rnd: random.Random) -> None:  # noqa: C901 - flat on purpose
    steps = body["steps"]
    step = rnd.choice(steps)
    choice = rnd.randrange(17)
    if choice == 0:
        body["steps"] = []
    elif choice == 1:
        step["deps"] = [*(step.get("deps") or []), "no-such-step-\x01"]
    elif choice == 2:  # a cycle: the first step depends on the last, the last on the first
        steps[0]["deps"] = [steps[-1]["key"]]
        steps[-1]["deps"] = [*(steps[-1].get("deps") or []), steps[0]["key"]]
    elif choice == 3:
        steps.append(copy.deepcopy(step))
    elif choice == 4:
        step["command"], step["call"] = ["true"], "m:f"
    elif choice == 5:
        step.pop("command", None)
        step.pop("call", None)
    elif choice == 6:
        step.pop("command", None)
        step["call"] = rnd.choice(["nocolon", ":f", "m:", "", 5])
    elif choice == 7:
        step.pop("call", None)
        step["command"] = rnd.choice([[], [1], "echo hi", [None]])
    elif choice == 8:
        step["timeout_seconds"] = rnd.choice([0, -1, "10", True])
    elif choice == 9:
        step[rnd.choice(["key", "deps"])] = rnd.choice(WRONG)
    elif choice == 10:
        step["retries"] = 3  # unknown step field
    elif choice == 11:
        body["job"] = rnd.choice(["", "   ", "\u2003", "j" * 201, 5])
    elif choice == 12:
        tags = body.setdefault("tags", {}) if isinstance(body.get("tags"), dict) else {}
        body["tags"] = tags
        prefix = rnd.choice(contract.TAG_PREFIXES)
        name, value = rnd.choice(
            [
                ("priority", "high"),
                ("priority", 2**40),
                ("priority", " 5"),
                ("priority", "\u0661"),  # a digit to int(), not to the contract
                ("priority", 5.5),
                ("max_runtime", "99999999999"),
                ("max_retries", True),
                ("max_retries", []),
                ("retry_strategy", "SOMETIMES"),
                ("retry_strategy", [1]),
                ("retry_strategy", {"a": 1}),
                ("retry_on_step_failure", "yes"),
                ("retry_on_step_failure", 1),
            ]
        )
        tags[prefix + name] = value
    elif choice == 13:
        body["env"] = rnd.choice([{"K": 1}, ["K=V"], "K=V", {"K": None}])
    elif choice == 14:
        body["launcher"] = rnd.choice(["docker", "", "nope", 7])
    elif choice == 15:
        body["extra"] = 1  # unknown top-level field
    else:
        body["steps"] = rnd.choice(["extract", {"key": "a"}, [1], [None]])


def _kind_mutation(kind: str, body: dict[str, Any], rnd: random.Random) -> None:
    if kind == "launch":
        _launch_mutation(body, rnd)
    elif kind == "reexecute":
        key, value = rnd.choice(
            [("strategy", v) for v in ("SOMETIMES", 0, "", [1], {"a": 1}, False)]
            + [("new_run_id", v) for v in ("", 0, False, "abc", [1])]
            + [("tags", v) for v in ([], "x", {"runherd/priority": "high"}, {"dagster/retry_strategy": [1]})]
        )
        body[key] = value
    elif kind == "event":
        key, value = rnd.choice(
            [("type", v) for v in ("RUN_EXPLODED", "run_start", "", 5)]
            + [(k, v) for k in ("attempt", "seq") for v in (-1, 2**31, 1.0, True, "1", None)]
            + [("ts", v) for v in BAD_TS]
            + [("data", v) for v in ([], "x", 5)]
            + [(k, v) for k in ("source", "step_key", "message") for v in (5, [], {})]
        )
        body[key] = value
    elif kind == "heartbeat":
        key, value = rnd.choice([("attempt", v) for v in (0, -1, 2**31, 1.0, True, "1")] + [("ts", v) for v in BAD_TS])
        body[key] = value
    else:
        body["run_id"] = rnd.choice(BAD_UUIDS)


def mutate(
    kind: str, body: dict[str, Any], rnd: random.Random, depths: tuple[int, ...] = (50, 500, 1100, 5000)
) -> bytes:
    """A broken (or, now and then, still valid) variant of a valid ``body``, as bytes. Nesting
    deeper than 1024 is not JSON to orjson; ``depths`` lets a caller keep within its own limits."""
    body = copy.deepcopy(body)
    out = _mutate_once(kind, body, rnd, depths, range(12))
    if out is None and rnd.random() < 0.15:  # now and then a second fault in the same body
        out = _mutate_once(kind, body, rnd, depths, range(2, 8))
    return orjson.dumps(body) if out is None else out


def _mutate_once(  # noqa: C901 - one branch per kind of fault, on purpose flat
    kind: str, body: dict[str, Any], rnd: random.Random, depths: tuple[int, ...], choices: range
) -> bytes | None:
    """Changes ``body`` in place, or returns the bytes to send instead."""
    choice = rnd.choice(choices)
    if choice == 0:
        return rnd.choice(NOT_JSON) if rnd.random() < 0.7 else orjson.dumps(body)[: rnd.randrange(1, 20)]
    if choice == 1:
        return orjson.dumps(rnd.choice([[body], "launch", 1, None, True]))
    if choice == 2:
        if rnd.random() < 0.3:
            body.pop("v", None)
        else:
            body["v"] = rnd.choice([0, 2, "1", True, None, 1.5, [1]])
    elif choice == 3:
        body.pop(rnd.choice(REQUIRED[kind][1:]), None)
    elif choice == 4:
        body[rnd.choice(REQUIRED[kind][1:])] = rnd.choice(WRONG)
    elif choice == 5:
        body["run_id"] = rnd.choice([*BAD_UUIDS, str(uuid.UUID(int=rnd.getrandbits(128)))])  # or an unknown run
    elif choice == 6:  # a huge string somewhere (valid or not, depending on where)
        paths = _string_paths(body)
        if paths:
            _set(body, rnd.choice(paths), huge(rnd))
        else:
            body["padding"] = huge(rnd)
    elif choice == 7:  # NUL in a string, or in a key
        paths = _string_paths(body)
        if paths and rnd.random() < 0.7:
            _set(body, rnd.choice(paths), "a\x00b")
        else:
            body["k\x00"] = 1
    elif choice == 8:  # deep nesting: past orjson's limit of 1024 (not JSON to runherd), or within it
        body[rnd.choice(["tags", "data", "note", "steps"])] = DEEP
        depth = rnd.choice(depths)
        return orjson.dumps(body).replace(orjson.dumps(DEEP), b"[" * depth + b"]" * depth)
    elif kind == "launch" and not (
        isinstance(body.get("steps"), list) and body["steps"] and all(isinstance(s, dict) for s in body["steps"])
    ):
        body["job"] = ""
    else:
        _kind_mutation(kind, body, rnd)
    return None
