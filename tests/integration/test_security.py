"""Issue 9, least privilege: broker users per role, authenticated events, secrets that stay secret.

On the machine's real RabbitMQ: ``scripts/rabbitmq-users.sh`` makes one user per role in a vhost of
this module's own (users and vhost removed afterwards); the services, the worker and a client each
run as their own user. Every attack a compromised worker could try with its credential is tried
here and must be refused by the broker or by runherd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
import orjson
import prometheus_client
import pytest

from runherd import auth
from runherd.broker import DEAD_QUEUE, ERROR_HEADER, Broker, BrokerError
from runherd.client import Client, Launch, Step
from runherd.contract import Event, EventType, heartbeat_body, now_iso
from runherd.errors import RunherdError
from runherd.store import Store
from tests import harness
from tests.harness import PYTHON, ROOT, Env, eventually

SCRIPT = ROOT / "scripts" / "rabbitmq-users.sh"
ROLES = ("launcher", "heartbeat", "monitor", "services", "worker", "client")
_AMQP = urlsplit(harness.AMQP)


@dataclass
class Roles:
    vhost: str
    prefix: str
    passwords: dict[str, str]

    def url(self, role: str, password: str | None = None, port: int | None = None) -> str:
        secret = self.passwords[role] if password is None else password
        return f"amqp://{self.prefix}{role}:{secret}@{_AMQP.hostname}:{port or _AMQP.port or 5672}/{self.vhost}"


@pytest.fixture(scope="module")
def roles() -> Iterator[Roles]:
    """The script's users, each with a password of its own, in a vhost the script creates; both
    removed afterwards. Three rabbitmqctl calls in all: each starts an Erlang VM."""
    tag = uuid.uuid4().hex[:10]
    vhost, prefix = f"runherd-sec-{tag}", f"rh-t-{tag}-"
    passwords = {role: f"pw-{role}-{secrets.token_hex(8)}" for role in ROLES}
    env = {**os.environ, **{f"RUNHERD_RABBITMQ_{r.upper()}_PASSWORD": p for r, p in passwords.items()}}
    try:
        out = subprocess.run(
            ["bash", str(SCRIPT), "--vhost", vhost, "--prefix", prefix],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert [line.split()[:2] for line in out.splitlines()] == [[r, prefix + r] for r in ROLES]
        yield Roles(vhost, prefix, passwords)
    finally:
        subprocess.run(["bash", str(SCRIPT), "--prefix", prefix, "--delete"], check=True, timeout=120)
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False, capture_output=True, timeout=120)


async def _declare(url: str) -> None:
    broker = await Broker.connect(url)
    await broker.close()


async def _refused(connection: aio_pika.abc.AbstractConnection, attack: Callable[[Any], Awaitable[Any]]) -> str:
    """Run ``attack`` on a fresh channel; it must be refused by the broker. Returns the refusal."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        await asyncio.wait_for(attack(channel), 10)
    except (aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelPreconditionFailed) as exc:
        return str(exc)
    raise AssertionError("the broker let it through")


def _message(body: bytes, **properties: Any) -> aio_pika.Message:
    return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties)


# --- item 2: the worker's broker identity --------------------------------------------------------


