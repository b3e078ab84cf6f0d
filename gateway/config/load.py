"""YAML in, `GatewayConfig` out: `${ENV}` interpolation, strict keys, every error with its path.

The loader collects every error of a file before giving up, so `gateway check` shows them all at
once.  Keys that belong to capabilities not built yet are recognised and refused with "not
supported yet" — never silently ignored.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Final, Literal, TypeVar
from urllib.parse import urlsplit

import yaml

from gateway.bearer import bearer_token
from gateway.certificates import CertificateProblem, check_ca_bundle, check_certificate
from gateway.config.model import (
    INTERNAL_ECHO,
    PATH_ESCAPES,
    AccessLogConfig,
    AdminConfig,
    CertificateConfig,
    EndpointConfig,
    GatewayConfig,
    HealthCheckConfig,
    HttpRulesConfig,
    LimitsConfig,
    ListenerConfig,
    ListenerTLSConfig,
    MatchConfig,
    OutlierDetectionConfig,
    PathEscape,
    RouteConfig,
    ShutdownConfig,
    StageSpec,
    StatusConfig,
    TracingConfig,
    UpstreamConfig,
    UpstreamTLSConfig,
    WeightedUpstream,
)
from gateway.config.reader import (
    HTTP_TOKEN,
    Fields,
    join_path,
)
from gateway.config.reader import Reader as _Reader
from gateway.config.reader import (
    as_bool as _bool,
)
from gateway.config.reader import (
    as_int as _int,
)
from gateway.config.reader import (
    as_str as _str,
)
from gateway.config.reader import (
    positive_duration as _positive_duration,
)
from gateway.config.reader import (
    positive_int as _positive_int,
)
from gateway.config.reader import (
    positive_size as _positive_size,
)
from gateway.config.reader import (
    ratio as _ratio,
)
from gateway.config.reader import (
    status as _status,
)
from gateway.config.reader import (
    str_list as _str_list,
)
from gateway.config.stages import ConfigKind, check_pipeline, parse_entry
from gateway.config.stores import read_stores
from gateway.config.strict_yaml import load_yaml
from gateway.config.tracing import read_route_tracing, read_tracing
from gateway.config.units import parse_duration, parse_size
from gateway.errors import ConfigError, ConfigErrors

T = TypeVar("T")

_ENV: Final = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HOSTNAME: Final = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

#: the top-level sections a config may have, in the order they are read
TOP_LEVEL_SECTIONS: Final = (
    "listeners",
    "admin",
    "status",
    "limits",
    "http",
    "trusted_proxies",
    "shutdown",
    "access_log",
    "tracing",
    "stores",
    "upstreams",
    "middlewares",
    "routes",
)
_LATER_TOP: Final[dict[str, str]] = {}


def interpolate_env(text: str, env: Mapping[str, str], path: str = "") -> str:
    """Replace ${VAR} and ${VAR:-default} in one string; `$${` stays a literal `${`."""
    missing: list[str] = []

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    result = _ENV.sub(sub, text)
    if missing:
        raise ConfigErrors(
            ConfigError(path, f"environment variable {name} is not set") for name in missing
        )
    return result


def _interpolate_tree(
    value: object, env: Mapping[str, str], path: str, errors: list[ConfigError]
) -> object:
    """Interpolate every string scalar of the parsed YAML (comments are never touched).

    A scalar that is exactly one `${...}` takes the YAML type of what it expands to, so
    `max_connections: ${MAX_CONN}` is still an integer.
    """
    if isinstance(value, str):
        if "$" not in value:
            return value
        try:
            expanded = interpolate_env(value, env, path)
        except ConfigErrors as exc:
            errors.extend(exc.errors)
            return value
        whole = _ENV.fullmatch(value.strip())
        if whole and whole.group(0) != "$${" and expanded:
            try:
                typed = yaml.safe_load(expanded)
            except yaml.YAMLError:
                return expanded
            if isinstance(typed, int | float | bool):
                return typed
        return expanded
    if isinstance(value, dict):
        return {k: _interpolate_tree(v, env, join_path(path, k), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_tree(v, env, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    return value


def _string_keys(value: object) -> object:
    """`value` with every mapping key a string, so the version's JSON can sort them.

    A key YAML typed (`1:`, `yes:`, a date) gets its type as a prefix: sorting never compares an
    int with a str (a TypeError), and `1` stays apart from `"1"`.  String keys are unchanged,
    so the version of a config with only string keys is what it always was.
    """
    if isinstance(value, dict):
        return {
            k if isinstance(k, str) else f"!!{type(k).__name__} {k}": _string_keys(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_string_keys(v) for v in value]
    return value


def _bind(value: object, path: str) -> tuple[str, int]:
    text = _str(value, path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(path, f"must be host:port, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(path, "port must be between 0 and 65535")
    if not host:
        raise ConfigError(path, "host is missing (use 0.0.0.0 for every interface)")
    return host, port


def _same_socket(host: str, port: int, other_host: str, other_port: int) -> bool:
    """Whether two binds claim the same socket: the same port (not 0, which the system picks)
    on the same host, or where one is the wildcard of the other's address family (asyncio makes
    an IPv6 socket IPv6-only, so `::` does not take IPv4 addresses)."""
    if port != other_port or port == 0:
        return False
    if host == other_host:
        return True
    try:
        ip, other_ip = ipaddress.ip_address(host), ipaddress.ip_address(other_host)
    except ValueError:
        return False  # a host name: only binding tells what it resolves to
    return ip.version == other_ip.version and (ip.is_unspecified or other_ip.is_unspecified)


def _path_value(value: object, path: str) -> str:
    text = _str(value, path)
    if not text.startswith("/"):
        raise ConfigError(path, "must start with /")
    return text


def _prefix(value: object, path: str) -> str:
    text = _path_value(value, path)
    return text.rstrip("/") or "/"


def _host(value: object, path: str) -> str:
    text = _str(value, path).strip().lower()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":")[0]
    candidate = text[2:] if text.startswith("*.") else text
    try:
        address = ipaddress.ip_address(candidate)
        if text.startswith("*."):
            raise ConfigError(path, "a wildcard cannot apply to an IP address")
        # the compressed form, as gateway.http.host spells a request's IPv6 host
        return address.compressed
    except ValueError:
        pass
    if not _HOSTNAME.match(candidate) or "*" in candidate:
        raise ConfigError(path, f"must be a host name, '*.domain' or an IP address, not {value!r}")
    return text


def _regex(value: object, path: str) -> str:
    text = _str(value, path)
    try:
        re.compile(text)
    except re.error as exc:
        raise ConfigError(path, f"invalid regular expression: {exc}") from None
    return text


def _methods(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a non-empty list of methods")
    methods: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not HTTP_TOKEN.match(item):
            raise ConfigError(f"{path}[{i}]", "must be an HTTP method")
        method = item.upper()
        if method in methods:
            raise ConfigError(f"{path}[{i}]", f"{method} is listed twice")
        methods.append(method)
    return tuple(methods)


def _headers(value: object, path: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ConfigError(path, "must be a mapping of header name to value")
    result = []
    for name, header_value in value.items():
        if not isinstance(name, str) or not HTTP_TOKEN.match(name):
            raise ConfigError(f"{path}.{name}", "is not a valid header name")
        if not isinstance(header_value, str):
            raise ConfigError(f"{path}.{name}", 'must be a string (quote values like "true")')
        result.append((name.lower(), header_value))
    return tuple(result)


#: request_buffering's ceiling: every connection may hold this much, so it stays small
_MAX_BUFFERING: Final = 1024 * 1024


def _buffering_size(value: object, path: str) -> int:
    size = parse_size(value, path)
    if size > _MAX_BUFFERING:
        raise ConfigError(path, "must be at most 1MiB (larger bodies stream once this arrived)")
    return size


def _non_negative_int(value: object, path: str) -> int:
    result = _int(value, path)
    if result < 0:
        raise ConfigError(path, "must be >= 0 (0: no limit)")
    return result


def _admin_token(value: object, path: str) -> str:
    text = _str(value, path)
    # what a client can send after "Bearer ": anything else could never match (the message
    # never shows the value, a secret)
    if text and bearer_token("Bearer " + text) != text:
        raise ConfigError(path, "must be a token68 (letters, digits and -._~+/, then any =)")
    return text


def _underscore_action(value: object, path: str) -> Literal["drop", "reject", "allow"]:
    if value == "drop" or value == "reject" or value == "allow":
        return value
    raise ConfigError(path, "must be drop, reject or allow")


def _semicolon_action(value: object, path: str) -> Literal["reject", "allow"]:
    if value == "reject" or value == "allow":
        return value
    raise ConfigError(path, "must be reject or allow")


def _path_escapes(value: object, path: str) -> tuple[PathEscape, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, f"must be a list of {', '.join(PATH_ESCAPES)}")
    result: list[PathEscape] = []
    for i, item in enumerate(value):
        escape = next((e for e in PATH_ESCAPES if e == item), None)
        if escape is None:
            raise ConfigError(f"{path}[{i}]", f"must be one of {', '.join(PATH_ESCAPES)}")
        result.append(escape)
    return tuple(result)


def _cidrs(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, "must be a list of CIDRs")
    result = []
    for i, item in enumerate(value):
        try:
            result.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            raise ConfigError(f"{path}[{i}]", f"is not an IP address or CIDR: {item!r}") from None
    return tuple(result)


def _percent(value: object, path: str) -> int:
    result = _int(value, path)
    if not 0 <= result <= 100:
        raise ConfigError(path, "must be between 0 and 100")
    return result


def _check_health_check(r: _Reader, config: HealthCheckConfig, path: str) -> None:
    if any(c in config.path for c in " \r\n\t"):
        r.error(f"{path}.path", "must not contain spaces or line breaks")
    if config.timeout > config.interval:
        r.error(f"{path}.timeout", "must not be longer than interval")


def _check_outlier_detection(r: _Reader, config: OutlierDetectionConfig, path: str) -> None:
    if config.max_ejection < config.ejection:
        r.error(f"{path}.max_ejection", "must be at least ejection")


_LIMITS: Final = Fields(
    LimitsConfig,
    {
        "max_header_bytes": _positive_size,
        "max_body_bytes": parse_size,
        "header_timeout": _positive_duration,
        "body_timeout": _positive_duration,
        "idle_timeout": _positive_duration,
        "max_connections": _positive_int,
        "max_connections_per_client": _non_negative_int,
        "request_buffering": _buffering_size,
        "tunnel_idle_timeout": _positive_duration,
    },
    # {bytes_per_second, grace}: two fields
    extra=("min_data_rate",),
)
_SHUTDOWN: Final = Fields(
    ShutdownConfig, {"drain_delay": parse_duration, "timeout": parse_duration}
)
_ACCESS_LOG: Final = Fields(
    AccessLogConfig,
    {
        "enabled": _bool,
        "sample_ratio": _ratio,
        "always_log_status": _status,
        "exclude_fields": _str_list,
    },
)
_HEALTH_CHECK: Final = Fields(
    HealthCheckConfig,
    {
        "path": _path_value,
        "interval": _positive_duration,
        "timeout": _positive_duration,
        "healthy": _positive_int,
        "unhealthy": _positive_int,
    },
    check=_check_health_check,
)
_OUTLIER_DETECTION: Final = Fields(
    OutlierDetectionConfig,
    {
        "max_ejected_percent": _percent,
        "consecutive_failures": _positive_int,
        "ejection": _positive_duration,
        "max_ejection": _positive_duration,
    },
    check=_check_outlier_detection,
)
_MATCH: Final = Fields(
    MatchConfig,
    {
        "host": _host,
        "path": _path_value,
        "path_prefix": _prefix,
        "path_regex": _regex,
        "methods": _methods,
        "headers": _headers,
        "case_insensitive": _bool,
    },
)
_HTTP_RULES: Final = Fields(
    HttpRulesConfig,
    {
        "underscores_in_headers": _underscore_action,
        "path_semicolons": _semicolon_action,
        "path_escapes": _path_escapes,
    },
)


class _Loader:
    def __init__(
        self, kinds: Mapping[str, ConfigKind], base_dir: Path, unset: Collection[str] = ()
    ) -> None:
        self.kinds = kinds
        self.r = _Reader(unset)
        self.r.resolve_file = self.file
        self.base_dir = base_dir
        #: files the config references (certificates, JWKS …): part of its version
        self.referenced_files: list[Path] = []
        self.declared_middlewares: set[str] = set()
        #: each declared middleware's stage kind as written
        self.middleware_kinds: dict[str, object] = {}
        #: what each middleware resolved for its first route (an idempotency `scope: auto`)
        self.resolved: dict[tuple[str, str], tuple[str, str]] = {}
        #: listeners that ask clients for certificates (an mtls stage needs one)
        self.client_ca_listeners: list[str] = []

    def load(self, raw: object, source: str, normalized: str) -> GatewayConfig:
        r = self.r
        top = r.mapping(
            raw,
            "",
            set(TOP_LEVEL_SECTIONS),
            later=_LATER_TOP,
        )
        if top is None:
            raise ConfigErrors(r.errors)
        listeners = self.listeners(top.get("listeners"))
        admin = self.admin(top.get("admin"))
        status = self.status(top["status"], listeners, admin) if "status" in top else None
        limits = self.limits(top.get("limits"))
        http = self.http_rules(top.get("http"), "http", HttpRulesConfig())
        trusted: tuple[str, ...] = r.get(top, "trusted_proxies", "", _cidrs, ())
        shutdown = self.shutdown(top.get("shutdown"))
        access_log = self.access_log(top.get("access_log"))
        tracing = read_tracing(r, top.get("tracing"))
        stores = read_stores(r, top.get("stores"))
        # every declared name counts, so a store with its own error is not reported again as
        # unknown by each stage that names it
        declared_stores = top.get("stores")
        if isinstance(declared_stores, dict):
            r.stores.update({str(k): "redis" for k in declared_stores if k != "memory"})
        upstreams = self.upstreams(top.get("upstreams"))
        # every declared name counts, so an upstream with its own error is not reported again
        # as unknown by each route that uses it
        declared = top.get("upstreams")
        names = {str(k) for k in declared} if isinstance(declared, dict) else set()
        r.upstreams = names
        middlewares = self.middlewares(top.get("middlewares"))
        routes = self.routes(top.get("routes"), names, middlewares, http, tracing)
        if r.errors:
            raise ConfigErrors(r.errors)
        digest = hashlib.sha256(normalized.encode())
        for file in self.referenced_files:
            digest.update(file.read_bytes())
        return GatewayConfig(
            listeners=listeners,
            admin=admin,
            status=status,
            limits=limits,
            http=http,
            trusted_proxies=trusted,
            shutdown=shutdown,
            access_log=access_log,
            tracing=tracing,
            stores=stores,
            upstreams=upstreams,
            middlewares=tuple(middlewares.values()),
            routes=routes,
            source=source,
            files=tuple(dict.fromkeys(str(f) for f in self.referenced_files)),
            version=digest.hexdigest()[:12],
        )

    def listeners(self, raw: object) -> tuple[ListenerConfig, ...]:
        r = self.r
        if raw is None:
            r.error("listeners", "at least one listener is required")
            return ()
        if not isinstance(raw, list) or not raw:
            r.error("listeners", "must be a non-empty list")
            return ()
        result: list[ListenerConfig] = []
        names: set[str] = set()
        binds: set[tuple[str, int]] = set()
        for i, item in enumerate(raw):
            path = f"listeners[{i}]"
            m = r.mapping(
                item, path, {"name", "bind", "tls", "redirect_https"}, required=("name", "bind")
            )
            if m is None:
                continue
            name = r.get(m, "name", path, _str, "")
            bind = r.get(m, "bind", path, _bind, ("", -1))
            if name in names:
                r.error(f"{path}.name", f"listener {name!r} is defined twice")
            if bind in binds and bind[1] != 0:
                r.error(f"{path}.bind", "another listener already binds this address")
            names.add(name)
            binds.add(bind)
            tls = self.listener_tls(m.get("tls"), f"{path}.tls") if "tls" in m else None
            # a declared client_ca counts even when it, or the listener's TLS, has an error of
            # its own (reported there): an mtls stage is not wrong because of it
            declared = m.get("tls")
            if isinstance(declared, dict) and declared.get("client_ca") is not None:
                self.client_ca_listeners.append(name)
            redirect = None
            if "redirect_https" in m:
                redirect = self.redirect_https(m["redirect_https"], f"{path}.redirect_https")
                if "tls" in m:
                    r.error(
                        f"{path}.redirect_https",
                        "is for a plain-HTTP listener; this one has tls (it is the https one)",
                    )
            if name and bind[1] >= 0:
                result.append(
                    ListenerConfig(
                        name=name, host=bind[0], port=bind[1], tls=tls, redirect_https=redirect
                    )
                )
        return tuple(result)

    def redirect_https(self, raw: object, path: str) -> int | None:
        """`redirect_https: {port}` (443 when left out): the port of the HTTPS URL."""
        m = self.r.mapping({} if raw is None else raw, path, {"port"})
        if m is None:
            return None
        port = self.r.get(m, "port", path, _int, 443)
        if not 1 <= port <= 65535:
            self.r.error(f"{path}.port", "must be between 1 and 65535")
            return None
        return port

    def file(self, raw: object, path: str) -> Path | None:
        """A referenced file: resolved against the config's directory, counted in its version."""
        if not isinstance(raw, str) or not raw:
            self.r.error(path, "must be a file path")
            return None
        # absolute, but symlinks kept: a Kubernetes `..data` swap must be seen as a change of
        # this path, not of whatever it pointed to when loaded
        resolved = Path(os.path.abspath(self.base_dir / raw))
        if not resolved.is_file():
            what = "not a file" if resolved.exists() else "no such file"
            self.r.error(path, f"{what}: {resolved}")
            return None
        self.referenced_files.append(resolved)
        return resolved

    def listener_tls(self, raw: object, path: str) -> ListenerTLSConfig | None:
        r = self.r
        m = r.mapping(
            raw, path, {"certificates", "client_ca", "min_version"}, required=("certificates",)
        )
        if m is None:
            return None
        items = m.get("certificates")
        if not isinstance(items, list) or not items:
            r.error(f"{path}.certificates", "must be a non-empty list of {cert, key}")
            return None
        certificates: list[CertificateConfig] = []
        for i, item in enumerate(items):
            where = f"{path}.certificates[{i}]"
            c = r.mapping(item, where, {"cert", "key"}, required=("cert", "key"))
            if c is None or "cert" not in c or "key" not in c:
                continue
            cert = self.file(c["cert"], f"{where}.cert")
            key = self.file(c["key"], f"{where}.key")
            if cert is None or key is None:
                continue
            try:
                checked = check_certificate(cert, key)
            except CertificateProblem as exc:
                r.error(f"{where}.cert", str(exc))
                continue
            certificates.append(
                CertificateConfig(
                    cert=str(cert),
                    key=str(key),
                    names=checked.names,
                    not_after=checked.not_after.timestamp(),
                )
            )
        client_ca = None
        if m.get("client_ca") is not None:
            ca = self.file(m["client_ca"], f"{path}.client_ca")
            if ca is not None:
                try:
                    check_ca_bundle(ca)
                    client_ca = str(ca)
                except CertificateProblem as exc:
                    r.error(f"{path}.client_ca", str(exc))
        version = str(m.get("min_version", "1.2"))
        if version not in ("1.2", "1.3"):
            r.error(f"{path}.min_version", 'must be "1.2" or "1.3"')
        if len(certificates) != len(items):
            return None
        return ListenerTLSConfig(
            certificates=tuple(certificates),
            client_ca=client_ca,
            min_version="1.3" if version == "1.3" else "1.2",
        )

    def admin(self, raw: object) -> AdminConfig:
        if raw is None:
            return AdminConfig()
        m = self.r.mapping(raw, "admin", {"bind", "token"})
        if m is None:
            return AdminConfig()
        host, port = self.r.get(m, "bind", "admin", _bind, ("127.0.0.1", 9901))
        token = self.r.get(m, "token", "admin", _admin_token, "")
        return AdminConfig(host=host, port=port, token=token or None)

    def status(
        self, raw: object, listeners: tuple[ListenerConfig, ...], admin: AdminConfig
    ) -> StatusConfig | None:
        """`status: {bind}`, on an address of its own: one shared with the admin API or a data
        listener would only fail later, when binding, without saying which key is wrong."""
        r = self.r
        m = r.mapping(raw, "status", {"bind"})
        if m is None:
            return None
        if m.get("bind") is None:
            # no default: the section exists to expose probes, and where is the operator's call
            r.error("status.bind", "is required (host:port; leave `status` out for no listener)")
            return None
        host, port = r.get(m, "bind", "status", _bind, ("", -1))
        if port < 0:
            return None
        taken = [
            ("the admin listener", admin.host, admin.port),
            *((f"listener {x.name!r}", x.host, x.port) for x in listeners),
        ]
        for owner, other_host, other_port in taken:
            if _same_socket(host, port, other_host, other_port):
                r.error("status.bind", f"{owner} already binds this address; give status its own")
                return None
        return StatusConfig(host=host, port=port)

    def limits(self, raw: object) -> LimitsConfig:
        r = self.r
        m = _LIMITS.mapping(r, raw, "limits")
        if m is None:
            return LimitsConfig()
        values = _LIMITS.values(r, m, "limits")
        if "min_data_rate" in m:
            where = "limits.min_data_rate"
            rm = r.mapping(m["min_data_rate"], where, {"bytes_per_second", "grace"})
            if rm is not None:
                d = LimitsConfig()
                values["min_data_rate"] = r.get(
                    rm, "bytes_per_second", where, parse_size, d.min_data_rate
                )
                values["min_data_rate_grace"] = r.get(
                    rm, "grace", where, _positive_duration, d.min_data_rate_grace
                )
        return LimitsConfig(**values)

    def shutdown(self, raw: object) -> ShutdownConfig:
        return _SHUTDOWN.read(self.r, raw, "shutdown") or ShutdownConfig()

    def access_log(self, raw: object) -> AccessLogConfig:
        return _ACCESS_LOG.read(self.r, raw, "access_log") or AccessLogConfig()

    def upstreams(self, raw: object) -> tuple[UpstreamConfig, ...]:
        r = self.r
        if raw is None:
            return ()
        if not isinstance(raw, dict):
            r.error("upstreams", "must be a mapping of name to upstream")
            return ()
        result = []
        for name, item in raw.items():
            path = f"upstreams.{name}"
            if not isinstance(name, str) or not _NAME.match(name):
                r.error(path, "an upstream name must be letters, digits, '_', '-' or '.'")
                continue
            m = r.mapping(
                item,
                path,
                {
                    "endpoints",
                    "balance",
                    "timeouts",
                    "pool",
                    "health_check",
                    "outlier_detection",
                    "tls",
                },
                required=("endpoints",),
            )
            if m is None:
                continue
            endpoints = self.endpoints(m.get("endpoints"), f"{path}.endpoints")
            balance = r.get(m, "balance", path, _str, "round_robin")
            if balance not in ("round_robin", "least_request"):
                r.error(f"{path}.balance", "must be round_robin or least_request")
                balance = "round_robin"
            d = UpstreamConfig(name=name, endpoints=())
            connect, response_header = d.connect_timeout, d.response_header_timeout
            if "timeouts" in m:
                t = r.mapping(m["timeouts"], f"{path}.timeouts", {"connect", "response_header"})
                if t is not None:
                    connect = r.get(t, "connect", f"{path}.timeouts", _positive_duration, connect)
                    response_header = r.get(
                        t,
                        "response_header",
                        f"{path}.timeouts",
                        _positive_duration,
                        response_header,
                    )
            max_conns, idle = d.pool_max_connections, d.pool_idle_timeout
            queue = d.pool_queue_timeout
            if "pool" in m:
                p = r.mapping(
                    m["pool"], f"{path}.pool", {"max_connections", "idle_timeout", "queue_timeout"}
                )
                if p is not None:
                    max_conns = r.get(
                        p, "max_connections", f"{path}.pool", _positive_int, max_conns
                    )
                    idle = r.get(p, "idle_timeout", f"{path}.pool", _positive_duration, idle)
                    queue = r.get(p, "queue_timeout", f"{path}.pool", parse_duration, queue)
            tls = self.upstream_tls(m.get("tls"), f"{path}.tls") if "tls" in m else None
            schemes = {e.scheme for e in endpoints}
            if len(schemes) > 1:
                r.error(f"{path}.endpoints", "must all be http:// or all https://")
            elif tls is not None and schemes == {"http"}:
                r.error(f"{path}.tls", "applies to https:// endpoints; these are http://")
            if endpoints:
                result.append(
                    UpstreamConfig(
                        name=name,
                        endpoints=endpoints,
                        balance="least_request" if balance == "least_request" else "round_robin",
                        connect_timeout=connect,
                        response_header_timeout=response_header,
                        pool_max_connections=max_conns,
                        pool_idle_timeout=idle,
                        pool_queue_timeout=queue,
                        health_check=self.health_check(m.get("health_check"), path),
                        outlier_detection=self.outlier_detection(m.get("outlier_detection"), path),
                        tls=tls,
                    )
                )
        return tuple(result)

    def upstream_tls(self, raw: object, path: str) -> UpstreamTLSConfig | None:
        r = self.r
        m = r.mapping({} if raw is None else raw, path, {"ca", "cert", "key", "server_name"})
        if m is None:
            return None
        errors = len(r.errors)
        ca = self.file(m["ca"], f"{path}.ca") if m.get("ca") is not None else None
        if ca is not None:
            try:
                check_ca_bundle(ca)
            except CertificateProblem as exc:
                r.error(f"{path}.ca", str(exc))
        cert = key = None
        if ("cert" in m) != ("key" in m):
            r.error(f"{path}.{'key' if 'cert' in m else 'cert'}", "cert and key go together")
        elif "cert" in m:
            cert = self.file(m["cert"], f"{path}.cert")
            key = self.file(m["key"], f"{path}.key")
            if cert is not None and key is not None:
                try:
                    check_certificate(cert, key)
                except CertificateProblem as exc:
                    r.error(f"{path}.cert", str(exc))
        name = r.get(m, "server_name", path, _host, None)
        if len(r.errors) > errors:
            return None
        return UpstreamTLSConfig(
            ca=str(ca) if ca else None,
            cert=str(cert) if cert else None,
            key=str(key) if key else None,
            server_name=name,
        )

    def health_check(self, raw: object, upstream: str) -> HealthCheckConfig | None:
        if raw is None:
            return None
        return _HEALTH_CHECK.read(self.r, {} if raw is True else raw, f"{upstream}.health_check")

    def outlier_detection(self, raw: object, upstream: str) -> OutlierDetectionConfig | None:
        if raw is None:
            return None
        path = f"{upstream}.outlier_detection"
        return _OUTLIER_DETECTION.read(self.r, {} if raw is True else raw, path)

    def endpoints(self, raw: object, path: str) -> tuple[EndpointConfig, ...]:
        r = self.r
        if not isinstance(raw, list) or not raw:
            r.error(path, "must be a non-empty list of endpoints")
            return ()
        result = []
        for i, item in enumerate(raw):
            where = f"{path}[{i}]"
            m = r.mapping(item, where, {"url", "weight"}, required=("url",))
            if m is None or "url" not in m:
                continue
            url = r.get(m, "url", where, _str, "")
            weight = r.get(m, "weight", where, _positive_int, 1)
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                r.error(f"{where}.url", f"must be http(s)://host[:port], not {url!r}")
                continue
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                r.error(f"{where}.url", "must not have a path, query or fragment")
                continue
            https = parts.scheme == "https"
            try:
                port = parts.port or (443 if https else 80)
            except ValueError:
                r.error(f"{where}.url", "has an invalid port")
                continue
            result.append(
                EndpointConfig(
                    url=url,
                    scheme="https" if https else "http",
                    host=parts.hostname,
                    port=port,
                    weight=weight,
                )
            )
        return tuple(result)

    def routes(
        self,
        raw: object,
        upstreams: set[str],
        middlewares: dict[str, StageSpec],
        http: HttpRulesConfig,
        tracing: TracingConfig | None,
    ) -> tuple[RouteConfig, ...]:
        r = self.r
        if raw is None:
            return ()
        if not isinstance(raw, list):
            r.error("routes", "must be a list")
            return ()
        result = []
        names: set[str] = set()
        known = upstreams | {INTERNAL_ECHO}
        for i, item in enumerate(raw):
            path = f"routes[{i}]"
            keys = {
                "name",
                "match",
                "upstream",
                "strip_prefix",
                "timeout",
                "max_body_bytes",
                "request_buffering",
                "websocket",
                "http",
                "pipeline",
                "tracing",
            }
            # `upstream` is required unless the pipeline answers every request (checked below)
            m = r.mapping(item, path, keys, required=("name",))
            if m is None:
                continue
            name = r.get(m, "name", path, _str, "")
            if name in names:
                r.error(f"{path}.name", f"route {name!r} is defined twice")
            names.add(name)
            match = self.match(m.get("match"), f"{path}.match")
            strip = r.get(m, "strip_prefix", path, _prefix, None)
            timeout = r.get(m, "timeout", path, _positive_duration, 30.0)
            max_body = r.get(m, "max_body_bytes", path, parse_size, None)
            buffering = r.get(m, "request_buffering", path, _buffering_size, None)
            websocket = r.get(m, "websocket", path, _bool, False)
            rules = self.http_rules(m.get("http"), f"{path}.http", http)
            pipeline = self.pipeline(
                m.get("pipeline"), f"{path}.pipeline", name, middlewares, strip
            )
            answered = self.answers(m.get("pipeline"))
            targets: tuple[WeightedUpstream, ...] = ()
            if answered is not None:
                if "upstream" in m:
                    r.error(
                        f"{path}.upstream",
                        f"is never used: the pipeline's {answered} stage answers every request"
                        " (remove upstream)",
                    )
            elif "upstream" not in m:
                r.error(f"{path}.upstream", "is required (unless the pipeline has a redirect)")
            else:
                targets = self.targets(m.get("upstream"), f"{path}.upstream", known)
            trace_ratio = read_route_tracing(r, m.get("tracing"), f"{path}.tracing", tracing)
            if name and (targets or answered is not None):
                result.append(
                    RouteConfig(
                        name=name,
                        index=i,
                        match=match,
                        upstreams=targets,
                        strip_prefix=strip,
                        timeout=timeout,
                        max_body_bytes=max_body,
                        request_buffering=buffering,
                        websocket=websocket,
                        http=rules,
                        pipeline=pipeline,
                        trace_sample_ratio=trace_ratio,
                    )
                )
        return tuple(result)

    def middlewares(self, raw: object) -> dict[str, StageSpec]:
        r = self.r
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            r.error("middlewares", "must be a mapping of name to stage")
            return {}
        result: dict[str, StageSpec] = {}
        for name, item in raw.items():
            self.declared_middlewares.add(str(name))
            if isinstance(item, dict) and len(item) == 1:
                # its kind, even when its config has errors (see `answers`)
                self.middleware_kinds[str(name)] = next(iter(item))
            path = f"middlewares.{name}"
            if not isinstance(name, str) or not _NAME.match(name):
                r.error(path, "name must be letters, digits, '_', '.' or '-'")
                continue
            spec = parse_entry(r, self.kinds, item, path, f"middleware:{name}", None)
            if spec is not None:
                result[name] = spec
        return result

    def answers(self, raw: object) -> str | None:
        """The kind of the first entry of a raw pipeline that answers every request itself (a
        redirect), even one with errors of its own: its route then takes no upstream."""
        if not isinstance(raw, list):
            return None
        for item in raw:
            kind: object = None
            if isinstance(item, str):
                kind = self.middleware_kinds.get(item)
            elif isinstance(item, dict) and len(item) == 1:
                kind = next(iter(item))
            else:
                continue
            found = self.kinds.get(kind) if isinstance(kind, str) else None
            if found is not None and found.answers:
                return str(kind)
        return None

    def pipeline(
        self,
        raw: object,
        path: str,
        route: str,
        middlewares: dict[str, StageSpec],
        strip_prefix: str | None = None,
    ) -> tuple[StageSpec, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.r.error(path, "must be a list of stages")
            return ()
        # every declared middleware name resolves, even one whose own config had an error
        result: list[tuple[str, StageSpec]] = []
        for i, item in enumerate(raw):
            if isinstance(item, str) and item in self.declared_middlewares - middlewares.keys():
                continue  # a middleware whose own error is already reported
            where = f"{path}[{i}]"
            spec = parse_entry(self.r, self.kinds, item, where, f"route:{route}:{i}", middlewares)
            if spec is not None:
                result.append((where, spec))
        verifies_clients = bool(self.client_ca_listeners)
        return tuple(
            check_pipeline(
                self.r, self.kinds, path, result, verifies_clients, self.resolved, strip_prefix
            )
        )

    def match(self, raw: object, path: str) -> MatchConfig:
        r = self.r
        if raw is None:
            return MatchConfig()
        m = _MATCH.mapping(r, raw, path)
        if m is None:
            return MatchConfig()
        given = [k for k in ("path", "path_prefix", "path_regex") if k in m]
        if len(given) > 1:
            r.error(
                path,
                "only one of path, path_prefix and path_regex may be given, "
                f"not {', '.join(given)}",
            )
        return MatchConfig(**_MATCH.values(r, m, path))

    def http_rules(self, raw: object, path: str, base: HttpRulesConfig) -> HttpRulesConfig:
        """The `http:` rules at `path`; keys not given keep `base`'s values."""
        if raw is None:
            return base
        given = {f.name: getattr(base, f.name) for f in fields(base)}
        return _HTTP_RULES.read(self.r, raw, path, **given) or base

    def targets(self, raw: object, path: str, known: set[str]) -> tuple[WeightedUpstream, ...]:
        r = self.r

        def check(name: object, where: str) -> str | None:
            if not isinstance(name, str):
                r.error(where, "must be an upstream name")
                return None
            if name not in known:
                hint = difflib.get_close_matches(name, sorted(known), n=1)
                r.error(
                    where,
                    f"unknown upstream {name!r}"
                    + (f" (did you mean '{hint[0]}'?)" if hint else ""),
                )
                return None
            return name

        if isinstance(raw, str):
            name = check(raw, path)
            return (WeightedUpstream(name=name, weight=1),) if name else ()
        if not isinstance(raw, list) or not raw:
            r.error(path, "must be an upstream name or a list of {name, weight}")
            return ()
        result = []
        for i, item in enumerate(raw):
            where = f"{path}[{i}]"
            m = r.mapping(item, where, {"name", "weight"}, required=("name",))
            if m is None or "name" not in m:
                continue
            name = check(m["name"], f"{where}.name")
            weight = r.get(m, "weight", where, _int, 1)
            if weight < 0:
                r.error(f"{where}.weight", "must be >= 0")
            if name and name == INTERNAL_ECHO and len(raw) > 1:
                r.error(f"{where}.name", "internal:echo cannot be part of a weighted split")
            if name:
                result.append(WeightedUpstream(name=name, weight=max(weight, 0)))
        if result and not any(t.weight > 0 for t in result):
            r.error(path, "at least one weight must be > 0")
        return tuple(result)


def parse_config(
    text: str,
    kinds: Mapping[str, ConfigKind],
    *,
    source: str = "",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Parse and validate a config whose stages are of `kinds` (gateway.stages.registry.KINDS);
    raises ConfigErrors listing every problem."""
    try:
        raw, duplicates = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigErrors([ConfigError("", f"invalid YAML{where}: {problem}")]) from None
    if raw is None:
        raw = {}
    # an unset variable stops nothing: the rest of the file is validated, and its own errors
    # reported with it (the Reader leaves out those that follow from the missing value)
    unset: list[ConfigError] = []
    raw = _interpolate_tree(raw, os.environ if env is None else env, "", unset)
    normalized = json.dumps(_string_keys(raw), sort_keys=True, default=str)
    loader = _Loader(kinds, base_dir or Path.cwd(), unset=[e.path for e in unset])
    first = [*duplicates, *unset]
    try:
        config = loader.load(raw, source, normalized)
    except ConfigErrors as exc:
        # a duplicate key is reported with the rest: the value kept is validated like any other
        raise ConfigErrors([*first, *exc.errors]) from None
    if first:
        raise ConfigErrors(first)
    return config


def load_config(
    path: str | os.PathLike[str],
    kinds: Mapping[str, ConfigKind],
    env: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Read and validate the config file at `path` (stages of `kinds`, as `parse_config`)."""
    file = Path(os.path.abspath(path))
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigErrors([ConfigError("", f"cannot read {file}: {exc.strerror}")]) from None
    return parse_config(text, kinds, source=str(file), base_dir=file.parent, env=env)
