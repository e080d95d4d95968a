"""What the gateway reads from and writes to the wire, without state: the agent token among
the credential headers, paths and hosts a server could read otherwise than the policy, the
refusal body and the rate-limit headers."""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote

from aiid_proxy.errors import RequestRefused
from aiid_proxy.gateway.flow import Target
from aiid_proxy.providers import CREDENTIAL_HEADERS
from aiid_proxy.ratelimit import RateDecision

TOKEN_HEADERS = tuple(h for h in CREDENTIAL_HEADERS if h != "proxy-authorization")


def refusal_body(refusal: RequestRefused, request_id: str) -> bytes:
    return json.dumps(
        {
            "type": "error",
            "error": {
                "type": refusal.type,
                "message": refusal.message,
                "rule": refusal.rule,
                "request_id": request_id,
            },
        }
    ).encode()


def unauthenticated(message: str) -> RequestRefused:
    return RequestRefused(401, "unauthenticated", message)


def token_from_value(name: str, value: str) -> str:
    value = value.strip()
    if name in ("authorization", "proxy-authorization"):
        scheme, _, rest = value.partition(" ")
        scheme = scheme.lower()
        rest = rest.strip()
        if scheme == "bearer":
            return rest
        if scheme == "basic":
            try:
                decoded = base64.b64decode(rest, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                raise unauthenticated("malformed Basic credentials") from None
            _, sep, password = decoded.partition(":")
            return password if sep else decoded
        # never quote the value: a scheme-less header is the credential itself
        raise unauthenticated("unsupported authorization scheme (use Bearer or Basic)")
    return value


def extract_token(headers: Iterable[tuple[str, str]], connection_token: str | None) -> str:
    """Find the agent token among the request's credential headers.

    ``Proxy-Authorization`` (on the request, or on the CONNECT that opened the connection)
    identifies the agent and the SDK's own key headers are then ignored. Otherwise every
    token-bearing header must carry the same token: two different values are ambiguous and
    refused.
    """
    proxy: list[str] = []
    others: list[tuple[str, str]] = []
    for name, value in headers:
        lname = name.lower()
        if lname == "proxy-authorization":
            proxy.append(token_from_value(lname, value))
        elif lname in TOKEN_HEADERS:
            others.append((lname, value))
    if connection_token is not None:
        proxy.append(connection_token)
    # An empty one is no token ("http://agent@gateway": a user name and no password): the
    # API key may then carry it ([AL]).
    proxy = [p for p in proxy if p]
    # with a proxy token the SDK's key headers may hold anything: they are not even parsed
    chosen = proxy if proxy else [token_from_value(n, v) for n, v in others]
    distinct = set(chosen)
    if not distinct or distinct == {""}:
        raise unauthenticated("no agent token: send it as the API key or as Proxy-Authorization")
    if len(distinct) > 1:
        raise unauthenticated("conflicting credentials: more than one distinct token sent")
    return distinct.pop()


@functools.lru_cache(maxsize=4096)  # a pure function of the host, asked on every request
def is_ip_literal(host: str) -> bool:
    h = host.strip("[]")
    if h.endswith(".") and not h.endswith(".."):
        h = h[:-1]  # "127.0.0.1." is the same address to resolvers that accept it
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        pass
    # inet_aton-style shorthands that resolvers accept: 127.1, 0x7f.1, 2130706433
    parts = h.split(".")
    return all(p and (p.isdigit() or p.lower().startswith("0x")) for p in parts)


# Headers some servers honour to change the method or the URL after the gateway decided.
OVERRIDE_HEADERS = (
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
)
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_PCT_U = re.compile(r"%[uU][0-9A-Fa-f]{4}")
_METHOD = re.compile(r"[A-Z]{1,20}")


def path_problem(path: str) -> str | None:
    """Why a server could route ``path`` (no query) elsewhere than the policy read it, or None.

    Refused: anything but origin-form printable ASCII, ``#`` and ``\\``; percent-encoded
    unreserved characters (``%2e``, ``%69``: a server decodes them, the policy would not);
    ``.``/``..`` segments (also ``..;`` and after up to three rounds of percent-decoding,
    which catches ``%252e`` and ``..%2f``); ``;`` (some servers cut a segment's parameters
    there: ``/deployments/mini;x`` or ``/models/gpt-4o;x`` would name another model than the
    policy read), also percent-encoded; invalid UTF-8 or controls once decoded.
    """
    if not path.startswith("/"):
        return "must be an absolute path"
    if not path.isascii() or not path.isprintable() or " " in path or "#" in path:
        return "contains spaces, '#', control or non-ASCII characters"
    if "\\" in path:
        return "contains a backslash"
    if any(chr(int(h, 16)) in _UNRESERVED for h in _PCT.findall(path)):
        return "percent-encodes a character that needs no encoding"

    text = path
    for _ in range(4):  # the path as sent, then after each of up to three decodings
        for seg in text.replace("\\", "/").split("/"):
            if seg.split(";", 1)[0] in (".", ".."):
                return "contains '.' or '..' segments"
        if ";" in text:
            return "contains ';' (a server may cut the path there)"
        if _PCT_U.search(text):  # IIS reads %u0061 as "a" (also once decoded: %25u0061)
            return "contains a %u escape"
        if any(c < " " or c == "\x7f" for c in text):
            return "contains control characters once decoded"
        try:
            decoded = unquote(text, errors="strict")
        except UnicodeDecodeError:
            return "does not decode as UTF-8"
        if decoded == text:
            break
        text = decoded
    return None


def ratelimit_headers(d: RateDecision, *, refused: bool) -> dict[str, str]:
    h: dict[str, str] = {}
    if refused:
        h["retry-after"] = str(max(1, d.retry_after))
    if d.limit_requests is not None:
        h["x-ratelimit-limit-requests"] = str(d.limit_requests)
    if d.remaining_requests is not None:
        h["x-ratelimit-remaining-requests"] = str(max(0, d.remaining_requests))
    if d.reset_requests_s is not None:
        h["x-ratelimit-reset-requests"] = f"{d.reset_requests_s:.3f}s"
    if d.limit_tokens is not None:
        h["x-ratelimit-limit-tokens"] = str(d.limit_tokens)
    if d.remaining_tokens is not None:
        h["x-ratelimit-remaining-tokens"] = str(max(0, d.remaining_tokens))
    if d.reset_tokens_s is not None:
        h["x-ratelimit-reset-tokens"] = f"{d.reset_tokens_s:.3f}s"
    return h


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def refuse_target(t: Target, headers: Mapping[str, str]) -> None:
    """Refuse what no rule may allow, whatever the policy says: protocol upgrades, CONNECT
    inside a tunnel, raw IP addresses, anything but https on port 443, a Host that is not the
    CONNECT target or the TLS SNI, a path a server could read otherwise than the policy does,
    and headers that ask a server to change the method or the URL. ``headers`` lowercase."""
    if headers.get("upgrade") or "upgrade" in headers.get("connection", "").lower():
        raise RequestRefused(
            403, "policy_denied", "protocol upgrades (WebSocket) are not allowed", "default"
        )
    if t.method.upper() == "CONNECT":
        raise RequestRefused(403, "policy_denied", "CONNECT inside a tunnel", "default")
    if _METHOD.fullmatch(t.method) is None:
        # methods are case-sensitive: rules match GET, and "get" would leave as it came
        raise RequestRefused(
            400, "bad_request", f"method {t.method!r} is not an upper-case HTTP method"
        )
    if is_ip_literal(t.host):
        raise RequestRefused(
            403, "policy_denied", "raw IP addresses are not allowed; use a host name", "default"
        )
    if t.scheme != "https" or t.port != 443:
        raise RequestRefused(
            403,
            "policy_denied",
            f"only https on port 443 is allowed (got {t.scheme}://{t.host}:{t.port})",
            "default",
        )
    named = set(t.stated_hosts)
    if named and named != {(t.host.lower().rstrip("."), t.port)}:
        raise RequestRefused(
            403,
            "policy_denied",
            "the request names another host than the one it goes to (request target, "
            ":authority and Host headers must agree)",
            "default",
        )
    if t.connect_host is not None and (
        t.connect_host.lower().rstrip(".") != t.host.lower().rstrip(".")
    ):
        raise RequestRefused(
            403, "policy_denied", "Host header does not match the CONNECT target", "default"
        )
    if t.sni is not None and t.sni.lower().rstrip(".") != t.host.lower().rstrip("."):
        raise RequestRefused(
            403, "policy_denied", "TLS SNI does not match the Host header", "default"
        )
    problem = path_problem(t.path)
    if problem is not None:
        raise RequestRefused(400, "bad_request", f"the request path {problem}")
    if not _utf8(t.query):  # undecodable bytes mitmproxy kept as surrogate escapes
        raise RequestRefused(400, "bad_request", "the query string is not valid UTF-8")
    for name in OVERRIDE_HEADERS:
        if headers.get(name) is not None:
            raise RequestRefused(403, "policy_denied", f"{name} is not allowed", "default")
