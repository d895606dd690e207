"""A run launcher of your own: workers as local processes at a low CPU priority, under `nice`.

A platform team's typical need: batch runs must not starve the services that share the host, and
every worker should carry the team's environment. This launcher does not start processes itself:
it wraps runherd's process launcher (whose handles survive restarts, which kills whole process
groups and watches exits) and changes only how a worker is started.

    run_launcher:
      module: examples.custom_launcher
      class: NiceLauncher
      config: {niceness: 10, env: {TEAM: data}, log_dir: /var/log/runherd}

``niceness`` is this launcher's own key; the others go to the process launcher, which refuses
unknown ones. A bad config raises ConfigError, so runherd refuses to start and says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping
from typing import Any

from runherd.errors import ConfigError
from runherd.launchers.base import Handle, Health, RunLauncher, WorkerExit, WorkerRun
from runherd.launchers.process import ProcessLauncher


class NiceLauncher(RunLauncher):
    name = "nice"  # stored in each handle: after a restart, runherd adopts the handles of this name

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        options = dict(self.config)
        niceness = options.pop("niceness", 10)
        if isinstance(niceness, bool) or not isinstance(niceness, int) or not 1 <= niceness <= 19:
            raise ConfigError(f"run_launcher.config.niceness: expected an integer from 1 to 19, got {niceness!r}")
        self.niceness = niceness
        self.processes = ProcessLauncher(options)

    async def launch(self, run: WorkerRun) -> Handle:
        # `nice` execs the worker: the pid in the handle is the worker's own.
        command = ["nice", "-n", str(self.niceness), *(run.command or self.processes.worker_command)]
        handle = await self.processes.launch(dataclasses.replace(run, command=command))
        return {**handle, "launcher": self.name, "niceness": self.niceness}

    async def terminate(self, handle: Handle, *, grace_seconds: float | None = None) -> bool:
        return await self.processes.terminate(handle, grace_seconds=grace_seconds)

    async def check_health(self, handle: Handle) -> Health:
        return await self.processes.check_health(handle)

    async def debug_info(self, handle: Handle) -> str:
        return f"(worker ran at niceness {handle.get('niceness')})\n" + await self.processes.debug_info(handle)

    def watch(self) -> AsyncIterator[WorkerExit] | None:
        return self.processes.watch()

    async def adopt(self, handles: list[Handle]) -> None:
        await self.processes.adopt(handles)

    async def close(self) -> None:
        await self.processes.close()
