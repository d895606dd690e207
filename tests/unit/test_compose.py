"""compose.yaml parses, and every command it runs is a real `runherd` verb."""

from __future__ import annotations

from pathlib import Path

import yaml

from runherd.cli import VERBS, _parser

ROOT = Path(__file__).resolve().parents[2]


def test_compose_parses_and_runs_real_verbs() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"rabbitmq", "postgres", "migrate", "launcher", "heartbeat", "monitor"} <= set(services)
    assert services["heartbeat"]["deploy"]["replicas"] == 2 and services["monitor"]["deploy"]["replicas"] == 2
    parser = _parser()
    runherd = [s for s in services.values() if "build" in s]
    assert len(runherd) == 4
    for service in runherd:
        assert service["build"]["dockerfile"] == "services/Dockerfile"
        assert (ROOT / service["build"]["dockerfile"]).exists()
        command = service["command"]
        assert command[0] in VERBS
        parser.parse_args(command)  # a real verb with valid arguments (raises SystemExit if not)


def test_dockerfile_entrypoint_is_runherd() -> None:
    text = (ROOT / "services" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["runherd"]' in text


def test_help_lists_every_verb_of_the_design() -> None:
    help_text = _parser().format_help()
    for verb in (
        "migrate",
        "up",
        "launcher",
        "heartbeat",
        "monitor",
        "worker",
        "submit",
        "runs",
        "show",
        "events",
        "cancel",
        "reexecute",
        "watch",
    ):
        assert verb in VERBS and verb in help_text
