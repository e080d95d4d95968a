from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiid_proxy.errors import ConfigError, RequestRefused
from aiid_proxy.providers import (
    CREDENTIAL_HEADERS,
    MAX_EVENT_BYTES,
    Registry,
    Route,
    RouteMatch,
    SSEUsageTracker,
    Usage,
    parse_request,
    parse_usage,
)
from aiid_proxy.providers.model import normalize_host
from aiid_proxy.providers.request import MEDIA_PART_TOKENS

REG = Registry.builtin()


def route_match(host: str, method: str, path: str) -> RouteMatch:
    m = REG.match(host, method, path)
    assert m is not None and m.route is not None, (host, method, path)
    return m


OPENAI_CHAT = ("api.openai.com", "POST", "/v1/chat/completions")
OPENAI_RESPONSES = ("api.openai.com", "POST", "/v1/responses")
OPENAI_EMBED = ("api.openai.com", "POST", "/v1/embeddings")
OPENAI_MODELS = ("api.openai.com", "GET", "/v1/models")
OPENAI_MODEL = ("api.openai.com", "GET", "/v1/models/gpt-4o")
ANTHROPIC = ("api.anthropic.com", "POST", "/v1/messages")
AZURE_CHAT = ("res.openai.azure.com", "POST", "/openai/deployments/gpt4o-prod/chat/completions")
GEMINI = (
    "generativelanguage.googleapis.com",
    "POST",
    "/v1beta/models/gemini-1.5-pro:generateContent",
)
GEMINI_STREAM = (
    "generativelanguage.googleapis.com",
    "POST",
    "/v1beta/models/gemini-1.5-pro:streamGenerateContent",
)


def minimal_data(**provider: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "hosts": ["llm.example.com"],
        "region": "eu",
        "auth": {"header": "authorization", "scheme": "Bearer"},
        "usage_format": "openai",
        "routes": [{"kind": "chat", "path": "/v1/chat/completions"}],
    }
    spec.update(provider)
    return {"version": 1, "providers": {"acme-llm": spec}}


# -- the built-in registry ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "host", "region", "header", "scheme", "usage_format"),
    [
        pytest.param(
            "openai", "api.openai.com", "us", "authorization", "Bearer", "openai", id="openai"
        ),
        pytest.param(
            "openai-eu",
            "eu.api.openai.com",
            "eu",
            "authorization",
            "Bearer",
            "openai",
            id="openai-eu",
        ),
        pytest.param(
            "anthropic", "api.anthropic.com", "us", "x-api-key", None, "anthropic", id="anthropic"
        ),
        pytest.param(
            "azure-openai", "*.openai.azure.com", None, "api-key", None, "openai", id="azure"
        ),
        pytest.param(
            "gemini",
            "generativelanguage.googleapis.com",
            None,
            "x-goog-api-key",
            None,
            "gemini",
            id="gemini",
        ),
        pytest.param(
            "mistral", "api.mistral.ai", "eu", "authorization", "Bearer", "openai", id="mistral"
        ),
        pytest.param("groq", "api.groq.com", "us", "authorization", "Bearer", "openai", id="groq"),
        pytest.param(
            "openrouter",
            "openrouter.ai",
            "us",
            "authorization",
            "Bearer",
            "openai",
            id="openrouter",
        ),
    ],
)
def test_builtin_providers(
    name: str, host: str, region: str | None, header: str, scheme: str | None, usage_format: str
) -> None:
    p = REG.get(name)
    assert host in p.hosts
    assert p.region == region
    assert p.auth_header == header
    assert p.auth_scheme == scheme
    assert p.usage_format == usage_format
    assert p.extra_headers == ()
    assert p.auth_header in CREDENTIAL_HEADERS
    assert p.auth_value("sk-1") == (f"{scheme} sk-1" if scheme else "sk-1")


def test_get_unknown_provider_is_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown provider 'nope'"):
        REG.get("nope")


def test_strip_headers_adds_a_custom_auth_header() -> None:
    reg = Registry.from_data(minimal_data(auth={"header": "x-custom-key", "scheme": None}))
    p = reg.get("acme-llm")
    assert p.strip_headers == (*CREDENTIAL_HEADERS, "x-custom-key")
    assert REG.get("openai").strip_headers == CREDENTIAL_HEADERS


# -- host matching ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "expected"),
    [
        pytest.param("api.openai.com", "openai", id="exact"),
        pytest.param("API.OpenAI.COM", "openai", id="case"),
        pytest.param("api.openai.com.", "openai", id="trailing-dot"),
        pytest.param("api.openai.com..", None, id="two-trailing-dots"),
        pytest.param(".api.openai.com", None, id="leading-dot"),
        pytest.param("eu.api.openai.com", "openai-eu", id="eu"),
        pytest.param("api.anthropic.com", "anthropic", id="anthropic"),
        pytest.param("myres.openai.azure.com", "azure-openai", id="azure-glob"),
        pytest.param("MyRes.OpenAI.Azure.Com.", "azure-openai", id="azure-glob-case-dot"),
        pytest.param("myres.cognitiveservices.azure.com", "azure-openai", id="azure-cognitive"),
        pytest.param("a.b.openai.azure.com", None, id="glob-is-one-label"),
        pytest.param("openai.azure.com", None, id="glob-needs-a-label"),
        pytest.param("evil.com.openai.azure.com.evil.com", None, id="glob-suffix-lookalike"),
        pytest.param("api.openai.com.evil.com", None, id="suffix-lookalike"),
        pytest.param("evilapi.openai.com", None, id="prefix-lookalike"),
        pytest.param("x.api.openai.com", None, id="subdomain"),
        pytest.param("api-openai.com", None, id="dash-lookalike"),
        pytest.param("api.xn--openi-6ta.com", None, id="punycode-lookalike"),
        pytest.param("xn--pi-7ld.openai.com", None, id="punycode-label"),
        pytest.param("api.\u043epenai.com", None, id="cyrillic-o"),
        pytest.param("api.openai.com\u3002", None, id="ideographic-full-stop"),
        pytest.param("api.openai.com:443", None, id="with-port"),
        pytest.param("1.2.3.4", None, id="ipv4"),
        pytest.param("127.1", None, id="short-ipv4"),
        pytest.param("::1", None, id="ipv6"),
        pytest.param("[::1]", None, id="ipv6-brackets"),
        pytest.param("", None, id="empty"),
        pytest.param(".", None, id="dot"),
        pytest.param("api..openai.com", None, id="empty-label"),
        pytest.param("api.openai.com ", None, id="trailing-space"),
        pytest.param("-api.openai.com", None, id="label-starts-with-dash"),
        pytest.param("a" * 64 + ".openai.azure.com", None, id="label-too-long"),
        pytest.param("unknown.example.com", None, id="unknown"),
    ],
)
def test_match_host(host: str, expected: str | None) -> None:
    p = REG.match_host(host)
    assert (p.name if p is not None else None) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        pytest.param("API.OpenAI.com.", "api.openai.com", id="case-and-trailing-dot"),
        pytest.param("1.2.3.example", "1.2.3.example", id="numeric-labels-then-a-name"),
        pytest.param("a1.b2", "a1.b2", id="alphanumeric-last-label"),
        pytest.param("1.2.3.4", None, id="ipv4"),
        pytest.param("127.1", None, id="short-ipv4"),
        pytest.param("2130706433", None, id="ipv4-as-one-number"),
        pytest.param("0x7f.1", None, id="hex-ipv4"),
        pytest.param("10.0.0.256", None, id="numeric-last-label-not-an-address"),
        pytest.param("::1", None, id="ipv6"),
        pytest.param("fe80::1%eth0", None, id="ipv6-scoped"),
        pytest.param("[::1]", None, id="ipv6-brackets"),
    ],
)
def test_normalize_host(host: str, expected: str | None) -> None:
    assert normalize_host(host) == expected


def test_a_provider_host_cannot_be_an_ip_address() -> None:
    with pytest.raises(ConfigError, match="not a DNS host name"):
        Registry.from_data(minimal_data(hosts=["10.0.0.1"]))


def test_kelvin_sign_does_not_lowercase_into_a_provider_host() -> None:
    # "\u212a".lower() == "k": lowercasing before the ASCII check would let it match.
    reg = Registry.from_data(minimal_data(hosts=["k.example.com"]))
    assert reg.match_host("K.example.com") is not None
    assert reg.match_host("\u212a.example.com") is None


