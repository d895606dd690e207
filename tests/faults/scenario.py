"""One fault scenario's world: a database of the private cluster, a vhost, the three services as
real OS processes (so they can be SIGKILLed), each behind its own TCP proxy to RabbitMQ (so each
can be cut alone), a recorder on the vhost, and the load. Workers talk to RabbitMQ directly: a cut
is a service's cut, not its workers'.

Every wait is bounded in time; teardown kills whatever the scenario started, by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import yaml

from runherd.broker import COMMANDS_QUEUE, EVENTS_QUEUE, HEARTBEATS_QUEUE, Broker
from tests import harness
from tests.faults.invariants import Limits, Recorder, Report, check, connect
from tests.faults.load import Load, make_load
from tests.faults.pgcluster import PgCluster
from tests.proxy import Proxy

SERVICES = ("launcher", "heartbeat", "monitor")
_READY_QUEUE = {"launcher": COMMANDS_QUEUE, "heartbeat": HEARTBEATS_QUEUE, "monitor": EVENTS_QUEUE}
_OUTBOX_LOCK = 0x5248424F  # the relay's advisory lock (runherd.store.store)

# start_timeout: every fault scenario boots its 30 concurrent workers from scratch (`python -m runherd.cli
# worker`, no fork server), and in CI beside another test on 2 cores 19 of 100 once took over 10 s to say
# RUN_START. No scenario relies on the start timeout firing; each relies on it not firing on a slow boot.
LIMITS = Limits(start_timeout=20, cancel_timeout=5, heartbeat_timeout=3, poll_interval=0.5)
LOAD_RUNS = 100
MAX_CONCURRENT_RUNS = 30


class Scenario:
    def __init__(self, name: str, cluster: PgCluster, tmp: Path) -> None:
        self.name = name
        self.cluster = cluster
        self.tmp = tmp
        self.id = uuid.uuid4().hex[:10]
        self.marker = f"faults-{self.id}"
        self.db_name = f"rh_faults_{self.id}"
        self.db_url = ""
        self.vhost = ""
        self.amqp_url = ""
        self.proxies: dict[str, Proxy] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: list[int] = []  # pids this scenario killed on purpose
        self.broker: Broker | None = None
        self.recorder = Recorder()
        self.load: Load = make_load(LOAD_RUNS, self.marker, tmp / "marks")
        # A scenario's own twists: Python run in a service before its CLI (to shorten a constant),
        # and argv put before every worker's command (e.g. faketime).
        self.preludes: dict[str, str] = {}
        self.worker_prefix: list[str] = []
        self.began = time.monotonic()
        self.report = Report(scenario=name, load=self.load.describe())

    # --- setup and teardown -------------------------------------------------------------------

    async def setup(self, vhost: str) -> Scenario:
        """``vhost``: an empty vhost of the session's pool (rabbitmqctl takes seconds a call)."""
        self.db_url = await self.cluster.new_database(self.db_name)
        self.vhost = vhost
        self.amqp_url = f"{harness.AMQP}/{self.vhost}"
        amqp = urlsplit(harness.AMQP)
        for service in SERVICES:
            self.proxies[service] = await Proxy(amqp.hostname or "127.0.0.1", amqp.port or 5672).start()
        self.broker = await Broker.connect(self.amqp_url)  # declares the topology before anyone publishes
        await self.recorder.start(self.amqp_url)
        (self.tmp / "logs").mkdir(parents=True, exist_ok=True)
        return self

    async def teardown(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for pid in self.marked_processes():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        await self.recorder.close()
        if self.broker is not None:
            await self.broker.close()
        for proxy in self.proxies.values():
            await proxy.close()
        with contextlib.suppress(Exception):
            await self.cluster.drop_database(self.db_name)

    # --- services ---------------------------------------------------------------------------

    def config_file(self, service: str) -> Path:
        amqp = urlsplit(harness.AMQP)
        via_proxy = f"amqp://{amqp.username}:{amqp.password}@127.0.0.1:{self.proxies[service].port}/{self.vhost}"
        worker = [
            "env",
            f"RUNHERD_AMQP_URL={self.amqp_url}",
            *self.worker_prefix,
            harness.PYTHON,
            "-m",
            "runherd.cli",
            "worker",
        ]
        raw: dict[str, Any] = harness.fast_raw(
            self.cluster.url(self.db_name, application_name=f"rh-{service}"),
            via_proxy,
            self.tmp / "logs",
            run_monitoring={
                "start_timeout_seconds": LIMITS.start_timeout,
                "cancel_timeout_seconds": LIMITS.cancel_timeout,
                "poll_interval_seconds": LIMITS.poll_interval,
                "heartbeat_interval_seconds": 0.5,
                "heartbeat_timeout_seconds": LIMITS.heartbeat_timeout,
                "max_resume_run_attempts": 3,
            },
            run_coordinator={"max_concurrent_runs": MAX_CONCURRENT_RUNS, "dequeue_interval_seconds": 0.5},
            run_launcher={
                "name": "process",
                "config": {
                    "log_dir": str(self.tmp / "logs"),
                    "terminate_grace_seconds": 2,
                    "worker_command": worker,
                },
            },
        )
        path = self.tmp / f"{service}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def spawn(self, service: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{service}-{len(self.killed)}.log", "wb")
        cli = ["-m", "runherd.cli"]
        if service in self.preludes:
            cli = [
                "-c",
                f"{self.preludes[service]}\nimport sys\nfrom runherd.cli import main\nsys.exit(main(sys.argv[1:]))",
            ]
        proc = subprocess.Popen(
            [harness.PYTHON, *cli, "--config", str(self.config_file(service)), service],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=harness.ROOT,
            start_new_session=True,  # killed by pid, never by group or terminal
        )
        log.close()
        self.procs[service] = proc
        return proc

    async def start_services(self) -> None:
        """The launcher first, so it takes the outbox relay's lock (a scenario knows who holds it),
        then the others."""
        self.spawn("launcher")
        await self.ready("launcher")
        with contextlib.suppress(AssertionError):
            await harness.eventually(self._launcher_relays, 15, interval=0.2, what="the launcher to hold the relay")
        for service in SERVICES[1:]:
            self.spawn(service)
        for service in SERVICES[1:]:
            await self.ready(service)

    async def _launcher_relays(self) -> bool:
        return await self.relay_holder() == "launcher"

    async def ready(self, service: str, timeout: float = 30) -> None:
        """The service consumes its queue (RabbitMQ counts its consumer)."""
        queue = _READY_QUEUE[service]

        async def consuming() -> bool:
            assert self.broker is not None
            channel = await self.broker.connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                return bool(declared.declaration_result.consumer_count)
            finally:
                await channel.close()

        await harness.eventually(consuming, timeout, interval=0.2, what=f"{service} consuming {queue}")

    async def kill(self, service: str) -> int:
        proc = self.procs[service]
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        self.killed.append(proc.pid)
        return proc.pid

    async def terminate(self, service: str, timeout: float) -> tuple[int | None, float]:
        """SIGTERM: the exit code (None: still running after ``timeout``, then SIGKILLed) and the
        seconds it took."""
        proc = self.procs[service]
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            code = None
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)
        self.killed.append(proc.pid)
        return code, time.monotonic() - began

    async def restart(self, service: str) -> None:
        self.spawn(service)
        await self.ready(service)

    def service_exits(self) -> list[str]:
        """Services that exited without being killed by the scenario."""
        return [
            f"{service} (pid {proc.pid}) exited with code {proc.returncode}"
            for service, proc in self.procs.items()
            if proc.poll() is not None and proc.pid not in self.killed
        ]

    # --- reading the database ---------------------------------------------------------------

    async def query(self, sql: str, *args: Any) -> list[dict[str, Any]] | None:
        """A read on a fresh connection; None while the database cannot be reached."""
        try:
            conn = await connect(self.db_url)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return None
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

    async def in_flight(self) -> int:
        rows = await self.query("SELECT count(*) AS n FROM runs WHERE status IN ('STARTING', 'STARTED')")
        return rows[0]["n"] if rows else 0

    async def wait_in_flight(self, n: int, timeout: float = 30) -> int:
        """Until ``n`` runs are in flight (or the deadline: the scenario goes on with what there is)."""
        with contextlib.suppress(AssertionError):
            await harness.eventually(lambda: self._at_least(n), timeout, interval=0.2, what=f"{n} runs in flight")
        return await self.in_flight()

    async def _at_least(self, n: int) -> bool:
        return await self.in_flight() >= n

    async def wait_finished(self, n: int, timeout: float = 30) -> int:
        """Until ``n`` runs are finished (or the deadline), to spread faults over the load."""

        async def count() -> int:
            rows = await self.query("SELECT count(*) AS n FROM runs WHERE status IN ('SUCCESS', 'FAILURE', 'CANCELED')")
            return rows[0]["n"] if rows else 0

        async def enough() -> bool:
            return await count() >= n

        with contextlib.suppress(AssertionError):
            await harness.eventually(enough, timeout, interval=0.2, what=f"{n} runs finished")
        return await count()

    async def relay_holder(self) -> str | None:
        rows = await self.query(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid::bigint = $1",
            _OUTBOX_LOCK,
        )
        if not rows:
            return None
        name = rows[0]["application_name"]
        return name.removeprefix("rh-") if name.startswith("rh-") else None

    async def wait_done(self, timeout: float = 90) -> bool:
        """Every run terminal, every failure's retry decided, the outbox drained, the recorder
        caught up; False at the deadline (the invariants then say what is wrong)."""

        async def done() -> bool:
            rows = await self.query(
                "SELECT count(*) FILTER (WHERE status NOT IN ('SUCCESS', 'FAILURE', 'CANCELED')) AS active, "
                "count(*) FILTER (WHERE status = 'FAILURE' AND NOT retried) AS undecided, count(*) AS total, "
                "(SELECT count(*) FROM status_outbox) AS outbox, "
                "(SELECT count(*) FROM events WHERE type = 'RUN_STATUS') AS transitions FROM runs"
            )
            if not rows:
                return False
            r = rows[0]
            settled = r["active"] == 0 and r["undecided"] == 0 and r["outbox"] == 0
            return (
                settled
                and r["total"] >= len(self.load.published)
                and (self.recorder.unique_status_ids() >= r["transitions"])
            )

        try:
            await harness.eventually(done, timeout, interval=0.3, what="the load to finish")
            return True
        except AssertionError:
            return False

    # --- processes ----------------------------------------------------------------------------

    def marked_processes(self) -> list[int]:
        """Live processes carrying this scenario's marker (workers and their steps)."""
        wanted = f"RUNHERD_FAULTS={self.marker}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if wanted not in f.read().split(b"\0"):
                        continue
            except OSError:
                continue
            if harness.pids_alive([int(entry)]):
                found.append(int(entry))
        return found

    def live_workers(self) -> list[int]:
        workers = []
        for pid in self.marked_processes():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"runherd.cli" in argv and b"worker" in argv:
                workers.append(pid)
        return workers

    # --- the verdict --------------------------------------------------------------------------

    async def verdict(
        self,
        fault: str,
        *,
        finish_timeout: float = 90,
        extra: Callable[[Report], Awaitable[None]] | None = None,
        deaf_seconds: float = 0.0,
    ) -> Report:
        """``extra``: the scenario's own checks, run after the common ones, before the report prints."""
        finished = await self.wait_done(finish_timeout)
        assert self.broker is not None
        report = self.report
        report.load = self.load.describe()
        report.fault = fault + ("" if finished else f"; the load did NOT finish within {finish_timeout:g} s")
        await check(
            report,
            db_url=self.db_url,
            amqp_url=self.amqp_url,
            load=self.load,
            recorder=self.recorder,
            limits=dataclasses.replace(LIMITS, deaf_seconds=deaf_seconds),
            service_exits=self.service_exits(),
        )
        if extra is not None:
            await extra(report)
        # Workers of finished runs exit by themselves (or are reaped): count those that do not.
        with contextlib.suppress(AssertionError):
            await harness.eventually(lambda: not self.live_workers(), 8, interval=0.3, what="workers to exit")
        report.leftover_workers = len(self.live_workers())
        report.seconds = time.monotonic() - self.began
        print("\n" + report.text())
        return report
