from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator

import aiodocker
import pytest

from runherd.broker import Broker
from runherd.store import Store
from tests import harness

_VHOSTS: list[str] = []
_FREE_VHOSTS: list[str] = []


@pytest.fixture(scope="session", autouse=True)
async def _template() -> AsyncIterator[None]:
    await harness.make_template()
    yield
    await harness.drop_template()
    harness.delete_vhosts(_VHOSTS)


@pytest.fixture
async def env(tmp_path) -> AsyncIterator[harness.Env]:  # type: ignore[no-untyped-def]
    """A fresh database (from a migrated template) and a fresh RabbitMQ vhost for one test."""
    db = await harness.new_database()
    if _FREE_VHOSTS:
        vhost = _FREE_VHOSTS.pop()
    else:
        vhost = await harness.new_vhost()
        _VHOSTS.append(vhost)
    db_url = f"{harness.PG}/{db}"
    amqp_url = f"{harness.AMQP}/{vhost}"
    store = await Store.connect(db_url)
    broker = await Broker.connect(amqp_url)
    e = harness.Env(
        db_url=db_url,
        amqp_url=amqp_url,
        tmp=tmp_path,
        store=store,
        broker=broker,
        cfg=harness.fast_config(db_url, amqp_url, tmp_path / "logs"),
    )
    try:
        yield e
    finally:
        await e.stop_all()
        await broker.close()
        await store.close()
        await harness.drop_database(db)
        if not os.environ.get("RUNHERD_TEST_KEEP_TMP"):  # keep a failed test's logs when asked
            shutil.rmtree(tmp_path, ignore_errors=True)
        if await harness.reset_vhost(amqp_url):
            _FREE_VHOSTS.append(vhost)


@pytest.fixture(scope="session")
async def docker_engine() -> AsyncIterator[aiodocker.Docker]:
    """A plain client to the real Docker engine, playing the operator (docker kill, inspect); the
    test is skipped, saying why, when no engine answers. Removes this session's containers after."""
    from tests.launchers.docker_fixtures import docker_unavailable_reason, ensure_base_image, remove_session_containers

    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    await asyncio.to_thread(ensure_base_image)
    docker = aiodocker.Docker()
    yield docker
    await remove_session_containers(docker)
    await docker.close()
