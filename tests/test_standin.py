"""Direct tests of the provider stand-in (no gateway): the official SDKs and curl against it."""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from standin import (
    DEFAULT_HOSTNAMES,
    DEFAULT_TEXT,
    StandIn,
    prompt_tokens_for,
    received_key,
    standin_text,
)

pytestmark = pytest.mark.timeout(30)

MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[StandIn]:
    with StandIn(tmp_path) as s:
        yield s
        assert s.errors == []


@pytest.fixture
def http(standin: StandIn) -> Iterator[httpx2.Client]:
    with httpx2.Client(verify=standin.ssl_context(), timeout=10) as client:
        yield client


@pytest.fixture
def oai(standin: StandIn, http: httpx2.Client) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=standin.base_url + "/v1", api_key="sk-test", http_client=http, max_retries=0
    )


@pytest.fixture
def ant(standin: StandIn, http: httpx2.Client) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=standin.base_url, api_key="sk-ant-test", http_client=http, max_retries=0
    )


def raw_exchange(s: StandIn, request: bytes, server_hostname: str = "localhost") -> list[bytes]:
    """Send one raw request over TLS; return every recv() result until the server closes."""
    with (
        socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock,
        s.ssl_context().wrap_socket(sock, server_hostname=server_hostname) as tls,
    ):
        tls.sendall(request)
        pieces: list[bytes] = []
        for _ in range(10_000):
            data = tls.recv(65536)
            if not data:
                break
            pieces.append(data)
    return pieces


def dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    for _ in range(10_000):
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, rest = out + rest[:size], rest[size + 2 :]
    raise AssertionError("unterminated chunked body")


# --------------------------------------------------------------------------- TLS


