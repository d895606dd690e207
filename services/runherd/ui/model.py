"""What the UI's pages show, decided from rows already read: the run list's filter and cursor,
how each attempt ended, and the timeline's geometry. Pure: no I/O, tested as tables."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from runherd.contract import RunStatus
from runherd.rules.events import describe_exit
from runherd.store.ui import Cursor, RunFilter

PAGE_SIZES = (25, 50, 100, 200)
WITHIN = {"15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800, "30d": 2592000}
LOG_TAIL_LINES = 20

# --- the run list ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListQuery:
    """The run list's query string, parsed: what to show and where the page starts."""

    filter: RunFilter
    limit: int = 50
    older_than: Cursor | None = None
    newer_than: Cursor | None = None
    within: str = ""
    problems: tuple[str, ...] = ()

    def params(self, **changes: Any) -> dict[str, str]:
        """The query string of this view (for links), with ``changes`` (None removes a key)."""
        f = self.filter
        out: dict[str, str] = {}
        if f.status:
            out["status"] = f.status
        if f.job:
            out["job"] = f.job
        tags = " ".join(k if v is None else f"{k}={v}" for k, v in f.tags)
        if tags:
            out["tag"] = tags
        if self.within:
            out["within"] = self.within
        else:
            if f.created_from:
                out["from"] = f.created_from.strftime("%Y-%m-%dT%H:%M")
            if f.created_to:
                out["to"] = f.created_to.strftime("%Y-%m-%dT%H:%M")
        if self.limit != 50:
            out["limit"] = str(self.limit)
        for key, value in changes.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = str(value)
        return out


def _time(value: str) -> datetime | None:
    """A datetime-local input (``2026-11-29T08:30``, taken as UTC) or an ISO timestamp."""
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_tags(text: str) -> list[tuple[str, str | None]]:
    """``team=data gpu`` -> [("team", "data"), ("gpu", None)]; separated by spaces or commas."""
    found: list[tuple[str, str | None]] = []
    for part in re.split(r"[\s,]+", text.strip()):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if key:
            found.append((key, value if sep else None))
    return found


def encode_cursor(row: Mapping[str, Any]) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['run_id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor | None:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        at, run_id = raw.split("|")
        return Cursor(datetime.fromisoformat(at), UUID(run_id))
    except (ValueError, UnicodeDecodeError):
        return None


def parse_list_query(query: Mapping[str, str], now: datetime) -> ListQuery:
    """The run list's query string; a value that makes no sense is left out and said so."""
    problems: list[str] = []
    status = (query.get("status") or "").strip().upper() or None
    if status and status not in RunStatus.__members__:
        problems.append(f"unknown status {status!r}")
        status = None
    within = (query.get("within") or "").strip()
    created_from = created_to = None
    if within:
        if within in WITHIN:
            created_from = now - timedelta(seconds=WITHIN[within])
        else:
            problems.append(f"unknown period {within!r} (one of {', '.join(WITHIN)})")
            within = ""
    if not within:
        for key in ("from", "to"):
            value = (query.get(key) or "").strip()
            if value and _time(value) is None:
                problems.append(f"{key}: expected a date and time such as 2026-11-29T08:30, got {value!r}")
        created_from = _time(query.get("from") or "") if query.get("from") else None
        created_to = _time(query.get("to") or "") if query.get("to") else None
    try:
        limit = int(query.get("limit") or 50)
    except ValueError:
        limit = 50
    limit = min(max(limit, 1), max(PAGE_SIZES))
    cursors = {}
    for key in ("after", "before"):
        if query.get(key):
            cursors[key] = decode_cursor(query[key])
            if cursors[key] is None:
                problems.append(f"{key}: not a page position; showing the first page")
    return ListQuery(
        filter=RunFilter(
            status=status,
            job=(query.get("job") or "").strip() or None,
            tags=tuple(parse_tags(query.get("tag") or "")),
            created_from=created_from,
            created_to=created_to,
        ),
        limit=limit,
        older_than=cursors.get("after"),
        newer_than=cursors.get("before") if not cursors.get("after") else None,
        within=within,
        problems=tuple(problems),
    )


# --- attempts: how each one ended -------------------------------------------------------------------

# kind -> the badge's class: success, failure (a step failed), crashed (exit code or signal), oom,
# hang, timeout, canceled, running, waiting (no worker yet).
_TERMINAL = ("SUCCESS", "FAILURE", "CANCELED")
_HANG = re.compile(r"no heartbeat|hung")
_TIMEOUT = re.compile(r"max runtime|did not start within|timed out|force-killed")


@dataclass
class AttemptView:
    number: int
    handle: dict[str, Any] | None
    launcher: str | None
    created_at: datetime | None
    launched_at: datetime | None
    ended_at: datetime | None
    last_heartbeat_at: datetime | None
    kind: str
    outcome: str
    exit_code: int | None = None
    signal: int | None = None
    reused: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)

    @property
    def worker(self) -> str:
        if not self.handle:
            return "no worker yet"
        h = self.handle
        for key in ("pid", "container_id", "job_name", "name"):
            if key in h:
                host = f" on {h['host']}" if h.get("host") else ""
                value = str(h[key])[:12] if key == "container_id" else h[key]
                return f"{key} {value}{host}"
        return " ".join(f"{k} {v}" for k, v in h.items())


