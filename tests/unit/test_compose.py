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


def test_compose_migrates_as_the_owner_and_serves_as_the_service_role() -> None:
    """Issue 9, item 5: the roles of scripts/postgres-roles.sql, made at the postgres container's first
    start; no runherd process connects as the superuser."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    mounts = dict(
        v.rsplit(":", 2)[:2] if v.endswith(":ro") else v.split(":", 1) for v in services["postgres"]["volumes"]
    )
    assert mounts["./scripts/postgres-roles.sql"] == "/runherd/postgres-roles.sql"
    init = mounts["./scripts/compose/postgres-roles.sh"]
    assert init.startswith("/docker-entrypoint-initdb.d/")
    assert "-f /runherd/postgres-roles.sql" in (ROOT / "scripts" / "compose" / "postgres-roles.sh").read_text()
    for name, service in services.items():
        if "build" in service:
            url = service["environment"]["RUNHERD_DATABASE_URL"]
            role = "runherd_owner" if name == "migrate" else "runherd_service"
            assert url.startswith(f"postgresql://{role}:"), (name, url)