# -- route matching -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "method", "path", "provider", "kind", "params"),
    [
        pytest.param(*OPENAI_CHAT, "openai", "chat", {}, id="openai-chat"),
        pytest.param(
            "api.openai.com", "POST", "/v1/chat/completions?x=1", "openai", "chat", {}, id="query"
        ),
        pytest.param(*OPENAI_RESPONSES, "openai", "responses", {}, id="openai-responses"),
        pytest.param(*OPENAI_EMBED, "openai", "embeddings", {}, id="openai-embeddings"),
        pytest.param(
            "api.openai.com",
            "POST",
            "/v1/completions",
            "openai",
            "completions",
            {},
            id="completions",
        ),
        pytest.param(*OPENAI_MODELS, "openai", "models", {}, id="openai-models"),
        pytest.param(*OPENAI_MODEL, "openai", "models", {"model": "gpt-4o"}, id="openai-model"),
        pytest.param(
            "eu.api.openai.com", "POST", "/v1/chat/completions", "openai-eu", "chat", {}, id="eu"
        ),
        pytest.param(
            "api.openai.com", "GET", "/v1/chat/completions", "openai", None, {}, id="wrong-method"
        ),
        pytest.param(
            "api.openai.com",
            "post",
            "/v1/chat/completions",
            "openai",
            None,
            {},
            id="lowercase-method",
        ),
        pytest.param(
            "api.openai.com",
            "POST",
            "/v1/chat/completions/",
            "openai",
            None,
            {},
            id="trailing-slash",
        ),
        pytest.param(
            "api.openai.com", "POST", "/v1//chat/completions", "openai", None, {}, id="double-slash"
        ),
        pytest.param(
            "api.openai.com", "POST", "/v1/./chat/completions", "openai", None, {}, id="dot-segment"
        ),
        pytest.param(
            "api.openai.com",
            "POST",
            "/v1/chat%2Fcompletions",
            "openai",
            None,
            {},
            id="encoded-slash",
        ),
        pytest.param(
            "api.openai.com", "POST", "/V1/chat/completions", "openai", None, {}, id="path-case"
        ),
        pytest.param("api.openai.com", "POST", "/v1/files", "openai", None, {}, id="unknown-path"),
        pytest.param(*ANTHROPIC, "anthropic", "messages", {}, id="anthropic"),
        pytest.param(
            "api.anthropic.com",
            "POST",
            "/v1/messages/count_tokens",
            "anthropic",
            "count_tokens",
            {},
            id="count",
        ),
        pytest.param(
            *AZURE_CHAT, "azure-openai", "chat", {"deployment": "gpt4o-prod"}, id="azure-chat"
        ),
        pytest.param(
            "res.openai.azure.com",
            "POST",
            "/openai/deployments/emb/embeddings?api-version=2024-10-21",
            "azure-openai",
            "embeddings",
            {"deployment": "emb"},
            id="azure-embeddings",
        ),
        pytest.param(
            "res.openai.azure.com",
            "POST",
            "/openai/v1/chat/completions",
            "azure-openai",
            "chat",
            {},
            id="azure-v1",
        ),
        pytest.param(
            "res.openai.azure.com",
            "POST",
            "/openai/deployments/a/b/chat/completions",
            "azure-openai",
            None,
            {},
            id="azure-param-is-one-segment",
        ),
        pytest.param(
            "res.openai.azure.com",
            "POST",
            "/openai/deployments//chat/completions",
            "azure-openai",
            None,
            {},
            id="azure-empty-param",
        ),
        pytest.param(
            *GEMINI, "gemini", "generate_content", {"model": "gemini-1.5-pro"}, id="gemini"
        ),
        pytest.param(
            *GEMINI_STREAM,
            "gemini",
            "stream_generate_content",
            {"model": "gemini-1.5-pro"},
            id="gemini-stream",
        ),
        pytest.param(
            "generativelanguage.googleapis.com",
            "POST",
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            "gemini",
            "stream_generate_content",
            {"model": "gemini-2.0-flash"},
            id="gemini-stream-sse",
        ),
        pytest.param(
            "generativelanguage.googleapis.com",
            "POST",
            "/v1beta/models/gemini-pro:generateContentX",
            "gemini",
            None,
            {},
            id="gemini-suffix",
        ),
        pytest.param(
            "generativelanguage.googleapis.com",
            "POST",
            "/v1beta/models/:generateContent",
            "gemini",
            None,
            {},
            id="gemini-empty-model",
        ),
        pytest.param(
            "api.mistral.ai", "POST", "/v1/chat/completions", "mistral", "chat", {}, id="mistral"
        ),
        pytest.param(
            "api.groq.com", "POST", "/openai/v1/chat/completions", "groq", "chat", {}, id="groq"
        ),
        pytest.param(
            "openrouter.ai",
            "POST",
            "/api/v1/chat/completions",
            "openrouter",
            "chat",
            {},
            id="openrouter",
        ),
    ],
)
def test_match(
    host: str, method: str, path: str, provider: str, kind: str | None, params: dict[str, str]
) -> None:
    m = REG.match(host, method, path)
    assert m is not None
    assert m.provider.name == provider
    assert (m.route.kind if m.route is not None else None) == kind
    assert dict(m.params) == params


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("example.com", id="other-host"),
        pytest.param("api.openai.com.evil.com", id="lookalike"),
        pytest.param("10.0.0.1", id="ip"),
    ],
)
def test_match_unknown_host_is_none(host: str) -> None:
    assert REG.match(host, "POST", "/v1/chat/completions") is None


@pytest.mark.parametrize(
    ("template", "path", "params"),
    [
        pytest.param("/a/{x}/b", "/a/1/b", {"x": "1"}, id="param"),
        pytest.param("/a/{x}/b", "/a/1/2/b", None, id="param-one-segment"),
        pytest.param("/m/{model}:run", "/m/g-1:run", {"model": "g-1"}, id="param-in-segment"),
        pytest.param("/m/{model}:run", "/m/:run", None, id="param-not-empty"),
        pytest.param("/v1/*/x", "/v1/abc/x", {}, id="star"),
        pytest.param("/v1/*/x", "/v1/a/b/x", None, id="star-one-segment"),
        pytest.param("/v1.x", "/v1Ax", None, id="dot-is-literal"),
    ],
)
def test_path_templates(template: str, path: str, params: dict[str, str] | None) -> None:
    assert Route.build("chat", template).match_path(path) == params


