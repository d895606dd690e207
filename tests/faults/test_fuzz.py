"""Fuzzing every message body through the real services (issue 8, the fault suite's last paragraph).

10,000 bodies, mostly invalid (mutations of valid bodies, wrong types, non-JSON bytes, huge strings,
deep nesting, NUL), are published to the real broker with the launcher, heartbeat and monitor
services running in this process. Afterwards: no service task crashed or restarted, every invalid
message is in runherd.dead-letters with the validator's reason in ``x-runherd-error``, every valid
one was applied, and the input queues are empty.

The bodies are made before the services start: hypothesis (derandomized, so the run is
reproducible) draws valid bodies and a ``random.Random`` each, and the mutation engine of
fuzz_bodies derives the cases from them. The oracle is the contract's own validator, plus what the
services know that the contract cannot (a terminate needs a run, a reexecute a finished one).

Three rounds, because a command's outcome depends on the ones before it: launches; terminates of
some of the launched runs; then reexecutes of the canceled runs, events about them, heartbeats.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from runherd import auth, contract
from runherd import broker as topology
from runherd.heartbeat.watermark import CANARY_RUN_ID
from tests import harness
from tests.faults import fuzz_bodies as fb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Cases per kind, 10,000 in all. Heartbeats weigh most: their consumer is the lightest, and a
# loaded machine runs out of CPU first.
CASES = {"launch": 1500, "terminate": 700, "reexecute": 800, "event": 2000, "heartbeat": 5000}
# Each round feeds the three consumers (launcher, monitor, heartbeat) at once where it can.
ROUNDS = [["launch", "heartbeat"], ["terminate"], ["reexecute", "event"]]
BASES = 30  # valid bodies hypothesis draws per kind; the mutation engine derives the cases from them
VALID_SHARE = 0.2
# About 60 s for the whole test on a 2-core machine at load 10; three times that at load 25.
ROUND_SECONDS = 180
CASE_HEADER = "x-fuzz-case"


@dataclass
class Case:
    index: int
    kind: str
    body: bytes
    reason: str | None = None  # the validator's; None: the contract accepts it
    expect: str = "applied"  # or "dead"
    reason_prefix: str = ""  # for a body the contract accepts and a service refuses


@dataclass
class World:
    """What the services have been told so far, to predict what they do with the next round."""

    launched: set[str] = field(default_factory=set)
    jobs_without_id: set[str] = field(default_factory=set)
    canceled: set[str] = field(default_factory=set)
    reexecuted: dict[str, str] = field(default_factory=dict)  # new run id -> origin
    events: set[tuple[str, int, str, int]] = field(default_factory=set)
    crashes: list[str] = field(default_factory=list)  # bodies the validator raised anything but InvalidMessage on


def draw_bases(kind: str, seed: int) -> list[tuple[dict[str, Any], random.Random]]:
    """Valid bodies and a Random each, drawn by hypothesis (derandomized: the same every run)."""
    drawn: list[tuple[dict[str, Any], random.Random]] = []

    @settings(
        max_examples=BASES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(body=fb.VALID[kind](), rnd=st.randoms(use_true_random=False), salt=st.just(seed))
    def collect(body: dict[str, Any], rnd: random.Random, salt: int) -> None:
        if len(drawn) < BASES:
            # hypothesis' Random may repeat between examples; the index keeps the engines apart
            drawn.append((body, random.Random(f"{salt}-{len(drawn)}-{rnd.getrandbits(64)}")))

    collect()
    return drawn


def derive(kind: str, n: int, seed: int, targets: list[str]) -> list[bytes]:
    """``n`` bodies of ``kind``: about VALID_SHARE valid copies (with fresh ids, or pointing at one
    of ``targets``), the rest mutants."""
    bases = draw_bases(kind, seed)
    out: list[bytes] = []
    i = 0
    while len(out) < n:
        base, rnd = bases[i % len(bases)]
        i += 1
        body = copy.deepcopy(base)
        if kind == "launch":
            body["run_id"] = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
            body.pop("launcher", None) if rnd.random() < 0.5 else body.update(launcher="process")
        elif targets:
            body["run_id"] = rnd.choice(targets)
        if kind == "reexecute":
            body["new_run_id"] = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        if kind == "launch" and rnd.random() < 0.02:  # a few without run_id: runherd draws one
            del body["run_id"]
            body["job"] = f"fuzz-no-id-{len(out)}"
        out.append(orjson.dumps(body) if rnd.random() < VALID_SHARE else fb.mutate(kind, body, rnd))
    return out


def predict(case: Case, world: World) -> None:
    """What the services must do with ``case``, given what they were told before; updates ``world``
    with what it changes."""
    try:
        case.reason = fb.at_the_door(case.kind, case.body)
    except Exception as exc:  # a validator bug: the services must still dead-letter it, with some reason
        world.crashes.append(f"{case.kind} {case.body[:200]!r}: {exc!r}")
        case.expect = "dead"
        return
    if case.reason is not None:
        case.expect = "dead"
        return
    _predict_accepted(case, world, contract.decode(case.body))


def _predict_accepted(case: Case, world: World, data: dict[str, Any]) -> None:
    """For a body the contract accepts: whether the services apply it, or refuse it for what they know."""
    if case.kind == "launch":
        if data.get("launcher") not in (None, "process"):
            case.expect, case.reason_prefix = "dead", "launcher: "
        elif data.get("run_id") is None:
            world.jobs_without_id.add(data["job"])
        else:
            world.launched.add(contract.parse_run_id(data["run_id"]))
    elif case.kind == "terminate":
        run_id = contract.parse_terminate(data)
        if run_id in world.launched:
            world.canceled.add(run_id)
        else:
            case.expect, case.reason_prefix = "dead", "terminate: no run"
    elif case.kind == "reexecute":
        request = contract.parse_reexecute(data)
        if request.run_id in world.canceled:
            if data.get("new_run_id") is not None:
                world.reexecuted.setdefault(request.new_run_id, request.run_id)
        elif request.run_id in world.launched:
            case.expect, case.reason_prefix = "dead", "reexecute: run "
        else:
            case.expect, case.reason_prefix = "dead", "reexecute: no run"
    elif case.kind == "event":
        event = contract.parse_event(data)
        if auth.role_of(event.source) is None:  # signed by whom? No role may claim this source
            case.expect, case.reason_prefix = "dead", "unauthenticated"
        elif event.run_id in world.launched:
            world.events.add((event.run_id, event.attempt, event.source, event.seq))
        else:
            case.expect, case.reason_prefix = "dead", "event for unknown run"


def routing(kind: str) -> tuple[str, str, bool]:
    """(exchange, routing key, persistent)"""
    if kind == "event":
        return topology.EVENTS, "run.fuzz", True
    if kind == "heartbeat":
        return topology.HEARTBEATS, "hb", False
    return topology.COMMANDS, kind, True


class Problems(logging.Handler):
    """Log records that mean a service met something the validator let through: an unexpected
    exception, a consumer restarting, a task crashing."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR or "retrying in" in message or "one by one" in message:
            self.records.append(f"{record.name}: {message}")


