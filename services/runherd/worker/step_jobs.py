"""The ``launcher`` executor's steps on Kubernetes, seen from the worker: one Job per step try
(runherd.launchers.kubernetes.steps says how they are built, named and found again).

The worker reaches the API with the launcher's own client config (in a cluster: its pod's service
account, ``step_jobs_service_account_name``, which must be allowed to create, read, list and delete
Jobs, create Secrets, list and delete pods and read pod logs: deploy/kubernetes's
``runherd-step-jobs`` Role).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from typing import Any

from runherd.contract import Step
from runherd.launchers.kubernetes.launcher import KubernetesLauncher
from runherd.launchers.kubernetes.steps import StepJob
from runherd.plan import Plan
from runherd.worker.steps import StepResult

# Variables of the worker's own pod that would be wrong in the step's (its host name).
_NOT_PASSED = frozenset({"HOSTNAME"})

_clients: dict[str, KubernetesLauncher] = {}


def _launcher(config: Mapping[str, Any]) -> KubernetesLauncher:
    """One API client per worker: every step Job of the attempt goes through it."""
    key = repr(sorted(config.items()))
    if key not in _clients:
        _clients[key] = KubernetesLauncher(config)
    return _clients[key]


async def close() -> None:
    """The worker is done: release its API connections."""
    for launcher in list(_clients.values()):
        with contextlib.suppress(Exception):
            await launcher.close()
    _clients.clear()


class JobStep:
    """One try of a step in its own Job."""

    def __init__(self, plan: Plan, step: Step, try_: int, launcher_config: Mapping[str, Any]) -> None:
        self.step = step
        self.job = StepJob(
            _launcher(launcher_config),
            run_id=plan.run_id,
            attempt=plan.attempt,
            job=plan.job,
            step_key=step.key,
            try_=try_,
        )
        self.result: StepResult | None = None

    async def adopt(self) -> dict[str, Any] | None:
        found = await self.job.adopt()
        if found is None:
            return None
        handle, result = found
        if result is not None:
            self.result = _result(result)
        return handle

    async def spawn(self, inputs: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
        spec = {"step": self.step.to_json(), "inputs": inputs}
        return await self.job.spawn(spec, {k: v for k, v in env.items() if k not in _NOT_PASSED}, sys.executable)

    async def wait(self) -> StepResult:
        if self.result is not None:
            return self.result
        got, why = await self.job.wait()
        self.result = _result(got) if got is not None else StepResult(False, error=why)
        return self.result

    async def run(self, inputs: dict[str, Any], env: dict[str, str]) -> StepResult:
        if await self.adopt() is None:
            await self.spawn(inputs, env)
        return await self.wait()

    async def stop(self, grace: float = 3.0) -> None:
        await self.job.stop(grace)


def _result(got: Mapping[str, Any]) -> StepResult:
    return StepResult(bool(got.get("ok")), got.get("output"), got.get("error"))
