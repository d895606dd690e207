"""The promises every fault scenario checks afterwards, from three independent witnesses:

* PostgreSQL (runs, attempts, the event log);
* a recorder bound from the start of the scenario to ``runherd.status`` (``#``), to
  ``runherd.events`` (``run.*``) and to ``runherd.heartbeats`` (``hb``), which keeps every message
  with its AMQP message_id and the time it arrived;
* the broker's dead-letter queue of the scenario's vhost.

``check`` returns a Report with one count per invariant (0 is the promise) and a few examples of each.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
import orjson

from runherd.broker import DEAD_QUEUE, ERROR_HEADER, EVENTS, HEARTBEATS, STATUS
from tests.faults.load import Load

TERMINAL = ("SUCCESS", "FAILURE", "CANCELED")
EXAMPLES = 5


@dataclass
class Recorded:
    body: dict[str, Any]
    message_id: str | None
    received: float  # time.time() when it arrived


class Recorder:
    """Every status message, lifecycle event and heartbeat of the vhost, as they arrive."""

    def __init__(self) -> None:
        self.status: list[Recorded] = []
        self.events: list[Recorded] = []
        self.heartbeats: list[Recorded] = []
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self, amqp_url: str) -> Recorder:
        self._conn = await aio_pika.connect_robust(amqp_url)
        channel = await self._conn.channel()
        await channel.set_qos(prefetch_count=500)
        for exchange, kind, key, into in (
            (STATUS, aio_pika.ExchangeType.TOPIC, "#", self.status),
            (EVENTS, aio_pika.ExchangeType.TOPIC, "run.*", self.events),
            (HEARTBEATS, aio_pika.ExchangeType.DIRECT, "hb", self.heartbeats),
        ):
            declared = await channel.declare_exchange(exchange, kind, durable=True)
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(declared, routing_key=key)
            await queue.consume(self._keeper(into), no_ack=True)
        return self

    @staticmethod
    def _keeper(into: list[Recorded]) -> Any:
        async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            with contextlib.suppress(orjson.JSONDecodeError):
                into.append(Recorded(orjson.loads(message.body), message.message_id, time.time()))

        return keep

    def unique_status_ids(self) -> int:
        return len({r.message_id for r in self.status})

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()


@dataclass
class Report:
    scenario: str
    load: str
    seconds: float = 0.0
    fault: str = ""
    runs: int = 0  # runs in the database (the load and the retries runherd made)
    outcomes: dict[str, int] = field(default_factory=dict)
    resumes: int = 0
    resume_reasons: dict[str, int] = field(default_factory=dict)
    transitions: int = 0
    status_messages: int = 0
    # the invariants: 0 each
    lost: int = 0
    stuck: int = 0
    two_workers: int = 0
    terminal_changed: int = 0
    spurious_resumes: int = 0
    status_missing: int = 0
    status_published_twice: int = 0  # one transition under two message_ids
    status_without_transition: int = 0
    transition_applied_twice: int = 0
    dead_lettered: int = 0
    service_exits: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    # reported, not a promise of the list (a fault may legitimately fail a run)
    status_redelivered: int = 0  # same message_id twice: allowed by the outbox contract
    unexpected_outcomes: int = 0
    leftover_workers: int = 0
    notes: list[str] = field(default_factory=list)  # a scenario's own figures
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    INVARIANTS = (
        "lost",
        "stuck",
        "two_workers",
        "terminal_changed",
        "spurious_resumes",
        "status_missing",
        "status_published_twice",
        "status_without_transition",
        "transition_applied_twice",
        "dead_lettered",
        "service_exits",
    )

    def note(self, invariant: str, example: str) -> None:
        setattr(self, invariant, getattr(self, invariant) + 1)
        if len(self.examples[invariant]) < EXAMPLES:
            self.examples[invariant].append(example)

    def violations(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.INVARIANTS if getattr(self, name)}

    def text(self) -> str:
        counts = ", ".join(f"{name} {getattr(self, name)}" for name in self.INVARIANTS)
        lines = [
            f"[faults] {self.scenario}: {self.seconds:.1f} s; fault: {self.fault}",
            f"  load: {self.load}; {self.runs} runs in the database, outcomes {dict(sorted(self.outcomes.items()))}",
            f"  {self.transitions} transitions, {self.status_messages} status messages "
            f"({self.status_redelivered} redelivered under the same message_id), {self.resumes} resumes "
            f"{self.resume_reasons or ''}",
            f"  invariants ({len(self.INVARIANTS)} checked): {counts}",
            f"  also: unexpected outcomes {self.unexpected_outcomes}, leftover workers {self.leftover_workers}",
        ]
        lines.extend(f"  {note}" for note in self.notes)
        if self.dead_letter_reasons:
            lines.append(f"  dead letters by reason: {self.dead_letter_reasons}")
        for name, examples in self.examples.items():
            for example in examples:
                lines.append(f"    {name}: {example}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Limits:
    start_timeout: float
    cancel_timeout: float
    heartbeat_timeout: float
    poll_interval: float
    # Seconds nobody could act (a database outage): a timeout that spans them fires that much later,
    # since its deadline is measured up to where runherd has heard its workers, not up to now.
    deaf_seconds: float = 0.0


async def connect(db_url: str) -> asyncpg.Connection:
    """A plain connection that decodes json and jsonb (as the store does)."""
    conn = await asyncpg.connect(db_url, timeout=5)
    for typ in ("jsonb", "json"):
        await conn.set_type_codec(
            typ, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
        )
    return conn


async def check(
    report: Report,
    *,
    db_url: str,
    amqp_url: str,
    load: Load,
    recorder: Recorder,
    limits: Limits,
    service_exits: list[str],
) -> Report:
    conn = await connect(db_url)
    try:
        runs = [dict(r) for r in await conn.fetch("SELECT * FROM runs")]
        attempts = [dict(r) for r in await conn.fetch("SELECT * FROM attempts")]
        events = [
            dict(r)
            for r in await conn.fetch(
                "SELECT id, run_id, attempt, source, seq, type, message, data, ts FROM events "
                "WHERE type IN ('RUN_STATUS', 'RUN_RESUMED') ORDER BY id"
            )
        ]
        now = await conn.fetchval("SELECT clock_timestamp()")
    finally:
        await conn.close()
    report.runs = len(runs)
    report.outcomes = dict(Counter(r["status"] for r in runs))
    _lost_and_stuck(report, load, runs, attempts, now, limits)
    _stuck_on_the_way(report, events, limits, recorder)
    _two_workers(report, recorder, attempts)
    _terminal_changed(report, recorder, events)
    _spurious_resumes(report, recorder, events)
    _published_once(report, recorder, events)
    _applied_once(report, events)
    await _dead_letters(report, amqp_url)
    _outcomes(report, load, runs, attempts)
    for what in service_exits:
        report.note("service_exits", what)
    return report


def _lost_and_stuck(
    report: Report, load: Load, runs: list[dict[str, Any]], attempts: list[dict[str, Any]], now: datetime, lim: Limits
) -> None:
    by_id = {str(r["run_id"]): r for r in runs}
    current = {(str(a["run_id"]), a["attempt"]): a for a in attempts}
    for run_id in load.published:
        if run_id not in by_id:
            report.note("lost", f"{run_id}: published, never stored")
    slack = 2 * lim.poll_interval + 2 + lim.deaf_seconds
    for run in runs:
        run_id, status = str(run["run_id"]), run["status"]
        if status in TERMINAL:
            continue
        attempt = current.get((run_id, run["attempt"]))
        handle = (attempt or {}).get("handle") or {}
        if status != "STARTED" or not _pid_alive(handle.get("pid")):
            report.note("lost", f"{run_id}: {status}, attempt {run['attempt']}, no live worker")
        age = (now - run["status_changed_at"]).total_seconds()
        if status == "STARTING" and age > lim.start_timeout + slack:
            report.note("stuck", f"{run_id}: STARTING for {age:.0f} s")
        elif status == "CANCELING" and age > lim.cancel_timeout + slack:
            report.note("stuck", f"{run_id}: CANCELING for {age:.0f} s")
        elif status == "STARTED" and attempt is not None:
            seen = attempt["last_heartbeat_at"] or attempt["launched_at"] or attempt["created_at"]
            silent = (now - seen).total_seconds()
            if silent > max(lim.heartbeat_timeout, lim.start_timeout) + slack:
                report.note("stuck", f"{run_id}: STARTED, silent for {silent:.0f} s")


def _stuck_on_the_way(
    report: Report, events: list[dict[str, Any]], lim: Limits, recorder: Recorder | None = None
) -> None:
    """A run that stayed STARTING or CANCELING longer than its timeout (plus two sweeps), even if it
    finished in the end: the timeout did not fire when it should have.

    A STARTING run whose worker said RUN_START in time was not stuck, even if that event was applied
    late (its monitor restarting, or a loaded machine): the start timeout is measured up to what the
    monitor has heard, so it rightly let the run start. There the hold ends when the recorder heard
    RUN_START on the broker, not when the event log applied it."""
    slack = 2 * lim.poll_interval + 2 + lim.deaf_seconds
    limit = {"STARTING": lim.start_timeout, "CANCELING": lim.cancel_timeout}
    said_start = _first_run_start(recorder)
    since: dict[str, tuple[str, datetime]] = {}
    for e in events:
        if e["type"] != "RUN_STATUS":
            continue
        run_id = str(e["run_id"])
        to = e["data"].get("to")
        previous = since.get(run_id)
        if previous is not None and previous[0] in limit:
            ended = e["ts"].timestamp()
            if previous[0] == "STARTING" and to == "STARTED":
                ended = min(ended, said_start.get((run_id, e["attempt"]), ended))
            held = ended - previous[1].timestamp()
            if held > limit[previous[0]] + slack:
                report.note("stuck", f"{run_id}: {previous[0]} for {held:.0f} s before {to}")
        since[run_id] = (to, e["ts"])


def _first_run_start(recorder: Recorder | None) -> dict[tuple[str, int], float]:
    """When each attempt's RUN_START first crossed the broker (time.time(), as the event log's clock)."""
    first: dict[tuple[str, int], float] = {}
    for rec in recorder.events if recorder is not None else []:
        body = rec.body
        if body.get("type") == "RUN_START":
            key = (str(body.get("run_id")), body.get("attempt"))
            first[key] = min(first.get(key, rec.received), rec.received)  # type: ignore[index]
    return first


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _two_workers(report: Report, recorder: Recorder, attempts: list[dict[str, Any]]) -> None:
    """Two distinct worker pids said RUN_START for one attempt (the recorder sees both, even when
    the event log keeps only the first), or the attempt's recorded handle names another worker."""
    pids: dict[tuple[str, int], set[int]] = defaultdict(set)
    for rec in recorder.events:
        body = rec.body
        if body.get("type") == "RUN_START" and isinstance((body.get("data") or {}).get("pid"), int):
            pids[(body["run_id"], body["attempt"])].add(body["data"]["pid"])
    handles = {(str(a["run_id"]), a["attempt"]): (a["handle"] or {}).get("pid") for a in attempts}
    for key, seen in pids.items():
        handle_pid = handles.get(key)
        if len(seen) > 1:
            report.note("two_workers", f"{key[0]} attempt {key[1]}: RUN_START from pids {sorted(seen)}")
        elif handle_pid is not None and handle_pid not in seen:
            report.note("two_workers", f"{key[0]} attempt {key[1]}: handle pid {handle_pid}, RUN_START from {seen}")


