"""Input limits, checked at the door: the ``limits`` config section and the pure checks.

A message over ``max_message_bytes`` is refused by the consume loop before it is parsed; a launch
(or reexecute) over any of the others is refused before it is validated or stored. Either way the
message is dead-lettered with a sentence naming the limit and its config key. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from runherd.errors import ConfigError, InvalidMessage
from runherd.plan import MAX_MESSAGE_BYTES as LARGEST_EVENT_BYTES

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 4 * MiB  # any message a service consumes: launch, event, heartbeat
    max_steps: int = 500  # steps of one run
    max_tag_key_length: int = 256  # characters
    max_tag_value_length: int = 4096  # characters (a value that is not a string: its JSON)
    max_env_bytes: int = 128 * 1024  # a launch's `env`: the UTF-8 bytes of every KEY=VALUE

    def check(self) -> Limits:
        for name, value in self.__dict__.items():
            if value < 1:
                raise ConfigError(f"limits.{name}: must be at least 1, got {value}")
        if self.max_message_bytes < LARGEST_EVENT_BYTES:
            raise ConfigError(
                f"limits.max_message_bytes: must be at least {LARGEST_EVENT_BYTES} (an event carrying a step "
                f"output at its 1 MiB limit), got {self.max_message_bytes}"
            )
        return self


DEFAULT = Limits()


def oversized(size: int, max_message_bytes: int) -> str | None:
    """The refusal of a body of ``size`` bytes, or None if it fits."""
    if size <= max_message_bytes:
        return None
    return (
        f"message too large: {size} bytes, over the limit of {max_message_bytes} bytes "
        "(limits.max_message_bytes); refused before parsing"
    )


def check_command(key: str, data: Any, limits: Limits) -> None:
    """Refuse a launch or reexecute over a limit. Only the sizes are looked at here: the types are
    the validator's job (a ``steps`` that is not a list passes this and is refused there)."""
    if not isinstance(data, dict):
        return
    if key == "launch":
        steps = data.get("steps")
        if isinstance(steps, list) and len(steps) > limits.max_steps:
            raise InvalidMessage(f"steps: {len(steps)} steps, over the limit of {limits.max_steps} (limits.max_steps)")
        env = data.get("env")
        if isinstance(env, dict):
            size = sum(len(f"{k}={v}".encode(errors="replace")) for k, v in env.items())
            if size > limits.max_env_bytes:
                raise InvalidMessage(
                    f"env: {size} bytes, over the limit of {limits.max_env_bytes} bytes (limits.max_env_bytes)"
                )
    if key in ("launch", "reexecute"):
        tags = data.get("tags")
        if isinstance(tags, dict):
            check_tags(tags, limits)


def check_tags(tags: dict[str, Any], limits: Limits) -> None:
    for key, value in tags.items():
        if len(key) > limits.max_tag_key_length:
            raise InvalidMessage(
                f"tag {key[:40]!r}...: key of {len(key)} characters, over the limit of "
                f"{limits.max_tag_key_length} (limits.max_tag_key_length)"
            )
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        if len(text) > limits.max_tag_value_length:
            raise InvalidMessage(
                f"tag {key!r}: value of {len(text)} characters, over the limit of "
                f"{limits.max_tag_value_length} (limits.max_tag_value_length)"
            )
