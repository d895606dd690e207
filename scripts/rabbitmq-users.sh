#!/usr/bin/env bash
# One RabbitMQ user per runherd role, each with only the permissions its role needs (README, Security).
#
#   scripts/rabbitmq-users.sh [--vhost VHOST] [--prefix PREFIX] [--delete]
#
# Users (PREFIX defaults to "runherd-"):
#   PREFIXlauncher   `runherd launcher`: consumes commands, publishes WORKER_EXITED, status, dead letters
#   PREFIXheartbeat  `runherd heartbeat`: consumes heartbeats, publishes its canaries and dead letters
#   PREFIXmonitor    `runherd monitor`: consumes events, publishes canaries, kill commands, status, dead letters
#   PREFIXservices   `runherd up` (all three in one process): the union of the three
#   PREFIXworker     every worker (`worker_amqp_url`): may publish to runherd.events and runherd.heartbeats,
#                    nothing else: no configure (declare, delete, purge), no read (consume, get, bind)
#   PREFIXclient     clients (`runherd submit`, `watch`, runherd.client): publish commands, follow runherd.status
#                    through private queues of their own; cannot touch runherd's queues
#
# The services declare the topology at start, so they may configure runherd's exchanges and queues;
# declaring a queue with a dead-letter exchange needs read on it too, so every service may read them.
# What tells the services apart is what they may write to.
#
# Passwords come from $RUNHERD_RABBITMQ_<ROLE>_PASSWORD (e.g. RUNHERD_RABBITMQ_WORKER_PASSWORD);
# a role without one gets a random password. Prints one line per role: `ROLE USER PASSWORD`.
# Run it again to rotate: an existing user gets the new password and the same permissions. The vhost is
# created if it is missing. Needs python3 (to hash the passwords). rabbitmqctl must reach the node (as root or the rabbitmq user); set RABBITMQCTL to run it elsewhere,
# e.g. RABBITMQCTL="docker compose exec -T rabbitmq rabbitmqctl".
set -euo pipefail

vhost=/
prefix=runherd-
delete=0
while [ $# -gt 0 ]; do
    case "$1" in
        --vhost) vhost="$2"; shift 2 ;;
        --prefix) prefix="$2"; shift 2 ;;
        --delete) delete=1; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "rabbitmq-users.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
read -r -a ctl <<< "${RABBITMQCTL:-rabbitmqctl}"

roles=(launcher heartbeat monitor services worker client)

# Resource names (exchanges and queues share one namespace for permissions).
queues='runherd\.launcher\.commands|runherd\.monitor\.events|runherd\.heartbeats|runherd\.dead-letters'
exchanges='runherd\.commands|runherd\.events|runherd\.heartbeats|runherd\.status|runherd\.dead'
topology="^($queues|$exchanges)\$"
private='runherd\.follow\..*|amq\.gen-.*'

permissions() {  # configure write read
    case "$1" in
        launcher)  echo "$topology" "^($queues|runherd\.events|runherd\.status|runherd\.dead)\$" "$topology" ;;
        heartbeat) echo "$topology" "^($queues|runherd\.dead)\$" "$topology" ;;
        monitor)   echo "$topology" "^($queues|runherd\.events|runherd\.commands|runherd\.status|runherd\.dead)\$" "$topology" ;;
        services)  echo "$topology" "^($queues|$exchanges)\$" "$topology" ;;
        worker)    echo '^$' '^(runherd\.events|runherd\.heartbeats)$' '^$' ;;
        client)    echo "^($private)\$" "^(runherd\.commands|$private)\$" "^(runherd\.status|$private)\$" ;;
    esac
}

password_for() {
    local var="RUNHERD_RABBITMQ_${1^^}_PASSWORD"
    if [ -n "${!var:-}" ]; then
        printf '%s' "${!var}"
    else
        head -c 18 /dev/urandom | base64 | tr '+/' '-_'
    fi
}

if [ "$delete" = 1 ]; then
    # One rabbitmqctl call for every user (each call starts an Erlang VM: about half a second).
    users=""
    for role in "${roles[@]}"; do users="$users<<\"$prefix$role\">>,"; done
    "${ctl[@]}" -q eval "[rabbit_auth_backend_internal:delete_user(U, <<\"rabbitmq-users.sh\">>) || U <- [${users%,}], rabbit_auth_backend_internal:exists(U)]." >/dev/null
    exit 0
fi

# The users, their permissions and the vhost (created if missing) as one definitions file, imported
# with one call. Passwords go in salted SHA-256 (RabbitMQ's default hashing), never on a command line.
declare -A passwords
lines=""
for role in "${roles[@]}"; do
    passwords[$role]="$(password_for "$role")"
    read -r configure write read <<< "$(permissions "$role")"
    lines+="$prefix$role"$'\t'"${passwords[$role]}"$'\t'"$configure"$'\t'"$write"$'\t'"$read"$'\n'
done
printf '%s' "$lines" | python3 -c '
import base64, hashlib, json, os, sys
vhost = sys.argv[1]
users, permissions = [], []
for line in sys.stdin.read().splitlines():
    user, password, configure, write, read = line.split("\t")
    salt = os.urandom(4)
    digest = base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()
    users.append({"name": user, "password_hash": digest, "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []})
    permissions.append({"user": user, "vhost": vhost, "configure": configure, "write": write, "read": read})
json.dump({"vhosts": [{"name": vhost}], "users": users, "permissions": permissions}, sys.stdout)
' "$vhost" | "${ctl[@]}" -q import_definitions --format json >/dev/null  # on its standard input: no file to leak
for role in "${roles[@]}"; do
    printf '%s %s %s\n' "$role" "$prefix$role" "${passwords[$role]}"
done
