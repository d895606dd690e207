"""Encrypted transport: the ``amqp_tls`` and ``database_tls`` config sections, folded into the URLs.

Both drivers take their TLS settings from the connection URL's query (aiormq: ``cafile``,
``certfile``, ``keyfile``, ``no_verify_ssl``; asyncpg, as libpq: ``sslmode``, ``sslrootcert``,
``sslcert``, ``sslkey``), so the config's keys are written into the URLs once, at load. Every
connection (services, CLI, client) and every worker, which gets the AMQP URL from its launcher, then
connects the same way. A parameter already in the URL wins over the section's. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from runherd.errors import ConfigError

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class AmqpTls:
    """Used when ``amqp_url`` is ``amqps://``: the CA that signed the broker's certificate (default:
    the system's), and the client certificate and key for brokers that ask for one."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True  # false: no certificate or host name check (testing only)


@dataclass(frozen=True)
class DatabaseTls:
    """libpq's ``sslmode`` (None: the driver's default, ``prefer``) and certificate files."""

    sslmode: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def _with_query(url: str, params: dict[str, str]) -> str:
    """``url`` with ``params`` added to its query, keeping any the URL already has."""
    if not params:
        return url
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    added = {k: v for k, v in params.items() if k not in query}
    if not added:
        return url
    return urlunsplit(parts._replace(query=urlencode({**query, **added}, safe="/:")))


def amqp_url(url: str, tls: AmqpTls, key: str = "amqp_url") -> str:
    params = {"cafile": tls.ca_file, "certfile": tls.cert_file, "keyfile": tls.key_file}
    found = {k: v for k, v in params.items() if v}
    if not tls.verify:
        found["no_verify_ssl"] = "1"
    if found and not url.startswith("amqps://"):
        raise ConfigError(f"amqp_tls: set, but {key} is not amqps:// (the broker's TLS listener, often port 5671)")
    return _with_query(url, found)


def database_url(url: str, tls: DatabaseTls) -> str:
    if tls.sslmode is not None and tls.sslmode not in SSLMODES:
        raise ConfigError(f"database_tls.sslmode: expected one of {', '.join(SSLMODES)}, got {tls.sslmode!r}")
    params = {"sslmode": tls.sslmode, "sslrootcert": tls.ca_file, "sslcert": tls.cert_file, "sslkey": tls.key_file}
    return _with_query(url, {k: v for k, v in params.items() if v})
