"""Kubernetes API failures: which errors are transport errors or transient, and what they say."""

from __future__ import annotations

import json

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

TRANSPORT_ERRORS = (aiohttp.ClientError, OSError)  # OSError covers TimeoutError


def _api_message(exc: ApiException) -> str:
    """The API's own sentence from a Status body, else what the client knows."""
    body: str | bytes | None = exc.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if body:
        try:
            status = json.loads(body)
        except ValueError:
            return str(body).strip()[:500]
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
    return str(exc.reason or f"HTTP {exc.status}")


def _transient(status: int | None) -> bool:
    return not status or status >= 500 or status == 429


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status}: {_api_message(exc)}"
    return repr(exc) if not str(exc) else str(exc)