def _terminal_changed(report: Report, recorder: Recorder, events: list[dict[str, Any]]) -> None:
    for e in events:
        if e["type"] == "RUN_STATUS" and e["data"].get("from") in TERMINAL:
            report.note("terminal_changed", f"{e['run_id']}: {e['data']['from']} -> {e['data']['to']} (event log)")
    finished: dict[str, str] = {}
    for rec in _unique_status(recorder):
        run_id, status = rec.body.get("run_id"), rec.body.get("status")
        if run_id in finished:
            report.note("terminal_changed", f"{run_id}: {status} published after {finished[run_id]}")
        elif status in TERMINAL:
            finished[run_id] = status


def _unique_status(recorder: Recorder) -> list[Recorded]:
    """Status messages deduplicated by message_id, in the relay's order (status-<outbox id>)."""
    seen: dict[str | None, Recorded] = {}
    for rec in recorder.status:
        seen.setdefault(rec.message_id, rec)
    return sorted(seen.values(), key=lambda r: _outbox_id(r.message_id))


def _outbox_id(message_id: str | None) -> int:
    try:
        return int((message_id or "").rsplit("-", 1)[-1])
    except ValueError:
        return -1


def _spurious_resumes(report: Report, recorder: Recorder, events: list[dict[str, Any]]) -> None:
    """A resume is spurious when the resumed attempt's worker was alive and talking: it sent a
    heartbeat or an event that arrived after the resume decision (a crashed worker sends nothing; a
    worker stopped because of the resume says at most RUN_CANCELED on its way out), or it had
    reported its own end (RUN_SUCCESS / RUN_FAILURE, still queued when the sweep decided). The load
    has no hung worker, so every such resume is runherd not hearing a live one."""
    resumes = [e for e in events if e["type"] == "RUN_RESUMED"]
    report.resumes = len(resumes)
    report.resume_reasons = dict(Counter(_gist(e["message"]) for e in resumes))
    if not resumes:
        return
    last_word: dict[tuple[str, int], float] = {}
    reported_end: dict[tuple[str, int], str] = {}
    for rec in [*recorder.heartbeats, *recorder.events]:
        body = rec.body
        by_worker = _by_worker(body)
        if body.get("type") in ("RUN_SUCCESS", "RUN_FAILURE") and by_worker:
            reported_end[(str(body.get("run_id")), body.get("attempt"))] = body["type"]
        if body.get("type") in ("RUN_CANCELED", "WORKER_EXITED") or not by_worker:
            continue
        key = (str(body.get("run_id")), body.get("attempt"))
        # When it arrived, not the worker's own stamp: a worker's clock may be off (the clock scenarios).
        if rec.received > last_word.get(key, 0.0):
            last_word[key] = rec.received
    for e in resumes:
        decided = e["ts"].timestamp()
        key = (str(e["run_id"]), e["attempt"])
        spoke = last_word.get(key)
        if key in reported_end:
            # The worker finished and said so; its event was still queued when the sweep decided.
            report.note(
                "spurious_resumes",
                f"{e['run_id']} attempt {e['attempt']}: {e['message']!r}, yet its worker had reported "
                f"{reported_end[key]}" + (f" ({decided - spoke:.1f} s before)" if spoke and spoke < decided else ""),
            )
        elif spoke is not None and spoke > decided + 0.2 and not _on_reported_death(e["message"]):
            report.note(
                "spurious_resumes",
                f"{e['run_id']} attempt {e['attempt']}: {e['message']!r}, yet its worker spoke "
                f"{spoke - decided:.1f} s after the decision",
            )


