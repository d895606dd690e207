"""runherd.yaml: load, substitute ``${VAR}``, apply environment overrides, validate.

Keys and defaults follow dagster.yaml. An unknown key or a wrong type is refused with a
ConfigError naming the key (``run_monitoring.start_timeout_seconds: expected a number``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from runherd import tls
from runherd.errors import ConfigError
from runherd.limits import Limits

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/runherd"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class RunMonitoring:
    enabled: bool = True
    start_timeout_seconds: float = 180
    cancel_timeout_seconds: float = 180
    max_resume_run_attempts: int = 3
    # Sweeps are one indexed query per rule, so runherd can afford to sweep far more often than
    # Dagster's 120 s; worker exits trigger a sweep at once regardless.
    poll_interval_seconds: float = 5
    max_runtime_seconds: float = 0
    heartbeat_interval_seconds: float = 5
    heartbeat_timeout_seconds: float = 30


@dataclass(frozen=True)
class TagConcurrencyLimit:
    key: str
    limit: int
    value: str | None = None  # None: every run carrying the key counts against one limit
    per_unique_value: bool = False


@dataclass(frozen=True)
class RunCoordinator:
    max_concurrent_runs: int = -1
    tag_concurrency_limits: tuple[TagConcurrencyLimit, ...] = ()
    dequeue_interval_seconds: float = 1.0


@dataclass(frozen=True)
class RunRetries:
    enabled: bool = True
    max_retries: int = 0
    retry_on_step_failure: bool = True
    retry_strategy: str = "FROM_FAILURE"
    retry_backoff_seconds: float = 0
    retry_backoff_max_seconds: float = 300


@dataclass(frozen=True)
class Execution:
    """How steps execute unless a run's tags say otherwise (README: "Steps: executors and retries")."""

    executor: str = "multiprocess"  # in_process | multiprocess | launcher
    max_concurrent: int = 4
    step_retry: Mapping[str, Any] | None = None  # the default step retry policy; None: no retries


@dataclass(frozen=True)
class RunLauncherConfig:
    name: str | None = "process"
    module: str | None = None
    class_name: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ui:
    """`runherd ui`, the read-only web view (services/runherd/ui)."""

    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str | None = None  # None: database_url; point it at a read-only role
    basic_auth_user: str | None = None  # both set: every page asks for them (HTTP basic)
    basic_auth_password: str | None = None
    allow_actions: bool = False  # true: cancel and re-execute buttons, publishing the normal commands
    dead_letters_shown: int = 20  # dead letters peeked (never removed) on the fleet page; 0: count only


@dataclass(frozen=True)
class Config:
    # Credentials: never in the repr (a config printed in a log or a traceback keeps them).
    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)
    # The workers' own broker credentials (publish events and heartbeats only); None: amqp_url.
    worker_amqp_url: str | None = field(default=None, repr=False)
    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    run_monitoring: RunMonitoring = field(default_factory=RunMonitoring)
    run_coordinator: RunCoordinator = field(default_factory=RunCoordinator)
    run_retries: RunRetries = field(default_factory=RunRetries)
    execution: Execution = field(default_factory=Execution)
    run_launcher: RunLauncherConfig = field(default_factory=RunLauncherConfig)
    ui: Ui = field(default_factory=Ui)
    metrics_port: int = 0  # 0: no HTTP endpoint (/metrics, /healthz, /readyz)
    # Lifecycle events sharded by run over this many queues, spread over the monitor replicas
    # (README "Sharded event ingest"); 1: one events queue with one active consumer.
    event_shards: int = 1
    # RabbitMQ's management API, for the queue-depth gauge (ready + unacknowledged); "": the AMQP
    # host on port 15672 with the AMQP credentials
    rabbitmq_management_url: str = ""
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one object per line, run_id and attempt as fields)
    amqp_tls: tls.AmqpTls = field(default_factory=tls.AmqpTls)
    database_tls: tls.DatabaseTls = field(default_factory=tls.DatabaseTls)
    limits: Limits = field(default_factory=Limits)

    @property
    def workers_amqp_url(self) -> str:
        """The URL handed to workers: ``worker_amqp_url``, else the services' own."""
        return self.worker_amqp_url or self.amqp_url


