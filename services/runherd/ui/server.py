"""`runherd ui`: the HTTP side (aiohttp). Server-rendered pages (Jinja2), server-sent events for
live updates, optional HTTP basic authentication, and — only when ``ui.allow_actions`` is on —
cancel and re-execute, which publish the normal commands through the client."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
import markupsafe
from aiohttp import web

from runherd import client, contract
from runherd.broker import Broker
from runherd.config import Config, redact
from runherd.contract import RunStatus
from runherd.errors import InvalidMessage
from runherd.store import Store
from runherd.ui import data, model
from runherd.ui.live import Hub

log = logging.getLogger("runherd.ui")

KEEPALIVE_SECONDS = 15.0
SOURCES: web.AppKey[data.Sources] = web.AppKey("sources", data.Sources)
HUB: web.AppKey[Hub] = web.AppKey("hub", Hub)
TEMPLATES: web.AppKey[jinja2.Environment] = web.AppKey("templates", jinja2.Environment)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["qs"] = lambda params: urlencode(params)
    env.filters["short"] = lambda run_id: str(run_id)[:8]
    env.filters["hms"] = lambda t: "" if t is None else t.strftime("%H:%M:%S.%f")[:-3]
    env.filters["when"] = lambda t: "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")
    env.filters["secs"] = lambda s: "" if s is None else (f"{s:.1f} s" if s < 120 else f"{s / 60:.0f} min")
    env.globals["duration"] = model.duration
    env.globals["tag"] = _tag_chip
    env.globals["now"] = data.now
    return env


def _tag_chip(key: str, value: Any) -> markupsafe.Markup:
    """A tag as a chip; a long value (a run id) shortened, whole in the tooltip."""
    text = str(value)
    shown = text if len(text) <= 20 else text[:8] + "…"
    return markupsafe.Markup('<span class="chip" title="{0}={1}">{0}={2}</span>').format(key, text, shown)


def _render(request: web.Request, name: str, **context: Any) -> web.Response:
    cfg = request.app[SOURCES].cfg
    html = (
        request.app[TEMPLATES]
        .get_template(name)
        .render(request=request, allow_actions=cfg.ui.allow_actions, path=request.path, **context)
    )
    return web.Response(text=html, content_type="text/html")


# --- pages ----------------------------------------------------------------------------------------------


async def runs(request: web.Request) -> web.Response:
    src = request.app[SOURCES]
    query = model.parse_list_query(request.query, data.now())
    page = await data.runs_page(src, query)
    fragment = "runs_live.html" if request.query.get("fragment") else "runs.html"
    return _render(request, fragment, q=query, page=page, within=model.WITHIN, sizes=model.PAGE_SIZES)


async def run(request: web.Request) -> web.Response:
    run_id = request.match_info["run_id"]
    try:
        run_id = contract.parse_run_id(run_id)
    except InvalidMessage:
        raise web.HTTPNotFound(text=f"not a run id: {run_id}") from None
    page = await data.run_page(request.app[SOURCES], run_id)
    if page is None:
        raise web.HTTPNotFound(text=f"no run {run_id}")
    fragment = "run_live.html" if request.query.get("fragment") else "run.html"
    return _render(request, fragment, p=page, notice=request.query.get("notice"))


async def queue(request: web.Request) -> web.Response:
    page = await data.queue_page(request.app[SOURCES])
    fragment = "queue_live.html" if request.query.get("fragment") else "queue.html"
    return _render(request, fragment, page=page)


async def fleet(request: web.Request) -> web.Response:
    page = await data.fleet_page(request.app[SOURCES])
    fragment = "fleet_live.html" if request.query.get("fragment") else "fleet.html"
    return _render(request, fragment, page=page, hub=request.app[HUB])


async def live(request: web.Request) -> web.StreamResponse:
    """Server-sent events: every status change (of one run with ``?run_id=``) as `event: status`."""
    hub = request.app[HUB]
    listener = hub.listen(request.query.get("run_id") or None)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    try:
        await response.write(b"retry: 2000\nevent: hello\ndata: {}\n\n")
        while True:
            try:
                kind, body = await asyncio.wait_for(listener.queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if kind == "close":
                break
            await response.write(b"event: " + kind.encode() + b"\ndata: " + body + b"\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        hub.leave(listener)
    return response


# --- actions (ui.allow_actions) -------------------------------------------------------------------------


def _same_origin(request: web.Request) -> bool:
    """A form posted from this site: its Origin (or Referer) names this host. Stops another site's page
    from making a logged-in browser cancel runs."""
    source = request.headers.get("Origin") or request.headers.get("Referer") or ""
    return bool(source) and urlsplit(source).netloc == request.host


async def _action_target(request: web.Request) -> tuple[data.Sources, str, dict[str, Any]]:
    src = request.app[SOURCES]
    if not src.cfg.ui.allow_actions:
        raise web.HTTPForbidden(text="actions are off: set ui.allow_actions: true to allow cancel and re-execute")
    if not _same_origin(request):
        raise web.HTTPForbidden(text="refused: the request did not come from this site")
    try:
        run_id = contract.parse_run_id(request.match_info["run_id"])
    except InvalidMessage:
        raise web.HTTPNotFound() from None
    found = await src.store.get_run(run_id)
    if found is None:
        raise web.HTTPNotFound(text=f"no run {run_id}")
    return src, run_id, found


async def cancel(request: web.Request) -> web.Response:
    src, run_id, found = await _action_target(request)
    if RunStatus(found["status"]).terminal:
        notice = f"already finished ({found['status']}): nothing to cancel"
    else:
        await client.cancel(src.broker, run_id)
        notice = "cancel requested"
        log.info("ui: cancel requested run_id=%s", run_id)
    raise web.HTTPSeeOther(f"/runs/{run_id}?{urlencode({'notice': notice})}")


async def reexecute(request: web.Request) -> web.Response:
    src, run_id, found = await _action_target(request)
    form = await request.post()
    strategy = str(form.get("strategy") or "FROM_FAILURE")
    if strategy not in ("FROM_FAILURE", "ALL_STEPS"):
        raise web.HTTPBadRequest(text="strategy: FROM_FAILURE or ALL_STEPS")
    if not RunStatus(found["status"]).terminal:
        raise web.HTTPSeeOther(f"/runs/{run_id}?{urlencode({'notice': 'only a finished run can be re-executed'})}")
    new_id = await client.reexecute(src.broker, run_id, strategy, {})
    log.info("ui: re-execute requested run_id=%s new run %s", run_id, new_id)
    raise web.HTTPSeeOther(f"/runs/{new_id}?{urlencode({'notice': f're-execution of {run_id} ({strategy})'})}")


# --- the application --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str

    def accepts(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        # Both compared, always, in constant time: no timing tells which one was wrong.
        ok_user = hmac.compare_digest(user.encode(), self.user.encode())
        ok_password = hmac.compare_digest(password.encode(), self.password.encode())
        return ok_user and ok_password


def _middlewares(cfg: Config) -> list[Any]:
    credentials = None
    if cfg.ui.basic_auth_user is not None and cfg.ui.basic_auth_password is not None:
        credentials = Credentials(cfg.ui.basic_auth_user, cfg.ui.basic_auth_password)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if credentials is not None and not credentials.accepts(request.headers.get("Authorization")):
            return web.Response(
                status=401, text="authentication required", headers={"WWW-Authenticate": 'Basic realm="runherd"'}
            )
        response = await handler(request)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; frame-ancestors 'none'"
        )
        return response

    return [guard]


def make_app(src: data.Sources, hub: Hub) -> web.Application:
    app = web.Application(middlewares=_middlewares(src.cfg))
    app[SOURCES] = src
    app[HUB] = hub
    app[TEMPLATES] = _templates()
    app.router.add_get("/", runs)
    app.router.add_get("/runs/{run_id}", run)
    app.router.add_get("/queue", queue)
    app.router.add_get("/fleet", fleet)
    app.router.add_get("/live", live)
    app.router.add_post("/runs/{run_id}/cancel", cancel)
    app.router.add_post("/runs/{run_id}/reexecute", reexecute)
    return app


@dataclass
class Running:
    """A UI being served: its address, and ``close()`` to stop it."""

    runner: web.AppRunner
    hub: Hub
    store: Store
    broker: Broker
    url: str

    async def close(self) -> None:
        await self.hub.close()
        await self.runner.cleanup()
        await self.broker.close()
        await self.store.close()


async def start(cfg: Config, *, host: str | None = None, port: int | None = None) -> Running:
    """Serve the UI in this event loop; port 0 picks a free one (see ``Running.url``)."""
    store = await Store.connect(cfg.ui.database_url or cfg.database_url, max_size=5, read_only=True)
    broker = await Broker.connect(cfg.amqp_url, declare=False)
    hub = Hub(broker)
    hub.start()
    app = make_app(data.Sources(cfg, store, broker), hub)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host or cfg.ui.host, cfg.ui.port if port is None else port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    url = f"http://{bound_host}:{bound_port}"
    log.info(
        "runherd ui on %s (database %s, actions %s)",
        url,
        redact(cfg.ui.database_url or cfg.database_url),
        "on" if cfg.ui.allow_actions else "off",
    )
    return Running(runner, hub, store, broker, url)


async def serve(cfg: Config, host: str | None = None, port: int | None = None) -> int:
    """`runherd ui`: serve until SIGTERM or SIGINT."""
    from runherd.runtime import install_signal_handlers

    stop = asyncio.Event()
    install_signal_handlers(stop)
    running = await start(cfg, host=host, port=port)
    with contextlib.suppress(asyncio.CancelledError):
        await stop.wait()
    await running.close()
    return 0
