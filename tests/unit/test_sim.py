"""The sim launcher's pure parts: its config, a run's script from its env, the rates, the commands,
and the protocol of a fleet in a process of its own."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from runherd.config import RunLauncherConfig
from runherd.errors import ConfigError, InvalidMessage
from runherd.launchers import build
from runherd.launchers.base import WorkerExit, WorkerRun
from runherd.launchers.sim import (
    SimConfig,
    SimLauncher,
    command_body,
    directives,
    fate,
    killed_exit,
    parse_command,
    parse_config,
)
from runherd.launchers.sim_host import encode, exit_from_wire, read_frame, run_from_wire, to_wire


def test_the_defaults_and_a_full_config() -> None:
    assert parse_config({}) == SimConfig()
    cfg = parse_config({"step_seconds": 0.5, "workers_per_connection": 50, "crash_rate": 0.01, "seed": 3})
    assert (cfg.step_seconds, cfg.workers_per_connection, cfg.crash_rate, cfg.seed) == (0.5, 50, 0.01, 3)
    assert cfg.fleet_process is False
    assert parse_config({"fleet_process": True}).fleet_process is True


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"log_dir": "x"}, "log_dir"),
        ({"step_seconds": -1}, "step_seconds"),
        ({"crash_rate": 1.5}, "crash_rate"),
        ({"hang_rate": True}, "hang_rate"),
        ({"workers_per_connection": 0}, "workers_per_connection"),
        ({"seed": "x"}, "seed"),
        ({"fleet_process": "yes"}, "fleet_process"),
        ({"fleet_process": 1}, "fleet_process"),
        ({"fleet_process": None}, "fleet_process"),
    ],
)
def test_a_bad_config_names_its_key(raw: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        parse_config(raw)


def test_it_is_a_builtin_launcher() -> None:
    launcher = build(RunLauncherConfig(name="sim", config={"step_seconds": 0}))
    assert isinstance(launcher, SimLauncher) and launcher.name == "sim"


def test_the_rates_split_one_draw() -> None:
    cfg = SimConfig(crash_rate=0.1, hang_rate=0.2, step_failure_rate=0.3)
    assert [fate(cfg, r) for r in (0.0, 0.09, 0.11, 0.28, 0.31, 0.58, 0.61, 0.99)] == [
        "crash",
        "crash",
        "hang",
        "hang",
        "fail",
        "fail",
        None,
        None,
    ]
    assert fate(SimConfig(), 0.0) is None


def test_a_run_is_scripted_by_its_env() -> None:
    script = directives(
        {"RUNHERD_SIM_OUTCOME": "crash", "RUNHERD_SIM_EXIT_CODE": "3", "RUNHERD_SIM_STEP_SECONDS": "0.5", "X": "y"}
    )
    assert (script.outcome, script.exit_code, script.step_seconds, script.say) == ("crash", 3, 0.5, None)
    assert directives({}).outcome is None
    with pytest.raises(InvalidMessage, match="RUNHERD_SIM_OUTCOME"):
        directives({"RUNHERD_SIM_OUTCOME": "explode"})
    with pytest.raises(InvalidMessage):
        directives({"RUNHERD_SIM_EXIT_CODE": "three"})


def test_a_crash_is_reported_as_a_kill_unless_it_has_a_code() -> None:
    killed = killed_exit("r", 2, None)
    assert (killed.exit_code, killed.signal, killed.reason) == (137, 9, "SIGKILL")
    assert (killed_exit("r", 2, 3).exit_code, killed_exit("r", 2, 3).signal) == (3, None)


def test_commands_round_trip_and_bad_ones_are_refused() -> None:
    assert parse_command(orjson.loads(command_body("crash", ["a", "b"]))) == ("crash", {"a", "b"})
    assert parse_command(orjson.loads(command_body("succeed"))) == ("succeed", None)
    for bad in ({"v": 1, "action": "explode"}, {"v": 2, "action": "crash"}, {"v": 1, "action": "hang", "run_ids": "a"}):
        with pytest.raises(InvalidMessage):
            parse_command(bad)
    with pytest.raises(InvalidMessage):
        command_body("explode")


# --- the fleet process's protocol ---------------------------------------------------------------


def _reader(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def test_frames_carry_messages_and_end_with_the_stream() -> None:
    first = [{"op": "launch", "n": 1, "text": "a\nb \u00e9"}, {"op": "command", "run_ids": None}]
    reader = _reader(encode(first) + encode([{"op": "reply", "id": 3, "value": True}]) + encode([])[:3])
    assert await read_frame(reader) == first
    assert await read_frame(reader) == [{"op": "reply", "id": 3, "value": True}]
    assert await read_frame(reader) is None  # a frame cut short: the other side is gone


async def test_a_frame_that_is_not_messages_is_refused() -> None:
    body = orjson.dumps({"op": "launch"})
    with pytest.raises(InvalidMessage):
        await read_frame(_reader(len(body).to_bytes(4, "big") + body))
    with pytest.raises(InvalidMessage):
        await read_frame(_reader(encode([{"no": "op"}])))


def test_runs_exits_and_configs_cross_the_wire_unchanged() -> None:
    run = WorkerRun(
        run_id="r",
        attempt=2,
        job="j",
        env={"RUNHERD_SIM_OUTCOME": "wait"},
        tags={"team": "x"},
        command=["true"],
        max_runtime_seconds=9,
        plan='{"v": 1}',
        worker_id="w",
        executor="launcher",
    )
    exit_ = WorkerExit("r", 2, 137, 9, "SIGKILL", "killed")
    cfg = parse_config({"step_seconds": 0.5, "seed": 3, "fleet_process": True, "amqp_url": "amqp://x"})
    wire = orjson.loads(orjson.dumps([to_wire(run), to_wire(exit_), to_wire(cfg)]))
    assert run_from_wire(wire[0]) == run
    assert exit_from_wire(wire[1]) == exit_
    assert SimConfig(**wire[2]) == cfg
