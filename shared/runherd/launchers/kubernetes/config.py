"""The kubernetes launcher's config keys, their defaults and validation (the table is in the package's
docstring)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from runherd.errors import ConfigError

# --- config ------------------------------------------------------------------------------------

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(i, str) for i in v)


def _is_str_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _is_env(v: Any) -> bool:
    # YAML turns `PORT: 5432` into an int: scalars are fine, they become strings.
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(x, str | int | float | bool) for k, x in v.items()
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_resources(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and set(v) <= {"requests", "limits"}
        and all(
            isinstance(q, dict) and all(isinstance(k, str) and isinstance(x, str | int | float) for k, x in q.items())
            for q in v.values()
        )
    )


@dataclass(frozen=True)
class _Key:
    check: Callable[[Any], bool]
    expected: str
    default: Any = None
    required: bool = False
    nullable: bool = False


_CONFIG: dict[str, _Key] = {
    "image": _Key(lambda v: isinstance(v, str) and bool(v), "a non-empty string", required=True),
    "command": _Key(lambda v: _is_str_list(v) and bool(v), "a non-empty list of strings"),
    "namespace": _Key(lambda v: isinstance(v, str) and bool(v), "a string", "default"),
    "service_account_name": _Key(lambda v: isinstance(v, str), "a string"),
    "env": _Key(_is_env, "a mapping of names to strings", {}),
    "env_from_secrets": _Key(_is_str_list, "a list of secret names", []),
    "resources": _Key(_is_resources, "a mapping with 'requests'/'limits' mappings", {}),
    "image_pull_secrets": _Key(_is_str_list, "a list of secret names", []),
    "image_pull_policy": _Key(lambda v: v in ("Always", "IfNotPresent", "Never"), "Always, IfNotPresent or Never"),
    "node_selector": _Key(_is_str_dict, "a mapping of strings to strings", {}),
    "tolerations": _Key(
        lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v),
        "a list of mappings",
        [],
    ),
    "labels": _Key(_is_str_dict, "a mapping of strings to strings", {}),
    "ttl_seconds_after_finished": _Key(lambda v: _is_int(v) and v >= 0, "an integer >= 0", 3600, nullable=True),
    "termination_grace_seconds": _Key(lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "load_incluster_config": _Key(lambda v: isinstance(v, bool), "a boolean", False),
    "kubeconfig_file": _Key(lambda v: isinstance(v, str) and bool(v), "a path"),
    "context": _Key(lambda v: isinstance(v, str) and bool(v), "a string"),
    "api_url": _Key(lambda v: isinstance(v, str) and "://" in v, "a URL"),
    "launch_retries": _Key(lambda v: _is_int(v) and v >= 0, "an integer >= 0", 3),
    "retry_backoff_seconds": _Key(lambda v: _is_number(v) and v > 0, "a number > 0", 0.5),
    "request_timeout_seconds": _Key(lambda v: _is_number(v) and v > 0, "a number > 0", 30),
    "watch_timeout_seconds": _Key(lambda v: _is_int(v) and v > 0, "an integer > 0", 300),
    "log_tail_lines": _Key(lambda v: _is_int(v) and v > 0, "an integer > 0", 50),
    "step_jobs_service_account_name": _Key(lambda v: isinstance(v, str) and bool(v), "a string"),
    "step_orphan_grace_seconds": _Key(lambda v: _is_number(v) and v >= 0, "a number >= 0", 60),
}


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with defaults filled in; ConfigError names the first bad key."""
    for key in config:
        if key not in _CONFIG:
            raise ConfigError(f"run_launcher.config.{key}: unknown key for the kubernetes launcher")
    out: dict[str, Any] = {}
    for key, spec in _CONFIG.items():
        value = config.get(key, spec.default)
        if value is None:
            if spec.required or (key in config and not spec.nullable and spec.default is not None):
                raise ConfigError(f"run_launcher.config.{key}: required, must be {spec.expected}")
        elif not spec.check(value):
            raise ConfigError(f"run_launcher.config.{key}: must be {spec.expected}, got {value!r}")
        out[key] = value
    for name, value in out["labels"].items():
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            raise ConfigError(f"run_launcher.config.labels.{name}: {value!r} is no label value")
    if out["load_incluster_config"] and (out["kubeconfig_file"] or out["context"]):
        raise ConfigError(
            "run_launcher.config.load_incluster_config: cannot be combined with kubeconfig_file or context"
        )
    return out