def signature(keys: auth.Keys, case: Case) -> dict[str, str]:
    """The token a real worker (or launcher) would send with a valid event or heartbeat (runherd.auth)."""
    if case.reason is not None or case.kind not in ("event", "heartbeat"):
        return {}
    data = contract.decode(case.body)
    if case.kind == "heartbeat":
        beat = contract.parse_heartbeat(data)
        return {auth.TOKEN_HEADER: auth.token(keys.current, auth.WORKER, beat.run_id, beat.attempt)}
    event = contract.parse_event(data)
    role = auth.role_of(event.source)
    return {auth.TOKEN_HEADER: auth.token(keys.current, role, event.run_id, event.attempt)} if role else {}


async def publish(env: harness.Env, cases: list[Case]) -> None:
    keys = await env.store.event_keys()

    async def one(case: Case) -> None:
        exchange, key, persistent = routing(case.kind)
        headers = {CASE_HEADER: case.index, **signature(keys, case)}
        await env.broker.publish(exchange, key, case.body, persistent=persistent, headers=headers)

    for start in range(0, len(cases), 250):
        await asyncio.gather(*(one(c) for c in cases[start : start + 250]))


async def queue_depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count or 0


async def settle(env: harness.Env, channel: aio_pika.abc.AbstractChannel, dead: int, runs: int, timeout: float) -> None:
    """Until the round is through: the expected dead letters, runs, and empty input queues."""

    loop = asyncio.get_running_loop()
    shown = loop.time()

    async def through() -> bool:
        nonlocal shown
        depths = [await queue_depth(channel, q) for q in (topology.COMMANDS_QUEUE, topology.EVENTS_QUEUE)]
        n_runs = (await env.store.fetch("SELECT count(*) AS n FROM runs"))[0]["n"]
        n_dead = await queue_depth(channel, topology.DEAD_QUEUE)
        if loop.time() - shown > 5:
            shown = loop.time()
            print(f"  waiting: queues {depths}, {n_dead}/{dead} dead letters, {n_runs}/{runs} runs", flush=True)
        return sum(depths) == 0 and n_dead >= dead and n_runs >= runs

    await harness.eventually(through, timeout, interval=0.2, what=f"{dead} dead letters and {runs} runs")


