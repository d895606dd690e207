"""Queue counts from RabbitMQ's management API, for the queue-depth gauge.

AMQP's queue.declare-ok counts only the *ready* messages. A consumer with a large prefetch (the
launcher takes up to 2 x its batch) holds the rest unacknowledged, so during a launch storm the
ready count reads ~0 while hundreds of commands wait. The management API reports both.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

DEFAULT_PORT = 15672


@dataclass(frozen=True)
class QueueCounts:
    ready: int
    unacked: int

    @property
    def depth(self) -> int:
        return self.ready + self.unacked


@dataclass(frozen=True)
class Endpoint:
    base: str  # http(s)://host:port, no trailing slash
    user: str
    password: str
    vhost: str
    ca_file: str | None = None  # https: the CA to trust (amqp_tls.ca_file), else the system's
    verify: bool = True


def endpoint(amqp_url: str, management_url: str = "", *, ca_file: str | None = None, verify: bool = True) -> Endpoint:
    """Where the management API of ``amqp_url``'s broker is: ``management_url`` if given (its
    credentials, else the AMQP ones), else the AMQP host on port 15672 (https for amqps)."""
    amqp = urlsplit(amqp_url)
    vhost = unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
    user, password = unquote(amqp.username or "guest"), unquote(amqp.password or "guest")
    if management_url:
        mgmt = urlsplit(management_url)
        if mgmt.username:
            user, password = unquote(mgmt.username), unquote(mgmt.password or "")
        netloc = mgmt.hostname or "127.0.0.1"
        if mgmt.port:
            netloc = f"{netloc}:{mgmt.port}"
        base = f"{mgmt.scheme or 'http'}://{netloc}{mgmt.path.rstrip('/')}"
    else:
        scheme = "https" if amqp.scheme == "amqps" else "http"
        base = f"{scheme}://{amqp.hostname or '127.0.0.1'}:{DEFAULT_PORT}"
    return Endpoint(base, user, password, vhost, ca_file, verify)


def parse_queues(payload: object, names: set[str]) -> dict[str, QueueCounts]:
    """The counts of ``names`` in a ``GET /api/queues/<vhost>`` answer (pure)."""
    counts: dict[str, QueueCounts] = {}
    if not isinstance(payload, list):
        return counts
    for item in payload:
        if isinstance(item, dict) and item.get("name") in names:
            counts[item["name"]] = QueueCounts(
                int(item.get("messages_ready") or 0), int(item.get("messages_unacknowledged") or 0)
            )
    return counts


def _get(url: str, where: Endpoint, timeout: float) -> object:
    request = urllib.request.Request(url)
    token = base64.b64encode(f"{where.user}:{where.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=where.ca_file)
        if not where.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return json.loads(response.read())


async def queue_counts(where: Endpoint, names: set[str], timeout: float = 3.0) -> dict[str, QueueCounts]:
    """Ready and unacknowledged counts of ``names``; raises OSError (URLError) or ValueError."""
    url = f"{where.base}/api/queues/{quote(where.vhost, safe='')}?columns=name,messages_ready,messages_unacknowledged"
    payload = await asyncio.to_thread(_get, url, where, timeout)
    return parse_queues(payload, names)
