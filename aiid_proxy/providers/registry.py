"""The provider registry: an immutable set of :class:`Provider`, indexed by host. The built-in
providers are data (``aiid_proxy/data/providers.yaml``); a file given to :meth:`Registry.load`
replaces or adds providers by name without code changes. The matching rules are in
:mod:`aiid_proxy.providers.model`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from aiid_proxy.errors import ConfigError
from aiid_proxy.home import NAME_RE
from aiid_proxy.providers.model import (
    CREDENTIAL_HEADERS,
    USAGE_FORMATS,
    Provider,
    Route,
    RouteMatch,
    normalize_host,
)

_HEADER_RE = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_REGION_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,31}")
_TLD_RE = re.compile(r"[a-z][a-z0-9-]*")


def _validate_host(spec: object, where: str) -> str:
    if not isinstance(spec, str):
        raise ConfigError(f"{where}: host must be a string, got {spec!r}")
    if spec != spec.lower():
        raise ConfigError(f"{where}: host {spec!r} must be lowercase")
    body = spec[2:] if spec.startswith("*.") else spec
    norm = normalize_host(body)
    if norm is None or norm != body or _TLD_RE.fullmatch(body.rsplit(".", 1)[-1]) is None:
        raise ConfigError(f"{where}: {spec!r} is not a DNS host name or '*.suffix' glob")
    if spec.startswith("*.") and body.count(".") < 1:
        raise ConfigError(f"{where}: glob {spec!r} is too broad (needs at least two labels)")
    return spec


# -- the registry -----------------------------------------------------------------------------
class Registry:
    """An immutable set of providers, indexed by host."""

    def __init__(self, providers: Iterable[Provider]) -> None:
        self._by_name: dict[str, Provider] = {}
        self._exact: dict[str, Provider] = {}
        self._globs: dict[str, Provider] = {}  # ".suffix" -> provider
        for p in providers:
            if p.name in self._by_name:
                raise ConfigError(f"provider {p.name!r} defined twice")
            self._by_name[p.name] = p
            for h in p.hosts:
                table, key = (self._globs, h[1:]) if h.startswith("*.") else (self._exact, h)
                other = table.get(key)
                if other is not None:
                    raise ConfigError(
                        f"host {h!r} claimed by both provider {other.name!r} and {p.name!r}"
                    )
                table[key] = p

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_data(cls, data: Mapping[str, Any], source: str = "providers") -> Registry:
        """Build from the parsed YAML shape (``{version: 1, providers: {name: {...}}}``)."""
        providers = _providers_section(data, source)
        out: list[Provider] = []
        for name, spec in providers.items():
            if spec is None:
                continue  # removed by an override file
            out.append(_provider_from_data(name, spec, source))
        try:
            return cls(out)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def builtin(cls) -> Registry:
        """The built-in registry from ``aiid_proxy/data/providers.yaml``."""
        return _builtin()

    @classmethod
    def load(cls, path: Path | None) -> Registry:
        """The built-in registry, with the providers in ``path`` (if any) replacing built-ins
        of the same name or adding new ones; a provider mapped to ``null`` is removed."""
        if path is None:
            return cls.builtin()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"providers file {path} unreadable: {e}") from None
        extra = _load_yaml(text, str(path))
        extra_providers = _providers_section(extra, str(path))
        merged = dict(_providers_section(_builtin_data(), "builtin providers.yaml"))
        merged.update(extra_providers)
        return cls.from_data({"version": 1, "providers": merged}, source=str(path))

    # -- queries --------------------------------------------------------------------------
    @property
    def providers(self) -> tuple[Provider, ...]:
        return tuple(self._by_name.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def get(self, name: str) -> Provider:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(f"unknown provider {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def match_host(self, host: str) -> Provider | None:
        h = normalize_host(host)
        if h is None:
            return None
        exact = self._exact.get(h)
        if exact is not None:
            return exact
        dot = h.find(".")
        if dot <= 0:
            return None
        # "*.suffix" covers exactly one label: look up everything after the first label.
        return self._globs.get(h[dot:])

    def match(self, host: str, method: str, path: str) -> RouteMatch | None:
        """None for a host that is no provider; else the provider and its route (or None)."""
        provider = self.match_host(host)
        if provider is None:
            return None
        for sep in ("?", "#"):
            path = path.split(sep, 1)[0]
        found = provider.match_route(method, path)
        if found is None:
            return RouteMatch(provider, None)
        return RouteMatch(provider, found[0], found[1])


# -- data parsing -----------------------------------------------------------------------------
_PROVIDER_KEYS = frozenset(
    {
        "hosts",
        "region",
        "auth",
        "extra_headers",
        "usage_format",
        "routes",
        "openai_compatible",
        "base_path",
    }
)
OPENAI_COMPATIBLE_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("chat", "POST", "/chat/completions"),
    ("responses", "POST", "/responses"),
    ("completions", "POST", "/completions"),
    ("embeddings", "POST", "/embeddings"),
    ("models", "GET", "/models"),
    ("models", "GET", "/models/{model}"),
)
"""The routes of an ``openai_compatible: true`` provider, under its ``base_path``."""


def _openai_compatible(spec: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """``spec`` with the defaults of an OpenAI-compatible endpoint filled in: Bearer key in
    ``authorization``, the OpenAI dialect, the OpenAI routes under ``base_path`` (``/v1``)."""
    flag = spec.get("openai_compatible")
    if flag is None or flag is False:
        if "base_path" in spec:
            raise ConfigError(f"{where}: base_path needs openai_compatible: true")
        return spec
    if flag is not True:
        raise ConfigError(f"{where}: openai_compatible must be true or false")
    base = spec.get("base_path", "/v1")
    bad_end = isinstance(base, str) and base.endswith("/") and base != "/"
    if not isinstance(base, str) or not base.startswith("/") or bad_end:
        raise ConfigError(f"{where}: base_path must start with '/' and not end with one: {base!r}")
    base = "" if base == "/" else base
    routes = []
    for kind, method, path in OPENAI_COMPATIBLE_ROUTES:
        route: dict[str, Any] = {"kind": kind, "methods": [method], "path": base + path}
        if method == "GET":
            route["json"] = False
            route["model_from"] = "path:model" if "{model}" in path else "none"
        routes.append(route)
    out = dict(spec)
    out.setdefault("auth", {"header": "authorization", "scheme": "Bearer"})
    out.setdefault("usage_format", "openai")
    out.setdefault("routes", routes)
    return out


_ROUTE_KEYS = frozenset({"kind", "methods", "path", "json", "model_from", "format"})


class _NoDuplicatesLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (YAML would keep the last)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"line {line}: duplicate key {key!r}")
        seen.add(key)
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node, deep=True))


_NoDuplicatesLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _load_yaml(text: str, source: str) -> Mapping[str, Any]:
    try:
        data = yaml.load(text, Loader=_NoDuplicatesLoader)  # noqa: S506 - a SafeLoader
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: must be a mapping with 'version' and 'providers'")
    return data


def _providers_section(data: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: must be a mapping with 'version' and 'providers'")
    for key in data:
        if not isinstance(key, str) or (
            key not in ("version", "providers") and not key.startswith("x-")
        ):
            raise ConfigError(f"{source}: unknown key {key!r} (expected version, providers)")
    if "version" in data and (type(data["version"]) is not int or data["version"] != 1):
        raise ConfigError(f"{source}: version must be 1, got {data['version']!r}")
    providers = data.get("providers")
    if not isinstance(providers, Mapping):
        raise ConfigError(f"{source}: 'providers' must be a mapping of name to provider")
    for name in providers:
        if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
            raise ConfigError(
                f"{source}: invalid provider name {name!r}: must match ^[a-z0-9][a-z0-9_-]{{0,62}}$"
            )
    return providers


def _provider_from_data(name: str, spec: object, source: str) -> Provider:
    where = f"{source}: provider {name!r}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: must be a mapping (or null to remove it)")
    unknown = sorted(str(k) for k in spec if k not in _PROVIDER_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    spec = _openai_compatible(spec, where)
    for key in ("hosts", "auth", "usage_format", "routes"):
        if key not in spec:
            raise ConfigError(f"{where}: missing {key!r}")

    hosts_v = spec["hosts"]
    if not isinstance(hosts_v, list) or not hosts_v:
        raise ConfigError(f"{where}: hosts must be a non-empty list")
    hosts = tuple(_validate_host(h, where) for h in hosts_v)
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"{where}: duplicate host")

    region = spec.get("region")
    if region is not None and (not isinstance(region, str) or _REGION_RE.fullmatch(region) is None):
        raise ConfigError(f"{where}: region must be a lowercase name or null, got {region!r}")

    auth = spec["auth"]
    if not isinstance(auth, Mapping) or set(auth) - {"header", "scheme"} or "header" not in auth:
        raise ConfigError(f"{where}: auth must be {{header: <name>, scheme: <Bearer|null>}}")
    header = auth["header"]
    if not isinstance(header, str) or _HEADER_RE.fullmatch(header) is None:
        raise ConfigError(f"{where}: auth header must be a lowercase header name, got {header!r}")
    if header in ("host", "content-length", "transfer-encoding", "cookie", "connection"):
        raise ConfigError(f"{where}: auth header {header!r} is not allowed")
    scheme = auth.get("scheme")
    if scheme is not None and (not isinstance(scheme, str) or _SCHEME_RE.fullmatch(scheme) is None):
        raise ConfigError(f"{where}: auth scheme must be a word such as Bearer, or null")

    extra_v = spec.get("extra_headers") or {}
    if not isinstance(extra_v, Mapping):
        raise ConfigError(f"{where}: extra_headers must be a mapping of header to value")
    extra: list[tuple[str, str]] = []
    for k, v in extra_v.items():
        if not isinstance(k, str) or _HEADER_RE.fullmatch(k) is None:
            raise ConfigError(f"{where}: extra header name must be lowercase, got {k!r}")
        if k in CREDENTIAL_HEADERS or k == header:
            raise ConfigError(f"{where}: extra header {k!r} would carry a credential")
        if not isinstance(v, str) or not v.isprintable() or not v.isascii():
            raise ConfigError(f"{where}: extra header {k!r} value must be printable ASCII")
        extra.append((k, v))

    fmt = spec["usage_format"]
    if fmt not in USAGE_FORMATS:
        raise ConfigError(f"{where}: usage_format must be one of {', '.join(USAGE_FORMATS)}")

    routes_v = spec["routes"]
    if not isinstance(routes_v, list):
        raise ConfigError(f"{where}: routes must be a list")
    routes: list[Route] = []
    for i, r in enumerate(routes_v, 1):
        try:
            routes.append(_route_from_data(r, fmt))
        except ConfigError as e:
            raise ConfigError(f"{where}: route {i}: {e}") from None

    return Provider(
        name=name,
        hosts=hosts,
        region=region,
        auth_header=header,
        auth_scheme=scheme,
        extra_headers=tuple(extra),
        routes=tuple(routes),
        usage_format=fmt,
    )


def _route_from_data(spec: object, default_format: str) -> Route:
    if not isinstance(spec, Mapping):
        raise ConfigError("must be a mapping with kind and path")
    unknown = sorted(str(k) for k in spec if k not in _ROUTE_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}")
    if "kind" not in spec or "path" not in spec:
        raise ConfigError("needs 'kind' and 'path'")
    methods = spec.get("methods", ["POST"])
    if not isinstance(methods, list):
        raise ConfigError("methods must be a list")
    json_v = spec.get("json")
    if json_v is not None and not isinstance(json_v, bool):
        raise ConfigError("json must be true or false")
    model_from = spec.get("model_from")
    if model_from is not None and not isinstance(model_from, str):
        raise ConfigError("model_from must be a string")
    wire_format = spec.get("format", default_format)
    return Route.build(spec["kind"], spec["path"], methods, json_v, model_from, wire_format)


@functools.cache
def _builtin_data() -> Mapping[str, Any]:
    text = resources.files("aiid_proxy").joinpath("data/providers.yaml").read_text("utf-8")
    return _load_yaml(text, "builtin providers.yaml")


@functools.cache
def _builtin() -> Registry:
    return Registry.from_data(_builtin_data(), source="builtin providers.yaml")