async def read_dead_letters(channel: aio_pika.abc.AbstractChannel) -> dict[int, dict[str, Any]]:
    queue = await channel.declare_queue(topology.DEAD_QUEUE, passive=True)
    total = queue.declaration_result.message_count or 0
    found: dict[int, dict[str, Any]] = {}
    await channel.set_qos(prefetch_count=2000)
    seen = 0
    if total:
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages:
                headers = dict(message.headers or {})
                found[int(headers.get(CASE_HEADER, -1))] = headers
                seen += 1
                if seen >= total:
                    break
    return found


def round_of(kinds: list[str], world: World, start: int, seed: int) -> list[Case]:
    targets = {
        "terminate": sorted(world.launched)[::2],  # half of the runs get canceled
        "reexecute": sorted(world.canceled),
        "event": sorted(world.canceled),
        "heartbeat": sorted(world.launched),  # none yet in round 1: heartbeats of unknown runs are acked
    }
    cases: list[Case] = []
    for kind in kinds:
        for body in derive(kind, CASES[kind], seed + len(cases), targets.get(kind, [])):
            cases.append(Case(start + len(cases), kind, body))
    rnd = random.Random(seed)
    rnd.shuffle(cases)  # kinds interleaved within a round
    for case in cases:
        predict(case, world)
    return cases


async def test_fuzz_every_body_through_the_services(env: harness.Env) -> None:
    began = time.monotonic()
    problems = Problems()
    logging.getLogger("runherd").addHandler(problems)
    # thousands of "dead-lettered message" warnings, some quoting 150 KB strings, say nothing here
    quiet = logging.getLogger("runherd.broker")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    # Runs are queued, never launched: this test is about the messages, not about workers.
    env.configure(run_coordinator={"max_concurrent_runs": 0})
    running = await env.start(cfg=env.cfg)
    connection = await aio_pika.connect(env.amqp_url)
    world = World()
    every: list[Case] = []
    try:
        channel = await connection.channel()
        for number, kinds in enumerate(ROUNDS):
            t0 = time.monotonic()
            cases = round_of(kinds, world, len(every), seed=1000 * (number + 1))
            t1 = time.monotonic()
            every += cases
            await publish(env, cases)
            t2 = time.monotonic()
            runs = len(world.launched) + len(world.jobs_without_id) + len(world.reexecuted)
            try:
                await settle(env, channel, sum(c.expect == "dead" for c in every), runs, timeout=ROUND_SECONDS)
            except AssertionError as exc:  # say why: a consumer stuck on a poison message logs it
                raise AssertionError(f"{exc}\nservice problems: {problems.records[:10]}") from None
            print(
                f"round {number + 1} ({', '.join(kinds)}): {len(cases)} cases, generated in {t1 - t0:.1f} s, "
                f"published in {t2 - t1:.1f} s, through in {time.monotonic() - t2:.1f} s"
            )
        await harness.eventually(
            _empty(channel, topology.HEARTBEATS_QUEUE), 30, interval=0.2, what="an empty heartbeat queue"
        )
        assert running.supervisor.failure is None and not running.supervisor.stop.is_set(), "a service task crashed"
        await env.stop_all()
        for name in (topology.COMMANDS_QUEUE, topology.EVENTS_QUEUE):
            assert await queue_depth(channel, name) == 0, f"{name} is not empty"
        assert await _only_canaries_left(channel), f"{topology.HEARTBEATS_QUEUE} holds more than canaries"
        dead = await read_dead_letters(channel)
        await check(env, every, dead, world)
    finally:
        logging.getLogger("runherd").removeHandler(problems)
        quiet.setLevel(level)
        await connection.close()
    assert not problems.records, "\n".join(problems.records[:20])
    assert not world.crashes, f"the validator crashed on {len(world.crashes)} bodies: {world.crashes[:5]}"
    print(f"fuzz: {len(every)} cases in {time.monotonic() - began:.1f} s")