# -- registry data validation -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(minimal_data(color="red"), "unknown key", id="unknown-provider-key"),
        pytest.param(
            {"version": 1, "providers": {"x": None}, "extra": 1},
            "unknown key 'extra'",
            id="top-key",
        ),
        pytest.param({"version": 2, "providers": {}}, "version must be 1", id="version"),
        pytest.param({"version": 1}, "'providers' must be a mapping", id="no-providers"),
        pytest.param(
            {"version": 1, "providers": {"Bad Name": {}}}, "invalid provider name", id="name"
        ),
        pytest.param(minimal_data(hosts=[]), "hosts must be a non-empty list", id="no-hosts"),
        pytest.param(minimal_data(hosts=["LLM.example.com"]), "must be lowercase", id="host-case"),
        pytest.param(minimal_data(hosts=["10.0.0.1"]), "not a DNS host name", id="host-ip"),
        pytest.param(
            minimal_data(hosts=["llm.example.com:443"]), "not a DNS host name", id="host-port"
        ),
        pytest.param(minimal_data(hosts=["*.com"]), "too broad", id="glob-broad"),
        pytest.param(minimal_data(hosts=["a.*.com"]), "not a DNS host name", id="glob-middle"),
        pytest.param(minimal_data(hosts=["x.com", "x.com"]), "duplicate host", id="dup-host"),
        pytest.param(minimal_data(region="EU"), "region must be", id="region"),
        pytest.param(
            minimal_data(auth={"header": "Authorization"}), "lowercase header", id="auth-case"
        ),
        pytest.param(minimal_data(auth={"header": "host"}), "not allowed", id="auth-host"),
        pytest.param(minimal_data(auth={"scheme": "Bearer"}), "auth must be", id="auth-no-header"),
        pytest.param(
            minimal_data(auth={"header": "a", "scheme": "Bad Scheme"}), "auth scheme", id="scheme"
        ),
        pytest.param(
            minimal_data(extra_headers={"x-api-key": "v"}), "carry a credential", id="extra-cred"
        ),
        pytest.param(
            minimal_data(extra_headers={"x-v": "a\r\nb"}), "printable ASCII", id="extra-crlf"
        ),
        pytest.param(minimal_data(usage_format="cohere"), "usage_format must be", id="format"),
        pytest.param(
            minimal_data(routes=[{"kind": "chat", "path": "v1"}]), "starting with '/'", id="path"
        ),
        pytest.param(
            minimal_data(routes=[{"kind": "chat", "path": "/a/{X}"}]), "bad parameter", id="param"
        ),
        pytest.param(
            minimal_data(routes=[{"kind": "chat", "path": "/{a}/{a}"}]), "twice", id="param-twice"
        ),
        pytest.param(
            minimal_data(routes=[{"kind": "chat", "path": "/a b"}]), "unexpected", id="path-space"
        ),
        pytest.param(minimal_data(routes=[{"kind": "Chat", "path": "/a"}]), "kind must", id="kind"),
        pytest.param(
            minimal_data(routes=[{"kind": "chat", "path": "/a", "methods": ["get"]}]),
            "method",
            id="meth",
        ),
        pytest.param(
            minimal_data(routes=[{"kind": "chat", "path": "/a", "methods": []}]),
            "empty",
            id="meths",
        ),
        pytest.param(
            minimal_data(routes=[{"kind": "chat", "path": "/a", "model_from": "path:deployment"}]),
            "names no {deployment}",
            id="model-from-missing-param",
        ),
        pytest.param(
            minimal_data(routes=[{"kind": "chat", "path": "/a", "model_from": "header"}]),
            "model_from must be",
            id="model-from",
        ),
        pytest.param(
            minimal_data(routes=[{"kind": "m", "path": "/a", "json": False, "model_from": "body"}]),
            "needs a JSON route",
            id="body-model-without-json",
        ),
        pytest.param(
            minimal_data(routes=[{"kind": "chat", "path": "/a", "x": 1}]),
            "unknown key",
            id="route-key",
        ),
        pytest.param(
            {
                "version": 1,
                "providers": {
                    "a": minimal_data()["providers"]["acme-llm"],
                    "b": minimal_data()["providers"]["acme-llm"],
                },
            },
            "claimed by both provider 'a' and 'b'",
            id="host-claimed-twice",
        ),
    ],
)
def test_from_data_refuses(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        Registry.from_data(data)
    assert message in str(info.value)


def test_route_defaults() -> None:
    reg = Registry.from_data(
        minimal_data(
            routes=[
                {"kind": "chat", "path": "/v1/chat"},
                {"kind": "models", "path": "/v1/models", "methods": ["GET"]},
                {
                    "kind": "gen",
                    "path": "/m/{model}:gen",
                    "model_from": "path:model",
                    "format": "gemini",
                },
            ]
        )
    )
    chat, models, gen = reg.get("acme-llm").routes
    assert (chat.methods, chat.json, chat.model_from, chat.wire_format) == (
        ("POST",),
        True,
        "body",
        "openai",
    )
    assert (models.json, models.model_from) == (False, "none")
    assert (gen.model_param, gen.wire_format) == ("model", "gemini")


def test_load_none_is_builtin() -> None:
    assert Registry.load(None).names() == REG.names()


def test_load_overrides_extends_and_removes(tmp_path: Path) -> None:
    f = tmp_path / "providers.yaml"
    f.write_text(
        """
providers:
  openai:
    hosts: [openai-proxy.internal.example]
    region: eu
    auth: {header: authorization, scheme: Bearer}
    usage_format: openai
    routes:
      - {kind: chat, path: /v1/chat/completions}
  local-vllm:
    hosts: [vllm.internal.example]
    auth: {header: authorization, scheme: Bearer}
    usage_format: openai
    extra_headers: {x-team: ml}
    routes:
      - {kind: chat, path: /v1/chat/completions}
  groq: null
"""
    )
    reg = Registry.load(f)
    assert reg.match_host("api.openai.com") is None
    assert reg.get("openai").region == "eu"
    assert reg.match_host("openai-proxy.internal.example") == reg.get("openai")
    local = reg.match("vllm.internal.example", "POST", "/v1/chat/completions")
    assert local is not None and local.route is not None
    assert local.provider.region is None and local.provider.extra_headers == (("x-team", "ml"),)
    assert "groq" not in reg and reg.match_host("api.groq.com") is None
    assert reg.get("anthropic") == REG.get("anthropic")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "providers:\n  a: null\n  a: null\n", "duplicate key 'a'", id="duplicate-yaml-key"
        ),
        pytest.param("providers: [\n", "not valid YAML", id="bad-yaml"),
        pytest.param("- 1\n", "must be a mapping", id="not-mapping"),
        pytest.param("providers:\n  openai: {hosts: [x.com]}\n", "missing 'auth'", id="incomplete"),
        pytest.param(
            "providers:\n  evil:\n    hosts: [api.openai.com]\n    auth: {header: authorization}\n"
            "    usage_format: openai\n    routes: []\n",
            "claimed by both",
            id="steals-builtin-host",
        ),
    ],
)
def test_load_refuses(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        Registry.load(f)
    assert message in str(info.value)
    assert str(f) in str(info.value)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unreadable"):
        Registry.load(tmp_path / "missing.yaml")


# -- parse_request ------------------------------------------------------------------------------
def facts(where: tuple[str, str, str], body: Any) -> dict[str, Any]:
    m = route_match(*where)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert m.route is not None
    return vars(parse_request(m.route, raw, m.params))


USER_HELLO = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize(
    ("where", "body", "expected"),
    [
        pytest.param(
            OPENAI_CHAT,
            {
                "model": "gpt-4o-mini",
                "messages": USER_HELLO,
                "max_tokens": 100,
                "temperature": 0.5,
                "top_p": 1,
                "n": 2,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            {
                "model": "gpt-4o-mini",
                "max_tokens": 100,
                "temperature": 0.5,
                "top_p": 1.0,
                "n": 2,
                "stream": True,
                "tools": False,
                "include_usage": True,
                "prompt_chars": 5,
                "estimated_input_tokens": 2 + 4,
            },
            id="chat-everything",
        ),
        pytest.param(
            OPENAI_CHAT,
            {"model": "o3", "messages": USER_HELLO, "max_completion_tokens": 300},
            {
                "max_tokens": 300,
                "stream": False,
                "include_usage": False,
                "n": None,
                "temperature": None,
            },
            id="max-completion-tokens",
        ),
        pytest.param(
            ("api.openai.com", "POST", "/v1/completions"),
            {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "n": 1, "best_of": 20},
            {"n": 20},
            id="best-of-counts-as-n",
        ),
        pytest.param(
            OPENAI_CHAT,
            {
                "model": "o3",
                "messages": USER_HELLO,
                "max_tokens": 100,
                "max_completion_tokens": 500,
            },
            {"max_tokens": 500},
            id="two-max-fields-take-larger",
        ),
        pytest.param(
            OPENAI_CHAT,
            {
                "model": "o3",
                "messages": USER_HELLO,
                "max_tokens": 900,
                "max_completion_tokens": 500,
            },
            {"max_tokens": 900},
            id="two-max-fields-take-larger-first",
        ),
        pytest.param(
            OPENAI_CHAT,
            {
                "model": "m",
                "messages": USER_HELLO,
                "max_tokens": None,
                "stream": None,
                "temperature": None,
            },
            {"max_tokens": None, "stream": False, "temperature": None},
            id="nulls-are-absent",
        ),
        pytest.param(
            OPENAI_CHAT, {"messages": []}, {"model": None, "prompt_chars": 0}, id="no-model"
        ),
        pytest.param(
            OPENAI_CHAT,
            {"model": "ft:gpt-4o-mini:acme::abc123", "messages": USER_HELLO},
            {"model": "ft:gpt-4o-mini:acme::abc123"},
            id="fine-tuned-model-name",
        ),
        pytest.param(
            OPENAI_CHAT,
            {
                "model": "m",
                "messages": USER_HELLO,
                "stream": True,
                "stream_options": {"include_usage": 1},
            },
            {"include_usage": False},
            id="include-usage-must-be-true",
        ),
        pytest.param(
            OPENAI_CHAT,
            {
                "model": "m",
                "messages": USER_HELLO,
                "tools": [{"type": "function"}],
                "tool_choice": "auto",
            },
            {"tools": True},
            id="tools",
        ),
        pytest.param(
            OPENAI_CHAT,
            {"model": "m", "messages": [], "tools": []},
            {"tools": False},
            id="empty-tools",
        ),
        pytest.param(
            OPENAI_CHAT,
            {"model": "m", "messages": [], "functions": [{"name": "f"}]},
            {"tools": True},
            id="functions",
        ),
        pytest.param(
            OPENAI_CHAT,
            {"model": "m", "messages": [], "tool_choice": "required"},
            {"tools": True},
            id="tool-choice",
        ),
        pytest.param(
            OPENAI_CHAT,
            {"model": "m", "messages": [], "tool_choice": "none"},
            {"tools": False},
            id="tool-choice-none",
        ),
        # Anthropic's and Gemini's spellings of "none" are no tools either ([AB])
        pytest.param(
            ANTHROPIC,
            {"model": "m", "max_tokens": 5, "messages": [], "tool_choice": {"type": "none"}},
            {"tools": False},
            id="anthropic-tool-choice-none",
        ),
        pytest.param(
            ANTHROPIC,
            {"model": "m", "max_tokens": 5, "messages": [], "tool_choice": {"type": "auto"}},
            {"tools": True},
            id="anthropic-tool-choice-auto",
        ),
        pytest.param(
            GEMINI,
            {"contents": [], "toolConfig": {"functionCallingConfig": {"mode": "NONE"}}},
            {"tools": False},
            id="gemini-mode-none",
        ),
        pytest.param(
            GEMINI,
            {"contents": [], "tool_config": {"function_calling_config": {"mode": "ANY"}}},
            {"tools": True},
            id="gemini-mode-any",
        ),
        pytest.param(
            GEMINI,
            {
                "contents": [],
                "tools": [{"functionDeclarations": [{"name": "f"}]}],
                "toolConfig": {"functionCallingConfig": {"mode": "NONE"}},
            },
            {"tools": True},
            id="gemini-tools-listed",
        ),
        pytest.param(
            OPENAI_CHAT,
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": "abc"},
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "defg"}, {"type": "image_url"}],
                    },
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
                    },
                ],
            },
            # the image part: its allowance, and the text of its keys ("type", "image_url")
            {
                "prompt_chars": 3 + 4 + 2 + 13 + 1,  # the function's name "f" too
                "estimated_input_tokens": 6 + 3 * 4 + MEDIA_PART_TOKENS,
            },
            id="content-parts-and-tool-calls",
        ),
        pytest.param(
            OPENAI_RESPONSES,
            {
                "model": "gpt-4.1",
                "input": "Say hi",
                "instructions": "Be brief",
                "max_output_tokens": 50,
                "tools": [{"type": "web_search"}],
            },
            {
                "model": "gpt-4.1",
                "max_tokens": 50,
                "tools": True,
                "prompt_chars": 14,
                "estimated_input_tokens": 7,  # (14 + the tool's "type" and "web_search") / 4
            },
            id="responses",
        ),
        pytest.param(
            OPENAI_RESPONSES,
            {
                "model": "gpt-4.1",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "abcd"}]}],
            },
            {"prompt_chars": 4, "estimated_input_tokens": 1 + 4},
            id="responses-input-items",
        ),
        pytest.param(
            OPENAI_EMBED,
            {"model": "text-embedding-3-small", "input": ["abc", "de"]},
            {"model": "text-embedding-3-small", "prompt_chars": 5, "estimated_input_tokens": 2 + 8},
            id="embeddings",
        ),
        pytest.param(
            OPENAI_EMBED,
            {"model": "text-embedding-3-small", "input": [[1, 2, 3]]},
            {"prompt_chars": 12, "estimated_input_tokens": 3 + 4},
            id="embeddings-token-ids",
        ),
        pytest.param(
            ANTHROPIC,
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 1024,
                "system": [{"type": "text", "text": "sys"}],
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "hi"},
                            {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
                        ],
                    }
                ],
                "tools": [{"name": "x", "input_schema": {}}],
            },
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 1024,
                "tools": True,
                "prompt_chars": 5 + 30,
                # 5 characters of prompt, 30 in the image part (its keys and short values; its
                # base64 of no declared type at a PDF's rate), 17 in the tool's definition:
                # 52 / 4; one message; the image's allowance
                "estimated_input_tokens": 13 + 4 + MEDIA_PART_TOKENS,
            },
            id="anthropic",
        ),
        pytest.param(
            ANTHROPIC,
            {
                "model": "claude",
                "max_tokens": 10,
                "messages": [],
                "mcp_servers": [{"url": "https://x"}],
            },
            {"tools": True},
            id="anthropic-mcp-servers",
        ),
        pytest.param(
            OPENAI_CHAT,
            {"model": "gpt-4o-mini-search-preview", "messages": [], "web_search_options": {}},
            {"tools": True},
            id="openai-web-search-options",
        ),
        pytest.param(
            AZURE_CHAT,
            {"model": "something-else", "messages": USER_HELLO, "max_tokens": 7},
            {"model": "gpt4o-prod", "max_tokens": 7},
            id="azure-model-is-the-deployment",
        ),
        pytest.param(
            GEMINI,
            {
                "contents": [{"role": "user", "parts": [{"text": "hello"}]}],
                "systemInstruction": {"parts": [{"text": "be nice"}]},
                "generationConfig": {
                    "maxOutputTokens": 256,
                    "temperature": 0.2,
                    "topP": 0.9,
                    "candidateCount": 1,
                },
                "tools": [{"functionDeclarations": []}],
            },
            {
                "model": "gemini-1.5-pro",
                "max_tokens": 256,
                "temperature": 0.2,
                "top_p": 0.9,
                "n": 1,
                "stream": False,
                "tools": True,
                "include_usage": True,
                "prompt_chars": 12,
                "estimated_input_tokens": 8 + 4,  # (12 + "functionDeclarations") / 4
            },
            id="gemini",
        ),
        pytest.param(
            GEMINI,
            {
                "contents": [],
                "generation_config": {"max_output_tokens": 64, "top_p": 0.5},
                "temperature": 9,
            },
            {"max_tokens": 64, "top_p": 0.5, "temperature": None, "tools": False},
            id="gemini-snake-case-and-top-level-ignored",
        ),
        pytest.param(
            GEMINI_STREAM,
            {"contents": []},
            {"stream": True, "model": "gemini-1.5-pro"},
            id="gemini-stream",
        ),
        pytest.param(
            GEMINI,
            {"model": "models/gemini-1.5-pro", "contents": []},
            {"model": "gemini-1.5-pro"},
            id="gemini-body-model-same-as-path",
        ),
        pytest.param(
            ("openrouter.ai", "POST", "/api/v1/chat/completions"),
            {"model": "anthropic/claude-sonnet-4.5", "messages": [], "models": None},
            {"model": "anthropic/claude-sonnet-4.5"},
            id="openrouter-null-models",
        ),
        pytest.param(
            OPENAI_MODELS, b"", {"model": None, "stream": False, "prompt_chars": 0}, id="models-get"
        ),
        pytest.param(OPENAI_MODEL, b"junk ignored", {"model": "gpt-4o"}, id="model-get"),
    ],
)
def test_parse_request(where: tuple[str, str, str], body: Any, expected: dict[str, Any]) -> None:
    got = facts(where, body)
    assert {k: got[k] for k in expected} == expected


