"""The Docker launcher's ``run_launcher.config``: its keys, their parsing and validation, DockerConfig."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runherd.errors import ConfigError

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class DockerConfig:
    image: str
    command: list[str] | None = None
    network: str = "host"  # the worker reaches RabbitMQ on 127.0.0.1
    env: Mapping[str, str] | None = None
    volumes: list[str] | None = None
    labels: Mapping[str, str] | None = None
    memory: int | None = None  # bytes
    cpus: float | None = None
    container_options: Mapping[str, Any] | None = None
    remove_after_exit: bool = False
    stop_grace_seconds: float = 10.0
    docker_url: str | None = None
    launch_retries: int = 3
    # The `launcher` executor's step containers of a worker that died and was not resumed within
    # this many seconds are killed (a resumed attempt adopts them well before).
    step_orphan_grace_seconds: float = 60.0


def _fail(key: str, why: str) -> ConfigError:
    return ConfigError(f"run_launcher.config.{key}: {why}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _str_list(key: str, value: Any, *, empty_ok: bool = True) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (not value and not empty_ok):
        raise _fail(key, f"expected a {'' if empty_ok else 'non-empty '}list of strings, got {value!r}")
    return list(value)


def _str_map(key: str, value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _fail(key, f"expected a mapping, got {type(value).__name__}")
    out: dict[str, str] = {}
    for k, v in value.items():
        # YAML turns `PORT: 5432` into an int: accept scalars, the engine wants strings anyway.
        if not isinstance(k, str) or not isinstance(v, str | int | float | bool):
            raise _fail(key, f"expected string keys and scalar values, got {k!r}: {v!r}")
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def parse_memory(key: str, value: Any) -> int | None:
    """Docker's memory notation ("256m", "1g", 1048576) in bytes; units are powers of 1024."""
    if value is None:
        return None
    if _is_number(value) and value > 0:
        return int(value)
    match = _MEMORY.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise _fail(key, f"expected bytes or a size like '256m' or '1g', got {value!r}")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()])


def _volumes(key: str, value: Any) -> list[str] | None:
    binds = _str_list(key, value)
    for bind in binds or []:
        parts = bind.split(":")
        if (
            len(parts) not in (2, 3)
            or not parts[0]
            or not parts[1].startswith("/")
            or (len(parts) == 3 and not parts[2])
        ):
            raise _fail(key, f"expected 'src:/dst[:ro]', got {bind!r}")
    return binds


def _remove_flag(cfg: Mapping[str, Any]) -> bool:
    values = {k: cfg[k] for k in ("auto_remove", "remove_after_exit") if k in cfg}
    for k, v in values.items():
        if not isinstance(v, bool):
            raise _fail(k, f"expected true or false, got {v!r}")
    if len(set(values.values())) > 1:
        raise _fail("remove_after_exit", "auto_remove and remove_after_exit disagree")
    return any(values.values())


def _number(cfg: Mapping[str, Any], key: str, default: float | None, *, minimum: float, integer: bool = False) -> Any:
    value = cfg.get(key, default)
    if value is None:
        return None
    if not _is_number(value) or value < minimum or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise _fail(key, f"expected {kind} >= {minimum}, got {value!r}")
    return value


_KNOWN_KEYS = frozenset(
    {
        "image",
        "command",
        "network",
        "env",
        "volumes",
        "labels",
        "memory",
        "cpus",
        "container_options",
        "auto_remove",
        "remove_after_exit",
        "stop_grace_seconds",
        "docker_url",
        "launch_retries",
        "step_orphan_grace_seconds",
    }
)


def parse_config(cfg: Mapping[str, Any]) -> DockerConfig:
    """Validate the ``run_launcher.config`` mapping; a ConfigError names the offending key."""
    unknown = sorted(set(cfg) - _KNOWN_KEYS)
    if unknown:
        raise _fail(unknown[0], f"unknown key (known: {', '.join(sorted(_KNOWN_KEYS))})")
    image = cfg.get("image")
    if not isinstance(image, str) or not image.strip():
        raise _fail("image", "required: the worker image, e.g. 'runherd-base:latest'")
    network = cfg.get("network", "host")
    if not isinstance(network, str) or not network:
        raise _fail("network", f"expected a network name, got {network!r}")
    labels = _str_map("labels", cfg.get("labels"))
    if labels and any(k.startswith("runherd.") for k in labels):
        raise _fail("labels", "the 'runherd.' prefix is reserved for runherd's own labels")
    options = cfg.get("container_options")
    if options is not None and not isinstance(options, Mapping):
        raise _fail("container_options", f"expected a mapping, got {type(options).__name__}")
    docker_url = cfg.get("docker_url")
    if docker_url is not None and (not isinstance(docker_url, str) or "://" not in docker_url):
        raise _fail("docker_url", f"expected a URL like unix:///var/run/docker.sock, got {docker_url!r}")
    cpus = _number(cfg, "cpus", None, minimum=0.01)
    return DockerConfig(
        image=image,
        command=_str_list("command", cfg.get("command"), empty_ok=False),
        network=network,
        env=_str_map("env", cfg.get("env")),
        volumes=_volumes("volumes", cfg.get("volumes")),
        labels=labels,
        memory=parse_memory("memory", cfg.get("memory")),
        cpus=float(cpus) if cpus is not None else None,
        container_options=dict(options) if options is not None else None,
        remove_after_exit=_remove_flag(cfg),
        stop_grace_seconds=float(_number(cfg, "stop_grace_seconds", 10.0, minimum=0)),
        docker_url=docker_url,
        launch_retries=_number(cfg, "launch_retries", 3, minimum=0, integer=True),
        step_orphan_grace_seconds=float(_number(cfg, "step_orphan_grace_seconds", 60.0, minimum=0)),
    )