def redact(url: str) -> str:
    """A connection URL without its password, for messages and logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}@{host}"
    return url


def substitute(text: str, environ: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` (and ``${VAR:-default}``) with the environment's values."""

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"${{{name}}} is used in the config but not set in the environment")

    return _VAR.sub(repl, text)


def _check(key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    # bool is an int in Python; a config saying `limit: true` is a mistake, not 1.
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    return value


_KINDS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


def _section(cls: type, key: str, raw: Any) -> Any:
    if raw is None:
        return cls()
    _check(key, raw, dict, "a mapping")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in known:
            raise ConfigError(f"{key}.{name}: unknown key (known: {', '.join(sorted(known))})")
        kind = known[name].type
        kind = {"bool": bool, "int": int, "float": float, "str": str, "str | None": str}.get(str(kind), kind)
        optional = str(known[name].type).endswith("| None") and value is None
        if kind in _KINDS and not optional:
            types, what = _KINDS[kind]
            _check(f"{key}.{name}", value, types, what)
        values[name] = value
    return cls(**values)


def _tag_limits(raw: Any) -> tuple[TagConcurrencyLimit, ...]:
    key = "run_coordinator.tag_concurrency_limits"
    if raw is None:
        return ()
    _check(key, raw, list, "a list")
    limits = []
    for i, item in enumerate(raw):
        where = f"{key}[{i}]"
        _check(where, item, dict, "a mapping")
        unknown = set(item) - {"key", "value", "limit"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (known: key, value, limit)")
        tag = _check(f"{where}.key", item.get("key"), str, "a string")
        limit = _check(f"{where}.limit", item.get("limit"), int, "an integer")
        value = item.get("value")
        per_unique = False
        if isinstance(value, dict):
            if set(value) != {"applyLimitPerUniqueValue"}:
                raise ConfigError(f"{where}.value: expected a string or {{applyLimitPerUniqueValue: true}}")
            per_unique = _check(
                f"{where}.value.applyLimitPerUniqueValue", value["applyLimitPerUniqueValue"], bool, "true or false"
            )
            value = None
        elif value is not None:
            value = str(_check(f"{where}.value", value, (str, int, float), "a string"))
        limits.append(TagConcurrencyLimit(key=tag, limit=limit, value=value, per_unique_value=per_unique))
    return tuple(limits)


def _run_launcher(raw: Any) -> RunLauncherConfig:
    key = "run_launcher"
    if raw is None:
        return RunLauncherConfig()
    _check(key, raw, dict, "a mapping")
    unknown = set(raw) - {"name", "module", "class", "config"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key (known: name, module, class, config)")
    config = raw.get("config") or {}
    _check(f"{key}.config", config, dict, "a mapping")
    if "module" in raw or "class" in raw:
        module = _check(f"{key}.module", raw.get("module"), str, "a module path")
        cls = _check(f"{key}.class", raw.get("class"), str, "a class name")
        return RunLauncherConfig(name=None, module=module, class_name=cls, config=config)
    name = _check(f"{key}.name", raw.get("name", "process"), str, "a launcher name")
    return RunLauncherConfig(name=name, config=config)


def _execution(raw: Any) -> Execution:
    from runherd import execution, step_retry  # pure validators of the same values in messages
    from runherd.errors import InvalidMessage

    section: Execution = _section(Execution, "execution", raw)
    try:
        execution.parse_executor(section.executor, "execution.executor")
        execution.parse_max_concurrent(section.max_concurrent, "execution.max_concurrent")
        if section.step_retry is not None:
            step_retry.parse_policy(section.step_retry, "execution.step_retry")
    except InvalidMessage as exc:
        raise ConfigError(str(exc)) from None
    return section


def _event_shards(value: Any) -> int:
    _check("event_shards", value, int, "an integer from 1 to 256")
    if not 1 <= value <= 256:
        raise ConfigError(f"event_shards: expected an integer from 1 to 256, got {value!r}")
    return int(value)


def from_mapping(raw: Mapping[str, Any] | None) -> Config:
    raw = dict(raw or {})
    known = {f.name for f in fields(Config)}
    for name in raw:
        if name not in known:
            raise ConfigError(f"{name}: unknown key (known: {', '.join(sorted(known))})")
    coordinator = dict(raw.get("run_coordinator") or {})
    limits = _tag_limits(coordinator.pop("tag_concurrency_limits", None))
    config = Config(
        amqp_url=_check("amqp_url", raw.get("amqp_url", DEFAULT_AMQP_URL), str, "a URL"),
        worker_amqp_url=_check("worker_amqp_url", raw.get("worker_amqp_url"), (str, type(None)), "a URL"),
        database_url=_check("database_url", raw.get("database_url", DEFAULT_DATABASE_URL), str, "a URL"),
        run_monitoring=_section(RunMonitoring, "run_monitoring", raw.get("run_monitoring")),
        run_coordinator=_section(RunCoordinator, "run_coordinator", coordinator),
        run_retries=_section(RunRetries, "run_retries", raw.get("run_retries")),
        execution=_execution(raw.get("execution")),
        run_launcher=_run_launcher(raw.get("run_launcher")),
        ui=_section(Ui, "ui", raw.get("ui")),
        metrics_port=_check("metrics_port", raw.get("metrics_port", 0), int, "an integer"),
        event_shards=_event_shards(raw.get("event_shards", 1)),
        rabbitmq_management_url=_check("rabbitmq_management_url", raw.get("rabbitmq_management_url", ""), str, "a URL"),
        log_level=_check("log_level", raw.get("log_level", "INFO"), str, "a level name"),
        log_format=_check("log_format", raw.get("log_format", "text"), str, "text or json"),
        amqp_tls=_section(tls.AmqpTls, "amqp_tls", raw.get("amqp_tls")),
        database_tls=_section(tls.DatabaseTls, "database_tls", raw.get("database_tls")),
        limits=_section(Limits, "limits", raw.get("limits")).check(),
    )
    object.__setattr__(
        config,
        "run_coordinator",
        RunCoordinator(**{**config.run_coordinator.__dict__, "tag_concurrency_limits": limits}),
    )
    _fold_tls(config)
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {config.log_format!r}")
    for name in ("database_url", "basic_auth_user", "basic_auth_password"):
        if getattr(config.ui, name) is not None:
            _check(f"ui.{name}", getattr(config.ui, name), str, "a string")
    if (config.ui.basic_auth_user is None) != (config.ui.basic_auth_password is None):
        raise ConfigError("ui.basic_auth_user and ui.basic_auth_password: set both or neither")
    if config.run_retries.retry_strategy not in ("FROM_FAILURE", "ALL_STEPS"):
        raise ConfigError("run_retries.retry_strategy: expected FROM_FAILURE or ALL_STEPS")
    return config


def _fold_tls(config: Config) -> None:
    """The TLS sections written into the URLs the drivers read (runherd.tls): every AMQP URL of the
    config (the services' and any other ``*amqp_url``, such as the workers') and the database's."""
    for f in fields(config):
        if f.name.endswith("amqp_url") and isinstance(getattr(config, f.name), str):
            object.__setattr__(config, f.name, tls.amqp_url(getattr(config, f.name), config.amqp_tls, f.name))
    object.__setattr__(config, "database_url", tls.database_url(config.database_url, config.database_tls))


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the config: the file at ``path`` or $RUNHERD_CONFIG or ./runherd.yaml if present,
    then $RUNHERD_AMQP_URL, $RUNHERD_WORKER_AMQP_URL and $RUNHERD_DATABASE_URL override."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    candidate = path or env.get("RUNHERD_CONFIG")
    if candidate is None and Path("runherd.yaml").exists():
        candidate = "runherd.yaml"
    if candidate is not None:
        try:
            text = Path(candidate).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {candidate}: {exc.strerror}") from exc
        try:
            raw = yaml.safe_load(substitute(text, env)) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{candidate}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{candidate}: expected a mapping at the top level")
    if "RUNHERD_AMQP_URL" in env:
        raw["amqp_url"] = env["RUNHERD_AMQP_URL"]
    if "RUNHERD_WORKER_AMQP_URL" in env:
        raw["worker_amqp_url"] = env["RUNHERD_WORKER_AMQP_URL"]
    if "RUNHERD_DATABASE_URL" in env:
        raw["database_url"] = env["RUNHERD_DATABASE_URL"]
    if env.get("RUNHERD_METRICS_PORT", "").isdigit():
        raw["metrics_port"] = int(env["RUNHERD_METRICS_PORT"])
    return from_mapping(raw)
