"""Dashboards and alerts against a real Prometheus (Debian's `prometheus` package, started here on
a free port with a temporary config and data dir; never as a system service).

A running runherd (launcher, heartbeat, monitor, on a private RabbitMQ node with the management
plugin) serves /metrics; Prometheus scrapes it. The test checks that every metric the Grafana
dashboard and the alerting rules use exists in Prometheus, that the rules load and evaluate, and,
through Prometheus, that the queue-depth gauge counts unacknowledged messages as well as ready
ones. `promtool check rules` and `promtool test rules` (one unit test per alert) run too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import yaml

from runherd import broker as topology
from runherd import probes
from tests import private_rabbit
from tests.harness import ROOT, Env, eventually
from tests.private_rabbit import PrivateRabbit

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "tests" / "ops" / "alerts_test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "runherd.json"

needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None, reason="Debian's prometheus package is not installed (.ci/run installs it)"
)
METRIC = re.compile(r"\b(?:runherd_[a-z0-9_]+|up)\b(?!\s*\()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    def walk(panels: list[dict[str, Any]]) -> list[str]:
        found = []
        for panel in panels:
            found += [t["expr"] for t in panel.get("targets", [])]
            found += walk(panel.get("panels", []))
        return found

    return walk(json.loads(DASHBOARD.read_text())["panels"])


def metrics_used() -> set[str]:
    exprs = [r["expr"] for r in alert_rules()] + dashboard_exprs()
    return {name for expr in exprs for name in METRIC.findall(expr)}


def test_dashboard_and_rules_read_runherd_metrics() -> None:
    used = metrics_used()
    assert len(dashboard_exprs()) >= 15 and len(alert_rules()) >= 7
    for needed in ("runherd_queue_depth", "runherd_oldest_queued_run_age_seconds", "runherd_outbox_backlog"):
        assert needed in used
    assert "runherd_detection_latency_seconds_bucket" in used


@needs_prometheus
def test_promtool_check_rules() -> None:
    done = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


@needs_prometheus
def test_promtool_unit_tests_every_alert() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests for case in t["alert_rule_test"] if not case["exp_alerts"]}
    names = {r["alert"] for r in alert_rules()}
    assert tested == names, f"alerts never seen firing in a unit test: {names - tested}"
    assert quiet == names, f"alerts never seen quiet in a unit test: {names - quiet}"
    done = subprocess.run(
        [PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60, cwd=RULE_TESTS.parent
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[PrivateRabbit]:
    if not private_rabbit.available():
        pytest.skip("no rabbitmq-server to start a private node")
    rabbit = PrivateRabbit(tmp_path / "rabbit", management=True)
    await rabbit.start()
    try:
        yield rabbit
    finally:
        await rabbit.discard()


@contextlib.asynccontextmanager
async def prometheus(tmp: Path, target_port: int) -> AsyncIterator[str]:
    """A Prometheus of our own scraping 127.0.0.1:target_port every 0.5 s; yields its base URL."""
    assert PROMETHEUS is not None
    port = free_port()
    config = {
        "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "runherd", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: we started it
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
        log.close()


async def api(session: aiohttp.ClientSession, base: str, path: str, **params: str) -> Any:
    try:
        async with session.get(base + path, params=params) as response:
            body = await response.json()
    except (aiohttp.ClientError, ValueError):
        return None
    return body.get("data") if body.get("status") == "success" else None


async def query(session: aiohttp.ClientSession, base: str, promql: str) -> float | None:
    data = await api(session, base, "/api/v1/query", query=promql)
    if not data or not data["result"]:
        return None
    return float(data["result"][0]["value"][1])


@needs_prometheus
async def test_prometheus_scrapes_every_metric_the_dashboard_and_rules_use(env: Env, node: PrivateRabbit) -> None:
    env.amqp_url = node.url
    cfg = env.configure(rabbitmq_management_url=node.management_url)
    running = await env.start({"launcher": 1, "heartbeat": 1, "monitor": 1}, cfg=cfg)
    port = free_port()
    server = await probes.serve(port, running.not_ready, host="127.0.0.1")
    holder = await aio_pika.connect(node.url)
    try:
        async with (
            prometheus(env.tmp, port) as base,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        ):
            broker = running.brokers[0]
            env.broker = broker
            # 30 messages in a queue nobody in runherd consumes; a consumer takes 20 and acks none.
            for i in range(30):
                await broker.publish(topology.DEAD, "", b'{"n": %d}' % i)
            channel = await holder.channel()
            await channel.set_qos(prefetch_count=20)
            held: list[aio_pika.abc.AbstractIncomingMessage] = []

            async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                held.append(message)

            await (await channel.get_queue(topology.DEAD_QUEUE, ensure=False)).consume(keep)
            await eventually(lambda: len(held) == 20, 10, what="20 deliveries held unacked")
            assert (await broker.queue_depths())[topology.DEAD_QUEUE] == 10, "AMQP alone sees the ready ones"

            # Real traffic: a run to SUCCESS (a launch, heartbeats, events, an exit detected).
            run_id = await env.submit([{"key": "a", "command": [sys.executable, "-c", "print('hi')"]}])
            await env.wait_status(run_id, "SUCCESS", timeout=30)

            async def target_up() -> bool:
                data = await api(session, base, "/api/v1/targets")
                return bool(data and data["activeTargets"]) and all(t["health"] == "up" for t in data["activeTargets"])

            await eventually(target_up, 30, 0.2, what="Prometheus scraping runherd")

            used = metrics_used()

            async def missing() -> set[str]:
                return used - set(await api(session, base, "/api/v1/label/__name__/values") or [])

            async def none_missing() -> bool:
                return not await missing()

            with contextlib.suppress(AssertionError):
                await eventually(none_missing, 20, 0.25, what="every metric in Prometheus")
            gone = await missing()
            assert not gone, f"used by the dashboard or the rules, not in Prometheus: {sorted(gone)}"

            # Through Prometheus: the gauge counts the 20 unacked with the 10 ready.
            depth_q = f'max(runherd_queue_depth{{queue="{topology.DEAD_QUEUE}"}})'
            await eventually(lambda: _equals(query(session, base, depth_q), 30.0), 20, 0.25, "queue depth 30")
            unacked_q = f'max(runherd_queue_messages{{queue="{topology.DEAD_QUEUE}",state="unacked"}})'
            assert await query(session, base, unacked_q) == 20.0
            assert await query(session, base, 'sum(runherd_service_replicas{service="monitor"})') == 1.0
            assert (await query(session, base, 'sum(runherd_launches_total{outcome="ok"})') or 0) >= 1

            async def rules_ok() -> bool:
                data = await api(session, base, "/api/v1/rules")
                rules = [r for g in (data or {}).get("groups", []) for r in g["rules"]]
                return len(rules) == len(alert_rules()) and all(r["health"] == "ok" for r in rules)

            await eventually(rules_ok, 20, 0.25, what="every rule loaded and evaluated without error")

            # Every dashboard panel's query is valid PromQL that Prometheus evaluates.
            for expr in dashboard_exprs():
                async with session.get(base + "/api/v1/query", params={"query": expr}) as response:
                    answer = await response.json()
                assert answer["status"] == "success", (expr, answer)
    finally:
        await holder.close()
        server.close()
        await env.stop_all()  # before the node goes (fixtures end in reverse order)


async def _equals(value: Any, expected: float) -> bool:
    return (await value) == expected
