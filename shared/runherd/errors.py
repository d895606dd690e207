"""One exception root for runherd; driver errors are converted to these at the boundary."""

from __future__ import annotations


class RunherdError(Exception):
    """Root of every error runherd raises on purpose."""


class ConfigError(RunherdError):
    """The configuration is invalid; the message names the key."""


class InvalidMessage(RunherdError):
    """A message body breaks the contract; it is dead-lettered with this reason."""


class NotMigrated(RunherdError):
    """The database has no runherd schema, or an older one."""


class LaunchError(RunherdError):
    """A run launcher could not start a worker.

    ``transient`` errors (engine unreachable, HTTP 5xx, 409 conflicts) are retried with backoff;
    the others fail the run at once with the engine's message.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class NotFound(RunherdError):
    """A run (or other object) the caller named does not exist."""


class UsageError(RunherdError):
    """Bad input on the command line (exit code 2)."""