_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "x" * 2000,
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}
_B64 = "iVBORw0KGgo" + "A" * 400_000  # an image's bytes: one part, never 100,000 tokens
_HELLO = [{"role": "user", "content": "hello"}]
_BASE = facts(OPENAI_CHAT, {"model": "gpt-4o", "messages": _HELLO})["estimated_input_tokens"]


def _with(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": _HELLO, **fields}


def _image_message(part: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "hello"}, part]}]


@pytest.mark.parametrize(
    ("where", "body", "low", "high"),
    [
        # what the provider bills as input besides the messages: an agent sending twenty
        # tools of 2,000 characters was held as much as one saying "hi"
        pytest.param(OPENAI_CHAT, _with(tools=[_TOOL] * 20), 20 * 500, 20 * 600, id="tools"),
        pytest.param(
            OPENAI_CHAT,
            _with(response_format={"type": "json_schema", "json_schema": {"schema": _TOOL}}),
            500,
            600,
            id="response-format",
        ),
        pytest.param(
            OPENAI_RESPONSES,
            {"model": "gpt-4.1", "input": "hi", "text": {"format": {"schema": _TOOL}}},
            500,
            600,
            id="responses-text-format",
        ),
        pytest.param(
            OPENAI_CHAT,
            _with(
                messages=_image_message(
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
                )
                * 10
            ),
            10 * MEDIA_PART_TOKENS,
            10 * MEDIA_PART_TOKENS + 200,
            id="ten-image-urls",
        ),
        pytest.param(
            OPENAI_CHAT,
            _with(
                messages=_image_message(
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_B64}"}}
                )
            ),
            MEDIA_PART_TOKENS,
            MEDIA_PART_TOKENS + 50,
            id="data-url-image",
        ),
        pytest.param(
            ANTHROPIC,
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 10,
                "messages": _image_message(
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": _B64},
                    }
                ),
            },
            MEDIA_PART_TOKENS,
            MEDIA_PART_TOKENS + 50,
            id="anthropic-base64-image",
        ),
        pytest.param(
            ANTHROPIC,
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 10,
                "messages": _image_message(
                    {"type": "document", "source": {"type": "text", "data": "word " * 4000}}
                ),
            },
            MEDIA_PART_TOKENS + 5000,
            MEDIA_PART_TOKENS + 5100,
            id="anthropic-text-document",
        ),
        pytest.param(
            GEMINI,
            {
                "contents": [
                    {
                        "parts": [
                            {"text": "hi"},
                            {"inlineData": {"mimeType": "image/png", "data": _B64}},
                        ]
                    }
                ],
                "tools": [{"functionDeclarations": [_TOOL["function"]]}],
                "generationConfig": {"responseSchema": _TOOL["function"]["parameters"]},
            },
            MEDIA_PART_TOKENS + 500,
            MEDIA_PART_TOKENS + 600,
            id="gemini-image-tools-schema",
        ),
        # about a token a character beyond ASCII (Chinese, Japanese...), not four characters
        pytest.param(
            OPENAI_CHAT,
            _with(messages=[{"role": "user", "content": "\u4f60\u597d" * 8000}]),
            16_000 - 2,  # (the base's "hello" is not in this one)
            16_100,
            id="cjk",
        ),
    ],
)
def test_the_input_estimate_counts_what_the_provider_bills(
    where: tuple[str, str, str], body: dict[str, Any], low: int, high: int
) -> None:
    """The estimate holds limits and budgets while requests run: a low one let concurrent
    requests spend many times a budget (pass [U]: 8.6x with tools, 17x with images)."""
    est = facts(where, body)["estimated_input_tokens"]
    assert low <= est - (_BASE if where == OPENAI_CHAT else 0) <= high, est


