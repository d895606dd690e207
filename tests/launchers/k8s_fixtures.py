"""Pytest fixtures: a Kubernetes API emulator and KubernetesLaunchers talking to it over HTTP.

The launcher finds the emulator the way it finds a real cluster: through a kubeconfig file (in
``tmp_path``) whose context points at ``http://127.0.0.1:PORT``. Nothing in the client is patched.
Use them from a test module (a sibling: ``import k8s_fixtures``) by binding the names, e.g.
``k8s_emulator = k8s_fixtures.k8s_emulator``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from runherd.launchers.kubernetes import KubernetesLauncher

try:
    from tests.k8s_emulator import K8sEmulator, wait_for
except ModuleNotFoundError:
    # Plain `pytest` puts only this test directory on sys.path; the emulator lives in tests/.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.k8s_emulator import K8sEmulator, wait_for

__all__ = ["TEST_IMAGE", "K8sEmulator", "LauncherFactory", "wait_for"]

LauncherFactory = Callable[..., KubernetesLauncher]

# The "image" is only a name to the emulator; the container command is what really runs.
TEST_IMAGE = "registry.example.com/runherd/worker:test"
DEFAULT_WORKER = [sys.executable, "-c", "print('worker ran')"]


@pytest.fixture
async def k8s_emulator() -> AsyncIterator[K8sEmulator]:
    async with K8sEmulator() as emulator:
        yield emulator


@pytest.fixture
def k8s_kubeconfig(k8s_emulator: K8sEmulator, tmp_path: Path) -> Path:
    return k8s_emulator.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
async def k8s_launcher_factory(k8s_kubeconfig: Path) -> AsyncIterator[LauncherFactory]:
    """Build launchers with test-friendly defaults (fast retries); all closed at teardown."""
    launchers: list[KubernetesLauncher] = []

    def make(**overrides: Any) -> KubernetesLauncher:
        config: dict[str, Any] = {
            "image": TEST_IMAGE,
            "command": DEFAULT_WORKER,
            "kubeconfig_file": str(k8s_kubeconfig),
            "context": "emulator",
            "retry_backoff_seconds": 0.02,
            "request_timeout_seconds": 5,
            "watch_timeout_seconds": 30,
            **overrides,
        }
        launcher = KubernetesLauncher(config)
        launchers.append(launcher)
        return launcher

    yield make
    for launcher in launchers:
        await launcher.close()


@pytest.fixture
async def k8s_launcher(k8s_launcher_factory: LauncherFactory) -> KubernetesLauncher:
    return k8s_launcher_factory()
