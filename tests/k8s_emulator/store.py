"""The emulator's object store: resourceVersions, history for watches, selectors.

It mimics the apiserver/etcd behaviour the launcher relies on: every change bumps one global
resourceVersion, a watch replays the changes after the version it asks for, and a version older
than the last compaction answers 410 Gone.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]
Key = tuple[str, str, str]  # (kind, namespace, name)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    """An error the server answers as a Kubernetes ``Status`` object."""

    REASONS = {
        400: "BadRequest",
        403: "Forbidden",
        404: "NotFound",
        409: "AlreadyExists",
        410: "Expired",
        422: "Invalid",
        429: "TooManyRequests",
        500: "InternalError",
        503: "ServiceUnavailable",
    }

    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or self.REASONS.get(code, "Unknown")

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


# --- selectors -------------------------------------------------------------------------------


def _lookup(obj: Obj, path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def match_labels(labels: dict[str, str], selector: str | None) -> bool:
    """Equality-based label selectors: ``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``."""
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def match_fields(obj: Obj, selector: str | None) -> bool:
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        negate = "!=" in term
        path, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        actual = _lookup(obj, path.strip())
        if (str(actual) == value.strip()) == negate:
            return False
    return True


# --- store -----------------------------------------------------------------------------------


@dataclass
class Event:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    kind: str
    namespace: str
    obj: Obj


@dataclass(eq=False)
class Watcher:
    kind: str
    namespace: str
    label_selector: str | None
    field_selector: str | None
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    position: int = 0  # rv of the last change this watcher has been offered (for bookmarks)

    def wants(self, event: Event) -> bool:
        if event.kind != self.kind or event.namespace != self.namespace:
            return False
        labels = event.obj.get("metadata", {}).get("labels") or {}
        return match_labels(labels, self.label_selector) and match_fields(event.obj, self.field_selector)

    def offer(self, event: Event) -> None:
        self.position = event.rv
        if self.wants(event):
            self.queue.put_nowait(event)


class Store:
    def __init__(self, history: int = 10_000) -> None:
        self.rv = 1
        self.compacted_rv = 0
        self.objects: dict[Key, Obj] = {}
        self.history: deque[Event] = deque(maxlen=history)
        self.watchers: set[Watcher] = set()

    # reads

    def get(self, kind: str, namespace: str, name: str) -> Obj:
        obj = self.objects.get((kind, namespace, name))
        if obj is None:
            raise ApiError(404, f'{kind.lower()}s "{name}" not found')
        return copy.deepcopy(obj)

    def find(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self.objects.get((kind, namespace, name))

    def list(
        self,
        kind: str,
        namespace: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[Obj], str]:
        items = [
            copy.deepcopy(obj)
            for (k, ns, _), obj in sorted(self.objects.items())
            if k == kind
            and ns == namespace
            and match_labels(obj["metadata"].get("labels") or {}, label_selector)
            and match_fields(obj, field_selector)
        ]
        return items, str(self.rv)

    # writes

    def _bump(self, etype: str, kind: str, namespace: str, obj: Obj) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        event = Event(self.rv, etype, kind, namespace, copy.deepcopy(obj))
        self.history.append(event)
        for watcher in list(self.watchers):
            watcher.offer(event)

    def create(self, kind: str, namespace: str, obj: Obj) -> Obj:
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ApiError(422, f"{kind}.metadata.name: Required value")
        if (kind, namespace, name) in self.objects:
            raise ApiError(409, f'{kind.lower()}s.batch "{name}" already exists')
        meta.update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            creationTimestamp=now_rfc3339(),
            generation=1,
        )
        self.objects[(kind, namespace, name)] = obj
        self._bump("ADDED", kind, namespace, obj)
        return copy.deepcopy(obj)

    def update(self, kind: str, namespace: str, name: str, mutate: Callable[[Obj], None]) -> Obj:
        obj = self.objects.get((kind, namespace, name))
        if obj is None:
            raise ApiError(404, f'{kind.lower()}s "{name}" not found')
        mutate(obj)
        self._bump("MODIFIED", kind, namespace, obj)
        return copy.deepcopy(obj)

    def delete(self, kind: str, namespace: str, name: str) -> Obj:
        obj = self.objects.pop((kind, namespace, name), None)
        if obj is None:
            raise ApiError(404, f'{kind.lower()}s "{name}" not found')
        self._bump("DELETED", kind, namespace, obj)
        return copy.deepcopy(obj)

    # watches

    def compact(self) -> None:
        """Forget the history: a watch from any version before now gets 410 Gone."""
        self.history.clear()
        self.compacted_rv = self.rv

    def watch(
        self,
        kind: str,
        namespace: str,
        label_selector: str | None,
        field_selector: str | None,
        since: str | None,
    ) -> Watcher:
        """Register a watcher and queue what it missed; no await in here, so nothing slips by."""
        watcher = Watcher(kind, namespace, label_selector, field_selector, position=self.rv)
        if since in (None, "", "0"):
            # Like the apiserver: start with synthetic ADDED events for what exists now.
            for (k, ns, _), obj in sorted(self.objects.items()):
                event = Event(self.rv, "ADDED", k, ns, copy.deepcopy(obj))
                if watcher.wants(event):
                    watcher.queue.put_nowait(event)
        else:
            since_rv = int(since)
            oldest = self.history[0].rv if self.history else self.rv + 1
            if since_rv < self.compacted_rv or (since_rv < self.rv and since_rv + 1 < oldest):
                raise ApiError(410, f"too old resource version: {since_rv} ({self.compacted_rv})")
            for event in self.history:
                if event.rv > since_rv and watcher.wants(event):
                    watcher.queue.put_nowait(event)
        self.watchers.add(watcher)
        return watcher