_TEXT = "The-quarterly-report-" * 5000  # 105,000 characters, no space


@pytest.mark.parametrize(
    ("where", "body"),
    [
        pytest.param(
            OPENAI_CHAT,
            _with(messages=[{"role": "user", "content": "data:;base64," + _TEXT}]),
            id="data-url-looking-prompt",
        ),
        pytest.param(
            OPENAI_CHAT,
            _with(
                messages=_image_message({"type": "text", "text": "data:image/png;base64," + _TEXT})
            ),
            id="data-url-looking-text-part",
        ),
        pytest.param(
            OPENAI_CHAT,
            _with(
                tools=[
                    {
                        "type": "function",
                        "function": {"name": "f", "description": "data:image/png;base64," + _TEXT},
                    }
                ]
            ),
            id="data-url-looking-tool",
        ),
        pytest.param(
            ANTHROPIC,
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 10,
                "system": "data:;base64," + _TEXT,
                "messages": _HELLO,
            },
            id="data-url-looking-system",
        ),
        pytest.param(
            ANTHROPIC,
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 10,
                "messages": _image_message(
                    {
                        "type": "document",
                        "source": {"type": "text", "media_type": "text/plain", "data": _TEXT},
                    }
                ),
            },
            id="document-text-without-spaces",
        ),
        # a media part's text is text, whatever it starts with (pass [X]: 200 under a limit
        # that refused the same text without the prefix)
        pytest.param(
            ANTHROPIC,
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 10,
                "messages": _image_message(
                    {
                        "type": "document",
                        "source": {
                            "type": "text",
                            "media_type": "text/plain",
                            "data": "data:image/png;base64," + _TEXT,
                        },
                    }
                ),
            },
            id="document-text-starting-like-an-image",
        ),
        pytest.param(
            ANTHROPIC,
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 10,
                "messages": _image_message(
                    {
                        "type": "document",
                        "source": {"type": "text", "media_type": "text/plain", "data": "x"},
                        "title": "data:image/png;base64," + _TEXT,
                    }
                ),
            },
            id="document-title-starting-like-an-image",
        ),
        pytest.param(
            OPENAI_CHAT,
            _with(
                messages=_image_message(
                    {
                        "type": "input_audio",
                        "input_audio": {"data": "x", "format": "wav"},
                        "transcript": "data:audio/wav;base64," + _TEXT,
                    }
                )
            ),
            id="audio-part-text-starting-like-audio",
        ),
    ],
)
def test_only_declared_image_audio_or_video_bytes_escape_the_count(
    where: tuple[str, str, str], body: dict[str, Any]
) -> None:
    """Anything starting "data:...;base64," was held as one 1,600-token part however long:
    a 496,000-character prompt passed a 10,000 tokens-per-minute limit (pass [V])."""
    assert facts(where, body)["estimated_input_tokens"] >= len(_TEXT) // 4


_PDF = "JVBERi0xLjcK" + "A" * 80_000  # ~60 KB of a PDF: a few pages


@pytest.mark.parametrize(
    ("where", "body"),
    [
        pytest.param(
            ANTHROPIC,
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 10,
                "messages": _image_message(
                    {
                        "type": "document",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": _PDF},
                    }
                ),
            },
            id="anthropic-pdf",
        ),
        pytest.param(
            OPENAI_CHAT,
            _with(
                messages=_image_message(
                    {"type": "file", "file": {"file_data": "data:application/pdf;base64," + _PDF}}
                )
            ),
            id="openai-pdf",
        ),
        pytest.param(
            GEMINI,
            {
                "contents": [
                    {"parts": [{"inlineData": {"mimeType": "application/pdf", "data": _PDF}}]}
                ]
            },
            id="gemini-pdf",
        ),
    ],
)
def test_a_pdf_is_held_at_about_what_its_pages_bill(
    where: tuple[str, str, str], body: dict[str, Any]
) -> None:
    """Pages bill a few thousand tokens each, not a token per 3 bytes of base64: counted as
    text, a 60 KB PDF could never pass 20,000 tokens a minute (pass [X])."""
    est = facts(where, body)["estimated_input_tokens"]
    assert MEDIA_PART_TOKENS + len(_PDF) // 16 <= est < 20_000 - 1000


_BIG = "x " * 50_000  # 100,000 characters


@pytest.mark.parametrize(
    ("where", "body"),
    [
        pytest.param(
            ANTHROPIC,
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 10,
                "messages": [
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "tool_use", "id": "t1", "name": "f", "input": {"q": _BIG}}
                        ],
                    }
                ],
            },
            id="anthropic-tool-use-input",
        ),
        pytest.param(
            ANTHROPIC,
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 10,
                "messages": [
                    {"role": "assistant", "content": [{"type": "thinking", "thinking": _BIG}]}
                ],
            },
            id="anthropic-thinking",
        ),
        pytest.param(
            GEMINI,
            {
                "contents": [
                    {"parts": [{"functionResponse": {"name": "f", "response": {"r": _BIG}}}]}
                ]
            },
            id="gemini-function-response",
        ),
        pytest.param(
            GEMINI,
            {"contents": [{"parts": [{"functionCall": {"name": "f", "args": {"a": _BIG}}}]}]},
            id="gemini-function-call",
        ),
        pytest.param(
            OPENAI_RESPONSES,
            {
                "model": "gpt-4.1",
                "input": [{"type": "custom_tool_call", "call_id": "c", "name": "f", "input": _BIG}],
            },
            id="responses-custom-tool-call",
        ),
        pytest.param(
            OPENAI_RESPONSES,
            {"model": "gpt-4.1", "input": "hi", "prompt": {"id": "p", "variables": {"v": _BIG}}},
            id="responses-prompt-variables",
        ),
        # free-form tool input under a key that is a label elsewhere (pass [Z]: held at 1)
        *(
            pytest.param(
                ANTHROPIC,
                {
                    "model": "claude-sonnet-4-5",
                    "max_tokens": 10,
                    "messages": [
                        {
                            "role": "assistant",
                            "content": [
                                {"type": "tool_use", "id": "t1", "name": "f", "input": {k: _BIG}}
                            ],
                        }
                    ],
                },
                id=f"tool-input-under-{k}",
            )
            for k in ("id", "status", "type", "role", "signature")
        ),
        pytest.param(
            GEMINI,
            {
                "contents": [
                    {"parts": [{"functionResponse": {"name": "f", "response": {"status": _BIG}}}]}
                ]
            },
            id="function-response-status",
        ),
    ],
)
def test_tool_inputs_results_and_thinking_are_input(
    where: tuple[str, str, str], body: dict[str, Any]
) -> None:
    """Only a list of text keys was counted inside a message: a 100,000-character tool result
    was held at 13 tokens and passed 20,000 tokens a minute (pass [Y])."""
    assert facts(where, body)["estimated_input_tokens"] >= len(_BIG) // 4


def test_images_inside_a_document_each_get_their_allowance() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": _B64}}
    doc = {"type": "document", "source": {"type": "content", "content": [image] * 20}}
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": _image_message(doc)}
    assert facts(ANTHROPIC, body)["estimated_input_tokens"] >= 21 * MEDIA_PART_TOKENS


def test_base64_text_counts_as_the_text_it_decodes_to() -> None:
    body = {"contents": [{"parts": [{"inlineData": {"mimeType": "text/plain", "data": _TEXT}}]}]}
    est = facts(GEMINI, body)["estimated_input_tokens"]
    assert est >= MEDIA_PART_TOKENS + len(_TEXT) * 3 // 16


def test_a_content_part_with_a_list_for_a_type_is_counted_not_a_crash() -> None:
    body = _with(messages=[{"role": "user", "content": [{"type": ["text"], "text": "hi"}]}])
    assert facts(OPENAI_CHAT, body)["estimated_input_tokens"] > 0


def test_knobs_are_no_input() -> None:
    knobs = {"max_tokens": 10, "temperature": 0.5, "stream": True, "metadata": {"k": "v" * 99}}
    assert facts(OPENAI_CHAT, _with(**knobs))["estimated_input_tokens"] == _BASE


