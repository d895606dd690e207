"""Sharded event ingest (event_shards > 1, README "Sharded event ingest"): the topology routes each
run's events to its shard's queue and the rest to the events queue; the watermark is the least over
the shards; with three real monitor processes every shard has exactly one consumer, the one the
assignment names, each run's events are applied in order, and a SIGKILLed replica's shards move
within seconds with nothing lost."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from typing import Any

import pytest

from runherd import broker as topology
from runherd import config
from runherd.broker import Broker
from runherd.contract import SHARD_HEADER, event_shard
from runherd.sharding import LEASE_SECONDS, owner
from tests.harness import Env, eventually

SHARDS = 4


async def _depth(broker: Broker, queue: str) -> int:
    stats = await broker.queue_stats(queue)
    assert stats is not None, f"{queue} is declared"
    return stats[0]


async def test_sharded_topology_routes_by_the_shard_header_and_keeps_headerless_events(env: Env) -> None:
    broker = await Broker.connect(env.amqp_url, event_shards=SHARDS)
    try:
        run_ids = [str(uuid.uuid4()) for _ in range(40)]
        for run_id in run_ids:
            await broker.publish_event(run_id, b'{"v": 1}', shards=SHARDS)
        await broker.publish_event(run_ids[0], b'{"v": 1}')  # no shard header: the events queue
        await broker.publish(topology.EVENTS, f"run.{run_ids[0]}", b"{}", headers={SHARD_HEADER: "99"})
        expected = [sum(1 for r in run_ids if event_shard(r, SHARDS) == s) for s in range(SHARDS)]

        async def routed() -> bool:
            depths = [await _depth(broker, topology.shard_queue(s)) for s in range(SHARDS)]
            return depths == expected and await _depth(broker, topology.EVENTS_QUEUE) == 2

        await eventually(routed, timeout=10, what="each event in its shard's queue, the others in the events queue")
        # A client that declares without shards (the default) does not bind the events queue to
        # runherd.events again: an event with a shard header still reaches its shard only.
        plain = await Broker.connect(env.amqp_url)
        await plain.publish_event(run_ids[1], b'{"v": 1}', shards=SHARDS)
        await plain.close()
        expected[event_shard(run_ids[1], SHARDS)] += 1
        await eventually(routed, timeout=5, what="the event in its shard's queue alone")
    finally:
        await broker.close()


async def test_the_event_watermark_moves_only_when_every_shard_applied_its_canary(env: Env) -> None:
    assert await env.store.issue_event_canary_round([11, 12, 13])
    assert not await env.store.issue_event_canary_round([13, 14])  # a nonce taken: withdrawn whole
    assert await _one(env, "SELECT count(*) FROM event_canaries WHERE nonce = 14") == 0
    assert not await env.store.record_event_canary_rounds([12])
    assert not await env.store.record_event_canary_rounds([11])
    assert await _one(env, "SELECT applied_through FROM event_watermark") is None
    assert await env.store.record_event_canary_rounds([13])
    stamp = await _one(env, "SELECT applied_through FROM event_watermark")
    assert stamp is not None
    assert await _one(env, "SELECT count(*) FROM event_canaries") == 0


async def _live(env: Env) -> list[str]:
    """The monitor replicas whose lease is current."""
    rows = await env.store.fetch(
        "SELECT replica FROM monitor_replicas WHERE seen_at > clock_timestamp() - make_interval(secs => $1)",
        LEASE_SECONDS,
    )
    return [r["replica"] for r in rows]


async def _one(env: Env, sql: str) -> Any:
    rows = await env.store.fetch(sql)
    return next(iter(rows[0].values()))


async def _later(env: Env, than: Any) -> bool:
    return bool(await _one(env, "SELECT applied_through FROM event_watermark") > than)


def _ctl_json(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", *args, "--formatter", "json"], check=True, capture_output=True, timeout=60
    ).stdout
    return list(json.loads(out or b"[]"))


def _shard_consumers(vhost: str) -> dict[str, list[str]]:
    """Shard queue -> the connection names of its consumers (rabbitmqctl)."""
    consumers = _ctl_json("list_consumers", "-p", vhost, "queue_name", "channel_pid")
    connection_of = {c["pid"]: c["connection"] for c in _ctl_json("list_channels", "pid", "connection")}
    names = {}
    for c in _ctl_json("list_connections", "pid", "client_properties"):
        props = {p[0]: p[2] for p in c["client_properties"]}
        names[c["pid"]] = props.get("connection_name", "")
    found: dict[str, list[str]] = {topology.shard_queue(s): [] for s in range(SHARDS)}
    for c in consumers:
        if c["queue_name"] in found:
            found[c["queue_name"]].append(names.get(connection_of.get(c["channel_pid"], ""), "?"))
    return found


@pytest.mark.slow
async def test_three_monitors_share_the_shards_keep_order_and_take_over_a_killed_one(env: Env) -> None:
    # 150 workers boot in a burst: a start timeout that fits that on 2 busy cores.
    env.configure(event_shards=SHARDS, run_monitoring={"heartbeat_timeout_seconds": 10, "start_timeout_seconds": 120})
    env.raw["run_launcher"] = {"name": "sim", "config": {"step_seconds": 0.02, "workers_per_connection": 100}}
    env.cfg = config.from_mapping(env.raw)
    vhost = env.amqp_url.rsplit("/", 1)[1]
    monitors = [env.spawn("monitor") for _ in range(3)]
    await env.start({"launcher": 1, "heartbeat": 1})

    async def settled(expected: int) -> dict[str, list[str]] | None:
        live = await _live(env)
        if len(live) != expected:
            return None
        found = await asyncio.to_thread(_shard_consumers, vhost)
        ok = all(names == [owner(s, live)] for s, names in enumerate(found.values()))
        return found if ok else None

    await eventually(lambda: settled(3), timeout=30, what="each shard consumed by its one assigned replica")

    steps = [{"key": f"s{i}", "command": ["true"], "deps": [f"s{i - 1}"] if i else []} for i in range(4)]
    run_ids = [await env.submit(steps, job="sharded") for _ in range(150)]

    async def applied(n: int) -> bool:
        return await _one(env, "SELECT count(*) FROM events") >= n

    await eventually(lambda: applied(300), timeout=30, interval=0.05, what="ingest under way")
    live = await _live(env)
    victim_name = owner(0, live)  # the replica holding shard 0 dies mid-ingest
    victim = next(m for m in monitors if f":{m.pid}:" in victim_name)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    killed = time.monotonic()

    async def taken_over() -> bool:
        found = await settled(2)
        return found is not None and all(victim_name not in names for names in found.values())

    await eventually(taken_over, timeout=20, what="the killed replica's shards taken over")
    takeover = time.monotonic() - killed
    print(f"shards taken over {takeover:.1f} s after the SIGKILL")
    assert takeover < 10, f"shards moved after {takeover:.1f} s"

    async def all_done() -> bool:
        rows = await env.store.fetch("SELECT status, count(*) AS n FROM runs GROUP BY status")
        return {r["status"]: r["n"] for r in rows} == {"SUCCESS": len(run_ids)}

    await eventually(all_done, timeout=60, what="every run SUCCESS")
    # Each run's events were applied in the order its worker sent them, the launcher's report of
    # the exit after the worker's last event, and none refused.
    rows = await env.store.fetch(
        "SELECT run_id::text AS run_id, source, seq, type, refused FROM events"
        " WHERE run_id = ANY($1::uuid[]) ORDER BY id",
        run_ids,
    )
    by_run: dict[str, list[Any]] = {}
    for row in rows:
        by_run.setdefault(row["run_id"], []).append(row)
    assert set(by_run) == set(run_ids)
    for run_id, events in by_run.items():
        # (status changes are logged with the source that caused them and no seq)
        seqs = [e["seq"] for e in events if e["source"].startswith("worker") and e["seq"] is not None]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), (run_id, seqs)
        assert seqs == list(range(1, len(seqs) + 1)), (run_id, seqs)  # none lost
        types = [e["type"] for e in events]
        assert types.index("RUN_SUCCESS") < types.index("WORKER_EXITED"), (run_id, types)
        assert not [e for e in events if e["refused"]], (run_id, events)
    assert await _depth(env.broker, topology.DEAD_QUEUE) == 0
    # Canary rounds complete (one canary per shard and one through the unsharded events queue,
    # which the monitors still consume): the event watermark moves, and keeps moving.
    first = await eventually(
        lambda: _one(env, "SELECT applied_through FROM event_watermark"), timeout=10, what="the event watermark"
    )
    await eventually(lambda: _later(env, first), timeout=10, what="a later round complete after the takeover")
    for m in monitors:
        if m is not victim:
            assert m.poll() is None, "the surviving monitors still run"
