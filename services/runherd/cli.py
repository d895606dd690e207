"""The `runherd` command. Bad input exits 2 with one line saying why."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from runherd import config as config_mod
from runherd import contract
from runherd.errors import ConfigError, InvalidMessage, NotMigrated, RunherdError, UsageError

VERBS = (
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
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runherd", description="Queue, launch, monitor, resume and retry runs.")
    p.add_argument("--config", help="runherd.yaml (default: $RUNHERD_CONFIG or ./runherd.yaml)")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    sub.add_parser("migrate", help="create or upgrade the PostgreSQL schema")
    up = sub.add_parser("up", help="launcher, heartbeat and monitor in one process (development, demo)")
    up.add_argument("--monitors", type=int, default=1, help="monitor replicas (default 1)")
    up.add_argument("--heartbeats", type=int, default=1, help="heartbeat replicas (default 1)")
    sub.add_parser("launcher", help="run the launcher service")
    sub.add_parser("heartbeat", help="run the heartbeat service")
    sub.add_parser("monitor", help="run the monitor service")
    sub.add_parser("worker", help="run one attempt of a run (started by a run launcher)")
    s = sub.add_parser("submit", help="submit a launch message from a YAML or JSON file; prints the run id")
    s.add_argument("file")
    s.add_argument("--tag", action="append", default=[], metavar="K=V")
    s.add_argument("--wait", action="store_true", help="follow the run; exit 0 on SUCCESS, 1 otherwise")
    r = sub.add_parser("runs", help="list runs")
    r.add_argument("--status", type=_status)
    r.add_argument("--job")
    r.add_argument("--limit", type=int, default=50)
    r.add_argument("--json", action="store_true")
    sh = sub.add_parser("show", help="one run: status, lineage, steps, worker")
    sh.add_argument("run_id", type=_run_id)
    sh.add_argument("--json", action="store_true")
    e = sub.add_parser("events", help="a run's event log")
    e.add_argument("run_id", type=_run_id)
    e.add_argument("--follow", action="store_true")
    e.add_argument("--json", action="store_true")
    c = sub.add_parser("cancel", help="cancel a run")
    c.add_argument("run_id", type=_run_id)
    rx = sub.add_parser("reexecute", help="re-execute a finished run as a new run")
    rx.add_argument("run_id", type=_run_id)
    rx.add_argument("--strategy", choices=["FROM_FAILURE", "ALL_STEPS"], default="FROM_FAILURE")
    rx.add_argument("--tag", action="append", default=[], metavar="K=V")
    rx.add_argument("--max-runtime", type=int, metavar="S")
    w = sub.add_parser("watch", help="follow status changes as they are published")
    w.add_argument("--status", type=_status)
    w.add_argument("--job")
    w.add_argument("--json", action="store_true")
    return p


def _status(value: str) -> str:
    if value.upper() not in contract.RunStatus.__members__:
        raise argparse.ArgumentTypeError(f"unknown status {value!r} (one of {', '.join(contract.RunStatus)})")
    return value.upper()


def _run_id(value: str) -> str:
    try:
        return contract.parse_run_id(value)
    except InvalidMessage as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verb == "worker":
        from runherd.worker.main import main as worker_main

        return worker_main()
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"runherd: config: {exc}", file=sys.stderr)
        return 2
    from runherd.runtime import setup_logging

    setup_logging(cfg.log_level, cfg.log_format)
    try:
        return asyncio.run(_dispatch(args, cfg))
    except (InvalidMessage, UsageError, ConfigError) as exc:
        print(f"runherd: {exc}", file=sys.stderr)
        return 2
    except NotMigrated as exc:
        print(f"runherd: {exc}", file=sys.stderr)
        return 3
    except RunherdError as exc:
        print(f"runherd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from runherd import app
    from runherd.store import migrate

    verb = args.verb
    if verb == "migrate":
        applied = await migrate(cfg.database_url)
        print(f"migrated: {', '.join(applied)}" if applied else "schema is up to date")
        return 0
    if verb == "up":
        return await app.serve(cfg, {"launcher": 1, "heartbeat": args.heartbeats, "monitor": args.monitors})
    if verb in app.SERVICES:
        return await app.serve(cfg, {verb: 1})
    from runherd import views

    return await views.run(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