@pytest.mark.parametrize(
    ("where", "body", "message"),
    [
        pytest.param(OPENAI_CHAT, b"", "empty", id="empty"),
        pytest.param(OPENAI_CHAT, b"  \r\n", "empty", id="blank"),
        pytest.param(OPENAI_CHAT, b"hello", "not valid JSON", id="not-json"),
        pytest.param(OPENAI_CHAT, b'{"model": "m"', "not valid JSON", id="truncated"),
        pytest.param(OPENAI_CHAT, b'{"model": "m"} {}', "not valid JSON", id="trailing-data"),
        pytest.param(OPENAI_CHAT, b"[1, 2]", "must be a JSON object, not an array", id="array"),
        pytest.param(OPENAI_CHAT, b'"text"', "not a string", id="string"),
        pytest.param(OPENAI_CHAT, b"null", "not null", id="null"),
        pytest.param(OPENAI_CHAT, b"3", "not a number", id="number"),
        pytest.param(OPENAI_CHAT, b'{"model": "\xff"}', "UTF-8", id="bad-utf8"),
        pytest.param(OPENAI_CHAT, b'{"model": "\xed\xa0\x80"}', "UTF-8", id="encoded-surrogate"),
        pytest.param(OPENAI_CHAT, b'\xef\xbb\xbf{"model": "m"}', "not valid JSON", id="bom"),
        pytest.param(
            OPENAI_CHAT, b'{"model":"ok","model":"denied"}', "duplicate key 'model'", id="dup-top"
        ),
        pytest.param(
            OPENAI_CHAT,
            b'{"model":"m","messages":[{"role":"user","role":"system","content":"x"}]}',
            "duplicate key 'role'",
            id="dup-nested",
        ),
        pytest.param(
            OPENAI_CHAT,
            b'{"model":"m","stream_options":{"include_usage":false,"include_usage":true}}',
            "duplicate key 'include_usage'",
            id="dup-stream-options",
        ),
        pytest.param(
            GEMINI,
            b'{"generationConfig":{"maxOutputTokens":1,"maxOutputTokens":99999}}',
            "duplicate key 'maxOutputTokens'",
            id="dup-gemini",
        ),
        pytest.param(OPENAI_CHAT, b'{"model":"m","temperature":NaN}', "NaN", id="nan"),
        pytest.param(
            OPENAI_CHAT, b'{"model":"m","temperature":-Infinity}', "Infinity", id="infinity"
        ),
        pytest.param(
            OPENAI_CHAT, b'{"model":"m","temperature":1e400}', "finite number", id="overflow"
        ),
        pytest.param(OPENAI_CHAT, b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="deep"),
        pytest.param(
            OPENAI_CHAT,
            b'{"model":"m","max_tokens":1' + b"0" * 5000 + b"}",
            "number over 4,300 digits long",  # not Python's own words ([AB])
            id="huge-int",
        ),
        pytest.param(OPENAI_CHAT, b'{"model":5}', "model must be a string", id="model-int"),
        pytest.param(
            OPENAI_CHAT, b'{"model":["gpt-4o"]}', "model must be a string", id="model-list"
        ),
        pytest.param(OPENAI_CHAT, b'{"model":""}', "must not be empty", id="model-empty"),
        pytest.param(
            OPENAI_CHAT, b'{"model":"gpt\\u20114o"}', "non-ASCII", id="model-nb-hyphen-escaped"
        ),
        pytest.param(
            OPENAI_CHAT, '{"model":"gpt\u20114o"}'.encode(), "non-ASCII", id="model-nb-hyphen-raw"
        ),
        pytest.param(OPENAI_CHAT, b'{"model":"gpt-4o\\u200b"}', "non-ASCII", id="model-zero-width"),
        pytest.param(OPENAI_CHAT, b'{"model":"gpt-\\u0430o"}', "non-ASCII", id="model-cyrillic"),
        pytest.param(OPENAI_CHAT, b'{"model":"\\uff47pt-4o"}', "non-ASCII", id="model-fullwidth"),
        pytest.param(OPENAI_CHAT, b'{"model":"gpt-4o "}', "whitespace", id="model-trailing-space"),
        pytest.param(OPENAI_CHAT, b'{"model":"gpt 4o"}', "whitespace", id="model-space"),
        pytest.param(OPENAI_CHAT, b'{"model":"gpt-4o\\n"}', "control", id="model-newline"),
        pytest.param(OPENAI_CHAT, b'{"model":"gpt-4o\\u0000"}', "control", id="model-nul"),
        pytest.param(
            OPENAI_CHAT, b'{"model":"gpt-4o\\ud800"}', "non-ASCII", id="model-lone-surrogate"
        ),
        pytest.param(
            OPENAI_CHAT, json.dumps({"model": "m" * 257}).encode(), "longer", id="model-long"
        ),
        pytest.param(
            OPENAI_CHAT, b'{"model":"m","max_tokens":true}', "max_tokens must be", id="max-bool"
        ),
        pytest.param(
            OPENAI_CHAT, b'{"model":"m","max_tokens":-1}', "max_tokens must be", id="max-negative"
        ),
        pytest.param(
            OPENAI_CHAT, b'{"model":"m","max_tokens":1.5}', "max_tokens must be", id="max-float"
        ),
        pytest.param(
            OPENAI_CHAT,
            b'{"model":"m","max_tokens":100.0}',
            "max_tokens must be",
            id="max-float-int",
        ),
        pytest.param(
            OPENAI_CHAT, b'{"model":"m","max_tokens":"100"}', "max_tokens must be", id="max-string"
        ),
        pytest.param(
            OPENAI_CHAT,
            b'{"model":"m","max_completion_tokens":false}',
            "max_completion_tokens",
            id="mct-bool",
        ),
        pytest.param(
            OPENAI_RESPONSES,
            b'{"model":"m","max_output_tokens":[1]}',
            "max_output_tokens",
            id="mot-list",
        ),
        pytest.param(
            OPENAI_CHAT, b'{"model":"m","temperature":true}', "temperature must be", id="temp-bool"
        ),
        pytest.param(
            OPENAI_CHAT, b'{"model":"m","temperature":"0.5"}', "temperature must be", id="temp-str"
        ),
        pytest.param(OPENAI_CHAT, b'{"model":"m","top_p":false}', "top_p must be", id="top-p-bool"),
        pytest.param(OPENAI_CHAT, b'{"model":"m","n":0}', "n must be an integer >= 1", id="n-zero"),
        pytest.param(OPENAI_CHAT, b'{"model":"m","n":true}', "n must be", id="n-bool"),
        pytest.param(
            OPENAI_CHAT,
            b'{"model":"m","stream":"true"}',
            "stream must be true or false",
            id="stream-str",
        ),
        pytest.param(OPENAI_CHAT, b'{"model":"m","stream":1}', "stream must be", id="stream-int"),
        pytest.param(
            OPENAI_CHAT,
            b'{"model":"m","tools":{"a":1}}',
            "tools must be an array",
            id="tools-object",
        ),
        pytest.param(
            GEMINI,
            b'{"generationConfig":{},"generation_config":{}}',
            "both generationConfig",
            id="gemini-alias",
        ),
        pytest.param(
            GEMINI,
            b'{"generationConfig":{"maxOutputTokens":1,"max_output_tokens":9999}}',
            "both maxOutputTokens",
            id="gemini-field-alias",
        ),
        pytest.param(
            GEMINI,
            b'{"generationConfig":"x"}',
            "generationConfig must be an object",
            id="gemini-config",
        ),
        pytest.param(
            GEMINI,
            b'{"generationConfig":{"maxOutputTokens":true}}',
            "maxOutputTokens must be",
            id="gemini-bool",
        ),
        pytest.param(GEMINI, b"", "empty", id="gemini-empty"),
        pytest.param(
            GEMINI,
            b'{"model": "models/gemini-ultra", "contents": []}',
            "differs from the model in the request path",
            id="gemini-body-model-differs",
        ),
        pytest.param(
            ("openrouter.ai", "POST", "/api/v1/chat/completions"),
            b'{"model": "cheap", "models": ["expensive"], "messages": []}',
            "'models' fallback list",
            id="openrouter-fallback-models",
        ),
    ],
)
def test_parse_request_refuses(where: tuple[str, str, str], body: bytes, message: str) -> None:
    m = route_match(*where)
    assert m.route is not None
    with pytest.raises(RequestRefused) as info:
        parse_request(m.route, body, m.params)
    assert (info.value.status, info.value.type) == (400, "bad_request")
    assert message in info.value.message


@pytest.mark.parametrize("background", [True, "yes", 1], ids=["true", "string", "one"])
def test_a_background_response_is_refused(background: object) -> None:
    """Queued: the answer has no usage and the work is reported only to a later GET, so no
    limit or budget could count it (an agent queued o3 jobs for $0.00001 each)."""
    m = route_match(*OPENAI_RESPONSES)
    assert m.route is not None
    body = json.dumps({"model": "o3", "input": "hi", "background": background}).encode()
    with pytest.raises(RequestRefused) as info:
        parse_request(m.route, body, m.params)
    assert (info.value.status, info.value.type, info.value.rule) == (
        403,
        "policy_denied",
        "default",
    )
    assert "background responses are not supported" in info.value.message
    for fine in (False, None):
        ok = json.dumps({"model": "o3", "input": "hi", "background": fine}).encode()
        assert parse_request(m.route, ok, m.params).model == "o3"


