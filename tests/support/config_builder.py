"""The tests' one way to write a gateway config: Python values in, the YAML the gateway reads out.

`gateway_yaml` fills the preamble every test gateway shares — a loopback listener `http` on
port 0, the admin API on 127.0.0.1:0, the access log off — and writes the rest as given.  A
section passed as None gets that default; one passed as `{}` is written empty, which leaves it
to the loader's own defaults.  Values stay as the YAML spells them: durations and sizes are
strings ("5s", "1MiB").  tests/unit/test_config_builder.py parses what it writes with the real
loader.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from gateway.config.load import TOP_LEVEL_SECTIONS as _ORDER

LOOPBACK = "127.0.0.1"


def listener(port: int = 0, name: str = "http", **options: Any) -> dict[str, Any]:
    """A listener on 127.0.0.1:`port`; `options` such as `tls`."""
    return {"name": name, "bind": f"{LOOPBACK}:{port}", **options}


def upstream_to(*endpoints: str | Mapping[str, Any], **options: Any) -> dict[str, Any]:
    """An upstream over `endpoints` (URLs, or endpoint mappings such as {url, weight});
    `options` such as `timeouts`, `pool`, `tls`, `health_check`."""
    listed = [{"url": e} if isinstance(e, str) else dict(e) for e in endpoints]
    return {"endpoints": listed, **options}


def route(
    name: str,
    upstream: str | Sequence[Mapping[str, Any]],
    path_prefix: str = "/",
    *,
    methods: Sequence[str] | None = None,
    match: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A route matching `path_prefix` (and `methods`), or `match` as given; `options` such as
    `pipeline`, `timeout`, `websocket`."""
    if match is None:
        match = {"path_prefix": path_prefix}
        if methods is not None:
            match["methods"] = list(methods)
    return {"name": name, "match": dict(match), "upstream": upstream, **options}


def gateway_yaml(
    *,
    upstreams: Mapping[str, Any] | None = None,
    routes: Sequence[Mapping[str, Any]] = (),
    listeners: Sequence[Mapping[str, Any]] | None = None,
    admin: Mapping[str, Any] | None = None,
    access_log: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | None = None,
    middlewares: Mapping[str, Any] | None = None,
    **sections: Any,
) -> str:
    """The config text: the preamble's defaults for listeners, admin and access_log unless
    given, then `limits`, `middlewares` and any other top-level `sections` (trusted_proxies,
    shutdown, http …) when given."""
    given: dict[str, Any] = {
        "listeners": [listener()] if listeners is None else list(listeners),
        "admin": {"bind": f"{LOOPBACK}:0"} if admin is None else admin,
        "access_log": {"enabled": False} if access_log is None else access_log,
        "limits": limits,
        "upstreams": upstreams,
        "middlewares": middlewares,
        "routes": list(routes) or None,
        **sections,
    }
    ordered = sorted(given, key=lambda k: _ORDER.index(k) if k in _ORDER else len(_ORDER))
    config = {key: _plain(given[key]) for key in ordered if given[key] is not None}
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=100)


def _plain(value: Any) -> Any:
    """`value` with every mapping a new dict, every sequence (not a string) a new list and every
    path a string: what yaml.safe_dump writes plainly (an object met twice would be written once,
    with a YAML anchor and alias)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(item) for item in value]
    return value