def test_ca_and_server_certificate(standin: StandIn) -> None:
    ca = x509.load_pem_x509_certificate(standin.ca_path.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    leaf = x509.load_pem_x509_certificate(standin.cert_path.read_bytes())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == set(DEFAULT_HOSTNAMES)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert standin.base_url == f"https://localhost:{standin.port}"

    # every SAN verifies (strict X.509 flags on), and the SNI is recorded
    for name in ("api.anthropic.com", "generativelanguage.googleapis.com", "127.0.0.1"):
        request = f"GET /ping HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
        pieces = raw_exchange(standin, request, server_hostname=name)
        assert b"".join(pieces).startswith(b"HTTP/1.1 200 ")
    assert [r.host for r in standin.requests][-3:] == [
        "api.anthropic.com",
        "generativelanguage.googleapis.com",
        "127.0.0.1",
    ]
    assert standin.requests[0].sni == "api.anthropic.com"
    assert standin.requests[2].sni is None  # no SNI for an IP address

    # TLS < 1.2 is refused
    old = standin.ssl_context()
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with (
        socket.create_connection(("127.0.0.1", standin.port), timeout=5) as sock,
        pytest.raises(ssl.SSLError),
    ):
        old.wrap_socket(sock, server_hostname="localhost")


def test_second_standin_in_same_dir_shares_ca(tmp_path: Path) -> None:
    with StandIn(tmp_path) as first, StandIn(tmp_path, hostnames=("localhost",)) as second:
        assert first.ca_path == second.ca_path
        assert first.port != second.port
        ctx = first.ssl_context()  # trusts the shared CA
        with httpx2.Client(verify=ctx) as client:
            assert client.get(first.url("/a")).status_code == 200
            assert client.get(second.url("/b")).status_code == 200


# --------------------------------------------------------------------------- OpenAI


def test_openai_chat_non_stream(standin: StandIn, oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.model == "gpt-4o-mini"
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content == DEFAULT_TEXT
    assert reply.choices[0].finish_reason == "stop"
    rec = standin.last()
    assert rec.method == "POST" and rec.path == "/v1/chat/completions"
    assert rec.host == f"localhost:{standin.port}"
    assert rec.header("Authorization") == "Bearer sk-test"
    assert rec.json()["model"] == "gpt-4o-mini"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == prompt_tokens_for(rec.body) == max(1, len(rec.body) // 16)
    assert reply.usage.completion_tokens == 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5
    assert standin.hits("/v1/chat") == 1 and standin.hits("/v1/embeddings") == 0


def test_openai_chat_stream(standin: StandIn, oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    body = standin.last().body
    assert [c.object for c in chunks] == ["chat.completion.chunk"] * 7
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_TEXT
    assert chunks[5].choices[0].finish_reason == "stop"
    assert chunks[6].choices == []
    usage = chunks[6].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens_for(body), 5)

    # without include_usage, or with x-standin-usage: 0, there is no usage chunk
    plain = list(oai.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert len(plain) == 6 and all(c.usage is None for c in plain)
    off = list(
        oai.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-standin-usage": "0"},
        )
    )
    assert len(off) == 6 and all(c.usage is None for c in off)


def test_openai_chat_stream_wire_format(standin: StandIn, http: httpx2.Client) -> None:
    with http.stream(
        "POST",
        standin.url("/v1/chat/completions"),
        json={"model": "m", "messages": [], "stream": True},
        headers={"Authorization": "Bearer sk-wire", "x-standin-events": "2"},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["transfer-encoding"] == "chunked"
        raw = b"".join(resp.iter_raw())
    events = raw.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    assert all(e.startswith(b"data: ") for e in events[:-1])
    assert json.loads(events[1][6:])["choices"][0]["delta"] == {"content": " from"}


def test_openai_responses(standin: StandIn, oai: openai.OpenAI) -> None:
    reply = oai.responses.create(model="gpt-4.1", input="Say hello")
    assert reply.output_text == DEFAULT_TEXT
    assert reply.status == "completed" and reply.model == "gpt-4.1"
    assert reply.usage is not None
    assert reply.usage.input_tokens == prompt_tokens_for(standin.last().body)
    assert reply.usage.output_tokens == 5

    events = list(
        oai.responses.create(
            model="gpt-4.1", input="hi", stream=True, extra_headers={"x-standin-events": "3"}
        )
    )
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == 3
    assert completed.response.output_text == standin_text(3)

    with oai.responses.stream(model="gpt-4.1", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == DEFAULT_TEXT == final.output_text
    assert final.usage is not None and final.usage.output_tokens == 5


def test_openai_embeddings_and_models(standin: StandIn, oai: openai.OpenAI) -> None:
    # the SDK asks for base64 by default and decodes it
    emb = oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert standin.last().json()["encoding_format"] == "base64"
    assert [d.index for d in emb.data] == [0, 1]
    assert len(emb.data[0].embedding) == 8
    assert (
        emb.usage.prompt_tokens == emb.usage.total_tokens == prompt_tokens_for(standin.last().body)
    )
    floats = oai.embeddings.create(
        model="text-embedding-3-small", input="a", encoding_format="float", dimensions=4
    )
    assert len(floats.data) == 1 and len(floats.data[0].embedding) == 4
    assert all(-1.0 <= v <= 1.0 for v in floats.data[0].embedding)
    raw = base64.b64decode(
        json.loads(
            oai.embeddings.with_raw_response.create(
                model="e", input="x", encoding_format="base64"
            ).text
        )["data"][0]["embedding"]
    )
    assert len(struct.unpack("<8f", raw)) == 8

    models = [m.id for m in oai.models.list()]
    assert "gpt-4o-mini" in models
    assert oai.models.retrieve("gpt-4o").id == "gpt-4o"
    assert standin.connections == 1  # the SDK reused one keep-alive connection


# --------------------------------------------------------------------------- Anthropic


def test_anthropic_messages(standin: StandIn, ant: anthropic.Anthropic) -> None:
    msg = ant.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=MESSAGES)
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.model == "claude-haiku-4-5"
    assert msg.content[0].type == "text" and msg.content[0].text == DEFAULT_TEXT
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    rec = standin.last()
    assert msg.usage.input_tokens == prompt_tokens_for(rec.body)
    assert msg.usage.output_tokens == 5
    assert rec.path == "/v1/messages"
    assert rec.header("anthropic-version") is not None
    # this SDK version sends api_key as a Bearer token, not as x-api-key
    assert rec.header("authorization") == "Bearer sk-ant-test"
    assert received_key(rec.headers) == "sk-ant-test"

    # an explicit x-api-key header (as curl or older SDKs send it) is recorded too
    ant.messages.create(
        model="c", max_tokens=4, messages=MESSAGES, extra_headers={"x-api-key": "sk-ant-x"}
    )
    assert standin.last().header("X-Api-Key") == "sk-ant-x"


def test_anthropic_stream(standin: StandIn, ant: anthropic.Anthropic) -> None:
    with ant.messages.stream(model="claude-sonnet-4-5", max_tokens=16, messages=MESSAGES) as st:
        text = "".join(st.text_stream)
        final = st.get_final_message()
    assert text == DEFAULT_TEXT == final.content[0].text
    assert final.usage.input_tokens == prompt_tokens_for(standin.last().body)
    assert final.usage.output_tokens == 5
    assert final.stop_reason == "end_turn"

    events = list(
        ant.messages.create(
            model="c",
            max_tokens=16,
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-standin-events": "2"},
        )
    )
    # the SDK drops `ping` events itself
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0].type == "message_start"
    assert events[0].message.usage.output_tokens == 1
    assert events[5].type == "message_delta"
    assert events[5].usage.output_tokens == 2

    # x-standin-usage: 0 leaves usage out of message_start and message_delta
    bare = list(
        ant.messages.create(
            model="c",
            max_tokens=16,
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-standin-usage": "0"},
        )
    )
    assert bare[0].type == "message_start" and bare[0].message.usage is None


def test_anthropic_wire_has_ping(standin: StandIn, http: httpx2.Client) -> None:
    resp = http.post(
        standin.url("/v1/messages"),
        json={"model": "c", "max_tokens": 5, "messages": [], "stream": True},
        headers={"x-api-key": "sk-ant-raw", "anthropic-version": "2023-06-01"},
    )
    names = [line[7:] for line in resp.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert received_key(standin.last().headers) == "sk-ant-raw"


# --------------------------------------------------------------------------- control headers


def test_echo_key_errors(
    standin: StandIn, oai: openai.OpenAI, ant: anthropic.Anthropic, http: httpx2.Client
) -> None:
    echo = {"x-standin-echo-key": "1"}
    with pytest.raises(openai.AuthenticationError) as oerr:
        oai.chat.completions.create(model="m", messages=MESSAGES, extra_headers=echo)
    assert oerr.value.status_code == 401
    assert "Incorrect API key provided: sk-test" in oerr.value.message
    assert oerr.value.code == "invalid_api_key"
    assert oerr.value.response.headers["x-echo-key"] == "sk-test"

    with pytest.raises(anthropic.AuthenticationError) as aerr:
        ant.messages.create(model="c", max_tokens=4, messages=MESSAGES, extra_headers=echo)
    assert aerr.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key sk-ant-test"},
    }
    assert aerr.value.response.headers["x-echo-key"] == "sk-ant-test"

    # key extraction order: Bearer, x-api-key, api-key, x-goog-api-key
    for header, key in [("api-key", "azure-k"), ("x-goog-api-key", "goog-k")]:
        resp = http.get(standin.url("/repos/x/y"), headers={**echo, header: key})
        assert resp.status_code == 401 and resp.headers["x-echo-key"] == key
        assert key in resp.json()["error"]["message"]


def test_echo_key_stream_is_split_across_writes(standin: StandIn, oai: openai.OpenAI) -> None:
    key = "sk-live-0123456789abcdef0123456789abcdef"
    body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\nx-standin-echo-key: 1\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    pieces = raw_exchange(standin, request)
    whole = b"".join(pieces)
    head, _, chunked = whole.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"x-echo-key: " + key.encode() in head
    # each TLS record is one recv(): the key never arrives in one piece
    assert not any(key.encode() in p for p in pieces if not p.startswith(b"HTTP/1.1"))
    events = dechunk(chunked).split(b"\n\n")
    second = json.loads(events[1][6:])
    assert second["choices"][0]["delta"]["content"] == " " + key

    # the SDK reassembles it
    stream = oai.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, extra_headers={"x-standin-echo-key": "1"}
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("Echo sk-test")


def test_echo_key_stream_anthropic_and_responses(
    ant: anthropic.Anthropic, oai: openai.OpenAI
) -> None:
    echo = {"x-standin-echo-key": "1"}
    with ant.messages.stream(model="c", max_tokens=8, messages=MESSAGES, extra_headers=echo) as s:
        assert "".join(s.text_stream).startswith("Echo sk-ant-test")
    with oai.responses.stream(model="m", input="hi", extra_headers=echo) as r:
        assert r.get_final_response().output_text.startswith("Echo sk-test")


def test_events_delay_status(
    standin: StandIn, oai: openai.OpenAI, ant: anthropic.Anthropic
) -> None:
    started = time.monotonic()
    chunks = list(
        oai.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-standin-events": "3", "x-standin-delay-ms": "60"},
        )
    )
    assert time.monotonic() - started >= 0.2  # 4 gaps between 5 events
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == standin_text(3)
    many = oai.chat.completions.create(
        model="m", messages=MESSAGES, extra_headers={"x-standin-events": "7"}
    )
    assert many.choices[0].message.content == standin_text(7) == DEFAULT_TEXT + " w6 w7"

    with pytest.raises(openai.InternalServerError) as oerr:
        oai.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-standin-status": "503"}
        )
    assert oerr.value.status_code == 503
    assert oerr.value.type == "server_error"
    with pytest.raises(anthropic.RateLimitError) as aerr:
        ant.messages.create(
            model="c", max_tokens=4, messages=MESSAGES, extra_headers={"x-standin-status": "429"}
        )
    assert aerr.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "stand-in forced status 429"},
    }
    assert standin.hits("/v1/") == 4  # max_retries=0: no retries


