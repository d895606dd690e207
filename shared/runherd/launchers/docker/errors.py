"""Engine and transport failures: which mean "unreachable", which are transient, as LaunchError."""

from __future__ import annotations

import asyncio

import aiohttp
from aiodocker.exceptions import DockerError

from runherd.errors import LaunchError

# aiodocker reports "cannot connect" as a DockerError with this pseudo-status.
CONNECT_ERROR_STATUS = 900
# Engine 5xx answers that no retry can fix (a bad command or mount in the container spec).
_PERMANENT_5XX = (
    "executable file not found",
    "no such file or directory",
    "permission denied",
    "invalid mount",
    "invalid reference format",
)
# Transport failures that mean "the engine could not be asked", never "the worker failed".
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


def launch_error(exc: BaseException, what: str) -> LaunchError:
    """Convert an engine or transport failure into LaunchError, keeping the engine's message."""
    if isinstance(exc, DockerError):
        status, message = exc.status, exc.message
        transient = status in (CONNECT_ERROR_STATUS, 409) or (
            status >= 500 and not any(m in message.lower() for m in _PERMANENT_5XX)
        )
        if status == CONNECT_ERROR_STATUS:  # not an HTTP answer: nothing answered at all
            return LaunchError(f"{what}: docker engine unreachable: {message}", transient=True)
        return LaunchError(f"{what}: docker engine answered {status}: {message}", transient=transient)
    return LaunchError(f"{what}: docker engine unreachable: {exc!r}", transient=True)


def _is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, DockerError) and exc.status == 404
