"""A local HTTPS stand-in for the LLM providers, for end-to-end tests.

`StandIn` is a small TLS HTTP/1.1 server on 127.0.0.1 (random port) that answers with the
shapes of the real provider APIs, so that the official `openai` and `anthropic` SDKs (and curl)
parse its replies, and records every request it receives.

    with StandIn(tmp_path) as s:
        client = openai.OpenAI(
            base_url=s.base_url + "/v1",
            api_key="sk-test",
            http_client=httpx2.Client(verify=s.ssl_context()),
        )
        client.chat.completions.create(model="gpt-4o-mini", messages=[...])
        assert s.last().header("authorization") == "Bearer sk-test"

Routes:
- `POST /v1/chat/completions` (OpenAI chat, stream or not), `POST /v1/responses` (OpenAI
  Responses API, stream or not), `POST /v1/embeddings`, `GET /v1/models[/ID]`;
- `POST /v1/messages` (Anthropic Messages, stream or not);
- `POST /v1beta/models/M:generateContent` and `:streamGenerateContent[?alt=sse]` (Gemini);
- anything else: 200 `{"ok": true, "path": ..., "host": ..., "method": ...}`.

Control request headers (all optional):
- `x-standin-echo-key: 1`: echo the received credential: 401 provider-shaped error naming it and a
  response header `x-echo-key: <key>`; with a streaming request instead a 200 stream whose second
  text event carries the key, written as two TCP writes (HTTP chunks) split inside the key.
  `x-standin-echo-key: spelled`: as 1, but a stream spells the key over three text events.
  `x-standin-echo-key: escaped`: as 1, but the key is written in JSON `\\uXXXX` escapes in
  the body or stream (the `x-echo-key` header stays plain).
- `x-standin-events: N`: number of text pieces (default 5, 1..10000); also for non-stream replies.
- `x-standin-delay-ms: D`: pause between streamed events (default 0, capped at 1000).
- `x-standin-status: S`: reply with status S (200..599); >= 400 gives a provider-shaped error body.
- `x-standin-usage: 0`: no usage anywhere (streams omit their usage chunk; bodies omit `usage`).
- `x-standin-gzip: 1`: non-stream bodies are sent gzip-compressed (`Content-Encoding: gzip`).

Token counts are deterministic: prompt/input tokens = max(1, len(raw request body) // 16),
completion/output tokens = the number of text pieces.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import gzip
import hashlib
import ipaddress
import json
import re
import secrets
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_EVENTS",
    "DEFAULT_HOSTNAMES",
    "DEFAULT_TEXT",
    "Recorded",
    "StandIn",
    "prompt_tokens_for",
    "received_key",
    "standin_text",
    "standin_words",
]

DEFAULT_HOSTNAMES: tuple[str, ...] = (
    "localhost",
    "api.openai.com",
    "api.anthropic.com",
    "api.github.com",
    "api.mistral.ai",
    "generativelanguage.googleapis.com",
)
DEFAULT_TEXT = "Hello from the stand-in"
DEFAULT_EVENTS = 5
_BASE_WORDS = ("Hello", " from", " the", " stand", "-in")  # joins to DEFAULT_TEXT
MAX_EVENTS = 10_000
MAX_DELAY_MS = 1000
MAX_BODY = 64 * 1024 * 1024
IDLE_TIMEOUT = 10.0  # seconds a keep-alive connection may sit idle
HANDSHAKE_TIMEOUT = 5.0
SPLIT_PAUSE = 0.03  # seconds between the two halves of a split event
CA_FILE = "standin-ca.pem"
CA_KEY_FILE = "standin-ca-key.pem"

_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_GEMINI_ROUTE = re.compile(
    r"^/v1(?:beta|alpha)?/models/([^/:?]+):(generateContent|streamGenerateContent)"
)


# --------------------------------------------------------------------------- helpers


def standin_words(n: int = DEFAULT_EVENTS) -> list[str]:
    """The text pieces the stand-in sends: n=5 joins to DEFAULT_TEXT; more add " w6", " w7"..."""
    n = max(1, min(MAX_EVENTS, n))
    return [_BASE_WORDS[i] if i < len(_BASE_WORDS) else f" w{i + 1}" for i in range(n)]


def standin_text(n: int = DEFAULT_EVENTS) -> str:
    return "".join(standin_words(n))


def prompt_tokens_for(body: bytes) -> int:
    return max(1, len(body) // 16)


def received_key(headers: Iterable[tuple[str, str]]) -> str | None:
    """The credential a provider would read: Bearer, else x-api-key, api-key, x-goog-api-key."""
    found: dict[str, str] = {}
    for name, value in headers:
        found.setdefault(name.lower(), value)
    auth = found.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        if name in found:
            return found[name].strip()
    return None


def _now() -> int:
    return int(time.time())


def _uid(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class Recorded:
    method: str
    path: str  # with the query string
    host: str  # the Host header ("" when absent)
    headers: list[tuple[str, str]]  # all of them, in order, repeats kept, names as received
    body: bytes  # decoded from chunked framing when it was chunked
    at: float  # time.time() when the request was complete
    sni: str | None = None  # the TLS server name the client sent

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def json(self) -> Any:
        return json.loads(self.body)


# --------------------------------------------------------------------------- certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _build_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "aiid-proxy stand-in test CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aiid-proxy tests"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _load_or_build_ca(workdir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """One CA per workdir: a second StandIn in the same directory shares (and keeps) it."""
    ca_path, key_path = workdir / CA_FILE, workdir / CA_KEY_FILE
    if ca_path.is_file() and key_path.is_file():
        cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return cert, key
    cert, key = _build_ca()
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _build_leaf(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hostnames: Sequence[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    sans: list[x509.GeneralName] = []
    ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for host in hostnames:
        try:
            ips.add(ipaddress.ip_address(host))
        except ValueError:
            sans.append(x509.DNSName(host))
    ips.add(ipaddress.ip_address("127.0.0.1"))
    sans.extend(x509.IPAddress(ip) for ip in sorted(ips, key=str))
    common_name = next((h for h in hostnames if h), "localhost")
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


# --------------------------------------------------------------------------- replies


@dataclass
class _Controls:
    echo: bool
    echo_mode: str  # "1", "spelled" or "escaped" when echo
    events: int
    delay: float  # seconds
    status: int | None
    usage: bool
    gzip: bool
    key: str | None


def _int_header(value: str | None, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    try:
        return max(low, min(high, int(value.strip())))
    except ValueError:
        return default


def _controls(rec: Recorded) -> _Controls:
    status_raw = rec.header("x-standin-status")
    status = _int_header(status_raw, 0, 200, 599) if status_raw is not None else None
    return _Controls(
        echo=(rec.header("x-standin-echo-key") or "").strip() not in ("", "0"),
        echo_mode=(rec.header("x-standin-echo-key") or "").strip().lower(),
        events=_int_header(rec.header("x-standin-events"), DEFAULT_EVENTS, 1, MAX_EVENTS),
        delay=_int_header(rec.header("x-standin-delay-ms"), 0, 0, MAX_DELAY_MS) / 1000.0,
        status=status or None,
        usage=(rec.header("x-standin-usage") or "1").strip() != "0",
        gzip=(rec.header("x-standin-gzip") or "").strip() not in ("", "0"),
        key=received_key(rec.headers),
    )


@dataclass
class _Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    events: list[bytes] | None = None  # a chunked stream, one flushed write per event
    split: dict[int, int] | None = None  # event index -> byte offset of a second write
    delay: float = 0.0  # seconds between events


def _flavour(rec: Recorded) -> str:
    path = rec.path.split("?", 1)[0]
    host = rec.host.split(":", 1)[0].lower()
    if (
        path.startswith(("/v1/messages", "/v1/complete"))
        or host == "api.anthropic.com"
        or rec.header("anthropic-version") is not None
    ):
        return "anthropic"
    if _GEMINI_ROUTE.match(path) or host == "generativelanguage.googleapis.com":
        return "google"
    return "openai"


def _id_headers(flavour: str) -> list[tuple[str, str]]:
    rid = _uid("req_")
    if flavour == "anthropic":
        return [("request-id", rid)]
    if flavour == "google":
        return []
    return [("x-request-id", rid), ("openai-processing-ms", "1")]


def _error_body(flavour: str, status: int, message: str) -> bytes:
    if flavour == "anthropic":
        etype = _ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        return _dumps({"type": "error", "error": {"type": etype, "message": message}})
    if flavour == "google":
        gstatus = _GOOGLE_STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
        return _dumps({"error": {"code": status, "message": message, "status": gstatus}})
    etype, code = "invalid_request_error", None
    if status == 401:
        code = "invalid_api_key"
    elif status == 404:
        code = "not_found"
    elif status == 429:
        etype, code = "requests", "rate_limit_exceeded"
    elif status >= 500:
        etype = "server_error"
    return _dumps({"error": {"message": message, "type": etype, "param": None, "code": code}})


def _json_reply(status: int, flavour: str, obj: object) -> _Reply:
    return _Reply(
        status, [("Content-Type", "application/json"), *_id_headers(flavour)], _dumps(obj)
    )


def _error_reply(flavour: str, status: int, message: str) -> _Reply:
    return _Reply(
        status,
        [("Content-Type", "application/json"), *_id_headers(flavour)],
        _error_body(flavour, status, message),
    )


def _echo_error(flavour: str, key: str) -> _Reply:
    if flavour == "anthropic":
        message = f"invalid x-api-key {key}"
    elif flavour == "google":
        message = f"API key not valid. Please pass a valid API key. ({key})"
    else:
        message = (
            f"Incorrect API key provided: {key}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
    reply = _error_reply(flavour, 401, message)
    reply.headers.append(("x-echo-key", key))
    return reply


def _escape_key(reply: _Reply, key: str) -> None:
    """The key in the body or events as JSON ``\\uXXXX`` escapes: the same JSON to a parser."""
    plain = json.dumps(key)[1:-1].encode()
    escaped = "".join(f"\\u{ord(c):04x}" for c in key).encode()
    reply.body = reply.body.replace(plain, escaped)
    if reply.events is not None:
        reply.events = [e.replace(plain, escaped) for e in reply.events]
        reply.split = {}


def _sse(event: str | None, data: object, sep: bytes = b"\n\n") -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + _dumps(data) + sep


def _stream_reply(flavour: str, events: list[bytes]) -> _Reply:
    headers = [
        ("Content-Type", "text/event-stream; charset=utf-8"),
        ("Cache-Control", "no-cache"),
        *_id_headers(flavour),
    ]
    return _Reply(200, headers, events=events)


def _words(ctl: _Controls, stream: bool) -> list[str]:
    words = standin_words(ctl.events)
    if ctl.echo and stream:
        key = ctl.key or "(no key)"
        if ctl.echo_mode == "spelled":
            return ["Echo ", key[:5], key[5:12], key[12:], *words[2:]]
        words = ["Echo", f" {key}", *words[2:]] if len(words) > 1 else ["Echo", f" {key}"]
    return words


def _split_points(events: list[bytes], text_indexes: list[int], ctl: _Controls) -> dict[int, int]:
    """For an echoed stream: split the second text event in the middle of the key."""
    if not (ctl.echo and len(text_indexes) > 1):
        return {}
    index = text_indexes[1]
    data = events[index]
    needle = json.dumps(ctl.key or "(no key)")[1:-1].encode()
    pos = data.find(needle)
    offset = pos + max(1, len(needle) // 2) if pos >= 0 and needle else len(data) // 2
    return {index: offset}


def _chat(model: str, body: bytes, req: dict[str, Any], ctl: _Controls) -> _Reply:
    stream = req.get("stream") is True
    words = _words(ctl, stream)
    prompt, completion = prompt_tokens_for(body), len(words)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    cid, created = _uid("chatcmpl-"), _now()
    if not stream:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(words),
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        if not ctl.usage:
            del obj["usage"]
        return _json_reply(200, "openai", obj)
    options = req.get("stream_options")
    include_usage = ctl.usage and isinstance(options, dict) and options.get("include_usage") is True
    base = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
    }
    chunks: list[dict[str, Any]] = []
    for i, word in enumerate(words):
        delta: dict[str, Any] = {"content": word}
        if i == 0:
            delta = {"role": "assistant", "content": word, "refusal": None}
        chunks.append(
            {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
            }
        )
    chunks.append(
        {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
    )
    if include_usage:
        for chunk in chunks:
            chunk["usage"] = None
        chunks.append({**base, "choices": [], "usage": usage})
    events = [_sse(None, chunk) for chunk in chunks]
    events.append(b"data: [DONE]\n\n")
    reply = _stream_reply("openai", events)
    reply.split = _split_points(events, list(range(len(words))), ctl)
    return reply


def _response_object(
    rid: str, model: str, created: int, status: str, output: list[Any], usage: Any
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def _responses(model: str, body: bytes, req: dict[str, Any], ctl: _Controls) -> _Reply:
    stream = req.get("stream") is True
    words = _words(ctl, stream)
    text = "".join(words)
    prompt, completion = prompt_tokens_for(body), len(words)
    usage = (
        {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
        if ctl.usage
        else None
    )
    rid, mid, created = _uid("resp_"), _uid("msg_"), _now()
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {
        "id": mid,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }
    if not stream:
        obj = _response_object(rid, model, created, "completed", [item], usage)
        if usage is None:
            del obj["usage"]
        return _json_reply(200, "openai", obj)
    seq = 0
    events: list[bytes] = []
    text_indexes: list[int] = []

    def emit(etype: str, **fields: Any) -> None:
        nonlocal seq
        events.append(_sse(etype, {"type": etype, "sequence_number": seq, **fields}))
        seq += 1

    pending = _response_object(rid, model, created, "in_progress", [], None)
    emit("response.created", response=pending)
    emit("response.in_progress", response=pending)
    emit(
        "response.output_item.added",
        output_index=0,
        item={**item, "status": "in_progress", "content": []},
    )
    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    emit("response.content_part.added", **where, part={**part, "text": ""})
    for word in words:
        text_indexes.append(len(events))
        emit("response.output_text.delta", **where, delta=word, logprobs=[])
    emit("response.output_text.done", **where, text=text, logprobs=[])
    emit("response.content_part.done", **where, part=part)
    emit("response.output_item.done", output_index=0, item=item)
    emit(
        "response.completed",
        response=_response_object(rid, model, created, "completed", [item], usage),
    )
    reply = _stream_reply("openai", events)
    reply.split = _split_points(events, text_indexes, ctl)
    return reply


def _embedding_vector(text: str, index: int, dims: int) -> list[float]:
    digest = b""
    counter = 0
    while len(digest) < dims:
        digest += hashlib.sha256(f"{counter}:{index}:{text}".encode()).digest()
        counter += 1
    return [round(b / 127.5 - 1.0, 6) for b in digest[:dims]]


def _embeddings(model: str, body: bytes, req: dict[str, Any], ctl: _Controls) -> _Reply:
    raw = req.get("input", "")
    inputs: list[Any]
    if isinstance(raw, list) and raw and not all(isinstance(x, int) for x in raw):
        inputs = list(raw)
    else:
        inputs = [raw]
    dims = req.get("dimensions")
    size = max(1, min(64, dims)) if isinstance(dims, int) else 8
    as_base64 = req.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(inputs[:2048]):
        vector = _embedding_vector(json.dumps(item), i, size)
        embedding: Any = vector
        if as_base64:
            embedding = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    prompt = prompt_tokens_for(body)
    obj: dict[str, Any] = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }
    if not ctl.usage:
        del obj["usage"]
    return _json_reply(200, "openai", obj)


def _messages(model: str, body: bytes, req: dict[str, Any], ctl: _Controls) -> _Reply:
    stream = req.get("stream") is True
    words = _words(ctl, stream)
    prompt, completion = prompt_tokens_for(body), len(words)
    mid = _uid("msg_")
    usage: dict[str, Any] = {
        "input_tokens": prompt,
        "output_tokens": completion,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    message: dict[str, Any] = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "".join(words)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    if not stream:
        if not ctl.usage:
            del message["usage"]
        return _json_reply(200, "anthropic", message)
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    if not ctl.usage:
        del start["usage"]
    events = [
        _sse("message_start", {"type": "message_start", "message": start}),
        _sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        _sse("ping", {"type": "ping"}),
    ]
    text_indexes = []
    for word in words:
        text_indexes.append(len(events))
        events.append(
            _sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": word},
                },
            )
        )
    events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": completion},
    }
    if not ctl.usage:
        del delta["usage"]
    events.append(_sse("message_delta", delta))
    events.append(_sse("message_stop", {"type": "message_stop"}))
    reply = _stream_reply("anthropic", events)
    reply.split = _split_points(events, text_indexes, ctl)
    return reply


def _gemini(model: str, body: bytes, method: str, query: str, ctl: _Controls) -> _Reply:
    stream = method == "streamGenerateContent"
    words = _words(ctl, stream)
    prompt, completion = prompt_tokens_for(body), len(words)
    usage = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": completion,
        "totalTokenCount": prompt + completion,
    }

    def chunk(text: str, last: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": text}], "role": "model"},
            "index": 0,
        }
        obj: dict[str, Any] = {"candidates": [candidate], "modelVersion": model}
        if last:
            candidate["finishReason"] = "STOP"
            if ctl.usage:
                obj["usageMetadata"] = usage
        return obj

    if not stream:
        return _json_reply(200, "google", chunk("".join(words), True))
    chunks = [chunk(w, i == len(words) - 1) for i, w in enumerate(words)]
    if "alt=sse" not in query:
        return _json_reply(200, "google", chunks)
    events = [_sse(None, c, b"\r\n\r\n") for c in chunks]
    reply = _stream_reply("google", events)
    reply.split = _split_points(events, list(range(len(events))), ctl)
    return reply


_OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
_ANTHROPIC_MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5")


def _models(flavour: str, path: str) -> _Reply:
    rest = path[len("/v1/models") :].strip("/")
    entries: list[dict[str, Any]]
    if flavour == "anthropic":
        entries = [
            {
                "type": "model",
                "id": m,
                "display_name": m,
                "created_at": "2025-01-01T00:00:00Z",
            }
            for m in _ANTHROPIC_MODELS
        ]
    else:
        entries = [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "openai"}
            for m in _OPENAI_MODELS
        ]
    if rest:
        for entry in entries:
            if entry["id"] == rest:
                return _json_reply(200, flavour, entry)
        return _error_reply(flavour, 404, f"The model '{rest}' does not exist")
    if flavour == "anthropic":
        listing: dict[str, Any] = {
            "data": entries,
            "has_more": False,
            "first_id": entries[0]["id"],
            "last_id": entries[-1]["id"],
        }
    else:
        listing = {"object": "list", "data": entries}
    return _json_reply(200, flavour, listing)


_JSON_ROUTES = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/messages")


def _respond(rec: Recorded) -> _Reply:
    ctl = _controls(rec)
    flavour = _flavour(rec)
    path, _, query = rec.path.partition("?")
    gemini = _GEMINI_ROUTE.match(path)
    json_route = rec.method == "POST" and (path in _JSON_ROUTES or gemini is not None)
    req: dict[str, Any] = {}
    if json_route:
        try:
            parsed = json.loads(rec.body or b"null")
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            return _error_reply(flavour, 400, "We could not parse the JSON body of your request.")
        req = parsed
    streaming = req.get("stream") is True or (
        gemini is not None and gemini.group(2) == "streamGenerateContent"
    )
    if ctl.echo and not (streaming and json_route):
        reply = _echo_error(flavour, ctl.key or "")
        if ctl.echo_mode == "escaped" and ctl.key:
            _escape_key(reply, ctl.key)
        if ctl.status is not None:
            reply.status = ctl.status
        return reply
    if ctl.status is not None and ctl.status >= 400:
        return _error_reply(flavour, ctl.status, f"stand-in forced status {ctl.status}")
    model = req.get("model")
    model = model if isinstance(model, str) else "stand-in-model"
    if rec.method == "POST" and path == "/v1/chat/completions":
        reply = _chat(model, rec.body, req, ctl)
    elif rec.method == "POST" and path == "/v1/responses":
        reply = _responses(model, rec.body, req, ctl)
    elif rec.method == "POST" and path == "/v1/embeddings":
        reply = _embeddings(model, rec.body, req, ctl)
    elif rec.method == "POST" and path == "/v1/messages":
        reply = _messages(model, rec.body, req, ctl)
    elif rec.method == "POST" and gemini is not None:
        reply = _gemini(gemini.group(1), rec.body, gemini.group(2), query, ctl)
    elif rec.method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")):
        reply = _models(flavour, path)
    else:
        obj = {"ok": True, "path": rec.path, "host": rec.host, "method": rec.method}
        reply = _json_reply(200, flavour, obj)
    if ctl.echo:
        reply.headers.append(("x-echo-key", ctl.key or ""))
    if ctl.echo and ctl.echo_mode == "escaped" and ctl.key:
        _escape_key(reply, ctl.key)
    if ctl.status is not None:
        reply.status = ctl.status
    reply.delay = ctl.delay
    if ctl.gzip and reply.events is None and reply.body:
        reply.body = gzip.compress(reply.body, mtime=0)
        reply.headers.append(("Content-Encoding", "gzip"))
    return reply


# --------------------------------------------------------------------------- server


class _BadRequest(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "standin/1"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def _owner(self) -> StandIn:
        return cast(_Server, self.server).owner

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length.strip())
        except ValueError:
            raise _BadRequest("bad Content-Length") from None
        if n < 0 or n > MAX_BODY:
            raise _BadRequest("bad Content-Length")
        data = self.rfile.read(n)
        if len(data) != n:
            raise _BadRequest("short body")
        return data

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        for _ in range(1_000_000):
            line = self.rfile.readline(1026)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            if size == 0:
                for _ in range(100):  # trailers
                    if self.rfile.readline(8192) in (b"\r\n", b"\n", b""):
                        break
                return b"".join(parts)
            total += size
            if size < 0 or total > MAX_BODY:
                raise _BadRequest("body too large")
            data = self.rfile.read(size)
            if len(data) != size or self.rfile.read(2) != b"\r\n":
                raise _BadRequest("bad chunk")
            parts.append(data)
        raise _BadRequest("too many chunks")

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
        except _BadRequest as exc:
            self.close_connection = True
            self._send(_Reply(400, [("Content-Type", "text/plain")], str(exc).encode()))
            return
        rec = Recorded(
            method=self.command,
            path=self.path,
            host=self.headers.get("Host") or "",
            headers=[(k, str(v)) for k, v in self.headers.items()],
            body=body,
            at=time.time(),
            sni=getattr(self.connection, "standin_sni", None),
        )
        self._owner._record(rec)
        self._send(_respond(rec))

    def _send(self, reply: _Reply) -> None:
        try:
            self.send_response(reply.status)
            for name, value in reply.headers:
                self.send_header(name, value)
            if reply.events is not None:
                self.send_header("Transfer-Encoding", "chunked")
            elif reply.status not in (204, 304):
                self.send_header("Content-Length", str(len(reply.body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            if reply.events is None:
                if reply.status not in (204, 304):
                    self.wfile.write(reply.body)
                return
            self._stream(reply.events, reply.split or {}, reply.delay)
        except OSError:
            self.close_connection = True

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, events: list[bytes], split: dict[int, int], delay: float) -> None:
        stopping = self._owner._stopping
        for i, event in enumerate(events):
            if i and delay and stopping.wait(delay):
                self.close_connection = True
                return
            if stopping.is_set():
                self.close_connection = True
                return
            offset = split.get(i)
            if offset is not None and 0 < offset < len(event):
                self._write_chunk(event[:offset])
                time.sleep(SPLIT_PAUSE)
                self._write_chunk(event[offset:])
            else:
                self._write_chunk(event)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, owner: StandIn) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), a reverse DNS lookup.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "localhost"
        self.server_port = self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        self.owner._serve_connection(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.owner._note_error()


class StandIn:
    """A local HTTPS stand-in for the providers. See the module docstring."""

    def __init__(
        self,
        workdir: Path,
        hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hostnames = tuple(hostnames)
        ca_cert, ca_key = _load_or_build_ca(self.workdir)
        leaf, leaf_key = _build_leaf(ca_cert, ca_key, self.hostnames)
        self.ca_path: Path = self.workdir / CA_FILE
        tag = secrets.token_hex(4)
        self.cert_path: Path = self.workdir / f"standin-server-{tag}.pem"
        self.key_path: Path = self.workdir / f"standin-server-{tag}-key.pem"
        self.cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        self.key_path.write_bytes(
            leaf_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.key_path.chmod(0o600)

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sni_callback = self._on_sni
        self._ctx = ctx

        self.requests: list[Recorded] = []
        self.errors: list[str] = []  # tracebacks of unexpected handler failures
        self.connections = 0  # TLS connections accepted (handshake done), for keep-alive checks
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conns: set[ssl.SSLSocket] = set()
        self._threads: set[threading.Thread] = set()
        self._serve_thread: threading.Thread | None = None
        self._closed = False
        self._server = _Server(self)  # binds and listens on 127.0.0.1:0 now
        self.port: int = int(self._server.server_address[1])
        self.base_url: str = f"https://localhost:{self.port}"

    # -- lifecycle

    def start(self) -> None:
        if self._closed:
            raise RuntimeError("StandIn was stopped; make a new one")
        if self._serve_thread is not None:
            return
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"standin-{self.port}",
            daemon=True,
        )
        self._serve_thread.start()

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._serve_thread is not None:
            self._server.shutdown()
            self._serve_thread.join(5)
        self._server.server_close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)  # bypass SSLSocket.shutdown
        deadline = time.monotonic() + 5
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> StandIn:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- conveniences

    def url(self, path: str = "/", host: str = "localhost") -> str:
        return f"https://{host}:{self.port}{path}"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only the stand-in CA (strict X.509 checks on)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        return ctx

    # -- recorded requests

    def hits(self, path_prefix: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path.startswith(path_prefix))

    def last(self) -> Recorded:
        with self._lock:
            if not self.requests:
                raise LookupError("the stand-in has received no request")
            return self.requests[-1]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- internals

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    def _note_error(self) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # includes ssl.SSLError, resets, timeouts
            return
        with self._lock:
            self.errors.append(traceback.format_exc())

    def _on_sni(self, sock: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        with contextlib.suppress(AttributeError):
            sock.standin_sni = server_name

    def _serve_connection(self, raw: socket.socket, client_address: Any) -> None:
        me = threading.current_thread()
        raw.settimeout(HANDSHAKE_TIMEOUT)
        try:
            conn = self._ctx.wrap_socket(raw, server_side=True)
        except OSError:
            raw.close()
            return
        with self._lock:
            self._conns.add(conn)
            self._threads.add(me)
            self.connections += 1
        try:
            if not self._stopping.is_set():
                _Handler(conn, client_address, self._server)
        except OSError:
            pass
        except Exception:
            self._note_error()
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(me)
            with contextlib.suppress(OSError, ValueError):
                conn.setblocking(False)
                conn.unwrap()  # sends close_notify; does not wait for the peer's
            conn.close()
