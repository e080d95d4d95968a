"""Providers as data: which hosts are LLM providers, where their key goes, which paths they
serve (:class:`Provider`, :class:`Route`), and how hosts and paths are matched.
:mod:`aiid_proxy.providers.registry` builds them from ``aiid_proxy/data/providers.yaml``.

Matching is deliberately strict, so that a host or a path the gateway does not understand is
never mistaken for one it does:

* hosts are compared as ASCII, lowercased, with one trailing dot removed; a host that is not a
  valid DNS name (IP literals, ports, non-ASCII, empty labels) never matches;
* ``*.suffix`` globs match exactly one DNS label, so ``a.b.openai.azure.com`` does not match
  ``*.openai.azure.com`` and ``api.openai.com.evil.com`` matches nothing;
* paths are matched whole, byte for byte: no percent-decoding, no ``.``/``//`` collapsing.
  Anything else on a known host is a :class:`RouteMatch` with ``route=None``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from aiid_proxy.errors import ConfigError

CREDENTIAL_HEADERS: tuple[str, ...] = (
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "proxy-authorization",
)
"""Every request header an agent may put a credential in; all are stripped before upstream."""

CREDENTIAL_QUERY_PARAMS: tuple[str, ...] = (
    "key",
    "api_key",
    "api-key",
    "apikey",
    "x-api-key",
    "x-goog-api-key",
    "access_token",
    "auth_token",
)
"""Query parameters that carry a key somewhere (Gemini's ``?key=``, Google's ``access_token``,
many APIs' ``api_key``); compared lowercased, never an identity, always stripped."""

ACCOUNT_HEADERS: tuple[str, ...] = ("openai-organization", "openai-project", "x-goog-user-project")
"""Request headers that pick which of the key's accounts is used and billed (OpenAI's
organization and project, Google's quota project): the tenant's key decides, never the agent,
so they are stripped like credentials."""

USAGE_FORMATS: tuple[str, ...] = ("openai", "anthropic", "gemini")
MODEL_FROM_BODY = "body"
MODEL_FROM_NONE = "none"
MODEL_FROM_PATH_PREFIX = "path:"

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_METHOD_RE = re.compile(r"[A-Z]{1,16}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
_PARAM_RE = re.compile(r"[a-z_][a-z0-9_]{0,31}")
_PATH_CHARS_RE = re.compile(r"[A-Za-z0-9._~!$&'()+,;=:@/%-]*")
_TEMPLATE_TOKEN_RE = re.compile(r"\{([^{}]*)\}|\*")


# -- data classes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    """One API endpoint of a provider.

    ``path`` is the template as written in the data (``/v1/chat/completions``,
    ``/openai/deployments/{deployment}/chat/completions``); ``pattern`` is its compiled form,
    matched against the whole request path. ``wire_format`` is the body dialect (one of
    :data:`USAGE_FORMATS`; the provider's ``usage_format`` unless the route says otherwise).
    """

    kind: str
    methods: tuple[str, ...]
    path: str
    json: bool
    model_from: str
    wire_format: str
    pattern: re.Pattern[str] = field(compare=False, repr=False)

    @classmethod
    def build(
        cls,
        kind: str,
        path: str,
        methods: Iterable[str] = ("POST",),
        json: bool | None = None,
        model_from: str | None = None,
        wire_format: str = "openai",
    ) -> Route:
        """Validate and compile one route; raises ConfigError on any bad field."""
        where = f"route {path!r}"
        if not isinstance(kind, str) or _KIND_RE.fullmatch(kind) is None:
            raise ConfigError(f"{where}: kind must match ^[a-z][a-z0-9_]*$, got {kind!r}")
        meths = tuple(methods)
        if not meths:
            raise ConfigError(f"{where}: methods must not be empty")
        for m in meths:
            if not isinstance(m, str) or _METHOD_RE.fullmatch(m) is None:
                raise ConfigError(f"{where}: method must be an upper-case HTTP method, got {m!r}")
        if len(set(meths)) != len(meths):
            raise ConfigError(f"{where}: duplicate method")
        if wire_format not in USAGE_FORMATS:
            raise ConfigError(f"{where}: format must be one of {', '.join(USAGE_FORMATS)}")
        pattern, params = compile_path_template(path)
        if json is None:
            json = all(m in _BODY_METHODS for m in meths)
        if model_from is None:
            model_from = MODEL_FROM_BODY if json else MODEL_FROM_NONE
        if model_from == MODEL_FROM_BODY:
            if not json:
                raise ConfigError(f"{where}: model_from 'body' needs a JSON route (json: true)")
        elif model_from.startswith(MODEL_FROM_PATH_PREFIX):
            name = model_from[len(MODEL_FROM_PATH_PREFIX) :]
            if name not in params:
                raise ConfigError(f"{where}: model_from {model_from!r} names no {{{name}}} in path")
        elif model_from != MODEL_FROM_NONE:
            raise ConfigError(
                f"{where}: model_from must be 'body', 'none' or 'path:<param>', got {model_from!r}"
            )
        return cls(
            kind=kind,
            methods=meths,
            path=path,
            json=json,
            model_from=model_from,
            wire_format=wire_format,
            pattern=pattern,
        )

    def match_path(self, path: str) -> dict[str, str] | None:
        """The path parameters if ``path`` (no query string) is this route's path, else None."""
        m = self.pattern.fullmatch(path)
        return None if m is None else m.groupdict()

    @property
    def model_param(self) -> str | None:
        """The path parameter that names the model, if the model comes from the path."""
        if self.model_from.startswith(MODEL_FROM_PATH_PREFIX):
            return self.model_from[len(MODEL_FROM_PATH_PREFIX) :]
        return None


@dataclass(frozen=True)
class Provider:
    name: str
    hosts: tuple[str, ...]
    region: str | None
    auth_header: str
    auth_scheme: str | None
    extra_headers: tuple[tuple[str, str], ...]
    routes: tuple[Route, ...]
    usage_format: str

    def auth_value(self, secret: str) -> str:
        """The value of :attr:`auth_header` that carries ``secret``."""
        return f"{self.auth_scheme} {secret}" if self.auth_scheme else secret

    @property
    def strip_headers(self) -> tuple[str, ...]:
        """Headers to remove from an agent's request: every credential header, and this
        provider's own key header when it is not one of them."""
        if self.auth_header in CREDENTIAL_HEADERS:
            return CREDENTIAL_HEADERS
        return (*CREDENTIAL_HEADERS, self.auth_header)

    def match_route(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        """The first route serving ``method`` at ``path``, with its path parameters."""
        for route in self.routes:
            if method not in route.methods:
                continue
            params = route.match_path(path)
            if params is not None:
                return route, params
        return None


@dataclass(frozen=True)
class RouteMatch:
    """A request on a provider host. ``route`` is None when the path (or method) is unknown."""

    provider: Provider
    route: Route | None
    params: Mapping[str, str] = field(default_factory=dict, hash=False)


# -- path templates and hosts -----------------------------------------------------------------
def compile_path_template(template: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """Compile ``/a/{name}/b*`` into an anchored pattern and its parameter names.

    ``{name}`` matches one path segment (``[^/]+``), also inside a segment such as
    ``{model}:generateContent``; ``*`` matches within one segment (``[^/]*``).
    """
    if not isinstance(template, str) or not template.startswith("/"):
        raise ConfigError(f"path {template!r} must be a string starting with '/'")
    out: list[str] = []
    params: list[str] = []
    pos = 0
    for tok in _TEMPLATE_TOKEN_RE.finditer(template):
        out.append(_literal(template, template[pos : tok.start()]))
        name = tok.group(1)
        if name is None:
            out.append("[^/]*")
        else:
            if _PARAM_RE.fullmatch(name) is None:
                raise ConfigError(f"path {template!r}: bad parameter name {{{name}}}")
            if name in params:
                raise ConfigError(f"path {template!r}: parameter {{{name}}} appears twice")
            params.append(name)
            out.append(f"(?P<{name}>[^/]+)")
        pos = tok.end()
    out.append(_literal(template, template[pos:]))
    return re.compile("".join(out)), tuple(params)


def _literal(template: str, text: str) -> str:
    if "{" in text or "}" in text or _PATH_CHARS_RE.fullmatch(text) is None or "//" in text:
        raise ConfigError(f"path {template!r}: unexpected characters in {text!r}")
    return re.escape(text)


def normalize_host(host: str) -> str | None:
    """``host`` as the registry compares it, or None if it can never be a provider host.

    ASCII only (checked before lowercasing: ``"\\u212a".lower()`` is ``"k"``), lowercased, one
    trailing dot removed, valid DNS labels, not an IP literal, no port.
    """
    if not isinstance(host, str) or not host.isascii():
        return None
    h = host.lower()
    if h.endswith("."):
        h = h[:-1]
    if not h or len(h) > 253 or _HOST_RE.fullmatch(h) is None:
        return None
    # Labels of letters, digits and hyphens hold no IPv6 literal (no ':'), and an IPv4
    # literal ends in a numeric label, as "127.1" and friends do: such a host is never a DNS
    # name we route by.
    if h.rsplit(".", 1)[-1].isdigit():
        return None
    return h
