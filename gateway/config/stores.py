"""Reading the `stores:` section (SPEC §2): named shared stores, today Redis.

`memory` always exists (per worker) and cannot be declared.  A store's `url` may carry a
password, normally from `${ENV}`: errors about a url never repeat it, and nothing the gateway
shows or logs prints it (`redacted_url`).
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from gateway.certificates import CertificateProblem, check_ca_bundle, check_certificate
from gateway.config.model import StoreConfig, StoreTLSConfig
from gateway.config.reader import Reader, join_path, positive_duration, positive_int
from gateway.errors import ConfigError

#: what a store's name may be (it appears in metrics and stage configs)
STORE_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_KEYS: Final = {"type", "url", "prefix", "timeout", "pool_size", "tls"}
_LATER: Final = {
    "cluster": "Redis Cluster support",
    "nodes": "Redis Cluster support",
    "sentinel": "Redis Sentinel support",
}


def redacted_url(url: str) -> str:
    """`url` with its password (and user name) replaced, for anything shown or logged."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _url(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, "must be a string")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(path, "is not a valid redis:// URL") from None
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ConfigError(path, "needs a host: redis://HOST:PORT/DB")
        database = parts.path.lstrip("/")
        if database and not database.isdigit():
            raise ConfigError(path, "the path must be a database number: redis://HOST:PORT/0")
    elif parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(path, "needs a socket path: unix:///run/redis.sock")
    else:
        raise ConfigError(path, "must be a redis://, rediss:// or unix:// URL")
    return value


def _prefix(value: object, path: str) -> str:
    if not isinstance(value, str) or any(c.isspace() for c in value):
        raise ConfigError(path, "must be a string without spaces")
    return value


def _tls(r: Reader, raw: object, path: str) -> StoreTLSConfig | None:
    m = r.mapping({} if raw is None else raw, path, {"ca", "cert", "key"})
    if m is None:
        return None
    errors = len(r.errors)
    ca = r.resolve_file(m["ca"], join_path(path, "ca")) if m.get("ca") is not None else None
    if ca is not None:
        try:
            check_ca_bundle(ca)
        except CertificateProblem as exc:
            r.error(join_path(path, "ca"), str(exc))
    cert = key = None
    if ("cert" in m) != ("key" in m):
        r.error(join_path(path, "key" if "cert" in m else "cert"), "cert and key go together")
    elif "cert" in m:
        cert = r.resolve_file(m["cert"], join_path(path, "cert"))
        key = r.resolve_file(m["key"], join_path(path, "key"))
        if cert is not None and key is not None:
            try:
                check_certificate(cert, key)
            except CertificateProblem as exc:
                r.error(join_path(path, "cert"), str(exc))
    if len(r.errors) > errors:
        return None
    return StoreTLSConfig(
        ca=None if ca is None else str(ca),
        cert=None if cert is None else str(cert),
        key=None if key is None else str(key),
    )


def read_stores(r: Reader, raw: object) -> tuple[StoreConfig, ...]:
    """The declared stores; those with errors are reported and left out."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        r.error("stores", "must be a mapping of store names to their settings")
        return ()
    stores: list[StoreConfig] = []
    for name, item in raw.items():
        path = join_path("stores", name)
        if name == "memory":
            r.error(path, "memory is built in (per worker) and cannot be declared")
            continue
        if not isinstance(name, str) or not STORE_NAME.match(name):
            r.error(path, "a store name is letters, digits, '_', '.' and '-'")
            continue
        errors = len(r.errors)
        m: dict[str, Any] | None = r.mapping(item, path, _KEYS, later=_LATER, required=("url",))
        if m is None or "url" not in m:
            continue
        kind = m.get("type", "redis")
        if kind != "redis":
            r.error(join_path(path, "type"), 'must be "redis"')
        url = r.get(m, "url", path, _url, "")
        tls = _tls(r, m["tls"], join_path(path, "tls")) if "tls" in m else None
        if tls is not None and not url.startswith("rediss://"):
            r.error(join_path(path, "tls"), "applies to a rediss:// url (TLS); this one is not")
        config = StoreConfig(
            name=name,
            url=url,
            prefix=r.get(m, "prefix", path, _prefix, "gw:"),
            timeout=r.get(m, "timeout", path, positive_duration, 0.1),
            pool_size=r.get(m, "pool_size", path, positive_int, 32),
            tls=tls,
        )
        if len(r.errors) == errors:
            stores.append(config)
    return tuple(stores)
