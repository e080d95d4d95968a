"""Fuzzing the parsers an agent or an operator feeds (issue 6), with hypothesis.

Each target may only fail in its documented way:

* ``providers.parse_request``: arbitrary bytes and JSON shapes on every built-in route raise
  nothing but RequestRefused, and a model it returns is printable ASCII without spaces;
* ``bodies.decode_body``: arbitrary bytes under arbitrary content-encodings raise nothing but
  RequestRefused, never return more than the limit, and undo every encoding they accept;
* ``gateway.extract_token``: arbitrary credential headers raise nothing but RequestRefused
  and never pick a token the headers did not carry;
* ``gateway.path_problem`` / ``is_ip_literal``: never raise; an accepted path has no dot
  segment however often it is percent-decoded;
* the policy loader: arbitrary YAML text raises nothing but PolicyError; structured random
  policies load or fail with ``file:line`` (a line inside the file);
* ``audit.verify_rows``: random rows never raise, and a chain it accepts is really intact;
* ``scrub.Scrubber``: a secret cut into arbitrary chunks never comes out whole.

Bounded for `make test` (AIID_FUZZ_EXAMPLES, default 150 per target, a few seconds in all);
`make fuzz` (scripts/fuzz.py) runs the same properties with many more examples.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import hmac
import json
import os
import zlib
from typing import Any
from urllib.parse import unquote

import brotli
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from aiid_proxy.audit import COLUMNS, GENESIS_MAC, canonical_bytes, verify_rows
from aiid_proxy.bodies import decode_body
from aiid_proxy.errors import PolicyError, RequestRefused
from aiid_proxy.gateway import extract_token, is_ip_literal, path_problem
from aiid_proxy.policy.loader import load_policy_text
from aiid_proxy.providers import Registry, parse_request
from aiid_proxy.scrub import Scrubber

EXAMPLES = int(os.environ.get("AIID_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,  # no .hypothesis directory written by `make test`
)

ROUTES = [(p.name, r) for p in Registry.builtin().providers for r in p.routes]


# --------------------------------------------------------------------------- JSON shapes


KEYS = [
    "model",
    "models",
    "messages",
    "input",
    "prompt",
    "system",
    "instructions",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "include_usage",
    "tools",
    "functions",
    "tool_choice",
    "function_call",
    "mcp_servers",
    "contents",
    "generationConfig",
    "generation_config",
    "maxOutputTokens",
    "max_output_tokens",
    "candidateCount",
    "topP",
    "systemInstruction",
    "toolConfig",
    "content",
    "text",
    "parts",
    "role",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["gpt-4o-mini", "claude-3-5-haiku", "gemini-1.5-flash", "ｇｐｔ", "a\u200bb"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=6),
    ),
    max_leaves=25,
)
json_objects = st.dictionaries(
    st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), json_values, max_size=10
)


def dumps_weird(obj: Any, data: st.DataObject) -> bytes:
    """JSON text with the odd spellings a parser may read differently: escapes, spaces,
    duplicate keys spliced in, constants, a BOM."""
    text = json.dumps(obj, ensure_ascii=data.draw(st.booleans()))
    trick = data.draw(
        st.sampled_from(
            ["", "dup", "nan", "bom", "ws", "trailing", "escape", "comment", "utf16", "lone"]
        )
    )
    if trick == "dup" and text.startswith("{") and len(text) > 2:
        text = '{"model":"gpt-4o",' + text[1:] if text != "{}" else '{"model":1,"model":2}'
    elif trick == "nan":
        text = text.replace("0.0", "NaN", 1) if "0.0" in text else text + "NaN"
    elif trick == "bom":
        text = "\ufeff" + text
    elif trick == "ws":
        text = " \t\r\n" + text + "\n "
    elif trick == "trailing":
        text += data.draw(st.sampled_from(["{}", ",", "x", "\x00"]))
    elif trick == "escape":
        text = text.replace('"model"', '"mod\\u0065l"')
    elif trick == "comment":
        text = "/* c */" + text
    elif trick == "utf16":
        return text.encode("utf-16")
    elif trick == "lone":
        text = text.replace('"', '"\\ud800', 1)
    return text.encode("utf-8", "surrogatepass")


def check_facts(facts: Any) -> None:
    if facts.model is not None:
        assert isinstance(facts.model, str) and facts.model
        assert facts.model.isascii() and facts.model.isprintable() and " " not in facts.model
    assert facts.estimated_input_tokens >= 0 and facts.prompt_chars >= 0
    for v in (facts.max_tokens, facts.n):
        assert v is None or (type(v) is int and v >= 0)
    assert isinstance(facts.stream, bool) and isinstance(facts.tools, bool)


path_params = st.dictionaries(
    st.sampled_from(["model", "deployment"]),
    st.one_of(st.text(max_size=30), st.sampled_from(["gpt-4o", "..", "a%2e", "m\u0430"])),
    max_size=2,
)


@FUZZ
@given(route=st.sampled_from(ROUTES), body=st.binary(max_size=300), params=path_params)
def test_parse_request_on_arbitrary_bytes(route: Any, body: bytes, params: dict[str, str]) -> None:
    try:
        facts = parse_request(route[1], body, params)
    except RequestRefused as e:
        assert e.status == 400 and e.type == "bad_request"
        return
    check_facts(facts)


@FUZZ
@given(route=st.sampled_from(ROUTES), obj=json_objects, params=path_params, data=st.data())
def test_parse_request_on_json_shapes(
    route: Any, obj: dict[str, Any], params: dict[str, str], data: st.DataObject
) -> None:
    body = dumps_weird(obj, data)
    try:
        facts = parse_request(route[1], body, params)
    except RequestRefused as e:
        assert e.status == 400 and e.type == "bad_request"
        return
    check_facts(facts)
    if route[1].json and route[1].model_param is None and facts.model is not None:
        # the model policy sees is the one the provider reads
        assert json.loads(body)["model"] == facts.model


# --------------------------------------------------------------------------- bodies


def _zstd(data: bytes) -> bytes:
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[no-redef]
    return zstd.compress(data)


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


ENCODERS = {
    "gzip": lambda b: gzip.compress(b, mtime=0),
    "x-gzip": lambda b: gzip.compress(b, mtime=0),
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": _zstd,
    "identity": lambda b: b,
}
coding_names = st.one_of(
    st.sampled_from([*ENCODERS, "GZIP", " gzip ", "compress", "", "gzip;q=1", "chunked"]),
    st.text(max_size=8),
)


@FUZZ
@given(
    data=st.binary(max_size=400),
    codings=st.lists(coding_names, max_size=4),
    limit=st.integers(min_value=0, max_value=2000),
)
def test_decode_body_on_arbitrary_bytes(data: bytes, codings: list[str], limit: int) -> None:
    header = ", ".join(codings) if codings else None
    try:
        out = decode_body(data, header, limit)
    except RequestRefused as e:
        assert (e.status, e.type) in ((400, "bad_request"), (413, "too_large"))
        return
    assert isinstance(out, bytes) and len(out) <= limit


@FUZZ
@given(
    payload=st.binary(max_size=3000),
    codings=st.lists(st.sampled_from(sorted(ENCODERS)), min_size=1, max_size=3),
    limit=st.integers(min_value=0, max_value=4000),
    cut=st.integers(min_value=0, max_value=64),
    flip=st.integers(min_value=0, max_value=10000),
)
# found in CI: gzip(b"") is 20 bytes, deflate of that 19: the middle layer is over a 19 limit
@example(payload=b"", codings=["gzip", "deflate"], limit=19, cut=0, flip=1)
def test_decode_body_undoes_every_encoding_it_accepts(
    payload: bytes, codings: list[str], limit: int, cut: int, flip: int
) -> None:
    data = payload
    layers = [payload]  # every size decoding passes through: each is held to the limit
    for c in codings:
        data = ENCODERS[c](data)
        layers.append(data)
    mangled = bytearray(data[: len(data) - cut] if cut < len(data) else data)
    if flip % 3 == 0 and mangled:
        mangled[flip % len(mangled)] ^= 0x41
    try:
        out = decode_body(bytes(mangled), ", ".join(codings), limit)
    except RequestRefused as e:
        assert (e.status, e.type) in ((400, "bad_request"), (413, "too_large"))
        if bytes(mangled) == data and e.status == 400:
            raise AssertionError(f"intact {codings} body refused: {e.message}") from None
        if bytes(mangled) == data:
            assert max(len(x) for x in layers) > limit
        return
    assert len(out) <= limit
    if bytes(mangled) == data:
        assert out == payload


# --------------------------------------------------------------------------- tokens


TOKEN_NAMES = ["authorization", "x-api-key", "api-key", "x-goog-api-key", "proxy-authorization"]


def odd_case(draw: Any, name: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if f else c for c, f in zip(name, flips, strict=True))


@st.composite
def header_lists(draw: Any) -> list[tuple[str, str]]:
    out = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.one_of(st.sampled_from(TOKEN_NAMES), st.text(max_size=10)))
        if draw(st.booleans()):
            name = odd_case(draw, name)
        token = draw(st.sampled_from(["tok-a", "tok-b", "", " ", "a b", "\x00"]) | st.text())
        value = draw(
            st.sampled_from(
                [
                    token,
                    f"Bearer {token}",
                    f"bearer  {token} ",
                    f"Basic {base64.b64encode(f'u:{token}'.encode()).decode()}",
                    f"Basic {base64.b64encode(token.encode(errors='replace')).decode()}",
                    "Basic !!!",
                    f"Digest {token}",
                    "Bearer",
                ]
            )
        )
        out.append((name, value))
    return out


@FUZZ
@given(headers=header_lists(), conn=st.one_of(st.none(), st.sampled_from(["tok-c", ""])))
def test_extract_token_never_invents_a_token(
    headers: list[tuple[str, str]], conn: str | None
) -> None:
    try:
        token = extract_token(headers, conn)
    except RequestRefused as e:
        assert e.status == 401 and e.type == "unauthenticated"
        return
    assert token
    carried = " ".join(v for _, v in headers) + " " + (conn or "")
    decoded = carried
    for word in carried.split():
        with contextlib.suppress(ValueError):
            decoded += " " + base64.b64decode(word, validate=True).decode("utf-8", "replace")
    assert token in decoded, "a token the request did not carry"


# --------------------------------------------------------------------------- paths and hosts


path_text = st.lists(
    st.sampled_from(list("/.%2eEfF5cC;:abAB09-_~?#\\ ") + ["%2e", "%2f", "%25", "..", "%c0%ae"]),
    max_size=20,
).map("".join)


@FUZZ
@given(path=st.one_of(path_text, st.text(max_size=40)))
def test_path_problem_never_raises_and_accepts_no_dot_segment(path: str) -> None:
    problem = path_problem(path)
    assert problem is None or isinstance(problem, str)
    if problem is None:
        text = path
        for _ in range(4):
            for seg in text.replace("\\", "/").split("/"):
                assert seg.split(";", 1)[0] not in (".", ".."), (path, text)
            text = unquote(text)


@FUZZ
@given(host=st.one_of(st.text(max_size=30), st.from_regex(r"\[?[0-9a-fx.:]{1,20}\]?\.?")))
def test_is_ip_literal_never_raises(host: str) -> None:
    assert isinstance(is_ip_literal(host), bool)


REGISTRY = Registry.builtin()
PROVIDER_ROUTES = [(p, r) for p in REGISTRY.providers for r in (*p.routes, None)]
hosts = st.one_of(
    st.sampled_from([h for p in REGISTRY.providers for h in p.hosts]).map(
        lambda h: h.replace("*", "x")
    ),
    st.text(max_size=30),
)


@FUZZ
@given(host=hosts, method=st.sampled_from(["GET", "POST", "get", ""]), path=path_text)
def test_registry_match_never_raises(host: str, method: str, path: str) -> None:
    m = REGISTRY.match(host, method, path)
    assert m is None or m.route is None or method in m.route.methods


sse_events = st.lists(
    st.one_of(
        json_objects.map(lambda o: b"data: " + json.dumps(o).encode() + b"\n\n"),
        st.sampled_from(
            [
                b'data: {"usage":{"prompt_tokens":-1,"completion_tokens":1e400}}\n\n',
                b'event: message_delta\ndata: {"usage":{"output_tokens":"7"}}\n\n',
                b"data: [DONE]\n\n",
                b'data: {"usageMetadata":{"promptTokenCount":2e9}}\r\n\r\n',
                b"data: \xff\xfe\n\n",
                b":" * 100 + b"\n",
            ]
        ),
        st.binary(max_size=40),
    ),
    max_size=8,
)


@FUZZ
@given(pr=st.sampled_from(PROVIDER_ROUTES), events=sse_events, cuts=st.lists(st.integers(1, 99)))
def test_usage_parsers_never_raise(pr: Any, events: list[bytes], cuts: list[int]) -> None:
    from aiid_proxy.providers import SSEUsageTracker, parse_usage

    provider, route = pr
    data = b"".join(events)
    u = parse_usage(provider, route, data)
    assert u is None or (u.input_tokens >= 0 and u.output_tokens >= 0)
    tracker = SSEUsageTracker(provider, route)
    points = sorted({c % (len(data) + 1) for c in cuts})
    for a, b in zip([0, *points], [*points, len(data)], strict=True):
        tracker.feed(data[a:b])
    tracker.close()
    u = tracker.usage()
    assert u is None or (u.input_tokens >= 0 and u.output_tokens >= 0)


# --------------------------------------------------------------------------- policies


@FUZZ
@given(text=st.text(max_size=400))
def test_policy_loader_on_arbitrary_text(text: str) -> None:
    try:
        load_policy_text(text, "acme.yaml", "acme")
    except PolicyError as e:
        assert e.file == "acme.yaml"


yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["deny", "allow", "approve", "08:00-20:00 UTC", "2030-01-01T00:00:00Z"]),
    st.sampled_from(["openai", "gpt-4o*", "support-*", "api.github.com", "/repos/*", "GET"]),
)
RULE_KEYS = ["id", "agents", "providers", "models", "hosts", "methods", "paths", "when"]
RULE_KEYS += ["effect", "reason", "inject", "approved_by", "expires", "bogus"]
WHEN_KEYS = ["max_tokens", "temperature", "top_p", "n", "stream", "tools", "hours", "x"]


@st.composite
def rules(draw: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(RULE_KEYS), max_size=7, unique=True)):
        if key in ("agents", "providers", "models", "hosts", "methods", "paths"):
            rule[key] = draw(st.one_of(st.lists(yaml_scalars, max_size=3), yaml_scalars))
        elif key == "when":
            rule[key] = draw(
                st.dictionaries(
                    st.sampled_from(WHEN_KEYS),
                    st.one_of(
                        yaml_scalars,
                        st.dictionaries(st.sampled_from(["min", "max", "x"]), yaml_scalars),
                    ),
                    max_size=3,
                )
            )
        elif key == "inject":
            rule[key] = draw(
                st.dictionaries(st.sampled_from(["header", "scheme", "secret", "x"]), yaml_scalars)
            )
        else:
            rule[key] = draw(yaml_scalars)
    return rule


@st.composite
def policies(draw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": 1, "tenant": "acme", "default": "deny"}
    for key in draw(st.lists(st.sampled_from(list(doc)), max_size=2, unique=True)):
        if draw(st.booleans()):
            del doc[key]
        else:
            doc[key] = draw(yaml_scalars)
    doc["rules"] = draw(st.one_of(st.lists(rules(), max_size=4), yaml_scalars))
    for key in draw(
        st.lists(
            st.sampled_from(["region", "audit", "approval", "limits", "budgets", "overrides", "x"]),
            max_size=3,
            unique=True,
        )
    ):
        doc[key] = draw(
            st.one_of(
                yaml_scalars,
                st.lists(rules(), max_size=2),
                st.dictionaries(st.text(max_size=10), yaml_scalars, max_size=3),
            )
        )
    return doc


@FUZZ
@given(doc=policies(), flow_style=st.booleans())
def test_structured_policies_load_or_fail_with_file_and_line(
    doc: dict[str, Any], flow_style: bool
) -> None:
    text = yaml.safe_dump(doc, default_flow_style=flow_style, sort_keys=False)
    try:
        policy = load_policy_text(text, "acme.yaml", "acme")
    except PolicyError as e:
        assert e.file == "acme.yaml", e
        assert e.line is not None and 1 <= e.line <= text.count("\n") + 1, (e, text)
        assert str(e).startswith(f"acme.yaml:{e.line}: ")
        return
    assert policy.tenant == "acme"


# --------------------------------------------------------------------------- audit rows


cells = st.one_of(
    st.none(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(),
    st.text(max_size=10),
    st.binary(max_size=6),
    st.sampled_from([GENESIS_MAC, "f" * 64, "F" * 64, "0" * 63]),
    st.dictionaries(
        st.text(max_size=4), st.one_of(st.integers(), st.text(max_size=4), st.floats())
    ),
    st.lists(st.integers(), max_size=3),
)
rows = st.lists(
    st.dictionaries(st.sampled_from([*COLUMNS, "extra"]), cells, max_size=len(COLUMNS) + 1),
    max_size=6,
)


@FUZZ
@given(
    rs=rows,
    key=st.binary(max_size=40),
    head=st.one_of(st.none(), st.tuples(st.integers(1, 9), st.sampled_from(["a" * 64, "F" * 64]))),
)
def test_verify_rows_on_random_rows_never_raises(
    rs: list[dict[str, Any]], key: bytes, head: tuple[int, str] | None
) -> None:
    result = verify_rows(rs, key, head)
    assert isinstance(result.ok, bool) and result.count >= 0
    if not result.ok:
        assert result.reason


def chain(key: bytes, n: int) -> list[dict[str, Any]]:
    out = []
    prev = GENESIS_MAC
    for seq in range(1, n + 1):
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        row.update(seq=seq, ts=f"2027-01-01T00:00:{seq:02d}Z", event="request", status=200)
        row.update(detail="{}", prev_mac=prev)
        row["mac"] = hmac.new(
            key, bytes.fromhex(prev) + canonical_bytes(row), hashlib.sha256
        ).hexdigest()
        prev = row["mac"]
        out.append(row)
    return out


@FUZZ
@given(
    n=st.integers(1, 6),
    col=st.sampled_from(COLUMNS),
    value=cells,
    at=st.integers(0, 5),
    key=st.binary(min_size=1, max_size=32),
)
def test_verify_rows_accepts_an_intact_chain_and_no_edited_one(
    n: int, col: str, value: Any, at: int, key: bytes
) -> None:
    rs = chain(key, n)
    assert verify_rows(rs, key).ok
    i = at % n
    assume(rs[i][col] != value and not (col == "detail" and value == {}))
    rs[i][col] = value
    result = verify_rows(rs, key)
    assert not result.ok


# --------------------------------------------------------------------------- scrubbing


@FUZZ
@given(
    secret=st.text(min_size=8, max_size=40).filter(
        lambda s: s.strip() == s and not set(s) & set("[]\x00")
    ),
    before=st.binary(max_size=60),
    after=st.binary(max_size=60),
    repeat=st.integers(1, 3),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12),
)
def test_a_secret_cut_anywhere_never_comes_out(
    secret: str, before: bytes, after: bytes, repeat: int, cuts: list[int]
) -> None:
    raw = secret.encode("utf-8", "surrogatepass")
    escaped = raw.replace(b"/", b"\\/")
    data = before + (raw + after) * repeat + escaped
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    s = Scrubber([secret])
    out = b"".join(s.feed(c) for c in chunks) + s.flush()
    assert raw not in out and escaped not in out
    assert s.hits >= repeat + 1


@pytest.mark.parametrize("target", ["parse_request", "decode_body", "policy"])
def test_regressions_found_by_fuzzing(target: str) -> None:
    """Inputs worth keeping (shapes that broke earlier versions of similar parsers)."""
    if target == "parse_request":
        route = next(r for name, r in ROUTES if name == "openai" and r.kind == "chat")
        for body in (b'{"model":"\\ud800"}', b"{" * 5000, b'{"model":"a","stream":1}', b"\xff"):
            with pytest.raises(RequestRefused):
                parse_request(route, body)
    elif target == "decode_body":
        for data, enc in (
            (b"\x1f\x8b\x08\x00" + b"\x00" * 10, "gzip"),
            (b"", "br"),
            (b"x", "zstd"),
        ):
            with pytest.raises(RequestRefused):
                decode_body(data, enc, 100)
    else:
        for text in (
            "version: 1\ntenant: acme\ndefault: deny\nrules: [&a [*a]]\n",
            "\x00",
            "!!python/object:os.system x",
        ):
            with pytest.raises(PolicyError):
                load_policy_text(text, "acme.yaml", "acme")