async def test_a_worker_credential_publishes_events_and_heartbeats_and_nothing_else(roles: Roles) -> None:
    await _declare(roles.url("services"))
    launch = orjson.dumps({"v": 1, "job": "evil", "steps": [{"key": "x", "command": ["sh", "-c", "id"]}]})
    connection = await aio_pika.connect(roles.url("worker"))
    async with connection:

        async def publish(exchange: str, key: str, body: bytes = b"{}", **props: Any) -> Callable[[Any], Any]:
            async def go(channel: Any) -> Any:
                target = (
                    channel.default_exchange if exchange == "" else await channel.get_exchange(exchange, ensure=False)
                )
                return await target.publish(_message(body, **props), routing_key=key)

            return go

        async def consume(queue: str) -> Callable[[Any], Any]:
            async def go(channel: Any) -> Any:
                return await (await channel.get_queue(queue, ensure=False)).consume(_ignore)

            return go

        attacks: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "publish a launch": await publish("runherd.commands", "launch", launch),
            "publish a launch through the default exchange": await publish("", "runherd.launcher.commands", launch),
            "publish a status": await publish("runherd.status", "SUCCESS.x"),
            "publish a dead letter": await publish("runherd.dead", ""),
            "report as the launcher (user_id)": await publish(
                "runherd.events", "run.x", user_id=f"{roles.prefix}launcher"
            ),
        }
        for queue in ("runherd.launcher.commands", "runherd.monitor.events", "runherd.heartbeats", DEAD_QUEUE):
            attacks[f"consume {queue}"] = await consume(queue)
            attacks[f"basic.get from {queue}"] = lambda ch, q=queue: _get(ch, q)
        attacks |= {
            "delete runherd.monitor.events": lambda ch: ch.queue_delete("runherd.monitor.events"),
            "purge runherd.launcher.commands": lambda ch: _purge(ch, "runherd.launcher.commands"),
            "delete the exchange runherd.events": lambda ch: ch.exchange_delete("runherd.events"),
            "declare a queue of its own": lambda ch: ch.declare_queue("evil", auto_delete=True),
            "bind a queue to runherd.events": lambda ch: _bind(ch, "runherd.heartbeats", "runherd.events"),
        }
        refusals = {name: await _refused(connection, attack) for name, attack in attacks.items()}
        assert all("ACCESS_REFUSED" in r or "PRECONDITION_FAILED" in r for r in refusals.values()), refusals
        assert "PRECONDITION_FAILED" in refusals["report as the launcher (user_id)"]

        # What a worker is for: both publishes are confirmed.
        channel = await connection.channel(publisher_confirms=True)
        for exchange, key in (("runherd.events", "run.x"), ("runherd.heartbeats", "hb")):
            await (await channel.get_exchange(exchange, ensure=False)).publish(_message(b"{}"), routing_key=key)

    # Nothing reached the launcher; every queue is still there (passive declares).
    async with await aio_pika.connect(roles.url("services")) as services:
        channel = await services.channel()
        commands = await channel.declare_queue("runherd.launcher.commands", passive=True)
        assert commands.declaration_result.message_count == 0
        for queue in ("runherd.monitor.events", "runherd.heartbeats", DEAD_QUEUE):
            await channel.declare_queue(queue, passive=True)


async def _heartbeat_of(env: Env, run_id: str) -> bool:
    rows = await env.store.fetch("SELECT last_heartbeat_at FROM attempts WHERE run_id = $1", uuid.UUID(run_id))
    return bool(rows) and rows[0]["last_heartbeat_at"] is not None


def _connected_users(vhost: str) -> str:
    args = ["rabbitmqctl", "-q", "list_connections", "-p", vhost, "user"]
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120).stdout


async def _get(channel: Any, queue: str) -> Any:
    return await (await channel.get_queue(queue, ensure=False)).get(fail=False)


async def _purge(channel: Any, queue: str) -> Any:
    return await (await channel.get_queue(queue, ensure=False)).purge()


async def _bind(channel: Any, queue: str, exchange: str) -> Any:
    return await (await channel.get_queue(queue, ensure=False)).bind(exchange, routing_key="#")


async def test_a_client_credential_cannot_touch_runherds_queues(roles: Roles) -> None:
    await _declare(roles.url("services"))
    connection = await aio_pika.connect(roles.url("client"))
    async with connection:
        for attack in (
            lambda ch: _get(ch, "runherd.launcher.commands"),
            lambda ch: ch.queue_delete("runherd.launcher.commands"),
            lambda ch: _purge(ch, "runherd.monitor.events"),
            lambda ch: _get(ch, DEAD_QUEUE),
        ):
            assert "ACCESS_REFUSED" in await _refused(connection, attack)
        async with await aio_pika.connect(roles.url("worker")) as worker:
            forged = await _refused(worker, lambda ch: ch.declare_queue("runherd.follow.spy", exclusive=True))
            assert "ACCESS_REFUSED" in forged


# --- items 2 and 4: the roles do their job, and no password leaks -----------------------------


def _with_password(db_url: str, password: str) -> str:
    parts = urlsplit(db_url)
    return parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port}").geturl()


async def _cli(*args: str, db_url: str, amqp_url: str) -> tuple[int, str]:
    urls = {"RUNHERD_DATABASE_URL": db_url, "RUNHERD_AMQP_URL": amqp_url, "RUNHERD_CONFIG": os.devnull}
    code, out, err = await harness.run_cli(*args, env=urls, timeout=60)
    return code, out + err


