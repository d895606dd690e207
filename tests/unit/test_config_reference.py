"""The README's configuration block is the real default: parsed as YAML, it equals what the loader
gives for an empty file, key for key; and the process launcher's keys shown in its comments are the
launcher's own defaults. A user who copies the block gets exactly what they would get without it."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from runherd import config
from runherd.launchers.process import ProcessLauncher

README = Path(__file__).resolve().parents[2] / "README.md"


def _block() -> str:
    text = README.read_text()
    section = text[text.index("## Configuration") :]
    match = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert match, "no ```yaml block in the README's Configuration section"
    return match.group(1)


def _plain(value: Any) -> Any:
    """The loader's dataclasses as the YAML a user would write."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _loader_defaults() -> dict[str, Any]:
    defaults = _plain(config.from_mapping({}))
    launcher = defaults.pop("run_launcher")
    # A named launcher is written `name:`; module and class are for your own launcher only.
    assert launcher["module"] is None and launcher["class_name"] is None
    defaults["run_launcher"] = {"name": launcher["name"], "config": launcher["config"]}
    return defaults


def test_every_value_of_the_config_block_is_the_loaders_default() -> None:
    shown = yaml.safe_load(_block())
    assert shown == _loader_defaults()


def test_the_block_loads_as_a_config() -> None:
    assert config.from_mapping(yaml.safe_load(_block())) == config.from_mapping({})


def test_the_process_launcher_keys_in_the_comments_are_its_defaults(monkeypatch: Any) -> None:
    monkeypatch.delenv("RUNHERD_LOG_DIR", raising=False)
    commented = re.findall(r"^  #  (\w+): (.*?)(?:\s+#.*)?$", _block().split("run_launcher:", 1)[1], re.MULTILINE)
    shown = {key: value for key, value in commented}
    keys = {
        "log_dir",
        "terminate_grace_seconds",
        "max_log_bytes",
        "worker_command",
        "env",
        "inherit_env",
        "fork_server",
        "fork_server_spares",
    }
    assert set(shown) == keys
    assert yaml.safe_load(shown["fork_server"]) is False
    assert ProcessLauncher({})._fork_server is None
    forking = ProcessLauncher({"fork_server": True})._fork_server
    assert forking is not None and forking.spares == int(shown["fork_server_spares"])
    launcher = ProcessLauncher({})
    assert Path(shown["log_dir"]) == launcher.log_dir
    assert float(shown["terminate_grace_seconds"]) == launcher.grace
    assert int(shown["max_log_bytes"]) == launcher.max_log_bytes
    assert yaml.safe_load(shown["env"]) == launcher.env
    assert frozenset(yaml.safe_load(shown["inherit_env"])) == launcher.inherit_env
    # Not `python`: the launcher's own interpreter, so the worker finds runherd whatever PATH says.
    assert launcher.worker_command == [sys.executable, "-m", "runherd.cli", "worker"]
    assert shown["worker_command"] == "[<the launcher's own python>, -m, runherd.cli, worker]"
