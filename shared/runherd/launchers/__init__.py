"""Run launchers: the built-in ones by name, or a user's class by module and class name."""

from __future__ import annotations

import importlib
import inspect
from typing import cast

from runherd.config import RunLauncherConfig
from runherd.errors import ConfigError
from runherd.launchers.base import Handle, Health, HealthStatus, RunLauncher, WorkerExit, WorkerRun

BUILTIN = {
    "process": ("runherd.launchers.process", "ProcessLauncher"),
    "docker": ("runherd.launchers.docker", "DockerLauncher"),
    "kubernetes": ("runherd.launchers.kubernetes", "KubernetesLauncher"),
    "sim": ("runherd.launchers.sim", "SimLauncher"),
}

_METHODS = ("launch", "terminate", "check_health", "debug_info")


def load_class(module: str, class_name: str) -> type[RunLauncher]:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"run_launcher.module: cannot import {module!r}: {exc}") from exc
    cls = getattr(mod, class_name, None)
    if cls is None or not inspect.isclass(cls):
        raise ConfigError(f"run_launcher.class: {module!r} has no class {class_name!r}")
    missing = [m for m in _METHODS if not callable(getattr(cls, m, None))]
    abstract = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing or abstract:
        raise ConfigError(
            f"run_launcher.class: {module}.{class_name} does not implement the launcher "
            f"interface (missing: {', '.join(missing or abstract)})"
        )
    return cast("type[RunLauncher]", cls)


def build(config: RunLauncherConfig) -> RunLauncher:
    """The configured launcher, built and validated; a bad module, class or config raises ConfigError."""
    if config.module:
        cls = load_class(config.module, config.class_name or "")
    else:
        name = config.name or "process"
        if name not in BUILTIN:
            raise ConfigError(
                f"run_launcher.name: unknown launcher {name!r} (built in: {', '.join(BUILTIN)}; "
                "or give module and class)"
            )
        cls = load_class(*BUILTIN[name])
    try:
        return cls(dict(config.config))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"run_launcher.config: {cls.__name__} refused its config: {exc}") from exc


__all__ = ["Handle", "Health", "HealthStatus", "RunLauncher", "WorkerExit", "WorkerRun", "build", "load_class"]
