"""A small Kubernetes API-server emulator for the Kubernetes launcher's tests.

Real HTTP (aiohttp on 127.0.0.1, random port), real Jobs-as-subprocesses; see ``K8sEmulator``.
"""

from __future__ import annotations

from .emulator import K8sEmulator, wait_for
from .server import Injection

__all__ = ["Injection", "K8sEmulator", "wait_for"]
