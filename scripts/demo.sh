#!/usr/bin/env bash
# Installs everything, creates the schema, and runs the demo: runs submitted, a worker SIGKILLed
# mid-run, the monitor resuming it from its last completed step.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/services.sh
exec .venv/bin/python scripts/demo.py "$@"