async def _only_canaries_left(channel: aio_pika.abc.AbstractChannel) -> bool:
    """Every heartbeat was written. What may remain is a heartbeat replica's own canary (every 0.1 s)
    published as it stopped, after its consumer had: it measures the pipeline and carries no run's
    word, and the next replica drops it."""
    queue = await channel.get_queue(topology.HEARTBEATS_QUEUE, ensure=False)
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        if orjson.loads(message.body).get("run_id") != CANARY_RUN_ID:
            return False
    return True


def _empty(channel: aio_pika.abc.AbstractChannel, name: str) -> Any:
    async def check() -> bool:
        return await queue_depth(channel, name) == 0

    return check


async def check(env: harness.Env, every: list[Case], dead: dict[int, dict[str, Any]], world: World) -> None:
    wrong: list[str] = []
    for case in every:
        headers = dead.get(case.index)
        if case.expect == "dead":
            error = None if headers is None else headers.get(topology.ERROR_HEADER)
            if not error:
                wrong.append(f"case {case.index} ({case.kind}) not dead-lettered with a reason: {case.body[:200]!r}")
            elif case.reason is not None and error != case.reason[:4000]:
                wrong.append(f"case {case.index} ({case.kind}): header {error!r}, validator {case.reason!r}")
            elif case.reason is None and not str(error).startswith(case.reason_prefix):
                wrong.append(f"case {case.index} ({case.kind}): header {error!r}, expected {case.reason_prefix!r}")
        elif headers is not None:
            wrong.append(
                f"case {case.index} ({case.kind}) valid but dead-lettered: {headers.get(topology.ERROR_HEADER)}"
            )
    unexpected = set(dead) - {c.index for c in every}
    assert not unexpected, f"dead letters of no case: {sorted(unexpected)[:10]}"

    rows = await env.store.fetch("SELECT run_id::text AS run_id, job, status, parent_run_id::text AS parent FROM runs")
    runs = {r["run_id"]: r for r in rows}
    jobs = {r["job"] for r in rows}
    wrong += [f"launched run {r} has no row" for r in world.launched - set(runs)]
    wrong += [f"launch without run_id (job {j}) has no row" for j in world.jobs_without_id - jobs]
    wrong += [f"run {r} not CANCELED" for r in world.canceled if runs.get(r, {}).get("status") != "CANCELED"]
    wrong += [
        f"reexecute {n} of {o}: no run" for n, o in world.reexecuted.items() if runs.get(n, {}).get("parent") != o
    ]
    logged = {
        (str(r["run_id"]), r["attempt"], r["source"], r["seq"])
        for r in await env.store.fetch("SELECT run_id, attempt, source, seq FROM events WHERE seq IS NOT NULL")
    }
    wrong += [f"event {e} not in the event log" for e in sorted(world.events - logged)[:20]]
    assert not wrong, f"{len(wrong)} problems:\n" + "\n".join(wrong[:30])

    per_kind = Counter((c.kind, c.expect, c.reason is None) for c in every)
    for kind in fb.KINDS:
        print(
            f"{kind:10} published {sum(v for k, v in per_kind.items() if k[0] == kind):5}  "
            f"dead-lettered {per_kind[(kind, 'dead', False)]:5} invalid + {per_kind[(kind, 'dead', True)]:4} refused"
            f" by the service  applied {per_kind[(kind, 'applied', True)]:5}"
        )
    print(
        f"total published {len(every)}, dead-lettered {len(dead)}, applied {len(every) - len(dead)}; runs {len(runs)}, "
        f"canceled {len(world.canceled)}, reexecuted {len(world.reexecuted)}, events logged {len(world.events)}"
    )
