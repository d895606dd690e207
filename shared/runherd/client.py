"""What clients do: publish commands (launch, terminate, reexecute) and read runs back."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from runherd import contract
from runherd.broker import Broker
from runherd.contract import RunStatus


async def submit(broker: Broker, launch: dict[str, Any]) -> str:
    """Validate locally (so a mistake is reported here, not dead-lettered), then publish."""
    parsed = contract.parse_launch({"v": contract.VERSION, **launch})
    body = {**launch, "v": contract.VERSION, "run_id": parsed.run_id}
    await broker.publish_command("launch", orjson.dumps(body))
    return parsed.run_id


async def cancel(broker: Broker, run_id: str) -> None:
    await broker.publish_command("terminate", orjson.dumps({"v": 1, "run_id": contract.parse_run_id(run_id)}))


async def reexecute(
    broker: Broker, run_id: str, strategy: str = "FROM_FAILURE", tags: dict[str, Any] | None = None
) -> str:
    body = {"v": 1, "run_id": contract.parse_run_id(run_id), "strategy": strategy, "tags": tags or {}}
    request = contract.parse_reexecute(body)
    await broker.publish_command("reexecute", orjson.dumps({**body, "new_run_id": request.new_run_id}))
    return request.new_run_id


async def wait_for_terminal(store: Any, run_id: str, timeout: float | None = None, poll: float = 0.25) -> RunStatus:
    """Poll the run until it is SUCCESS, FAILURE or CANCELED (or the timeout passes)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        run = await store.get_run(run_id)
        if run is not None and RunStatus(run["status"]).terminal:
            return RunStatus(run["status"])
        if deadline is not None and loop.time() > deadline:
            raise TimeoutError(f"run {run_id} did not finish within {timeout} s")
        await asyncio.sleep(poll)