def test_generic_route_gzip_and_gemini(standin: StandIn, http: httpx2.Client) -> None:
    resp = http.get(standin.url("/repos/x/y?per_page=1"), headers={"Host": "api.github.com"})
    assert resp.status_code == 200
    assert resp.json() == {
        "ok": True,
        "path": "/repos/x/y?per_page=1",
        "host": "api.github.com",
        "method": "GET",
    }
    with http.stream("GET", standin.url("/x"), headers={"x-standin-gzip": "1"}) as zipped:
        assert zipped.headers["content-encoding"] == "gzip"
        assert json.loads(gzip.decompress(b"".join(zipped.iter_raw())))["ok"] is True

    gem = http.post(
        standin.url("/v1beta/models/gemini-2.0-flash:generateContent"),
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers={"x-goog-api-key": "goog"},
    ).json()
    assert gem["candidates"][0]["content"]["parts"][0]["text"] == DEFAULT_TEXT
    assert gem["usageMetadata"]["candidatesTokenCount"] == 5
    sse = http.post(
        standin.url("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"),
        json={"contents": []},
    ).text
    parts = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: ")]
    assert "".join(p["candidates"][0]["content"]["parts"][0]["text"] for p in parts) == (
        DEFAULT_TEXT
    )
    bad = http.post(standin.url("/v1/chat/completions"), content=b"{not json")
    assert bad.status_code == 400 and "error" in bad.json()


