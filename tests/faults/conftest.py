"""Fixtures of the fault suite: one private PostgreSQL cluster per session (it is stopped and
restarted by scenarios, never the machine's own), and one Scenario per test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests import harness
from tests.faults.pgcluster import PgCluster
from tests.faults.scenario import Scenario


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster().init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def vhosts() -> Iterator[list[str]]:
    """Empty vhosts to reuse: a scenario's is emptied after it (milliseconds), not deleted and
    created again (seconds of rabbitmqctl each); all are deleted at the end of the session."""
    free: list[str] = []
    yield free
    harness.delete_vhosts(free)


@pytest.fixture
async def scenario(
    request: pytest.FixtureRequest, pg_cluster: PgCluster, vhosts: list[str], tmp_path: Path
) -> AsyncIterator[Scenario]:
    if not pg_cluster.running:  # a scenario that stopped it and failed before starting it again
        pg_cluster.start()
    vhost = vhosts.pop() if vhosts else await harness.new_vhost()
    sc = Scenario(request.node.name, pg_cluster, tmp_path)
    try:
        await sc.setup(vhost)
        yield sc
    finally:
        await sc.teardown()
        if await harness.reset_vhost(f"{harness.AMQP}/{vhost}"):
            vhosts.append(vhost)
        else:
            await asyncio.to_thread(harness.delete_vhosts, [vhost])
