"""The CLI's client verbs: submit, runs, show, events, cancel, reexecute, watch, prune."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from runherd import client, contract, overrides, stepview
from runherd.broker import STATUS, Broker
from runherd.config import Config
from runherd.contract import RunStatus
from runherd.errors import InvalidMessage, UsageError
from runherd.store import Store

# A run not stored this long after its launch was published: no launcher is consuming.
NOT_ACCEPTED_AFTER = 3.0
# After a failure, how long to wait for the worker's exit report (it carries the log tail).
EXIT_REPORT_WAIT = 5.0
POLL = 0.25


async def run(args: argparse.Namespace, cfg: Config) -> int:
    # The command prints one line per failure; the AMQP library's own ERROR log lines would only
    # repeat it with a traceback-like prefix.
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    handler = {
        "submit": submit,
        "runs": runs,
        "show": show,
        "events": events,
        "cancel": cancel,
        "reexecute": reexecute,
        "watch": watch,
        "prune": prune,
    }[args.verb]
    return await handler(args, cfg)


def _json(value: Any) -> None:
    print(orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2).decode())


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)).rstrip())


async def submit(args: argparse.Namespace, cfg: Config) -> int:
    data = load_launch_file(args.file, args.tag)
    broker = await Broker.connect(cfg.amqp_url)
    try:
        run_id = await client.submit(broker, data)
    finally:
        await broker.close()
    print(run_id, flush=True)
    if not args.wait:
        return 0
    store = await Store.connect(cfg.database_url)
    try:
        status = await follow(store, run_id)
    finally:
        await store.close()
    print(status.value)
    return 0 if status is RunStatus.SUCCESS else 1


async def follow(store: Store, run_id: str) -> RunStatus:
    """Print each status change of the run as it is recorded, until it is terminal; on FAILURE or
    CANCELED, the reason and the last lines of the failing step's log."""
    published = time.monotonic()
    warned = False
    last = 0
    while True:
        run = await store.get_run(run_id)
        if run is None:
            if not warned and time.monotonic() - published > NOT_ACCEPTED_AFTER:
                warned = True
                print(
                    f"runherd: run {run_id} not accepted after {NOT_ACCEPTED_AFTER:g} s: is a launcher running "
                    "(`runherd up` or `runherd launcher`)? The launch stays queued in RabbitMQ; still waiting",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(POLL)
            continue
        for e in await store.list_events(run_id, last):
            last = e["id"]
            line = _change_line(e)
            if line:
                print(line, flush=True)
        status = RunStatus(run["status"])
        if status.terminal:
            if status is not RunStatus.SUCCESS:
                await _explain_failure(store, run_id, run)
            return status
        await asyncio.sleep(POLL)


def _change_line(e: dict[str, Any]) -> str | None:
    """A status change (or a resume, which keeps the run STARTED) as one line; other events: None."""
    at = e["ts"].strftime("%H:%M:%S.%f")[:-3]
    if e["type"] == "RUN_STATUS":
        change = f"{e['data'].get('from') or '-'} -> {e['data'].get('to')}"
        return f"{at}  {change}  attempt {e['attempt']}" + (f"  ({e['message']})" if e["message"] else "")
    if e["type"] == "RUN_RESUMED":
        return f"{at}  resumed as attempt {e['attempt']}" + (f"  ({e['message']})" if e["message"] else "")
    return None


_WORKER_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ runherd")


async def _explain_failure(store: Store, run_id: str, run: dict[str, Any], tail_lines: int = 10) -> None:
    """The reason, the failed step's error, and the tail of its log (the worker's exit report carries
    it, and may be recorded a moment after the terminal status)."""
    print(f"reason: {run['reason'] or run['status']}", flush=True)
    deadline = time.monotonic() + EXIT_REPORT_WAIT
    while True:
        events = await store.list_events(run_id)
        exits = [e for e in events if e["type"] == "WORKER_EXITED" and e["attempt"] == run["attempt"]]
        if exits or time.monotonic() > deadline or run["attempt"] == 0:
            break
        await asyncio.sleep(POLL)
    for e in events:
        if e["type"] == "STEP_FAILURE":
            print(f"step {e['step_key']} failed: {e['message'] or ''}".rstrip(), flush=True)
    debug = str((exits[-1]["data"] or {}).get("debug_info") or "") if exits else ""
    # The step's own output, not the worker's log lines around it.
    lines = [line for line in debug.splitlines() if line.strip() and not _WORKER_LOG_LINE.match(line)]
    if lines:
        print(f"last lines of the log (attempt {run['attempt']}):", flush=True)
        for line in lines[-tail_lines:]:
            print(f"  | {line}", flush=True)


def load_launch_file(path: str, tags: list[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML or JSON: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a launch message (an object with job and steps)")
    data.setdefault("v", contract.VERSION)
    data["tags"] = {**(data.get("tags") or {}), **contract.parse_tag_args(tags)}
    contract.parse_launch(data)
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem with its line and column (1-based, as PyYAML prints them), on one line."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return str(problem)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


async def runs(args: argparse.Namespace, cfg: Config) -> int:
    store = await Store.connect(cfg.database_url)
    try:
        rows = await store.list_runs(args.status, args.job, args.limit)
        waiting = await waiting_reasons(store, rows, cfg) if args.status == "QUEUED" else {}
    finally:
        await store.close()
    if args.json:
        _json([{**r, "waiting_for": waiting.get(str(r["run_id"]))} if waiting else r for r in rows])
        return 0
    header = ["RUN_ID", "JOB", "STATUS", "ATTEMPT", "CREATED", "WAITING FOR" if waiting else "REASON"]
    width = 90 if waiting else 60
    _table(
        [
            [
                str(r["run_id"]),
                r["job"],
                r["status"],
                str(r["attempt"]),
                r["created_at"].strftime("%H:%M:%S"),
                (waiting.get(str(r["run_id"])) or r["reason"] or "")[:width],
            ]
            for r in rows
        ],
        header,
    )
    return 0


async def waiting_reasons(store: Store, rows: list[dict[str, Any]], cfg: Config) -> dict[str, str]:
    """run_id -> what each QUEUED run of ``rows`` waits for (the limit that holds it, a retry
    backoff, or next in line): `runs --status QUEUED` and the UI's queue page."""
    from runherd.rules.coordinator import why_waiting
    from runherd.store import retries as retry_store

    queued = [r for r in rows if r["status"] == "QUEUED"]
    if not queued:
        return {}
    details = await retry_store.queued_details(store, [r["run_id"] for r in queued])
    queued = [{**r, **details.get(str(r["run_id"]), {})} for r in queued]
    return why_waiting(queued, await store.in_flight(), cfg.run_coordinator)


def show_view(run: dict[str, Any], lineage: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`show --json`'s view of a run (also the UI's run page): steps in run order, lineage, worker."""
    return _show_json(run, lineage)


def _show_json(run: dict[str, Any], lineage: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    run_id = str(run["run_id"])
    steps = _steps_in_run_order(run)
    return {
        "run_id": run_id,
        "job": run["job"],
        "status": run["status"],
        "attempt": run["attempt"],
        "tags": run["tags"],
        "parent_run_id": _s(run["parent_run_id"]),
        "root_run_id": _s(run["root_run_id"]),
        "retry_number": run["retry_number"],
        "resumes": run["resumes"],
        "reason": run["reason"],
        "failure_kind": run["failure_kind"],
        "steps": [
            {
                "key": s["step_key"],
                "status": s["status"],
                "attempt": s["attempt"],
                "reused": s["reused"],
                "error": s["error"],
                "output": s["output"],
            }
            for s in steps
        ],
        "reused_steps": [s["step_key"] for s in steps if s["reused"]],
        "worker": run["handle"],
        # Every run with the same root: the original, its retries and re-executions, oldest first.
        "lineage": [
            {
                "run_id": str(r["run_id"]),
                "status": r["status"],
                "retry_number": r["retry_number"],
                "parent_run_id": _s(r["parent_run_id"]),
                "failure_kind": r["failure_kind"],
                "reused_steps": r["reused_steps"],
                "created_at": r["created_at"],
            }
            for r in lineage or []
        ],
        "children": [str(r["run_id"]) for r in lineage or [] if _s(r["parent_run_id"]) == run_id],
    }


def _steps_in_run_order(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step of the plan in the plan's order (a valid plan lists a step after its deps), with
    its recorded state; a step that has not started yet is PENDING."""
    recorded = {s["step_key"]: s for s in run["steps_status"]}
    plan = run.get("steps") or []
    keys = [s["key"] for s in plan if isinstance(s, dict) and "key" in s]
    keys += sorted(k for k in recorded if k not in keys)
    pending = {"status": "PENDING", "attempt": None, "reused": False, "error": None, "output": None}
    return [{**pending, **recorded.get(k, {}), "step_key": k} for k in keys]


def _handle_text(handle: dict[str, Any] | None) -> str:
    """The worker's handle as `key value` pairs (pid 4242  host build-1 ...); `-` before launch."""
    if not handle:
        return "- (not launched yet)"
    return "  ".join(f"{k} {v}" for k, v in handle.items())


def _output_text(output: Any, width: int = 60) -> str:
    if output is None:
        return ""
    text = orjson.dumps(output).decode()
    return text if len(text) <= width else text[: width - 3] + "..."


def _s(value: Any) -> str | None:
    return None if value is None else str(value)


def _lineage_lines(view: dict[str, Any]) -> list[str]:
    """One line per run of the lineage, marking this run, the root and how each came to be."""
    lines = []
    for r in view["lineage"]:
        if r["parent_run_id"] is None:
            how = "root"
        elif r["retry_number"]:
            how = f"retry {r['retry_number']} of {r['parent_run_id']}"
        else:
            how = f"re-execution of {r['parent_run_id']}"
        n = r["reused_steps"]
        reused = f", {n} step{'s' if n != 1 else ''} reused" if n else ""
        mark = "  <- this run" if r["run_id"] == view["run_id"] else ""
        lines.append(f"  {r['run_id']}  {r['status']:<9} {how}{reused}{mark}")
    return lines


async def show(args: argparse.Namespace, cfg: Config) -> int:
    from runherd.store import retries as retry_store

    store = await Store.connect(cfg.database_url)
    try:
        run = await store.get_run(args.run_id)
        lineage = await retry_store.lineage(store, str(run["root_run_id"] or run["run_id"])) if run else []
        events = await store.list_events(args.run_id) if run else []
    finally:
        await store.close()
    if run is None:
        print(f"runherd: no run {args.run_id}", file=sys.stderr)
        return 2
    view = _show_json(run, lineage)
    tries = stepview.step_tries(events)
    for step in view["steps"]:
        step["tries"] = tries.get(step["key"], [])
    view["executor"] = stepview.executor_of(events)
    view["overrides"] = stepview.overrides_of(events)
    if args.json:
        _json(view)
        return 0
    print(
        f"run      {view['run_id']}\njob      {view['job']}\nstatus   {view['status']}"
        f"{'  (' + view['reason'] + ')' if view['reason'] else ''}\nattempt  {view['attempt']} "
        f"(resumes {view['resumes']})"
    )
    print(
        f"lineage  root {view['root_run_id']}  parent {view['parent_run_id'] or '-'}  "
        f"retry {view['retry_number']}  re-run as {', '.join(view['children']) or '-'}"
    )
    if len(view["lineage"]) > 1:
        print("\n".join(_lineage_lines(view)))
    if view["reused_steps"]:
        print(f"reused   {', '.join(view['reused_steps'])} (outputs from run {view['parent_run_id']}, not executed)")
    print(f"tags     {orjson.dumps(view['tags']).decode()}\nworker   {_handle_text(view['worker'])}")
    if view["executor"]:
        print(f"executor {view['executor']['name']} (max_concurrent {view['executor']['max_concurrent']})")
    if view["overrides"]:
        print(f"given    {', '.join(f'{k} {v}' for k, v in view['overrides'].items())}")
    _table(
        [
            [
                s["key"],
                s["status"],
                "" if s["attempt"] is None else str(s["attempt"]),
                "reused" if s["reused"] else "",
                _output_text(s["output"]),
                s["error"] or "",
            ]
            for s in view["steps"]
        ],
        ["STEP", "STATUS", "ATTEMPT", "", "OUTPUT", "ERROR"],
    )
    if lines := stepview.tries_lines(tries):
        print("tries\n" + "\n".join(lines))
    return 0


def _event_line(e: dict[str, Any]) -> str:
    step = f" [{e['step_key']}]" if e["step_key"] else ""
    if e["type"] == "RUN_STATUS":
        change = f"{e['data'].get('from') or '-'} -> {e['data'].get('to')}"
        e = {**e, "message": f"{change}: {e['message']}" if e["message"] else change}
    refused = f"  REFUSED: {e['refused']}" if e["refused"] else ""
    return (
        f"{e['ts'].strftime('%H:%M:%S.%f')[:-3]}  a{e['attempt']}  {e['source']:<19} {e['type']:<17}"
        f"{step} {e['message'] or ''}{refused}"
    ).rstrip()


async def events(args: argparse.Namespace, cfg: Config) -> int:
    store = await Store.connect(cfg.database_url)
    last = 0
    try:
        if await store.get_run(args.run_id) is None:
            print(f"runherd: no run {args.run_id}", file=sys.stderr)
            return 2
        while True:
            rows = await store.list_events(args.run_id, last)
            last = max([last, *(e["id"] for e in rows)])
            # Time order: a worker's event may be recorded after the launcher's or monitor's.
            for e in sorted(rows, key=lambda e: (e["ts"], e["id"])):
                _print_event(e, args.json)
            if not args.follow:
                return 0
            run = await store.get_run(args.run_id)
            if run is not None and RunStatus(run["status"]).terminal and not rows:
                return 0
            await asyncio.sleep(0.5)
    finally:
        await store.close()


def _print_event(e: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(e, default=str).decode(), flush=True)
        return
    print(_event_line(e), flush=True)
    tail = (e["data"] or {}).get("debug_info") if e["type"] == "WORKER_EXITED" else None
    for line in (tail or "").splitlines()[-8:]:
        print(f"      | {line}", flush=True)


async def _run_or_none(cfg: Config, run_id: str) -> dict[str, Any] | None:
    """The run, read before a command is published; None (after one line on stderr) if there is none."""
    store = await Store.connect(cfg.database_url)
    try:
        run = await store.get_run(run_id)
    finally:
        await store.close()
    if run is None:
        print(f"runherd: no run {run_id}", file=sys.stderr)
    return run


async def cancel(args: argparse.Namespace, cfg: Config) -> int:
    run = await _run_or_none(cfg, args.run_id)
    if run is None:
        return 2
    if RunStatus(run["status"]).terminal:
        print(f"runherd: run {args.run_id} already finished ({run['status']}): nothing to cancel", file=sys.stderr)
        return 2
    broker = await Broker.connect(cfg.amqp_url)
    try:
        await client.cancel(broker, args.run_id)
    finally:
        await broker.close()
    print(f"cancel requested for {args.run_id}")
    return 0


async def reexecute(args: argparse.Namespace, cfg: Config) -> int:
    origin = await _run_or_none(cfg, args.run_id)
    if origin is None:
        return 2
    if not RunStatus(origin["status"]).terminal:
        print(
            f"runherd: run {args.run_id} is {origin['status']}: only a finished run can be re-executed", file=sys.stderr
        )
        return 2
    tags: dict[str, Any] = dict(contract.parse_tag_args(args.tag))
    try:
        # Checked here too, so a typo exits 2 at once instead of becoming a dead letter.
        overrides.apply(contract.parse_steps(origin["steps"]), overrides.parse_list(args.with_))
    except InvalidMessage as exc:
        print(f"runherd: {exc}", file=sys.stderr)
        return 2
    broker = await Broker.connect(cfg.amqp_url)
    try:
        new_id = await client.reexecute(
            broker,
            args.run_id,
            args.strategy,
            tags,
            with_=args.with_,
            job_name=args.job_name,
            max_runtime=args.max_runtime,
            executor=args.executor,
        )
    finally:
        await broker.close()
    print(new_id)
    return 0


async def watch(args: argparse.Namespace, cfg: Config) -> int:
    binding = f"{args.status or '*'}.{(args.job or '#').replace('.', '_')}"
    broker = await Broker.connect(cfg.amqp_url)
    try:
        async for delivery in broker.subscribe(STATUS, binding):
            body = orjson.loads(delivery.body)
            if args.json:
                print(delivery.body.decode(), flush=True)
            else:
                print(
                    f"{body['ts']}  {body['status']:<9} {body['job']}  {body['run_id']}  a{body['attempt']}"
                    f"  {body.get('reason') or ''}".rstrip(),
                    flush=True,
                )
    finally:
        await broker.close()
    return 0


async def prune(args: argparse.Namespace, cfg: Config) -> int:
    """Finished runs older than --older-than, with their events, steps and attempts: counted by
    default, deleted with --yes in batches of --batch-size runs, one short transaction each."""
    if args.batch_size < 1:
        raise UsageError("--batch-size: expected at least 1")
    age = args.older_than
    store = await Store.connect(cfg.database_url)
    try:
        if not args.yes:
            found = await store.prune_preview(age)
            span = ""
            if found["runs"]:
                span = f" (finished {found['oldest']:%Y-%m-%d %H:%M} .. {found['newest']:%Y-%m-%d %H:%M})"
            print(
                f"would delete {found['runs']} finished run(s) older than {age:g} s{span}: {found['events']} events, "
                f"{found['steps']} steps, {found['attempts']} attempts. Nothing deleted; add --yes to delete."
            )
            return 0
        runs_total = events_total = batches = 0
        while True:
            runs_done, events_done = await store.prune_batch(age, args.batch_size)
            if runs_done == 0:
                break
            batches += 1
            runs_total += runs_done
            events_total += events_done
            print(f"batch {batches}: deleted {runs_done} run(s), {events_done} events", flush=True)
    finally:
        await store.close()
    print(f"deleted {runs_total} finished run(s) older than {age:g} s, {events_total} events, {batches} batch(es)")
    return 0
