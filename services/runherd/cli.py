"""The `runherd` command. Bad input exits 2 with one line saying why."""

from __future__ import annotations

import argparse
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
    "prune",
    "ui",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runherd", description="Queue, launch, monitor, resume and retry runs.")
    p.add_argument("--config", help="runherd.yaml (default: $RUNHERD_CONFIG or ./runherd.yaml)")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB", help="what to do")
    sub.add_parser("migrate", help="create or upgrade the PostgreSQL schema")
    up = sub.add_parser("up", help="launcher, heartbeat and monitor in one process (development, demo)")
    up.add_argument("--monitors", type=int, default=1, help="monitor replicas (default 1)")
    up.add_argument("--heartbeats", type=int, default=1, help="heartbeat replicas (default 1)")
    sub.add_parser("launcher", help="run the launcher service")
    sub.add_parser("heartbeat", help="run the heartbeat service")
    sub.add_parser("monitor", help="run the monitor service")
    sub.add_parser("worker", help="run one attempt of a run (started by a run launcher)")
    s = sub.add_parser("submit", help="submit a launch message from a YAML or JSON file; prints the run id")
    s.add_argument("file", help="the launch message: job, steps, optional tags, env and run_id")
    s.add_argument("--tag", action="append", default=[], metavar="K=V", help="add a tag (repeatable)")
    s.add_argument(
        "--wait",
        action="store_true",
        help="follow the run, printing each status change; exit 0 on SUCCESS, 1 on FAILURE or CANCELED",
    )
    r = sub.add_parser("runs", help="list runs, newest first")
    r.add_argument("--status", type=_status, help="only runs in this status (QUEUED also says what each waits for)")
    r.add_argument("--job", help="only runs of this job")
    r.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    r.add_argument("--json", action="store_true", help="JSON instead of a table")
    sh = sub.add_parser("show", help="one run: status, lineage, steps in run order with outputs, worker")
    sh.add_argument("run_id", type=_run_id, help="the run's id (a UUID)")
    sh.add_argument("--json", action="store_true", help="JSON instead of text")
    e = sub.add_parser("events", help="a run's event log, in time order")
    e.add_argument("run_id", type=_run_id, help="the run's id (a UUID)")
    e.add_argument("--follow", action="store_true", help="keep printing new events until the run has finished")
    e.add_argument("--json", action="store_true", help="one JSON object per event")
    c = sub.add_parser("cancel", help="cancel a queued or running run")
    c.add_argument("run_id", type=_run_id, help="the run's id (a UUID)")
    rx = sub.add_parser("reexecute", help="re-execute a finished run as a new run")
    rx.add_argument("run_id", type=_run_id, help="the finished run's id (a UUID)")
    rx.add_argument(
        "--strategy",
        choices=["FROM_FAILURE", "ALL_STEPS"],
        default="FROM_FAILURE",
        help="FROM_FAILURE reuses the steps that succeeded (default); ALL_STEPS runs every step again",
    )
    rx.add_argument("--tag", action="append", default=[], metavar="K=V", help="add a tag to the new run (repeatable)")
    rx.add_argument("--max-runtime", type=int, metavar="S", help="the new run's runherd/max_runtime, in seconds")
    rx.add_argument(
        "--with",
        dest="with_",
        action="append",
        default=[],
        metavar="STEP=retry:N|STEP=timeout:S",
        help="override a step's retries or timeout in the new run only; STEP * is every step (repeatable)",
    )
    rx.add_argument("--job-name", metavar="NAME", help="the new run's job name (default: the origin's)")
    rx.add_argument("--executor", choices=["in_process", "multiprocess", "launcher"], help="the new run's executor")
    w = sub.add_parser("watch", help="follow status changes as they are published")
    w.add_argument("--status", type=_status, help="only changes to this status")
    w.add_argument("--job", help="only runs of this job")
    w.add_argument("--json", action="store_true", help="the status messages as published (JSON)")
    pr = sub.add_parser(
        "prune",
        help="delete finished runs and their events; a dry run unless --yes",
        description="Delete finished runs (SUCCESS, FAILURE, CANCELED) with their events, steps and attempts. "
        "A dry run unless --yes: it prints what would be deleted.",
    )
    pr.add_argument(
        "--older-than",
        type=_duration,
        required=True,
        metavar="DURATION",
        help="runs that finished longer ago than this: 90s, 45m, 12h, 30d, 2w (a bare number is seconds)",
    )
    pr.add_argument("--yes", action="store_true", help="delete (without it, only print what would be deleted)")
    pr.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        metavar="N",
        help="runs deleted per transaction (default 1000), so no lock is held for long",
    )
    ui = sub.add_parser("ui", help="serve the read-only web view (runs, timelines, queue, fleet)")
    ui.add_argument("--host", help="address to listen on (default: ui.host, 127.0.0.1)")
    ui.add_argument("--port", type=int, help="port to listen on (default: ui.port, 8080)")
    return p


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(value: str) -> float:
    """`30d` -> seconds. A bare number is seconds."""
    text = value.strip().lower()
    unit = text[-1:] if text[-1:] in _UNITS else "s"
    number = text[:-1] if text[-1:] in _UNITS else text
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90s, 45m, 12h or 30d, got {value!r}") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"expected a duration >= 0, got {value!r}")
    return seconds


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
    from runherd.runtime import run_loop, setup_logging

    setup_logging(cfg.log_level, cfg.log_format)
    try:
        return run_loop(_dispatch(args, cfg))
    except (InvalidMessage, UsageError, ConfigError) as exc:
        print(f"runherd: {exc}", file=sys.stderr)
        return 2
    except NotMigrated as exc:
        print(f"runherd: {exc}", file=sys.stderr)
        return 3
    except RunherdError as exc:
        hinted = _hint(str(exc))
        print(f"runherd: {hinted}", file=sys.stderr)
        # A database that does not exist is one that was never migrated: the same exit code.
        return 3 if hinted != str(exc) else 1
    except KeyboardInterrupt:
        return 130


def _hint(message: str) -> str:
    # A database that does not exist yet was never migrated: `runherd migrate` creates it.
    if "database" in message and "does not exist" in message:
        return f"{message}: run `runherd migrate`"
    return message


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
    if verb == "ui":
        from runherd.ui.server import serve

        return await serve(cfg, args.host, args.port)
    from runherd import views

    return await views.run(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
