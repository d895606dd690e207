#!/usr/bin/env bash
# Runs the whole test suite against the real PostgreSQL, RabbitMQ and (if it can run) Docker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/services.sh
bash scripts/ci/dockerd.sh || echo "test.sh: no Docker engine; the Docker tests will say they are skipped"
# Tooling is a gate: lint and types first, then the suite.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# Two workers: the machine has 2 cores, and much of the suite waits on real processes and timeouts.
# Files stay whole on one worker (a fault scenario and its fixtures together).
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=25 "$@"
