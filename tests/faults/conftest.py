"""Fixtures of the fault suite: one private PostgreSQL cluster per session (it is stopped and
restarted by scenarios, never the machine's own), and one Scenario per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

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


@pytest.fixture
async def scenario(request: pytest.FixtureRequest, pg_cluster: PgCluster, tmp_path: Path) -> AsyncIterator[Scenario]:
    if not pg_cluster.running:  # a scenario that stopped it and failed before starting it again
        pg_cluster.start()
    sc = await Scenario(request.node.name, pg_cluster, tmp_path).setup()
    try:
        yield sc
    finally:
        await sc.teardown()
