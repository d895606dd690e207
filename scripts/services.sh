#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ answer on localhost (starting the machine's own if they do not).
set -uo pipefail
if ! pg_isready -h 127.0.0.1 -q 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 60); do pg_isready -h 127.0.0.1 -q && break; sleep 1; done
fi
if ! rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1; then
  rabbitmq-server -detached || true
  rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1 || true
fi
pg_isready -h 127.0.0.1 -q || { echo "services.sh: PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }
rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1 || { echo "services.sh: RabbitMQ is not up" >&2; exit 1; }
echo "services.sh: PostgreSQL and RabbitMQ are up"
