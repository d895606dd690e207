#!/usr/bin/env bash
# Installs everything and runs the demo: runs submitted, a worker SIGKILLed
# mid-run, the monitor resuming it from its last completed step. It runs in a RabbitMQ vhost and a
# PostgreSQL database of its own (made and removed by scripts/demo.py), never in your deployment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/services.sh
exec .venv/bin/python scripts/demo.py "$@"
