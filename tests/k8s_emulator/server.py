"""The HTTP side of the emulator: the few apiserver routes the launcher uses, over aiohttp.

Besides the routes it offers what tests need to provoke failures: injected answers (the next N
matching requests get a 500/403/409... Status, optionally after the request took effect, like a
reply lost on the way back), a gate that holds new watch requests, and a way to cut every open
watch stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .kubelet import Kubelet
from .store import ApiError, Obj, Store, Watcher, now_rfc3339

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

KINDS = {
    "jobs": ("Job", "batch/v1", "JobList"),
    "pods": ("Pod", "v1", "PodList"),
    "events": ("Event", "v1", "EventList"),
    "secrets": ("Secret", "v1", "SecretList"),
}
MAX_SECRET_BYTES = 1024 * 1024  # the apiserver's limit on a Secret's data


@dataclass
class Injection:
    """Answer the next ``times`` requests matching method/path with ``status``."""

    status: int
    times: int = 1
    method: str | None = None
    path: str | None = None  # a regex searched in the request path
    message: str | None = None
    after: bool = False  # let the request take effect first, then answer the error

    def matches(self, request: web.Request) -> bool:
        if self.method and request.method != self.method.upper():
            return False
        return not self.path or re.search(self.path, request.path) is not None


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    status: int = 0
    at: float = field(default_factory=time.monotonic)  # when it arrived, to check retry backoff


@dataclass
class ApiServer:
    store: Store
    kubelet: Kubelet
    injections: list[Injection] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    watch_gate: asyncio.Event = field(default_factory=asyncio.Event)
    open_watches: dict[Watcher, web.Request] = field(default_factory=dict)
    deletions: list[tuple[str, str, str]] = field(default_factory=list)  # (ns, name, policy)

    def __post_init__(self) -> None:
        self.watch_gate.set()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        for plural, prefix in (
            ("jobs", "/apis/batch/v1"),
            ("pods", "/api/v1"),
            ("events", "/api/v1"),
            ("secrets", "/api/v1"),
        ):
            base = prefix + "/namespaces/{ns}/" + plural
            app.router.add_get(base, self._collection(plural))
            app.router.add_get(base + "/{name}", self._read(plural))
        app.router.add_post("/apis/batch/v1/namespaces/{ns}/jobs", self._create_job)
        app.router.add_post("/api/v1/namespaces/{ns}/secrets", self._create_secret)
        app.router.add_delete("/apis/batch/v1/namespaces/{ns}/jobs/{name}", self._delete_job)
        app.router.add_delete("/api/v1/namespaces/{ns}/pods/{name}", self._delete_pod)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}/log", self._pod_log)
        return app

    # --- plumbing ----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        record = RecordedRequest(request.method, request.path, dict(request.query))
        self.requests.append(record)
        injection = self._take_injection(request)
        try:
            if injection is not None and not injection.after:
                raise ApiError(injection.status, injection.message or "injected failure")
            response = await handler(request)
            if injection is not None:
                raise ApiError(injection.status, injection.message or "injected failure")
        except ApiError as exc:
            response = web.json_response(exc.status(), status=exc.code)
        record.status = response.status
        return response

    def _take_injection(self, request: web.Request) -> Injection | None:
        for injection in self.injections:
            if injection.times > 0 and injection.matches(request):
                injection.times -= 1
                if injection.times == 0:
                    self.injections.remove(injection)
                return injection
        return None

    # --- generic reads -----------------------------------------------------------------------

    def _collection(self, plural: str) -> Handler:
        kind, api_version, list_kind = KINDS[plural]

        async def handler(request: web.Request) -> web.StreamResponse:
            q = request.query
            if _flag(q.get("watch")):
                return await self._watch(request, kind)
            items, rv = self.store.list(kind, request.match_info["ns"], q.get("labelSelector"), q.get("fieldSelector"))
            for item in items:
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", api_version)
            return web.json_response(
                {
                    "kind": list_kind,
                    "apiVersion": api_version,
                    "metadata": {"resourceVersion": rv},
                    "items": items,
                }
            )

        return handler

    def _read(self, plural: str) -> Handler:
        kind = KINDS[plural][0]

        async def handler(request: web.Request) -> web.StreamResponse:
            ns, name = request.match_info["ns"], request.match_info["name"]
            return web.json_response(self.store.get(kind, ns, name))

        return handler

    async def _watch(self, request: web.Request, kind: str) -> web.StreamResponse:
        await self.watch_gate.wait()
        q = request.query
        seconds = float(q.get("timeoutSeconds") or 1800)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            watcher = self.store.watch(
                kind,
                request.match_info["ns"],
                q.get("labelSelector"),
                q.get("fieldSelector"),
                q.get("resourceVersion"),
            )
        except ApiError as exc:
            # Like the apiserver: a 200 stream whose only event is an ERROR with the Status.
            await _send(response, {"type": "ERROR", "object": exc.status()})
            return response
        self.open_watches[watcher] = request
        try:
            await self._pump(response, watcher, seconds, _flag(q.get("allowWatchBookmarks")))
        finally:
            self.store.watchers.discard(watcher)
            self.open_watches.pop(watcher, None)
        return response

    async def _pump(self, response: web.StreamResponse, watcher: Watcher, seconds: float, bookmarks: bool) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            try:
                event = await asyncio.wait_for(watcher.queue.get(), left)
            except TimeoutError:
                break
            if event is None:  # cut by drop_watches(): the connection is already closed
                return
            await _send(response, {"type": event.type, "object": event.obj})
        if bookmarks:
            bookmark = {
                "kind": watcher.kind,
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(watcher.position)},
            }
            await _send(response, {"type": "BOOKMARK", "object": bookmark})

    def drop_watches(self) -> int:
        """Cut every open watch stream abruptly (the TCP connection is closed)."""
        dropped = 0
        for watcher, request in list(self.open_watches.items()):
            self.store.watchers.discard(watcher)
            watcher.queue.put_nowait(None)
            if request.transport is not None:
                request.transport.close()
            dropped += 1
        return dropped

    # --- writes ------------------------------------------------------------------------------

    async def _create_job(self, request: web.Request) -> web.StreamResponse:
        ns = request.match_info["ns"]
        job = await request.json()
        _validate_job(job)
        job.setdefault("apiVersion", "batch/v1")
        job.setdefault("kind", "Job")
        spec = job["spec"]
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec.setdefault("backoffLimit", 6)
        job["status"] = {}
        created = self.store.create("Job", ns, job)
        self.kubelet.job_created(ns, created)
        return web.json_response(created, status=201)

    async def _create_secret(self, request: web.Request) -> web.StreamResponse:
        ns = request.match_info["ns"]
        secret = await request.json()
        name = secret.get("metadata", {}).get("name", "")
        if len(name) > 253 or not DNS1123_LABEL.match(name):
            raise ApiError(422, f'Secret "{name}" is invalid: metadata.name: must be a DNS-1123 subdomain')
        size = sum(len(base64.b64decode(v)) for v in (secret.get("data") or {}).values())
        if size > MAX_SECRET_BYTES:
            raise ApiError(422, f'Secret "{name}" is invalid: data: Too long: must have at most 1048576 bytes')
        secret.setdefault("apiVersion", "v1")
        secret.setdefault("kind", "Secret")
        secret["metadata"]["creationTimestamp"] = now_rfc3339()
        return web.json_response(self.store.create("Secret", ns, secret), status=201)

    async def _delete_job(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        options = await _delete_options(request)
        policy = options.get("propagationPolicy") or "Background"
        self.store.get("Job", ns, name)  # 404 before anything else
        self.deletions.append((ns, name, policy))
        self.kubelet.delete_job(ns, name, policy)
        return web.json_response(_success(name, "jobs"))

    async def _delete_pod(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        options = await _delete_options(request)
        grace = options.get("gracePeriodSeconds")
        self.kubelet.delete_pod(ns, name, None if grace is None else float(grace))
        return web.json_response(_success(name, "pods"))

    async def _pod_log(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        self.store.get("Pod", ns, name)
        rt = self.kubelet.pods.get((ns, name))
        if rt is None or rt.proc is None:
            raise ApiError(400, f'container "runherd-worker" in pod "{name}" is waiting to start', "BadRequest")
        text = rt.log.decode("utf-8", "replace")
        if tail := request.query.get("tailLines"):
            text = "".join(text.splitlines(keepends=True)[-int(tail) :])
        if limit := request.query.get("limitBytes"):
            text = text.encode()[: int(limit)].decode("utf-8", "ignore")
        return web.Response(text=text, content_type="text/plain")


def _flag(value: str | None) -> bool:
    # Go's strconv.ParseBool, as the apiserver parses it: the Python client sends "True".
    return (value or "").lower() in ("1", "t", "true")


async def _send(response: web.StreamResponse, event: Obj) -> None:
    await response.write(json.dumps(event).encode() + b"\n")


async def _delete_options(request: web.Request) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if request.can_read_body:
        with contextlib.suppress(ValueError):
            options.update(await request.json() or {})
    for key in ("propagationPolicy", "gracePeriodSeconds"):
        if key in request.query:
            options[key] = request.query[key]
    return options


def _success(name: str, plural: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "kind": plural},
    }


def _validate_job(job: Obj) -> None:
    """The apiserver's validation of the fields the launcher sets, answered as 422 Invalid."""
    errors: list[str] = []
    name = job.get("metadata", {}).get("name", "")
    if len(name) > 63 or not DNS1123_LABEL.match(name):
        errors.append(f'metadata.name: Invalid value: "{name}": must be a DNS-1123 label')
    template = job.get("spec", {}).get("template", {})
    for where, meta in (
        ("metadata", job.get("metadata", {})),
        ("spec.template.metadata", template.get("metadata", {})),
    ):
        for key, value in (meta.get("labels") or {}).items():
            if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
                errors.append(f'{where}.labels: Invalid value: "{value}" for key {key}')
    pod_spec = template.get("spec", {})
    if pod_spec.get("restartPolicy") not in ("Never", "OnFailure"):
        errors.append('spec.template.spec.restartPolicy: Unsupported value: must be "Never" or "OnFailure"')
    containers = pod_spec.get("containers") or []
    if not containers or not all(c.get("image") and c.get("name") for c in containers):
        errors.append("spec.template.spec.containers: Required value")
    if errors:
        raise ApiError(422, f'Job.batch "{name}" is invalid: ' + "; ".join(errors))
    job["metadata"].setdefault("labels", {})
    job["metadata"]["creationTimestamp"] = now_rfc3339()