def test_keep_alive_connection_close_and_chunked_body(
    standin: StandIn, http: httpx2.Client
) -> None:
    for _ in range(3):
        assert http.get(standin.url("/v1/models")).status_code == 200
    assert standin.connections == 1

    resp = http.get(standin.url("/v1/models"), headers={"Connection": "close"})
    assert resp.headers["connection"] == "close"
    assert http.get(standin.url("/v1/models")).status_code == 200
    assert standin.connections == 2

    request = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        b"X-Dup: 1\r\nX-Dup: 2\r\nConnection: close\r\n\r\n"
        b'7\r\n{"input\r\n9;ext=1\r\n": "abc"}\r\n0\r\n\r\n'
    )
    whole = b"".join(raw_exchange(standin, request))
    assert whole.startswith(b"HTTP/1.1 200 ")
    rec = standin.last()
    assert rec.body == b'{"input": "abc"}'
    assert rec.header_all("x-dup") == ["1", "2"]
    assert b'"prompt_tokens":1' in whole

    standin.clear()
    assert standin.hits() == 0
    with pytest.raises(LookupError):
        standin.last()


def test_curl(standin: StandIn) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    port = standin.port
    out = subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(standin.ca_path),
            "--resolve",
            f"api.openai.com:{port}:127.0.0.1",
            "-H",
            "Authorization: Bearer sk-curl",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}',
            "-D",
            "-",
            f"https://api.openai.com:{port}/v1/chat/completions",
        ],
        capture_output=True,
        timeout=20,
        check=True,
    ).stdout.decode()
    head, _, body = out.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert json.loads(body)["choices"][0]["message"]["content"] == DEFAULT_TEXT
    rec = standin.last()
    assert rec.host == f"api.openai.com:{port}"
    assert rec.sni == "api.openai.com"
    assert rec.header("authorization") == "Bearer sk-curl"


def test_stop_is_prompt_with_open_connections(tmp_path: Path) -> None:
    s = StandIn(tmp_path)
    s.start()
    idle = httpx2.Client(verify=s.ssl_context())
    slow = httpx2.Client(verify=s.ssl_context())
    try:
        assert idle.get(s.url("/")).status_code == 200  # leaves a keep-alive connection
        with slow.stream(
            "POST",
            s.url("/v1/chat/completions"),
            json={"model": "m", "messages": [], "stream": True},
            headers={"x-standin-events": "50", "x-standin-delay-ms": "1000"},
        ) as resp:
            next(resp.iter_raw())
            started = time.monotonic()
            s.stop()
            assert time.monotonic() - started < 2
        s.stop()  # idempotent
        with pytest.raises(httpx2.ConnectError):
            httpx2.get(s.url("/"), verify=s.ssl_context())
    finally:
        idle.close()
        slow.close()
        s.stop()
