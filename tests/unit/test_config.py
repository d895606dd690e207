"""runherd.yaml: keys, defaults, ${VAR}, overrides, and refusals that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from runherd import config
from runherd.errors import ConfigError


def test_defaults_follow_dagster() -> None:
    cfg = config.from_mapping({})
    assert cfg.run_monitoring.start_timeout_seconds == 180
    assert cfg.run_monitoring.cancel_timeout_seconds == 180
    assert cfg.run_monitoring.max_resume_run_attempts == 3
    assert cfg.run_coordinator.max_concurrent_runs == -1
    assert cfg.run_launcher.name == "process"


def test_file_with_variables_and_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "runherd.yaml"
    path.write_text(
        "database_url: postgresql://${DB_USER}@h/db\nrun_monitoring:\n  poll_interval_seconds: 2\n"
        "run_coordinator:\n  tag_concurrency_limits:\n    - {key: team, value: data, limit: 2}\n"
        "    - {key: database, value: {applyLimitPerUniqueValue: true}, limit: 1}\n"
        "amqp_url: ${AMQP:-amqp://default/}\n"
    )
    cfg = config.load(path, {"DB_USER": "alice", "RUNHERD_AMQP_URL": "amqp://override/"})
    assert cfg.database_url == "postgresql://alice@h/db"
    assert cfg.amqp_url == "amqp://override/"
    assert cfg.run_monitoring.poll_interval_seconds == 2
    team, database = cfg.run_coordinator.tag_concurrency_limits
    assert (team.key, team.value, team.limit, team.per_unique_value) == ("team", "data", 2, False)
    assert (database.value, database.per_unique_value) == (None, True)
    assert config.load(path, {"DB_USER": "a"}).amqp_url == "amqp://default/"


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"amqp": "x"}, "amqp: unknown key"),
        ({"run_monitoring": {"start_timeout": 3}}, "run_monitoring.start_timeout: unknown key"),
        (
            {"run_monitoring": {"start_timeout_seconds": "soon"}},
            "run_monitoring.start_timeout_seconds: expected a number",
        ),
        ({"run_monitoring": {"enabled": "yes"}}, "run_monitoring.enabled: expected true or false"),
        ({"run_monitoring": {"max_resume_run_attempts": 1.5}}, "run_monitoring.max_resume_run_attempts"),
        ({"run_coordinator": {"max_concurrent_runs": True}}, "run_coordinator.max_concurrent_runs"),
        ({"run_coordinator": {"tag_concurrency_limits": [{"key": "a"}]}}, "tag_concurrency_limits[0].limit"),
        ({"run_retries": {"retry_strategy": "X"}}, "run_retries.retry_strategy"),
        ({"run_launcher": {"nme": "process"}}, "run_launcher.nme: unknown key"),
        ({"run_launcher": "process"}, "run_launcher: expected a mapping"),
    ],
)
def test_bad_config_is_refused_naming_the_key(raw: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_mapping(raw)
    assert named in str(info.value)


def test_unset_variable_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "runherd.yaml"
    path.write_text("database_url: ${NOPE}\n")
    with pytest.raises(ConfigError, match=r"\$\{NOPE\}"):
        config.load(path, {})


def test_unknown_launcher_and_bad_launcher_config() -> None:
    from runherd import launchers

    with pytest.raises(ConfigError, match="unknown launcher 'ssh'"):
        launchers.build(config.from_mapping({"run_launcher": {"name": "ssh"}}).run_launcher)
    with pytest.raises(ConfigError, match="run_launcher.config.colour"):
        launchers.build(config.from_mapping({"run_launcher": {"config": {"colour": "red"}}}).run_launcher)


def test_json_logs_carry_run_id_and_attempt_as_fields() -> None:
    import logging

    import orjson

    from runherd.runtime import JsonFormatter

    record = logging.LogRecord(
        "runherd.monitor",
        logging.INFO,
        __file__,
        1,
        "resuming run_id=%s attempt=%s: %s",
        ("r-1", 2, "worker crashed"),
        None,
    )
    entry = orjson.loads(JsonFormatter().format(record))
    assert entry["run_id"] == "r-1" and entry["attempt"] == 2 and entry["level"] == "INFO"
    assert entry["message"] == "resuming run_id=r-1 attempt=2: worker crashed" and entry["ts"].endswith("Z")
    with pytest.raises(ConfigError, match="log_format"):
        config.from_mapping({"log_format": "xml"})