def _on_reported_death(reason: str) -> bool:
    """Resumed on the launcher's report that the process died (a signal, an exit code): the worker
    is gone for certain, so words of it that reach the recorder after the decision were sent before
    it died and were still in flight (a 1 MB event takes seconds to record under load; the decision
    now comes within ~0.1 s of the kill). Only a resume on silence can take a live worker for dead."""
    return reason.startswith(("worker crashed: killed by signal", "worker crashed: exit code"))


def _by_worker(body: dict[str, Any]) -> bool:
    """Said by a worker: ``worker`` or ``worker:<worker_id>`` (heartbeats name no source)."""
    source = str(body.get("source", "worker"))
    return source == "worker" or source.startswith("worker:")


def _gist(message: str | None) -> str:
    """A resume's reason without its numbers and run-specific tail, to count them by kind."""
    text = (message or "").split(";")[0]
    return " ".join("N" if w.rstrip("s").replace(".", "").isdigit() else w for w in text.split())[:80]


def _published_once(report: Report, recorder: Recorder, events: list[dict[str, Any]]) -> None:
    """Every transition of the event log is on runherd.status once (by message_id), and nothing else."""
    logged = Counter(
        (str(e["run_id"]), e["data"].get("from"), e["data"].get("to"), e["attempt"])
        for e in events
        if e["type"] == "RUN_STATUS"
    )
    # A resume keeps the run STARTED and is published as STARTED -> STARTED with the new attempt.
    logged.update(
        (str(e["run_id"]), "STARTED", "STARTED", e["data"].get("new_attempt"))
        for e in events
        if e["type"] == "RUN_RESUMED"
    )
    unique = _unique_status(recorder)
    published = Counter(
        (str(r.body.get("run_id")), r.body.get("previous_status"), r.body.get("status"), r.body.get("attempt"))
        for r in unique
    )
    report.transitions = sum(logged.values())
    report.status_messages = len(recorder.status)
    report.status_redelivered = len(recorder.status) - len(unique)
    for key, n in logged.items():
        got = published.get(key, 0)
        for _ in range(max(0, n - got)):
            report.note("status_missing", f"{key[0]}: {key[1]} -> {key[2]} (attempt {key[3]}) never published")
        for _ in range(max(0, got - n)):
            report.note("status_published_twice", f"{key[0]}: {key[1]} -> {key[2]} under {got} message_ids")
    for key in published:
        if key not in logged:
            report.note("status_without_transition", f"{key[0]}: {key[1]} -> {key[2]} published, not in the log")


