"""K8sEmulator: the store, the kubelet and the HTTP server on 127.0.0.1, with test hooks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .kubelet import Kubelet, PodRuntime
from .server import ApiServer, Injection, RecordedRequest
from .store import Obj, Store


class K8sEmulator:
    """A small Kubernetes API server whose Jobs run as local processes. Use ``async with``."""

    def __init__(self, *, node_labels: dict[str, str] | None = None) -> None:
        self.store = Store()
        self.kubelet = Kubelet(self.store, node_labels=node_labels)
        self.server = ApiServer(self.store, self.kubelet)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> K8sEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        # A short shutdown_timeout: open watch streams must not hold the test's teardown.
        self._runner = web.AppRunner(self.server.app(), shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self.server.drop_watches()
        self.server.watch_gate.set()
        await self.kubelet.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """A kubeconfig with one context, ``emulator``, pointing at this server over HTTP."""
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: emulator\n"
            f"clusters:\n- name: emulator\n  cluster:\n    server: {self.url}\n"
            "contexts:\n- name: emulator\n  context:\n    cluster: emulator\n"
            f"    user: tester\n    namespace: {namespace}\n"
            "users:\n- name: tester\n  user:\n    token: emulator-token\n"
        )
        return path

    # --- state for assertions ----------------------------------------------------------------

    def job(self, name: str, namespace: str = "default") -> Obj | None:
        return self.store.find("Job", namespace, name)

    def jobs(self, namespace: str = "default") -> list[Obj]:
        return self.store.list("Job", namespace)[0]

    def pods(self, job_name: str, namespace: str = "default") -> list[Obj]:
        return self.store.list("Pod", namespace, f"job-name={job_name}")[0]

    def runtime(self, job_name: str, namespace: str = "default") -> PodRuntime | None:
        return self.kubelet.runtime_for_job(namespace, job_name)

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.server.requests

    @property
    def deletions(self) -> list[tuple[str, str, str]]:
        return self.server.deletions

    def watch_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if (r.query.get("watch") or "").lower() in ("1", "true")]

    def open_watch_count(self) -> int:
        return len(self.server.open_watches)

    # --- fault injection and test hooks ------------------------------------------------------

    def inject(self, status: int, times: int = 1, **kwargs: Any) -> Injection:
        """The next ``times`` requests matching ``method``/``path`` answer ``status``."""
        injection = Injection(status, times, **kwargs)
        self.server.injections.append(injection)
        return injection

    def add_secret(self, name: str, data: dict[str, str], namespace: str = "default") -> None:
        self.kubelet.secrets[(namespace, name)] = dict(data)

    async def oom_kill(self, job_name: str, namespace: str = "default") -> None:
        await self.kubelet.oom_kill(namespace, job_name)

    def drop_watches(self) -> int:
        return self.server.drop_watches()

    def hold_watches(self) -> None:
        """New watch requests wait (the client sees a slow server) until release_watches()."""
        self.server.watch_gate.clear()

    def release_watches(self) -> None:
        self.server.watch_gate.set()

    def compact(self) -> None:
        """Like etcd compaction: every resourceVersion seen so far becomes too old (410)."""
        self.store.compact()


async def wait_for(predicate: Callable[[], Any], within: float = 5.0, what: str = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until truthy; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)