async def test_each_role_does_its_job_as_its_own_user_and_no_password_leaks(
    env: Env, roles: Roles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pg_password = f"pgpw-{secrets.token_hex(8)}"
    db_url = _with_password(env.db_url, pg_password)  # trust auth here: accepted, never checked
    logs = env.tmp / "logs"

    def cfg(role: str) -> Any:
        return harness.fast_config(db_url, roles.url(role), logs, worker_amqp_url=roles.url("worker"))

    await _declare(roles.url("services"))
    for role in ("launcher", "heartbeat", "monitor"):
        await env.start({role: 1}, cfg=cfg(role))
    texts: dict[str, str] = {}
    flag = env.tmp / "go"
    step = Step("probe", command=["sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done; echo step ran"])
    changes: list[Any] = []

    async def collect(stream: Any) -> None:
        async for change in stream:
            changes.append(change)

    client = await Client.connect(roles.url("client"))
    async with client, client.statuses(job="sec") as stream:  # the client's own private queue
        follower = asyncio.ensure_future(collect(stream))
        launch = Launch("sec", [step], tags={"t": "1"})
        await client.launch(launch)
        # While the step waits: a heartbeat written (worker -> heartbeat service), and who is connected.
        await eventually(lambda: _heartbeat_of(env, launch.run_id), timeout=30, what="a heartbeat written")
        users = set((await asyncio.to_thread(_connected_users, roles.vhost)).split())
        flag.touch()
        result = await client.wait(launch.run_id, timeout=30)
        assert result.status == "SUCCESS", result.reason
        await eventually(lambda: len(changes) >= 4, what="every status change followed")
        follower.cancel()
    texts["status messages"] = repr(changes)
    # Each role was connected as its own user, the worker too.
    assert {roles.prefix + r for r in ("launcher", "heartbeat", "monitor", "worker", "client")} <= users
    [attempt] = await env.store.fetch("SELECT handle FROM attempts WHERE run_id = $1", uuid.UUID(launch.run_id))

    # The failing paths: a broker and a database that refuse the connection, with the password in the URL.
    for url in (roles.url("worker", port=1), roles.url("worker", password=roles.passwords["worker"] + "-wrong")):
        with pytest.raises(BrokerError) as broker_error:
            await Broker.connect(url, timeout=3)
        texts[f"broker error {url.split('@')[1]}"] = str(broker_error.value) + repr(broker_error.value)
    bad_db = _with_password(env.db_url.replace(f":{urlsplit(env.db_url).port}/", ":1/"), pg_password)
    with pytest.raises(RunherdError) as store_error:
        await Store.connect(bad_db)
    texts["store error"] = str(store_error.value)
    code, texts["runherd show"] = await _cli("show", launch.run_id, db_url=db_url, amqp_url=roles.url("services"))
    assert code == 0 and "SUCCESS" in texts["runherd show"], texts["runherd show"]
    code, texts["runherd show --json"] = await _cli(
        "show", launch.run_id, "--json", db_url=db_url, amqp_url=roles.url("services")
    )
    code, texts["runherd runs, unreachable"] = await _cli("runs", db_url=bad_db, amqp_url=roles.url("client", port=1))
    assert code == 1 and "cannot connect" in texts["runherd runs, unreachable"], texts["runherd runs, unreachable"]

    texts["events"] = orjson.dumps(await env.events(launch.run_id), default=str).decode()
    texts["run"] = orjson.dumps(await env.run(launch.run_id), default=str).decode()
    texts["handle"] = orjson.dumps(attempt["handle"]).decode()
    texts["metrics"] = prometheus_client.generate_latest().decode()
    texts["worker logs"] = "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())
    assert "step ran" in texts["worker logs"]
    await env.stop_all()
    texts["service logs"] = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert "launched run_id=" in texts["service logs"]
    for secret in [pg_password, *roles.passwords.values()]:
        leaks = [where for where, text in texts.items() if secret in text]
        assert leaks == [], f"a password appears in: {leaks}"


# --- item 3: the source of an event is authenticated -------------------------------------------


async def test_forged_events_and_heartbeats_are_refused_counted_and_logged(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A compromised worker of run A holds A's token. It tries to report for run B, as the launcher,
    as the monitor, and without a token; all refused. Its own events still count."""
    caplog.set_level(logging.INFO)
    await env.start()
    long_step = [{"key": "wait", "command": ["sleep", "60"]}]
    run_a, run_b = await env.submit(long_step), await env.submit([*long_step])
    for run_id in (run_a, run_b):
        await env.wait_status(run_id, "STARTED")
    stolen = await env.token(run_a, 1)  # what a step of A can read from its worker

    def forged_event(run_id: str, kind: EventType, source: str, seq: int) -> bytes:
        return Event(run_id=run_id, attempt=1, seq=seq, type=kind, source=source, message="forged", ts=now_iso()).body()

    def counted(kind: str) -> float:
        return prometheus_client.REGISTRY.get_sample_value("runherd_forged_total", {"kind": kind}) or 0.0

    before = counted("event"), counted("heartbeat")
    attacks = {
        "B's WORKER_EXITED as the launcher, with A's token": (run_b, EventType.WORKER_EXITED, "launcher", stolen),
        "B's RUN_SUCCESS as a worker, with A's token": (run_b, EventType.RUN_SUCCESS, "worker:evil", stolen),
        "B's RUN_FAILURE without a token": (run_b, EventType.RUN_FAILURE, "worker", None),
        "A's own WORKER_EXITED as the launcher, with A's worker token": (
            run_a,
            EventType.WORKER_EXITED,
            "launcher",
            stolen,
        ),
        "A's RUN_SUCCESS as the monitor": (run_a, EventType.RUN_SUCCESS, "monitor", stolen),
    }
    for seq, (run_id, kind, source, token) in enumerate(attacks.values(), start=1000):
        await env.broker.publish_event(run_id, forged_event(run_id, kind, source, seq), token=token)
    # Heartbeats for B with A's token: B's worker is alive and beating, so look at the count only.
    for _ in range(3):
        await env.broker.publish_heartbeat(heartbeat_body(run_b, 1), token=stolen)
    # A's own step event, with its own token: applied (the control).
    probe = Event(run_id=run_a, attempt=1, seq=2000, type=EventType.STEP_START, step_key="probe", ts=now_iso())
    await env.broker.publish_event(run_a, probe.body(), token=stolen)

    dead = await _dead_letters(env.amqp_url, len(attacks))
    reasons = sorted(d.headers[ERROR_HEADER] for d in dead)
    assert all(r.startswith("unauthenticated") for r in reasons), reasons
    assert not any(auth.TOKEN_HEADER in d.headers for d in dead)  # a dead letter never carries a token
    await eventually(lambda: _has_event(env, run_a, 2000), what="A's own event applied")
    for run_id in (run_a, run_b):
        assert (await env.status(run_id)) == "STARTED"
        assert (await env.run(run_id))["attempt"] == 1  # no resume
    assert not any(1000 <= (e["seq"] or 0) < 2000 for e in await env.events(run_b))
    assert counted("event") - before[0] == len(attacks)
    await eventually(lambda: counted("heartbeat") - before[1] == 3, what="3 forged heartbeats counted")
    logged = [r.getMessage() for r in caplog.records if "unauthenticated" in r.getMessage()]
    assert sum(f"run_id={run_b} attempt=1" in line for line in logged) >= 3, logged
    assert any("dropped forged heartbeat" in line for line in logged), logged


async def _has_event(env: Env, run_id: str, seq: int) -> bool:
    return any(e["seq"] == seq for e in await env.events(run_id))


async def _dead_letters(amqp_url: str, n: int, timeout: float = 15) -> list[aio_pika.abc.AbstractIncomingMessage]:
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(DEAD_QUEUE, passive=True)

        async def enough() -> bool:
            message = await queue.get(fail=False, no_ack=True)
            if message is not None:
                got.append(message)
            return len(got) >= n

        await eventually(enough, timeout, what=f"{n} dead letters")
    return got


# --- item 1: the worker's environment is built, not inherited ---------------------------------

DUMP = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"


def _service_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """What the services' own environment holds and no step may see."""
    found = {
        "RUNHERD_DATABASE_URL": f"postgresql://postgres:db-{secrets.token_hex(6)}@127.0.0.1/runherd",
        "RUNHERD_AMQP_URL": f"amqp://svc:amqp-{secrets.token_hex(6)}@127.0.0.1/",
        "AWS_SECRET_ACCESS_KEY": f"aws-{secrets.token_hex(6)}",
    }
    for name, value in found.items():
        monkeypatch.setenv(name, value)
    return found


async def _dump_env_of_a_step(env: Env, dump: Path) -> tuple[str, dict[str, str]]:
    run_id = await env.submit([{"key": "dump", "command": [PYTHON, "-c", DUMP, str(dump)]}], env={"FROM_LAUNCH": "1"})
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=60)
    assert run["status"] == "SUCCESS", run["reason"]
    return run_id, orjson.loads(await asyncio.to_thread(dump.read_bytes))


def _assert_clean(step_env: dict[str, str], service_secrets: dict[str, str], token: str) -> None:
    assert step_env["FROM_LAUNCH"] == "1" and step_env["RUNHERD_STEP_KEY"] == "dump"
    for name in (
        "RUNHERD_DATABASE_URL",
        "RUNHERD_AMQP_URL",
        "RUNHERD_PLAN",
        "RUNHERD_PLAN_FILE",
    ):
        assert name not in step_env, f"{name} reached the step"
    everything = "\n".join(f"{k}={v}" for k, v in step_env.items())
    for secret in [*service_secrets.values(), token, "guest:guest"]:
        assert secret not in everything


async def test_a_step_on_the_process_launcher_sees_no_credentials(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    service_secrets = _service_secrets(monkeypatch)
    env.configure(run_launcher={"config": {"env": {"FROM_CONFIG": "yes"}}})
    await env.start()
    run_id, step_env = await _dump_env_of_a_step(env, env.tmp / "env.json")
    _assert_clean(step_env, service_secrets, await env.token(run_id, 1))
    assert step_env["FROM_CONFIG"] == "yes" and "PATH" in step_env
    # The worker deleted its plan (it holds its password and token) once read.
    assert not list((env.tmp / "logs" / run_id).glob("*.plan.json"))


async def test_a_step_in_a_docker_worker_sees_no_credentials_and_labels_hold_none(
    env: Env, docker_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.integration.test_docker_monitoring import use_docker
    from tests.launchers.docker_fixtures import remove_session_containers

    service_secrets = _service_secrets(monkeypatch)
    use_docker(env, remove_after_exit=False)
    await env.start()
    try:
        run_id, step_env = await _dump_env_of_a_step(env, env.tmp / "env.json")
        _assert_clean(step_env, service_secrets, await env.token(run_id, 1))
        handle = await env.handle(run_id)
        spec = await docker_engine.containers.container(handle["container_id"]).show()
        shown = orjson.dumps(spec["Config"]).decode()
        assert "guest:guest" not in shown and await env.token(run_id, 1) not in shown  # labels, env, cmd
        assert not any("amqp" in v for v in spec["Config"]["Labels"].values())
        assert not any(e.startswith(("RUNHERD_AMQP_URL=", "RUNHERD_DATABASE_URL=")) for e in spec["Config"]["Env"])
    finally:
        await env.stop_all()
        await remove_session_containers(docker_engine)


async def test_a_step_in_a_kubernetes_job_sees_no_credentials_and_the_job_spec_holds_none(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.integration.test_launch_failures import use_launcher
    from tests.k8s_emulator import K8sEmulator

    service_secrets = _service_secrets(monkeypatch)
    async with K8sEmulator() as emulator:
        use_launcher(
            env,
            "kubernetes",
            {
                "image": "registry.example.com/runherd/worker:test",
                "command": [PYTHON, "-m", "runherd.cli", "worker"],
                "kubeconfig_file": str(emulator.write_kubeconfig(env.tmp / "kubeconfig")),
                "context": "emulator",
                "request_timeout_seconds": 5,
            },
        )
        await env.start()
        try:
            run_id, step_env = await _dump_env_of_a_step(env, env.tmp / "env.json")
            token = await env.token(run_id, 1)
            _assert_clean(step_env, service_secrets, token)
            [job] = emulator.jobs()
            spec = orjson.dumps(job).decode()
            assert "guest:guest" not in spec and token not in spec and "RUNHERD_AMQP_URL" not in spec
            # The credentials went in the plan's Secret, owned by the Job (deleted with it).
            [secret] = [s for s in emulator.store.list("Secret", job["metadata"]["namespace"])[0]]
            assert secret["metadata"]["ownerReferences"][0]["name"] == job["metadata"]["name"]
        finally:
            await env.stop_all()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


async def _ignore(message: Any) -> None:
    pass