@pytest.mark.parametrize(
    ("deployment", "message"),
    [
        pytest.param("gpt%2D4o", "percent-encoded", id="percent"),
        pytest.param("gpt\u20114o", "non-ASCII", id="unicode"),
    ],
)
def test_path_model_refused(deployment: str, message: str) -> None:
    route = route_match(*AZURE_CHAT).route
    assert route is not None
    with pytest.raises(RequestRefused) as info:
        parse_request(route, b'{"messages":[]}', {"deployment": deployment})
    assert message in info.value.message


def test_path_model_missing_params() -> None:
    route = route_match(*AZURE_CHAT).route
    assert route is not None
    with pytest.raises(RequestRefused, match="names no deployment"):
        parse_request(route, b'{"messages":[]}', None)


@settings(max_examples=300, deadline=None)
@given(model=st.text(max_size=20))
def test_model_names_are_kept_exactly_or_refused(model: str) -> None:
    route = route_match(*OPENAI_CHAT).route
    assert route is not None
    body = json.dumps({"model": model, "messages": []}).encode()
    try:
        got = parse_request(route, body).model
    except RequestRefused as e:
        assert e.status == 400
        bad = not model or any(not ("!" <= c <= "~") for c in model)
        assert bad, model
    else:
        assert got == model
        assert all("!" <= c <= "~" for c in model)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_request_refused(body: bytes) -> None:
    route = route_match(*OPENAI_CHAT).route
    assert route is not None
    try:
        parse_request(route, body)
    except RequestRefused as e:
        assert e.status == 400


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(0, 30), first=st.text(max_size=5), second=st.text(max_size=5))
def test_duplicate_keys_refused_at_any_depth(depth: int, first: str, second: str) -> None:
    route = route_match(*OPENAI_CHAT).route
    assert route is not None
    a, b = json.dumps(first), json.dumps(second)
    inner = f'{{"k": {a}, "k": {b}}}' if depth else f'{{"model": "m", "k": {a}, "k": {b}}}'
    for i in range(depth):
        inner = f'{{"model": "m", "x{i}": [{inner}]}}' if i % 2 else f'{{"y": {inner}}}'
    body = inner
    with pytest.raises(RequestRefused, match="duplicate key 'k'"):
        parse_request(route, body.encode())


# -- parse_usage --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("provider", "where", "body", "expected"),
    [
        pytest.param(
            "openai",
            OPENAI_CHAT,
            {"usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}},
            Usage(10, 5),
            id="openai-chat",
        ),
        pytest.param(
            "openai",
            OPENAI_RESPONSES,
            {"usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}},
            Usage(7, 3),
            id="openai-responses",
        ),
        pytest.param(
            "openai",
            OPENAI_EMBED,
            {"usage": {"prompt_tokens": 8, "total_tokens": 8}},
            Usage(8, 0),
            id="embeddings",
        ),
        pytest.param(
            "openai",
            None,
            {"usage": {"prompt_tokens": 1, "completion_tokens": 2}},
            Usage(1, 2),
            id="openai-no-route",
        ),
        pytest.param(
            "azure-openai",
            AZURE_CHAT,
            {"usage": {"prompt_tokens": 4, "completion_tokens": 9}},
            Usage(4, 9),
            id="azure",
        ),
        pytest.param(
            "anthropic",
            ANTHROPIC,
            {
                "usage": {
                    "input_tokens": 10,
                    "cache_creation_input_tokens": 100,
                    "cache_read_input_tokens": 1000,
                    "output_tokens": 20,
                }
            },
            Usage(1110, 20, cache_write_tokens=100),  # writes: billed at twice the price
            id="anthropic-cache",
        ),
        pytest.param(
            "anthropic",
            ANTHROPIC,
            {
                "usage": {
                    "input_tokens": 10,
                    "cache_creation_input_tokens": None,
                    "cache_read_input_tokens": None,
                    "output_tokens": 20,
                }
            },
            Usage(10, 20),
            id="anthropic-null-cache",
        ),
        pytest.param(
            "anthropic", ANTHROPIC, {"input_tokens": 12}, None, id="anthropic-count-tokens"
        ),
        pytest.param(
            "gemini",
            GEMINI,
            {
                "usageMetadata": {
                    "promptTokenCount": 4,
                    "candidatesTokenCount": 6,
                    "totalTokenCount": 10,
                }
            },
            Usage(4, 6),
            id="gemini",
        ),
        pytest.param(
            "gemini",
            GEMINI,
            {
                "usageMetadata": {
                    "promptTokenCount": 4,
                    "candidatesTokenCount": 6,
                    "thoughtsTokenCount": 30,
                }
            },
            Usage(4, 36),
            id="gemini-thoughts",
        ),
        pytest.param(
            "gemini",
            GEMINI_STREAM,
            [
                {"usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 1}},
                {"usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 8}},
                {"candidates": []},
            ],
            Usage(4, 8),
            id="gemini-array",
        ),
        pytest.param(
            "gemini",
            GEMINI,
            {"usageMetadata": {"promptTokenCount": 4}},
            Usage(4, 0),
            id="gemini-no-output",
        ),
        pytest.param("openai", OPENAI_CHAT, b"", None, id="empty"),
        pytest.param("openai", OPENAI_CHAT, b"not json", None, id="not-json"),
        pytest.param("openai", OPENAI_CHAT, b"\xff\xfe", None, id="bad-utf8"),
        pytest.param("openai", OPENAI_CHAT, b"[" * 50_000, None, id="deep"),
        pytest.param("openai", OPENAI_CHAT, [], None, id="array"),
        pytest.param("openai", OPENAI_CHAT, {"usage": None}, None, id="null-usage"),
        pytest.param("openai", OPENAI_CHAT, {"usage": "10"}, None, id="string-usage"),
        pytest.param(
            "openai", OPENAI_CHAT, {"usage": {"prompt_tokens": "10"}}, None, id="string-count"
        ),
        pytest.param(
            "openai",
            OPENAI_CHAT,
            {"usage": {"prompt_tokens": True, "completion_tokens": 1}},
            None,
            id="bool-count",
        ),
        pytest.param(
            "openai",
            OPENAI_CHAT,
            {"usage": {"prompt_tokens": -1, "completion_tokens": 1}},
            None,
            id="negative",
        ),
        pytest.param(
            "openai",
            OPENAI_CHAT,
            {"usage": {"prompt_tokens": 1, "completion_tokens": 1.5}},
            None,
            id="float",
        ),
        pytest.param(
            "anthropic", ANTHROPIC, {"usage": {"input_tokens": 1}}, None, id="anthropic-no-output"
        ),
        pytest.param(
            "anthropic",
            ANTHROPIC,
            {"usage": {"input_tokens": 1, "output_tokens": 1, "cache_read_input_tokens": "x"}},
            None,
            id="anthropic-junk-cache",
        ),
        pytest.param(
            "gemini",
            GEMINI,
            {"usageMetadata": {"candidatesTokenCount": 3}},
            None,
            id="gemini-no-prompt",
        ),
        pytest.param("gemini", GEMINI, [1, "x", None], None, id="gemini-junk-array"),
    ],
)
def test_parse_usage(
    provider: str, where: tuple[str, str, str] | None, body: Any, expected: Usage | None
) -> None:
    route = route_match(*where).route if where is not None else None
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert parse_usage(REG.get(provider), route, raw) == expected


# -- SSE usage tracking -------------------------------------------------------------------------
def sse(*events: tuple[str | None, Any]) -> bytes:
    out = []
    for name, data in events:
        head = f"event: {name}\n" if name else ""
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        out.append(f"{head}data: {payload}\n\n")
    return "".join(out).encode()


CHAT_STREAM = sse(
    (
        None,
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None},
    ),
    (None, {"choices": [{"index": 0, "delta": {"content": "Hello"}}], "usage": None}),
    (None, {"choices": [{"index": 0, "delta": {"content": " w\u00f6rld"}}], "usage": None}),
    (
        None,
        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}},
    ),
    (None, "[DONE]"),
)
RESPONSES_STREAM = sse(
    ("response.created", {"type": "response.created", "response": {"id": "r1", "usage": None}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "delta": " there"}),
    (
        "response.completed",
        {
            "type": "response.completed",
            "response": {"usage": {"input_tokens": 20, "output_tokens": 2}},
        },
    ),
)
ANTHROPIC_STREAM = (
    sse(
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "m1",
                    "usage": {
                        "input_tokens": 25,
                        "cache_creation_input_tokens": 3,
                        "cache_read_input_tokens": 2,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"text": ""}},
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hello"}},
        ),
    )
    # one event whose data spans two lines, and a comment line
    + b': keep-alive\nevent: content_block_delta\ndata: {"type": "content_block_delta",\n'
    b'data: "delta": {"type": "text_delta", "text": "!\xe2\x82\xac"}}\n\n'
    + sse(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": None},
                "usage": {"output_tokens": 7},
            },
        ),
        ("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 15}}),
        ("message_stop", {"type": "message_stop"}),
    )
)
GEMINI_SSE = sse(
    (
        None,
        {
            "candidates": [{"content": {"parts": [{"text": "Hel"}], "role": "model"}}],
            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 1},
        },
    ),
    (
        None,
        {
            "candidates": [{"content": {"parts": [{"text": "lo"}]}, "finishReason": "STOP"}],
            "usageMetadata": {
                "promptTokenCount": 9,
                "candidatesTokenCount": 2,
                "thoughtsTokenCount": 5,
            },
        },
    ),
)