def _applied_once(report: Report, events: list[dict[str, Any]]) -> None:
    """A transition of one attempt is logged once: an event or command handled again (a restart,
    a redelivery) must find the compare-and-set already done."""
    logged = Counter(
        (str(e["run_id"]), e["data"].get("from"), e["data"].get("to"), e["attempt"])
        for e in events
        if e["type"] == "RUN_STATUS"
    )
    for key, n in logged.items():
        if n > 1:
            report.note(
                "transition_applied_twice", f"{key[0]}: {key[1]} -> {key[2]} (attempt {key[3]}) logged {n} times"
            )


async def _dead_letters(report: Report, amqp_url: str, limit: int = 1000) -> None:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(DEAD_QUEUE, passive=True)
        for _ in range(limit):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            reason = _dead_reason(message.headers or {})
            report.dead_letter_reasons[reason] = report.dead_letter_reasons.get(reason, 0) + 1
            report.note("dead_lettered", f"{message.routing_key}: {reason}")
            await message.nack(requeue=False)  # the dead-letter queue has no dead-letter exchange


def _dead_reason(headers: dict[str, Any]) -> str:
    """runherd's own reason, or the broker's (a message over the queue's delivery limit)."""
    if headers.get(ERROR_HEADER):
        return f"runherd: {str(headers[ERROR_HEADER])[:160]}"
    reason, queue = headers.get("x-first-death-reason"), headers.get("x-first-death-queue")
    return f"broker: {reason!s} in {queue!s}" if reason else "unknown"


def _outcomes(report: Report, load: Load, runs: list[dict[str, Any]], attempts: list[dict[str, Any]]) -> None:
    """Each lineage ends as its load said (a failing run fails; a flaky one succeeds on its retry)."""
    launched = {(str(a["run_id"]), a["attempt"]) for a in attempts if a["handle"] is not None}
    latest: dict[str, dict[str, Any]] = {}
    for run in sorted(runs, key=lambda r: (r["retry_number"], r["created_at"])):
        latest[str(run["root_run_id"] or run["run_id"])] = run
    for spec in load.specs:
        if spec.run_id not in load.published:
            continue
        last = latest.get(spec.run_id)
        if last is None or last["status"] != spec.expected:
            report.unexpected_outcomes += 1
            if len(report.examples["unexpected_outcomes"]) < EXAMPLES:
                got = "nothing" if last is None else f"{last['status']} ({last['reason']})"
                if last is not None and (str(last["run_id"]), last["attempt"]) not in launched:
                    got += f"; attempt {last['attempt']} has no worker handle"
                report.examples["unexpected_outcomes"].append(f"{spec.run_id} ({spec.kind}): {got}")
