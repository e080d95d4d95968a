"""Providers as data: the built-in list and tenant-declared OpenAI-compatible endpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiid_proxy.errors import ConfigError
from aiid_proxy.providers import Registry


def load(tmp_path: Path, text: str) -> Registry:
    f = tmp_path / "providers.yaml"
    f.write_text(text)
    return Registry.load(f)


GEMINI_PATH = "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
AZURE_PATH = "/openai/deployments/d1/chat/completions"


@pytest.mark.parametrize(
    ("host", "path", "provider", "header", "region"),
    [
        pytest.param("api.openai.com", "/v1/chat/completions", "openai", "authorization", "us"),
        pytest.param("api.anthropic.com", "/v1/messages", "anthropic", "x-api-key", "us"),
        pytest.param("r.openai.azure.com", AZURE_PATH, "azure-openai", "api-key", None),
        pytest.param(
            "generativelanguage.googleapis.com", GEMINI_PATH, "gemini", "x-goog-api-key", None
        ),
        pytest.param("api.mistral.ai", "/v1/chat/completions", "mistral", "authorization", "eu"),
        pytest.param("api.groq.com", "/openai/v1/chat/completions", "groq", "authorization", "us"),
        pytest.param(
            "openrouter.ai", "/api/v1/chat/completions", "openrouter", "authorization", "us"
        ),
    ],
    ids=["openai", "anthropic", "azure", "gemini", "mistral", "groq", "openrouter"],
)
def test_builtin_providers(
    host: str, path: str, provider: str, header: str, region: str | None
) -> None:
    m = Registry.builtin().match(host, "POST", path)
    assert m is not None and m.route is not None
    assert (m.provider.name, m.provider.auth_header, m.provider.region) == (
        provider,
        header,
        region,
    )


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        pytest.param(None, "/v1/chat/completions", id="default-v1"),
        pytest.param("/openai/v1", "/openai/v1/chat/completions", id="nested"),
        pytest.param("/", "/chat/completions", id="root"),
    ],
)
def test_openai_compatible_endpoint(tmp_path: Path, base: str | None, expected: str) -> None:
    extra = f"    base_path: {base}\n" if base else ""
    reg = load(
        tmp_path,
        "version: 1\nproviders:\n  acme-llm:\n    openai_compatible: true\n"
        f"    hosts: [llm.acme.example]\n    region: eu\n{extra}",
    )
    p = reg.get("acme-llm")
    assert (p.auth_header, p.auth_scheme, p.usage_format, p.region) == (
        "authorization",
        "Bearer",
        "openai",
        "eu",
    )
    m = reg.match("llm.acme.example", "POST", expected)
    assert m is not None and m.route is not None and m.route.kind == "chat"
    models = reg.match("llm.acme.example", "GET", expected.replace("chat/completions", "models/x"))
    assert models is not None and models.route is not None and models.route.kind == "models"
    assert "openai" in reg  # built-ins stay


def test_openai_compatible_keeps_what_is_given(tmp_path: Path) -> None:
    reg = load(
        tmp_path,
        "providers:\n  acme-llm:\n    openai_compatible: true\n    hosts: [llm.acme.example]\n"
        "    auth: {header: x-api-key, scheme: null}\n"
        "    routes: [{kind: chat, path: /chat}]\n",
    )
    p = reg.get("acme-llm")
    assert p.auth_header == "x-api-key" and [r.path for r in p.routes] == ["/chat"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param("openai_compatible: yes-please", "true or false", id="not-bool"),
        pytest.param("base_path: /v1", "needs openai_compatible", id="base-without-flag"),
        pytest.param("openai_compatible: true\n    base_path: v1", "base_path", id="relative"),
        pytest.param("openai_compatible: true\n    base_path: /v1/", "base_path", id="slash-end"),
        pytest.param(
            "openai_compatible: true\n    hosts: [1.2.3.4]", "not a DNS host name", id="ip-host"
        ),
    ],
)
def test_openai_compatible_errors(tmp_path: Path, spec: str, message: str) -> None:
    text = f"providers:\n  acme-llm:\n    {spec}\n"
    if "hosts" not in spec:
        text += "    hosts: [llm.acme.example]\n"
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert message in str(e.value)


def test_a_declared_host_cannot_take_over_a_builtin_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="claimed by both"):
        load(
            tmp_path,
            "providers:\n  evil:\n    openai_compatible: true\n    hosts: [api.openai.com]\n",
        )
