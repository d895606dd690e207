"""The pure parts of issue 9's items 6 and 7: each input limit at its boundary, and the TLS config
sections folded into the URLs the drivers read."""

from __future__ import annotations

from typing import Any

import pytest

from runherd import config, limits, tls
from runherd.errors import ConfigError, InvalidMessage

L = limits.Limits(max_message_bytes=2_000_000, max_steps=3, max_tag_key_length=4, max_tag_value_length=5)


def _steps(n: int) -> list[dict[str, Any]]:
    return [{"key": f"s{i}", "command": ["true"]} for i in range(n)]


@pytest.mark.parametrize(
    ("key", "data", "refusal"),
    [
        ("launch", {"steps": _steps(3)}, None),
        ("launch", {"steps": _steps(4)}, "steps: 4 steps, over the limit of 3 (limits.max_steps)"),
        ("launch", {"tags": {"abcd": "x"}}, None),
        ("launch", {"tags": {"abcde": "x"}}, "key of 5 characters, over the limit of 4 (limits.max_tag_key_length)"),
        ("launch", {"tags": {"k": "vvvvv"}}, None),
        ("launch", {"tags": {"k": "vvvvvv"}}, "value of 6 characters, over the limit of 5"),
        ("launch", {"tags": {"k": 123456}}, "value of 6 characters"),  # not a string: its JSON
        ("launch", {"tags": {"k": [1, 2]}}, None),  # "[1,2]"
        ("reexecute", {"tags": {"abcde": 1}}, "(limits.max_tag_key_length)"),
        ("launch", {"env": {"K": "v" * (131072 - 2)}}, None),  # "K=" plus the value: exactly the limit
        ("launch", {"env": {"K": "v" * (131072 - 1)}}, "env: 131073 bytes, over the limit of 131072 bytes"),
        ("launch", {"steps": "not a list", "tags": [], "env": None}, None),  # types are the validator's job
        ("terminate", {"tags": {"abcde": 1}}, None),
        ("launch", ["not", "a", "dict"], None),
    ],
)
def test_check_command(key: str, data: Any, refusal: str | None) -> None:
    if refusal is None:
        limits.check_command(key, data, L)
        return
    with pytest.raises(InvalidMessage) as raised:
        limits.check_command(key, data, L)
    assert refusal in str(raised.value)


def test_utf8_env_is_counted_in_bytes() -> None:
    limits.check_command("launch", {"env": {"K": "é" * 65535}}, limits.DEFAULT)  # 2 + 131070 bytes
    with pytest.raises(InvalidMessage, match="env: 131074 bytes"):
        limits.check_command("launch", {"env": {"K": "é" * 65536}}, limits.DEFAULT)


def test_oversized() -> None:
    assert limits.oversized(10, 10) is None
    assert limits.oversized(11, 10) == (
        "message too large: 11 bytes, over the limit of 10 bytes (limits.max_message_bytes); refused before parsing"
    )


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"max_steps": 0}, "limits.max_steps: must be at least 1, got 0"),
        ({"max_message_bytes": 1_000_000}, "limits.max_message_bytes: must be at least 1114112"),
        ({"max_env_bytes": "big"}, "limits.max_env_bytes: expected an integer"),
        ({"max_files": 3}, "limits.max_files: unknown key"),
    ],
)
def test_bad_limits_are_refused_at_start(raw: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("(", r"\(")):
        config.from_mapping({"limits": raw})


def test_tls_sections_are_folded_into_the_urls() -> None:
    cfg = config.from_mapping(
        {
            "amqp_url": "amqps://u:p@broker:5671/prod",
            "database_url": "postgresql://runherd_service:pw@db:5432/runherd",
            "amqp_tls": {"ca_file": "/tls/ca.pem", "cert_file": "/tls/c.pem", "key_file": "/tls/c.key"},
            "database_tls": {"sslmode": "verify-full", "ca_file": "/tls/ca.pem", "cert_file": "/c", "key_file": "/k"},
        }
    )
    assert cfg.amqp_url == "amqps://u:p@broker:5671/prod?cafile=/tls/ca.pem&certfile=/tls/c.pem&keyfile=/tls/c.key"
    assert cfg.database_url == (
        "postgresql://runherd_service:pw@db:5432/runherd?sslmode=verify-full&sslrootcert=/tls/ca.pem&sslcert=/c&sslkey=/k"
    )
    assert config.redact(cfg.database_url).startswith("postgresql://runherd_service@db:5432/runherd?sslmode=")


def test_a_parameter_in_the_url_wins_and_no_section_changes_nothing() -> None:
    assert tls.amqp_url("amqps://h/?cafile=/mine", tls.AmqpTls(ca_file="/theirs")) == "amqps://h/?cafile=/mine"
    assert tls.database_url("postgresql://h/db?sslmode=require", tls.DatabaseTls(sslmode="disable")).endswith(
        "?sslmode=require"
    )
    assert config.from_mapping({}).amqp_url == config.DEFAULT_AMQP_URL
    assert config.from_mapping({}).database_url == config.DEFAULT_DATABASE_URL
    assert tls.amqp_url("amqps://h/", tls.AmqpTls(verify=False)) == "amqps://h/?no_verify_ssl=1"


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"amqp_tls": {"ca_file": "/ca.pem"}}, "amqp_tls: set, but amqp_url is not amqps://"),
        ({"database_tls": {"sslmode": "on"}}, "database_tls.sslmode: expected one of disable"),
        ({"database_tls": {"ca_file": 1}}, "database_tls.ca_file: expected a string"),
        ({"amqp_tls": {"verify": "no"}}, "amqp_tls.verify: expected true or false"),
    ],
)
def test_bad_tls_config_is_refused_at_start(raw: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        config.from_mapping(raw)