def _log_tail(text: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _classify(
    status_to: str | None,
    status_reason: str,
    resumed_why: str,
    exit_data: Mapping[str, Any] | None,
    exit_message: str,
) -> tuple[str, str]:
    """(kind, sentence) for one attempt from its end: terminal status, resume reason, exit report."""
    why = resumed_why or status_reason
    exit_reason = (exit_data or {}).get("reason")
    if status_to == RunStatus.SUCCESS:
        return "success", "succeeded"
    if exit_reason == "OOMKilled":
        return "oom", exit_message or "OOMKilled"
    if _HANG.search(why):
        return "hang", why
    if status_to == RunStatus.CANCELED:
        return "canceled", status_reason or "canceled"
    if _TIMEOUT.search(why) and "crashed" not in why:
        return "timeout", why
    if exit_data is not None and (exit_data.get("signal") or exit_data.get("exit_code") not in (0, None)):
        if why and exit_message in why:
            return "crashed", why
        return "crashed", exit_message + (f"; {why}" if why else "")
    if status_to == RunStatus.FAILURE:
        return "failure", status_reason or "failed"
    if resumed_why:
        return "crashed", resumed_why
    if exit_data is not None:
        return "exited", exit_message or "exited"
    return "", ""


def attempt_views(
    run: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]]
) -> list[AttemptView]:
    """Every attempt of the run, oldest first, with its worker and how it ended."""
    by_attempt: dict[int, list[Mapping[str, Any]]] = {}
    for e in events:
        by_attempt.setdefault(e["attempt"], []).append(e)
    views = []
    for row in rows:
        n = row["attempt"]
        mine = by_attempt.get(n, [])
        exit_event = next((e for e in mine if e["type"] == "WORKER_EXITED"), None)
        exit_data = dict(exit_event["data"] or {}) if exit_event else None
        resumed = next((e for e in mine if e["type"] == "RUN_RESUMED"), None)
        terminal = [
            e
            for e in mine
            if e["type"] == "RUN_STATUS" and (e["data"] or {}).get("to") in ("SUCCESS", "FAILURE", "CANCELED")
        ]
        status_to = (terminal[-1]["data"] or {}).get("to") if terminal else None
        status_reason = (terminal[-1]["message"] or "") if terminal else ""
        exit_message = (
            exit_event["message"]
            if exit_event and exit_event["message"]
            else (describe_exit(row["exit_code"], None, row["exit_reason"]) if row["exited_at"] else "")
        )
        kind, outcome = _classify(
            status_to, status_reason, (resumed["message"] or "") if resumed else "", exit_data, exit_message
        )
        if not kind:
            current = n == run["attempt"] and not RunStatus(run["status"]).terminal
            kind, outcome = ("running", "running") if current and row["handle"] else ("waiting", "waiting for a worker")
            if not current:
                kind, outcome = "exited", "ended"
        started = next((e for e in mine if e["type"] == "RUN_START"), None)
        ended = [
            t
            for t in (
                row["exited_at"],
                exit_event["ts"] if exit_event else None,
                resumed["ts"] if resumed else None,
                terminal[-1]["ts"] if terminal else None,
            )
            if t is not None
        ]
        views.append(
            AttemptView(
                number=n,
                handle=row["handle"],
                launcher=row["launcher"],
                created_at=row["created_at"],
                launched_at=row["launched_at"],
                ended_at=min(ended) if ended else None,
                last_heartbeat_at=row["last_heartbeat_at"],
                kind=kind,
                outcome=outcome,
                exit_code=(exit_data or {}).get("exit_code", row["exit_code"]),
                signal=(exit_data or {}).get("signal"),
                reused=list(((started["data"] or {}).get("reused") or []) if started else []),
                log_tail=_log_tail(str((exit_data or {}).get("debug_info") or "")),
            )
        )
    return views


# --- the timeline -------------------------------------------------------------------------------------


