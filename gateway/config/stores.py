"""Reading the `stores:` section (SPEC §2): named shared stores, today Redis.

`memory` always exists (per worker) and cannot be declared.  A store's `url` may carry a
password, normally from `${ENV}`: errors about a url never repeat it, and nothing the gateway
shows or logs prints it (`redacted_url`).

A Redis Cluster is `cluster: true` with its seed nodes in `nodes:` instead of `url:` (one way to
write it: `url` next to `cluster: true` is an error, not one more seed).  The nodes share one
scheme — all redis:// or all rediss://, never unix:// — and one user and password, since the
client speaks to every master it discovers with the same credentials.
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from gateway.certificates import CertificateProblem, check_ca_bundle, check_certificate
from gateway.config.model import StoreConfig, StoreTLSConfig
from gateway.config.reader import Reader, as_bool, join_path, positive_duration, positive_int
from gateway.errors import ConfigError

#: what a store's name may be (it appears in metrics and stage configs)
STORE_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_KEYS: Final = {"type", "url", "cluster", "nodes", "prefix", "timeout", "pool_size", "tls"}
_LATER: Final = {"sentinel": "Redis Sentinel support"}


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
    return _checked_url(value, path, node=False)


def _node_url(value: object, path: str) -> str:
    return _checked_url(value, path, node=True)


def _checked_url(value: object, path: str, *, node: bool) -> str:
    """`value` when it is a url a redis store can use (`node`: a cluster's seed node)."""
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
        if node and database.strip("0"):
            raise ConfigError(path, "a cluster has database 0 only: redis://HOST:PORT")
        if node and (parts.query or parts.fragment):
            raise ConfigError(path, "a cluster node's URL takes no query: redis://HOST:PORT")
    elif node:
        raise ConfigError(path, "must be a redis:// or rediss:// URL (a cluster has no unix://)")
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


def _credentials(url: str) -> tuple[str | None, str | None]:
    parts = urlsplit(url)
    return parts.username, parts.password


def _nodes(r: Reader, raw: object, path: str) -> tuple[str, ...]:
    """A cluster's seed nodes, each mistake reported at `nodes[i]` (never repeating a url)."""
    if not isinstance(raw, list) or not raw:
        r.error(path, "must be a non-empty list of redis:// or rediss:// URLs")
        return ()
    errors = len(r.errors)
    nodes: list[str] = []
    for index, item in enumerate(raw):
        where = f"{path}[{index}]"
        try:
            url = _node_url(item, where)
        except ConfigError as exc:
            r.add(exc)
            continue
        if nodes:
            first = nodes[0]
            if urlsplit(url).scheme != urlsplit(first).scheme:
                r.error(where, "every node has the scheme of the first (redis:// or rediss://)")
            elif _credentials(url) != _credentials(first):
                r.error(where, "every node has the first one's user and password (one cluster)")
        nodes.append(url)
    if len(r.errors) > errors:
        return ()
    return tuple(nodes)


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
        m: dict[str, Any] | None = r.mapping(item, path, _KEYS, later=_LATER)
        if m is None:
            continue
        kind = m.get("type", "redis")
        if kind != "redis":
            r.error(join_path(path, "type"), 'must be "redis"')
        try:
            cluster = m.get("cluster") is not None and as_bool(
                m["cluster"], join_path(path, "cluster")
            )
        except ConfigError as exc:
            r.add(exc)  # whether url or nodes is expected is unknown: nothing more to check
            continue
        url = ""
        nodes: tuple[str, ...] = ()
        if cluster:
            if "url" in m:
                r.error(join_path(path, "url"), "with cluster: true, list the seed nodes in nodes:")
            if "nodes" not in m:
                r.error(join_path(path, "nodes"), "is required with cluster: true")
                continue
            nodes = _nodes(r, m["nodes"], join_path(path, "nodes"))
            schemes = {urlsplit(n).scheme for n in nodes}
        else:
            if "nodes" in m:
                r.error(join_path(path, "nodes"), "needs cluster: true (one Redis is a url:)")
            if "url" not in m:
                if "nodes" not in m:
                    r.error(join_path(path, "url"), "is required")
                continue
            url = r.get(m, "url", path, _url, "")
            schemes = {urlsplit(url).scheme}
        tls = _tls(r, m["tls"], join_path(path, "tls")) if "tls" in m else None
        if tls is not None and (url or nodes) and schemes != {"rediss"}:
            r.error(
                join_path(path, "tls"),
                "applies to rediss:// nodes (TLS); these are not"
                if cluster
                else "applies to a rediss:// url (TLS); this one is not",
            )
        config = StoreConfig(
            name=name,
            url=url,
            cluster=cluster,
            nodes=nodes,
            prefix=r.get(m, "prefix", path, _prefix, "gw:"),
            timeout=r.get(m, "timeout", path, positive_duration, 0.1),
            pool_size=r.get(m, "pool_size", path, positive_int, 32),
            tls=tls,
        )
        if len(r.errors) == errors:
            stores.append(config)
    return tuple(stores)
