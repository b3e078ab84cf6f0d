"""Pipeline entries in the config: `middlewares:` and each route's `pipeline:` (SPEC §2, §5).

An entry is either the name of a middleware or a mapping with exactly one key, the stage kind,
whose value is that stage's config.  Which kinds exist, how each one's config is parsed and which
rules it has about the stages around it all come from the `ConfigKind`s the loader is given
(`gateway/stages/registry.py`): nothing here knows a particular kind.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from gateway.config.model import StageSpec
from gateway.config.reader import Reader


class ConfigKind(Protocol):
    """What the loader needs of a stage kind: its parser and its rules about other stages."""

    @property
    def parse(self) -> Callable[[Reader, object, str], object | None]:
        """The kind's config from its raw YAML value at a path; None after reporting errors."""
        ...

    @property
    def check(self) -> Callable[[PipelineCheck, Any], object] | None:
        """Rules between this entry and the rest of its route's pipeline; returns the entry's
        config with what depends on earlier stages resolved (or unchanged)."""
        ...

    @property
    def upstream_headers(self) -> Callable[[Any], Iterable[str]] | None:
        """Request headers the stage sets for the upstream (a client's copies are dropped)."""
        ...

    @property
    def answers(self) -> bool:
        """The stage answers every request itself (a redirect): a route whose pipeline has one
        takes no `upstream`."""
        ...


@dataclass(slots=True, kw_only=True)
class PipelineCheck:
    """One entry of a route's pipeline as a kind's `check` sees it, with its neighbours."""

    r: Reader
    #: the entry's YAML path, and the route's `pipeline`
    path: str
    pipeline_path: str
    spec: StageSpec
    #: the entries before it, and after it with their paths
    before: tuple[StageSpec, ...]
    after: tuple[tuple[str, StageSpec], ...]
    #: lower-case header name -> the kind of the stage in this pipeline that sets it upstream
    upstream_headers: Mapping[str, str]
    #: whether any listener asks clients for certificates (tls.client_ca)
    verifies_clients: bool
    #: (owner, what) -> (value, path) of the first route that resolved it, across routes
    resolved: dict[tuple[str, str], tuple[str, str]]
    #: the route's `strip_prefix` (a path rewrite cannot be combined with it)
    strip_prefix: str | None = None

    def error(self, message: str, path: str | None = None) -> None:
        self.r.error(self.path if path is None else path, message)

    @property
    def kinds_before(self) -> frozenset[str]:
        return frozenset(spec.kind for spec in self.before)

    def resolve_once(self, what: str, value: str) -> tuple[str, str] | None:
        """A named middleware is one instance for every route naming it, so what a route
        resolves for it must be the same everywhere: None when `value` agrees with the first
        route's (or the entry is the route's own), else (that value, where it was resolved)."""
        if not self.spec.owner.startswith("middleware:"):
            return None
        first = self.resolved.setdefault((self.spec.owner, what), (value, self.path))
        return None if first[0] == value else first


def parse_entry(
    r: Reader,
    kinds: Mapping[str, ConfigKind],
    raw: object,
    path: str,
    owner: str,
    middlewares: dict[str, StageSpec] | None,
) -> StageSpec | None:
    """One pipeline entry; `middlewares` is None while the middlewares themselves are read."""
    if isinstance(raw, str) and middlewares is not None:
        spec = middlewares.get(raw)
        if spec is None:
            hint = difflib.get_close_matches(raw, sorted(middlewares), n=1)
            r.error(
                path,
                f"unknown middleware {raw!r}" + (f" (did you mean '{hint[0]}'?)" if hint else ""),
            )
        return spec
    if not isinstance(raw, dict) or len(raw) != 1:
        what = "a middleware name or " if middlewares is not None else ""
        r.error(path, f"must be {what}a mapping with one stage kind, e.g. {{headers: {{...}}}}")
        return None
    [(name, value)] = raw.items()
    where = f"{path}.{name}"
    kind = kinds.get(name) if isinstance(name, str) else None
    if kind is None:
        known = sorted(kinds)
        hint = difflib.get_close_matches(str(name), known, n=1)
        r.error(
            where,
            "unknown stage kind"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; stages: {', '.join(known)}",
        )
        return None
    config = kind.parse(r, value, where)
    if config is None:
        return None
    store = getattr(config, "store", None)
    if isinstance(store, str) and store not in r.stores:
        r.error(f"{where}.store", f"unknown store {store!r}; stores: {', '.join(sorted(r.stores))}")
        return None
    return StageSpec(kind=name, config=config, owner=owner)


def check_pipeline(
    r: Reader,
    kinds: Mapping[str, ConfigKind],
    pipeline_path: str,
    specs: list[tuple[str, StageSpec]],
    verifies_clients: bool,
    resolved: dict[tuple[str, str], tuple[str, str]],
    strip_prefix: str | None = None,
) -> list[StageSpec]:
    """Each entry's rules about the rest of one route's pipeline (each entry given with its YAML
    path); the pipeline with what depends on earlier stages resolved.

    `resolved` remembers, across routes, what each named middleware resolved to and where;
    `strip_prefix` is the route's.
    """
    forwarded: dict[str, str] = {}
    for _, spec in specs:
        headers = kinds[spec.kind].upstream_headers
        if headers is not None:
            forwarded.update(dict.fromkeys((h.lower() for h in headers(spec.config)), spec.kind))
    result: list[StageSpec] = []
    for i, (path, spec) in enumerate(specs):
        check = kinds[spec.kind].check
        if check is not None:
            config = check(
                PipelineCheck(
                    r=r,
                    path=path,
                    pipeline_path=pipeline_path,
                    spec=spec,
                    before=tuple(result),
                    after=tuple(specs[i + 1 :]),
                    upstream_headers=forwarded,
                    verifies_clients=verifies_clients,
                    resolved=resolved,
                    strip_prefix=strip_prefix,
                ),
                spec.config,
            )
            if config is not spec.config:
                spec = replace(spec, config=config)
        result.append(spec)
    return result