STREAMS = [
    pytest.param("openai", OPENAI_CHAT, CHAT_STREAM, Usage(11, 3), 11, 5, id="openai-chat"),
    pytest.param(
        "openai", OPENAI_RESPONSES, RESPONSES_STREAM, Usage(20, 2), 8, 4, id="openai-responses"
    ),
    pytest.param(
        "anthropic",
        ANTHROPIC,
        ANTHROPIC_STREAM,
        Usage(30, 15, cache_write_tokens=3),
        7,
        8,
        id="anthropic",
    ),
    pytest.param("gemini", GEMINI_STREAM, GEMINI_SSE, Usage(9, 7), 5, 2, id="gemini"),
]


def track(provider: str, where: tuple[str, str, str], chunks: list[bytes]) -> SSEUsageTracker:
    t = SSEUsageTracker(REG.get(provider), route_match(*where).route)
    for c in chunks:
        t.feed(c)
    return t


def summary(t: SSEUsageTracker) -> tuple[Usage | None, int, int, int]:
    return t.usage(), t.output_chars, t.events, t.junk


def endings(stream: bytes, eol: bytes) -> bytes:
    return stream.replace(b"\n", eol)


@pytest.mark.parametrize(
    "eol",
    [pytest.param(b"\n", id="lf"), pytest.param(b"\r\n", id="crlf"), pytest.param(b"\r", id="cr")],
)
@pytest.mark.parametrize(("provider", "where", "stream", "usage", "chars", "events"), STREAMS)
def test_sse_whole_stream(
    provider: str,
    where: tuple[str, str, str],
    stream: bytes,
    usage: Usage,
    chars: int,
    events: int,
    eol: bytes,
) -> None:
    t = track(provider, where, [endings(stream, eol)])
    assert summary(t) == (usage, chars, events, 0)
    assert t.finished
    assert t.buffered == 0


@pytest.mark.parametrize(
    "eol",
    [pytest.param(b"\n", id="lf"), pytest.param(b"\r\n", id="crlf"), pytest.param(b"\r", id="cr")],
)
@pytest.mark.parametrize(("provider", "where", "stream", "usage", "chars", "events"), STREAMS)
def test_sse_every_split_point_gives_the_same_result(
    provider: str,
    where: tuple[str, str, str],
    stream: bytes,
    usage: Usage,
    chars: int,
    events: int,
    eol: bytes,
) -> None:
    data = endings(stream, eol)
    for i in range(len(data) + 1):
        t = track(provider, where, [data[:i], data[i:]])
        assert summary(t) == (usage, chars, events, 0), i
    one_by_one = track(provider, where, [data[i : i + 1] for i in range(len(data))])
    assert summary(one_by_one) == (usage, chars, events, 0)


@settings(max_examples=200, deadline=None)
@given(
    which=st.sampled_from(range(len(STREAMS))),
    eol=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30),
)
def test_sse_random_chunking(which: int, eol: bytes, cuts: list[int]) -> None:
    provider, where, stream, usage, chars, events = STREAMS[which].values
    data = endings(stream, eol)
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    assert summary(track(provider, where, chunks)) == (usage, chars, events, 0)


def test_sse_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    # "\r" at a chunk end then "\n" must not be read as two line ends (an empty line would
    # dispatch the event early, before its second data line).
    t = track(
        "anthropic",
        ANTHROPIC,
        [b'data: {"type": "content_block_delta",\r', b'\ndata: "delta": {"text": "abc"}}\r\n\r\n'],
    )
    assert (t.events, t.output_chars, t.junk) == (1, 3, 0)


def test_sse_cr_then_empty_chunk_then_lf() -> None:
    t = track(
        "anthropic",
        ANTHROPIC,
        [b'data: {"type": "content_block_delta",\r', b"", b'\ndata: "delta": {"text": "ab"}}\r\r'],
    )
    assert (t.events, t.output_chars) == (1, 2)


def test_sse_junk_events_are_counted_and_skipped() -> None:
    stream = (
        b"data: not json\n\n"
        b"data: [1, 2]\n\n"
        b'data: {"choices": "x", "usage": {"prompt_tokens": "5"}}\n\n'
        b'data: {"choices": [7, {"delta": "x"}, {"delta": {"content": 5}}]}\n\n'
        b"data: \xff\xfe\n\n"
        b"event: only-a-name\n\n"
        b"id: 5\nretry: 10\n\n" + CHAT_STREAM
    )
    t = track("openai", OPENAI_CHAT, [stream])
    assert t.usage() == Usage(11, 3)
    assert t.output_chars == 11
    assert t.junk == 3  # "not json", the array, the invalid UTF-8
    assert t.events == 5 + 5


def test_sse_oversized_event_is_dropped_and_memory_stays_bounded() -> None:
    t = SSEUsageTracker(REG.get("openai"), route_match(*OPENAI_CHAT).route)
    big = b'data: {"choices": [{"delta": {"content": "' + b"x" * (MAX_EVENT_BYTES + 10) + b'"}}]}\n'
    peak = 0
    for i in range(0, len(big), 65536):
        t.feed(big[i : i + 65536])
        peak = max(peak, t.buffered)
    t.feed(b"data: more\n\n")  # still the same (dropped) event
    t.feed(CHAT_STREAM)
    assert peak <= MAX_EVENT_BYTES
    assert t.dropped == 1
    assert t.usage() == Usage(11, 3)
    assert t.output_chars == 11


def test_sse_many_data_lines_count_toward_the_cap() -> None:
    t = SSEUsageTracker(REG.get("openai"), None)
    line = b"data: " + b"y" * 1000 + b"\n"
    for _ in range(MAX_EVENT_BYTES // (len(line) - 8) + 5):  # each counts its value alone
        t.feed(line)
    assert t.buffered <= MAX_EVENT_BYTES
    assert t.dropped == 1
    t.feed(b"\n" + CHAT_STREAM)
    assert t.usage() == Usage(11, 3)


def test_sse_close_flushes_an_unterminated_last_event() -> None:
    t = track(
        "openai", OPENAI_CHAT, [CHAT_STREAM[: CHAT_STREAM.index(b"data: [DONE]")].rstrip(b"\n")]
    )
    assert t.usage() is None
    t.close()
    assert t.usage() == Usage(11, 3)


@pytest.mark.parametrize(
    ("provider", "where", "stream", "input_hint", "expected"),
    [
        pytest.param(
            "openai",
            OPENAI_CHAT,
            CHAT_STREAM[: CHAT_STREAM.index(b'data: {"choices": []')],
            40,
            Usage(40, 3, True),
            id="openai-cut-before-usage",
        ),
        pytest.param("openai", OPENAI_CHAT, b"", 0, Usage(0, 0, True), id="nothing"),
        pytest.param(
            "openai",
            OPENAI_CHAT,
            sse((None, {"choices": [{"delta": {"content": "a"}}]})),
            5,
            Usage(5, 1, True),
            id="at-least-one-token",
        ),
        pytest.param(
            "anthropic",
            ANTHROPIC,
            ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: message_delta")],
            99,
            Usage(30, 2, True),
            id="anthropic-cut-input-from-message-start",
        ),
    ],
)
def test_sse_estimate(
    provider: str, where: tuple[str, str, str], stream: bytes, input_hint: int, expected: Usage
) -> None:
    t = track(provider, where, [stream])
    assert t.usage() is None
    assert t.estimate(input_hint) == expected
    assert t.estimate(input_hint).output_tokens == math.ceil(t.output_chars / 4)


def test_sse_tool_call_arguments_count_as_output() -> None:
    stream = sse(
        (
            None,
            {
                "choices": [
                    {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}}
                ]
            },
        ),
        (
            None,
            {
                "choices": [
                    {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}}
                ]
            },
        ),
    )
    t = track("openai", OPENAI_CHAT, [stream])
    assert t.output_chars == 8


def test_sse_groq_usage_in_x_groq() -> None:
    stream = sse(
        (None, {"choices": [], "x_groq": {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}})
    )
    t = SSEUsageTracker(REG.get("groq"), None)
    t.feed(stream)
    assert t.usage() == Usage(3, 4)
