"""The Docker run launcher: one container per run attempt, watched through the engine's events.

Each attempt runs in a container named ``runherd-<run_id>-<attempt>`` and labelled
``runherd.run_id``, ``runherd.attempt`` and ``runherd.job``; the handle stores the container id,
so any process talking to the same engine can check, stop or read the worker later.

Exits are seen at once from the engine's event stream (``die`` events of runherd's containers).
The stream can drop (engine restart, socket trouble): the watcher then reconnects with backoff,
asks the engine to replay events since the last one it saw, and inspects every container it
watches, so an exit that happened while it was disconnected is still reported (maybe twice:
runherd dedupes).

Docker's own AutoRemove is never used: it deletes the container, its exit code and its log the
moment it exits. ``remove_after_exit`` instead removes the container once the watcher has
recorded its exit and captured its log tail (kept in memory for ``debug_info``).
"""

from runherd.launchers.docker.config import DEFAULT_DOCKER_URL, DockerConfig, parse_config, parse_memory
from runherd.launchers.docker.errors import CONNECT_ERROR_STATUS, launch_error
from runherd.launchers.docker.launcher import LOG_TAIL_LINES, DockerLauncher
from runherd.launchers.docker.spec import LABEL_ATTEMPT, LABEL_JOB, LABEL_RUN_ID, build_container_spec, container_name
from runherd.launchers.docker.state import exit_from_state, health_from_inspect

__all__ = [
    "CONNECT_ERROR_STATUS",
    "DEFAULT_DOCKER_URL",
    "LABEL_ATTEMPT",
    "LABEL_JOB",
    "LABEL_RUN_ID",
    "LOG_TAIL_LINES",
    "DockerConfig",
    "DockerLauncher",
    "build_container_spec",
    "container_name",
    "exit_from_state",
    "health_from_inspect",
    "launch_error",
    "parse_config",
    "parse_memory",
]