# A step's events on the timeline: a start (or a retry's restart) opens a bar, the others close it.
_STEP_EVENTS = {
    "STEP_START": "",
    "STEP_RESTARTED": "",
    "STEP_SUCCESS": "SUCCESS",
    "STEP_FAILURE": "FAILURE",
    "STEP_UP_FOR_RETRY": "RETRY",  # this try failed; the step is tried again
}


@dataclass(frozen=True)
class Bar:
    step: str
    start: float  # percent of the axis
    width: float
    status: str  # SUCCESS, FAILURE, RETRY, RUNNING, INTERRUPTED
    title: str


@dataclass(frozen=True)
class Lane:
    attempt: int
    kind: str
    outcome: str
    start: float
    width: float
    bars: tuple[Bar, ...]
    reused: tuple[str, ...]  # steps this attempt skipped, reusing their recorded outputs
    end_mark: float | None  # where the attempt's worker ended (crash, hang, exit), percent


@dataclass(frozen=True)
class Timeline:
    start: datetime
    end: datetime
    lanes: tuple[Lane, ...]
    ticks: tuple[tuple[float, str], ...]
    reused_from_parent: tuple[str, ...]

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


def _ticks(start: datetime, end: datetime, count: int = 6) -> tuple[tuple[float, str], ...]:
    span = max((end - start).total_seconds(), 1e-3)
    steps = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
    step = next((s for s in steps if span / s <= count), steps[-1])
    out = []
    t = 0.0
    while t <= span + 1e-9:
        label = f"{t:g} s" if step < 60 else (f"{t / 60:g} min" if step < 3600 else f"{t / 3600:g} h")
        out.append((100 * t / span, label))
        t += step
    return tuple(out)


def timeline(
    attempts: Sequence[AttemptView],
    events: Sequence[Mapping[str, Any]],
    reused_from_parent: Sequence[str],
    now: datetime,
) -> Timeline | None:
    """Steps per attempt on one time axis: each step a bar from its STEP_START to its end in that
    attempt; a step still running when its attempt's worker ended is INTERRUPTED there. None when
    no attempt has started."""
    starts: list[datetime] = [t for a in attempts if (t := a.launched_at or a.created_at) is not None]
    if not starts:
        return None
    t0 = min(starts)
    step_events = [e for e in events if e["step_key"] and e["type"] in _STEP_EVENTS]
    ends = [a.ended_at for a in attempts if a.ended_at] + [e["ts"] for e in step_events]
    running = any(a.kind in ("running", "waiting") for a in attempts)
    t1 = max([*ends, *starts, now] if running else [*ends, *starts])
    span = max((t1 - t0).total_seconds(), 1e-3)

    def pct(t: datetime) -> float:
        return max(0.0, min(100.0, 100 * (t - t0).total_seconds() / span))

    lanes = []
    for a in attempts:
        a_start = a.launched_at or a.created_at or t0
        a_end = a.ended_at or t1
        opened: dict[str, datetime] = {}
        bars: list[Bar] = []
        for e in sorted((e for e in step_events if e["attempt"] == a.number), key=lambda e: (e["ts"], e["id"])):
            key = e["step_key"]
            if e["type"] in ("STEP_START", "STEP_RESTARTED"):
                opened[key] = e["ts"]
                continue
            began = opened.pop(key, e["ts"])
            bars.append(_bar(key, began, e["ts"], _STEP_EVENTS[e["type"]], pct))
        for key, began in opened.items():
            status = "RUNNING" if a.kind == "running" else "INTERRUPTED"
            bars.append(_bar(key, began, a_end, status, pct))
        lanes.append(
            Lane(
                attempt=a.number,
                kind=a.kind,
                outcome=a.outcome,
                start=pct(a_start),
                width=max(pct(a_end) - pct(a_start), 0.3),
                bars=tuple(sorted(bars, key=lambda b: b.start)),
                reused=tuple(a.reused),
                end_mark=pct(a.ended_at) if a.ended_at and a.kind not in ("success",) else None,
            )
        )
    return Timeline(t0, t1, tuple(lanes), _ticks(t0, t1), tuple(reused_from_parent))


def _bar(key: str, began: datetime, ended: datetime, status: str, pct: Any) -> Bar:
    seconds = (ended - began).total_seconds()
    left = pct(began)
    return Bar(key, left, max(pct(ended) - left, 0.4), status, f"{key}: {status.lower()} after {seconds:.2f} s")


def duration(start: datetime | None, end: datetime | None, now: datetime) -> str:
    if start is None:
        return ""
    seconds = ((end or now) - start).total_seconds()
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
