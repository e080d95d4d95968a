"""Event streams on their way back to the agent: event splitting, release timing (TTFT),
scrubbing across chunk boundaries, usage counting, and the cut at the output reservation."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from standin import standin_words

from aiid_proxy.providers import MAX_EVENT_BYTES, Registry, SSEUsageTracker, Usage
from aiid_proxy.scrub import REDACTED, Scrubber, TextWatch
from aiid_proxy.streaming import (
    CHANNELS_CUT_REASON,
    CUT_REASON,
    INDEX_CUT_REASON,
    KEY_CUT_REASON,
    LARGE_CUT_REASON,
    EventSplitter,
    StreamGuard,
    cut_event,
)

REG = Registry.builtin()
SECRET = "sk-canary-stream-0123456789abcdef"


def ev(data: object, name: str | None = None, eol: str = "\n") -> bytes:
    head = f"event: {name}{eol}" if name else ""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {payload}{eol}{eol}".encode()


def chat_stream(words: list[str], usage: bool = True, eol: str = "\n") -> list[bytes]:
    events = [ev({"choices": [{"index": 0, "delta": {"content": w}}]}, eol=eol) for w in words]
    if usage:
        u = {"prompt_tokens": 7, "completion_tokens": len(words)}
        events.append(ev({"choices": [], "usage": u}, eol=eol))
    events.append(ev("[DONE]", eol=eol))
    return events


def responses_stream(words: list[str]) -> list[bytes]:
    out = [ev({"type": "response.created", "response": {"usage": None}}, "response.created")]
    for w in words:
        out.append(
            ev({"type": "response.output_text.delta", "delta": w}, "response.output_text.delta")
        )
    done = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 9, "output_tokens": len(words)}},
    }
    out.append(ev(done, "response.completed"))
    return out


def anthropic_stream(words: list[str]) -> list[bytes]:
    start = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 12, "output_tokens": 1}},
    }
    out = [ev(start, "message_start"), ev({"type": "ping"}, "ping")]
    for w in words:
        delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": w}}
        out.append(ev(delta, "content_block_delta"))
    out.append(
        ev({"type": "message_delta", "usage": {"output_tokens": len(words)}}, "message_delta")
    )
    out.append(ev({"type": "message_stop"}, "message_stop"))
    return out


def tracker(provider: str = "openai", path: str = "/v1/chat/completions") -> SSEUsageTracker:
    p = REG.get(provider)
    found = p.match_route("POST", path)
    assert found is not None
    return SSEUsageTracker(p, found[0])


def guard(
    provider: str = "openai",
    path: str = "/v1/chat/completions",
    cap: int | None = None,
    secrets: tuple[str, ...] = (),
) -> tuple[StreamGuard, list[int]]:
    calls: list[int] = []
    g = StreamGuard(
        Scrubber(secrets),
        tracker(provider, path),
        output_cap=cap,
        request_id="req_test",
        on_cut=lambda: calls.append(1),
    )
    return g, calls


def splits(data: bytes) -> Iterator[list[bytes]]:
    """Every way to cut ``data`` in two, and one byte at a time."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


# -- EventSplitter -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "eol",
    [pytest.param("\n", id="lf"), pytest.param("\r\n", id="crlf"), pytest.param("\r", id="cr")],
)
def test_splitter_finds_every_event_over_any_chunking(eol: str) -> None:
    events = [
        ev({"a": 1}, eol=eol),
        ev({"b": 2}, "named", eol=eol),
        f": comment{eol}data: x{eol}data: y{eol}{eol}".encode(),
    ]
    stream = b"".join(events)

    def norm(e: bytes) -> bytes:
        return e.replace(b"\r\n", b"\n").replace(b"\r", b"\n").strip(b"\n")

    for chunks in splits(stream):
        s = EventSplitter()
        got = [e for c in chunks for e in s.feed(c)]
        # an event whose blank line is a CR at the end of a chunk is released at once; the LF
        # that may complete that CRLF then travels with the next event
        assert b"".join(got) + s.rest() == stream
        assert [norm(e) for e in got] == [norm(e) for e in events], chunks


def test_splitter_crlf_split_across_chunks_is_one_line_end() -> None:
    s = EventSplitter()
    assert s.feed(b"data: a\r") == []
    # the LF completes the CRLF; it is not an empty line ending the event
    assert s.feed(b"\ndata: b\r\n") == []
    assert s.feed(b"\r\n") == [b"data: a\r\ndata: b\r\n\r\n"]


def test_splitter_hands_out_an_oversized_tail_and_recovers() -> None:
    s = EventSplitter(max_event=100)
    big = b"data: " + b"x" * 200
    out = s.feed(big)
    assert out == [big] and s.pending == 0
    # the end of that line is not a blank line; the next blank line ends the event
    assert s.feed(b"\n") == []
    assert s.feed(b"\n" + ev(1)) == [b"\n\n", ev(1)]


# -- release timing: nothing is held past the end of an event -----------------------------------
@pytest.mark.parametrize(
    ("provider", "path", "events"),
    [
        pytest.param("openai", "/v1/chat/completions", chat_stream(standin_words(8)), id="chat"),
        pytest.param("openai", "/v1/responses", responses_stream(standin_words(8)), id="responses"),
        pytest.param(
            "anthropic", "/v1/messages", anthropic_stream(standin_words(8)), id="messages"
        ),
    ],
)
def test_each_event_is_released_in_the_call_that_completes_it(
    provider: str, path: str, events: list[bytes]
) -> None:
    g, _ = guard(provider, path, secrets=(SECRET,))
    for e in events:
        assert g(e) == e  # the first token leaves with the chunk that brought it
    assert g(b"") == b""
    assert g.cut is None and g.released == sum(map(len, events))


def test_half_an_event_waits_for_its_end_only() -> None:
    g, _ = guard()
    e1, e2 = chat_stream(["Hello", " there"], usage=False)[:2]
    assert g(e1 + e2[:10]) == e1
    assert g(e2[10:]) == e2


# -- scrubbing -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("secret", "words", "hits"),
    [
        pytest.param(SECRET, ["Echo", f" {SECRET}", " done"], 1, id="key-in-a-delta"),
        pytest.param(SECRET, [f"{SECRET}", f"{SECRET}!"], 2, id="key-twice"),
        pytest.param("ghp_a/b+c0123456789", ["k: ghp_a/b+c0123456789"], 1, id="json-escaped-slash"),
    ],
)
def test_secret_is_scrubbed_over_every_chunking(secret: str, words: list[str], hits: int) -> None:
    events = [
        f'data: {{"choices": [{{"delta": {{"content": "{w.replace("/", "\\/")}"}}}}]}}\n\n'.encode()
        for w in words
    ]
    stream = b"".join(events)
    escaped = secret.replace("/", "\\/").encode()
    assert escaped in stream
    for chunks in splits(stream):
        g, _ = guard(secrets=(secret,))
        out = b"".join(g(c) for c in chunks) + g(b"")
        assert out == stream.replace(escaped, REDACTED), chunks
        assert g.scrubber.hits == hits


# A key a model spells out over several deltas (or with JSON escapes) is no run of bytes the
# scrubber could see: it is caught in the text and the stream is cut before the event that
# completes it; the events whose text ends in the key's first characters are never released.
SPELLED = [
    pytest.param("openai", "/v1/chat/completions", chat_stream, id="chat"),
    pytest.param("openai", "/v1/responses", responses_stream, id="responses"),
    pytest.param("anthropic", "/v1/messages", anthropic_stream, id="messages"),
]


@pytest.mark.parametrize(("provider", "path", "build"), SPELLED)
@pytest.mark.parametrize(
    "words",
    [
        pytest.param(["The key: ", SECRET[:3], SECRET[3:20], SECRET[20:], " ok"], id="3-pieces"),
        pytest.param(["The key: " + SECRET[:10], SECRET[10:] + " ok"], id="2-pieces"),
        pytest.param(["x"] + list(SECRET) + ["y"], id="char-by-char"),
    ],
)
def test_a_key_spelled_out_over_deltas_cuts_the_stream(
    provider: str, path: str, build: object, words: list[str]
) -> None:
    events = build(words)  # type: ignore[operator]
    stream = b"".join(events)
    for chunks in ([stream], events, [stream[i : i + 7] for i in range(0, len(stream), 7)]):
        g, calls = guard(provider, path, secrets=(SECRET,))
        out = b"".join(g(c) for c in chunks) + g(b"")
        text, errors = text_of(provider, out)
        assert SECRET[: TextWatch.HOLD] not in text, text  # at most HOLD - 1 of its characters
        assert text in {"".join(words[:k]) for k in range(len(words))}  # whole events only
        assert len(errors) == 1 and "spelled out the key" in json.dumps(errors[0])
        if provider == "openai":
            assert errors[0]["error"]["code"] == "injected_key_in_output"  # type: ignore[index]
        assert SECRET not in json.dumps(errors[0]) and "req_test" in json.dumps(errors[0])
        assert g.cut == KEY_CUT_REASON and calls == [1] and g.scrubber.hits == 1


@pytest.mark.parametrize(("provider", "path", "build"), SPELLED)
def test_text_ending_in_a_keys_first_characters_waits_for_the_next_event_only(
    provider: str, path: str, build: object
) -> None:
    words = ["ask", " sk-c", "at", " done"]  # "sk-c" starts the key, "sk-cat" does not
    events = build(words)  # type: ignore[operator]
    g, calls = guard(provider, path, secrets=(SECRET,))
    released = [g(e) for e in events]
    out = b"".join(released) + g(b"")
    assert out == b"".join(events) and g.cut is None and calls == []
    held = events.index(next(e for e in events if b"sk-c" in e))
    assert released[held] == b""  # held: a key may follow
    assert released[held + 1] == events[held] + events[held + 1]  # released with the next


@pytest.mark.parametrize("cap", [None, 2], ids=["at-the-end", "at-a-reservation-cut"])
def test_text_ending_in_a_keys_first_characters_is_never_released(cap: int | None) -> None:
    """25 of the key's 33 characters, and then the stream ends (or is cut at its reservation):
    the held events never go out; the stream ends with the key cut."""
    # with a cap of 2 the third piece is the cut, while the second is held
    events = chat_stream(["see", SECRET[:25], *([] if cap is None else ["x"])], usage=False)
    g, calls = guard(secrets=(SECRET,), cap=cap)
    out = b"".join(g(e) for e in events) + g(b"")
    text, errors = text_of("openai", out)
    assert SECRET[: TextWatch.HOLD] not in text and len(errors) == 1
    assert g.cut == (KEY_CUT_REASON if cap is None else CUT_REASON) and calls == [1]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            {
                "choices": [
                    {"delta": {"content": "k " + "".join(f"\\u{ord(c):04x}" for c in SECRET)}}
                ]
            },
            id="escaped-delta",
        ),
        pytest.param(
            {"error": {"message": "bad key \\u0073" + SECRET[1:]}}, id="escaped-error-field"
        ),
    ],
)
def test_a_key_in_json_escapes_cuts_the_stream(data: dict[str, object]) -> None:
    payload = json.dumps(data).replace("\\\\u", "\\u")  # the escapes as the provider wrote them
    assert SECRET not in payload and json.loads(payload) != data
    g, calls = guard(secrets=(SECRET,))
    out = g(f"data: {payload}\n\n".encode()) + g(b"data: [DONE]\n\n") + g(b"")
    assert SECRET.encode() not in out and b"\\u0073" not in out
    assert g.cut == KEY_CUT_REASON and calls == [1]


def _pieces(secret: str, n: int = 3) -> list[str]:
    step = -(-len(secret) // n)
    return [secret[i : i + step] for i in range(0, len(secret), step)]


def _chat_delta(delta: dict[str, object], index: int = 0) -> bytes:
    return ev({"choices": [{"index": index, "delta": delta}]})


FIELD_STREAMS = [
    pytest.param(
        "openai", "/v1/chat/completions",
        [_chat_delta({"reasoning_content": p}) for p in _pieces(SECRET)], id="reasoning-content",
    ),
    pytest.param(
        "openai", "/v1/chat/completions",
        [_chat_delta({"refusal": p}) for p in _pieces(SECRET)], id="refusal",
    ),
    pytest.param(
        "openai", "/v1/chat/completions",
        [_chat_delta({"function_call": {"arguments": p}}) for p in _pieces(SECRET)],
        id="legacy-function-call",
    ),
    pytest.param(
        "openai", "/v1/chat/completions",
        [e for p in _pieces(SECRET, 6) for e in (_chat_delta({"content": "x"}, 0),
                                                  _chat_delta({"content": p}, 1))],
        id="choices-interleaved",
    ),
    pytest.param(
        "openai", "/v1/responses",
        [ev({"type": "response.reasoning_summary_text.delta", "delta": p, "output_index": 0,
             "summary_index": 0}) for p in _pieces(SECRET)],
        id="responses-reasoning-summary",
    ),
    pytest.param(
        "anthropic", "/v1/messages",
        [e for p in _pieces(SECRET, 6) for e in (
            ev({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "x"}}, "content_block_delta"),
            ev({"type": "content_block_delta", "index": 1,
                "delta": {"type": "text_delta", "text": p}}, "content_block_delta"))],
        id="anthropic-blocks-interleaved",
    ),
    pytest.param(
        "anthropic", "/v1/messages",
        [ev({"type": "content_block_delta", "index": 0,
             "delta": {"type": "citations_delta", "citation": {"cited_text": p}}},
            "content_block_delta") for p in _pieces(SECRET)],
        id="anthropic-citation",
    ),
    pytest.param(
        "gemini", "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
        [ev({"candidates": [{"index": i % 2, "content": {"parts": [{"text": p}]}}]})
         for i, p in enumerate(q for p in _pieces(SECRET, 6) for q in ("x", p))],
        id="gemini-candidates-interleaved",
    ),
    # [AC] fields the counting does not read: the watch reads every string of a delta
    pytest.param(
        "openai", "/v1/chat/completions",
        [_chat_delta({"content": [{"type": "text", "text": p}]}) for p in _pieces(SECRET)],
        id="content-parts",
    ),
    pytest.param(
        "openai", "/v1/chat/completions",
        [_chat_delta({"audio": {"transcript": p}}) for p in _pieces(SECRET)],
        id="audio-transcript",
    ),
    pytest.param(
        "openai", "/v1/chat/completions",
        [ev({"choices": [{"index": 0, "delta": {},
                          "logprobs": {"content": [{"token": p}]}}]}) for p in _pieces(SECRET)],
        id="logprob-tokens",
    ),
    pytest.param(
        "openai", "/v1/responses",
        [ev({"type": "response.audio.transcript.delta", "delta": p}) for p in _pieces(SECRET)],
        id="responses-audio-transcript",
    ),
    pytest.param(
        "anthropic", "/v1/messages",
        [ev({"type": "content_block_delta", "index": 0,
             "delta": {"type": "future_delta", "payload": {"value": p}}},
            "content_block_delta") for p in _pieces(SECRET)],
        id="anthropic-unknown-delta",
    ),
    pytest.param(
        "gemini", "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
        [ev({"candidates": [{"index": 0, "content": {"parts": [{"executableCode": {"code": p}}]}}]})
         for p in _pieces(SECRET)],
        id="gemini-executable-code",
    ),
]  # fmt: skip


def test_an_event_too_large_to_read_cuts_a_watched_stream() -> None:
    """[AC] An event over MAX_EVENT_BYTES was skipped unread, so a key spelled from its end
    into the next delta passed. Now the stream is cut at such an event, its bytes unsent."""
    head = SECRET[:15]
    big = _chat_delta({"content": "A" * (MAX_EVENT_BYTES + 10) + head})
    g, calls = guard(secrets=(SECRET,))
    first = g(_chat_delta({"content": "hello"}))
    out = first + b"".join(g(big[i : i + 65536]) for i in range(0, len(big), 65536))
    out += g(_chat_delta({"content": SECRET[15:]})) + g(b"")
    assert g.cut == LARGE_CUT_REASON and calls == [1]
    assert head.encode() not in out and b"AAAA" not in out
    assert b"event too large" in out


def test_an_event_too_large_passes_a_stream_with_nothing_to_watch() -> None:
    big = _chat_delta({"content": "A" * (MAX_EVENT_BYTES + 10)})
    g, _ = guard(secrets=())
    out = b"".join(g(big[i : i + 65536]) for i in range(0, len(big), 65536)) + g(b"")
    assert g.cut is None and len(out) == len(big)


@pytest.mark.parametrize(("provider", "path", "events"), FIELD_STREAMS)
def test_a_key_spelled_in_any_generated_field_or_interleaved_output_is_cut(
    provider: str, path: str, events: list[bytes]
) -> None:
    g, calls = guard(provider, path, secrets=(SECRET,))
    out = b"".join(g(e) for e in events) + g(b"")
    assert g.cut == KEY_CUT_REASON and calls == [1], out[-300:]
    assert b"spelled out the key" in out


def test_without_a_secret_to_watch_nothing_is_held() -> None:
    events = chat_stream(["sk-c", "at"])
    g, _ = guard(secrets=())
    assert [g(e) for e in events] == events


# -- usage ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("provider", "path", "events", "expected"),
    [
        pytest.param(
            "openai", "/v1/chat/completions", chat_stream(standin_words(5)), Usage(7, 5),
            id="chat-usage-chunk",
        ),
        pytest.param(
            "openai", "/v1/responses", responses_stream(standin_words(5)), Usage(9, 5),
            id="responses-completed",
        ),
        pytest.param(
            "anthropic", "/v1/messages", anthropic_stream(standin_words(5)), Usage(12, 5),
            id="anthropic-start-and-delta",
        ),
        pytest.param(
            "openai", "/v1/chat/completions", chat_stream(standin_words(5), usage=False),
            Usage(40, 6, estimated=True), id="no-usage-estimated-from-text",
        ),
        pytest.param(
            "openai", "/v1/chat/completions", chat_stream(["a"] * 9, usage=False),
            Usage(40, 9, estimated=True), id="estimate-at-least-one-per-piece",
        ),
    ],
)  # fmt: skip
def test_usage_reported_or_estimated(
    provider: str, path: str, events: list[bytes], expected: Usage
) -> None:
    g, _ = guard(provider, path)
    for e in events:
        g(e)
    g(b"")
    assert g.usage(40) == expected


def test_estimate_is_never_zero_for_a_stream_with_text() -> None:
    g, _ = guard()
    g(chat_stream(["x"], usage=False)[0])
    g(b"")
    u = g.usage(0)
    assert u.estimated and u.output_tokens == 1


# -- the cut -------------------------------------------------------------------------------------
def text_of(provider: str, out: bytes) -> tuple[str, list[dict[str, object]]]:
    """The text an SDK would assemble, and the error events it would raise on."""
    text, errors = "", []
    for block in out.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in block.split(b"\n"):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                errors.append(obj)
            elif provider == "anthropic":
                delta = obj.get("delta") or {}
                text += delta.get("text", "") if obj["type"] == "content_block_delta" else ""
            elif obj.get("type") == "response.output_text.delta":
                text += obj["delta"]
            else:
                for c in obj.get("choices", []):
                    text += c["delta"].get("content", "")
    return text, errors


@pytest.mark.parametrize(
    ("provider", "path", "build"),
    [
        pytest.param("openai", "/v1/chat/completions", chat_stream, id="chat"),
        pytest.param("openai", "/v1/responses", responses_stream, id="responses"),
        pytest.param("anthropic", "/v1/messages", anthropic_stream, id="messages"),
    ],
)
@pytest.mark.parametrize("cap", [pytest.param(1, id="cap1"), pytest.param(10, id="cap10")])
def test_stream_past_its_reservation_is_cut_at_the_limit(
    provider: str, path: str, build: object, cap: int
) -> None:
    words = standin_words(200)
    events = build(words)  # type: ignore[operator]
    g, calls = guard(provider, path, cap=cap)
    out = b"".join(g(e) for e in events) + g(b"")
    text, errors = text_of(provider, out)
    assert text == "".join(words[:cap])  # exactly the reserved pieces, nothing after them
    assert len(errors) == 1 and "reservation" in json.dumps(errors[0])
    assert g.cut == CUT_REASON and calls == [1]
    # everything that arrived was still counted, for the bill
    assert g.tracker.text_deltas == len(words)


def test_stream_within_its_reservation_is_not_cut() -> None:
    events = chat_stream(standin_words(10))  # reports completion_tokens = 10
    g, calls = guard(cap=10)
    out = b"".join(g(e) for e in events) + g(b"")
    assert out == b"".join(events) and g.cut is None and calls == []


def test_anthropic_reported_output_within_cap_is_not_cut() -> None:
    # message_start reports output_tokens 1; final message_delta 3: all within a cap of 3
    g, calls = guard("anthropic", "/v1/messages", cap=3)
    events = anthropic_stream(["a", "b", "c"])
    assert b"".join(g(e) for e in events) + g(b"") == b"".join(events)
    assert calls == []


def test_no_cap_never_cuts() -> None:
    g, calls = guard(cap=None)
    events = chat_stream(standin_words(500))
    assert b"".join(g(e) for e in events) + g(b"") == b"".join(events)
    assert calls == [] and g.cut is None


def test_unterminated_last_event_past_the_cap_is_withheld() -> None:
    g, calls = guard(cap=1)
    e1, e2 = chat_stream(["one", "two"], usage=False)[:2]
    out = g(e1 + e2.rstrip(b"\n")) + g(b"")
    text, errors = text_of("openai", out)
    assert text == "one" and len(errors) == 1 and calls == [1]


def test_after_the_cut_nothing_more_is_released() -> None:
    g, calls = guard(cap=2)
    events = chat_stream(standin_words(20))
    outs = [g(e) for e in events]
    first_empty = next(i for i, o in enumerate(outs) if i > 2 and o == b"")
    assert all(o == b"" for o in outs[first_empty:])
    assert g(b"") == b"" and calls == [1]


@pytest.mark.parametrize(
    ("fmt", "marker"),
    [
        pytest.param("openai", b'"code": "reservation_exceeded"', id="openai"),
        pytest.param("anthropic", b"event: error\n", id="anthropic"),
        pytest.param("gemini", b'"status": "RESOURCE_EXHAUSTED"', id="gemini"),
    ],
)
def test_cut_event_shapes(fmt: str, marker: bytes) -> None:
    e = cut_event(fmt, "stop")
    assert marker in e and e.endswith(b"\n\n")
    data = json.loads(e.split(b"data: ", 1)[1])
    assert data["error"]["message"] == "stop"
    assert "request_id" not in data["error"]
    with_id = json.loads(cut_event(fmt, "stop", "req_1").split(b"data: ", 1)[1])
    assert with_id["error"]["request_id"] == "req_1" and with_id["error"]["rule"] is None


# -- the mitmproxy adapter -----------------------------------------------------------------------
def test_adapter_never_hands_mitmproxy_an_empty_bytes_chunk() -> None:
    """mitmproxy sends a bytes result as one HTTP/1.1 chunk; an empty one would end the
    agent's chunked body in the middle of the stream."""
    from addons.response import StreamFilter

    sf = StreamFilter(Scrubber([SECRET]), tracker())
    e1, e2 = chat_stream(["a", "b"], usage=False)[:2]
    held = sf(e2[:5])  # half an event: nothing to pass on yet
    assert held == b"" and not isinstance(held, bytes)
    assert sf(e2[5:] + e1) == e2 + e1
    end = sf(b"")
    assert end == b"" and not isinstance(end, bytes)


# -- [AK] fields and channels the watch missed ---------------------------------------------
SLASHED = "sk-abcdEFGH/ijklMNOP/qrstUVWX+yz012345=="


def _resp(kind: str, **fields: object) -> bytes:
    return ev({"type": kind, "output_index": 0, **fields}, kind)


def _block_start(index: object, text: str) -> bytes:
    start = {"type": "content_block_start", "index": index}
    return ev({**start, "content_block": {"type": "text", "text": text}}, "content_block_start")


def _block_delta(index: object, text: str) -> bytes:
    delta = {"type": "content_block_delta", "index": index}
    return ev({**delta, "delta": {"type": "text_delta", "text": text}}, "content_block_delta")


def _cut(out: bytes) -> bool:
    return b"injected_key_in_output" in out or b"spelled out the key" in out


def test_a_key_with_only_some_slashes_escaped_is_scrubbed_in_any_field() -> None:
    """A JSON reader reads ``sk-a\\/b/c`` as ``sk-a/b/c``: an event id spelled so reached the
    agent whole (the scrubber knew the raw and the all-escaped spellings only)."""
    g, _ = guard(secrets=(SLASHED,))
    event = b'data: {"id":"' + SLASHED.replace("/", "\\/", 1).encode() + b'","choices":[]}\n\n'
    out = g(event) + g(b"")
    assert SLASHED not in json.dumps([json.loads(x[6:]) for x in out.split(b"\n\n") if x])
    assert REDACTED in out


def test_interleaved_tool_calls_are_watched_each_on_its_own() -> None:
    """The watch left list positions out of its channels, so the arguments of tool call 0 and
    1 ran together: a key spelled over call 0's deltas with call 1's in between passed."""
    k = SLASHED

    def call(index: int, args: str) -> bytes:
        delta = {"tool_calls": [{"index": index, "function": {"arguments": args}}]}
        return ev({"choices": [{"index": 0, "delta": delta}]})

    g, _ = guard(secrets=(k,))
    out = b"".join(
        g(e) for e in [call(0, '{"a":"'), call(0, k[:20]), call(1, "{}"), call(0, k[20:])]
    )
    assert _cut(out + g(b""))


def test_a_key_spelled_in_choice_65_of_70_is_cut() -> None:
    """Past 64 channels every new one shared one: text of two choices ran together."""
    g, _ = guard(secrets=(SLASHED,))
    first = ev({"choices": [{"index": i, "delta": {"content": "x"}} for i in range(64)]})
    second = ev(
        {
            "choices": [
                {"index": 65, "delta": {"content": SLASHED[:20]}},
                {"index": 66, "delta": {"content": "junk"}},
            ]
        }
    )
    third = ev({"choices": [{"index": 65, "delta": {"content": SLASHED[20:]}}]})
    assert _cut(g(first) + g(second) + g(third) + g(b""))


def test_more_channels_than_the_watch_keeps_apart_cut_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiid_proxy.scrub import scrubber

    monkeypatch.setattr(scrubber, "MAX_CHANNELS", 8)
    g, _ = guard(secrets=(SLASHED,))
    out = g(ev({"choices": [{"index": i, "delta": {"content": "x"}} for i in range(9)]}))
    assert b"too_many_channels" in out and g.cut == CHANNELS_CUT_REASON


@pytest.mark.parametrize(
    ("provider", "path", "events"),
    [
        pytest.param(
            "anthropic",
            "/v1/messages",
            [
                _block_start(0, SLASHED[:25]),
                _block_delta(0, SLASHED[25:]),
            ],
            id="anthropic-block-start",
        ),
        pytest.param(
            "openai",
            "/v1/responses",
            [
                ev(
                    {
                        "type": "response.content_part.added",
                        "output_index": 0,
                        "content_index": 0,
                        "part": {"type": "output_text", "text": SLASHED[:20]},
                    },
                    "response.content_part.added",
                ),
                ev(
                    {
                        "type": "response.output_text.delta",
                        "output_index": 0,
                        "content_index": 0,
                        "delta": SLASHED[20:],
                    },
                    "response.output_text.delta",
                ),
            ],
            id="responses-part-added",
        ),
        # [AN] an item's start: a call's arguments, a message's parts; a refusal part
        pytest.param(
            "openai",
            "/v1/responses",
            [
                _resp(
                    "response.output_item.added",
                    item={"type": "function_call", "name": "f", "arguments": SLASHED[:14]},
                ),
                _resp("response.function_call_arguments.delta", delta=SLASHED[14:]),
            ],
            id="responses-item-arguments",
        ),
        pytest.param(
            "openai",
            "/v1/responses",
            [
                _resp(
                    "response.output_item.added",
                    item={
                        "type": "message",
                        "content": [{"type": "output_text", "text": SLASHED[:14]}],
                    },
                ),
                _resp("response.output_text.delta", content_index=0, delta=SLASHED[14:]),
            ],
            id="responses-item-message-text",
        ),
        pytest.param(
            "openai",
            "/v1/responses",
            [
                _resp(
                    "response.content_part.added",
                    content_index=0,
                    part={"type": "refusal", "refusal": SLASHED[:14]},
                ),
                _resp("response.refusal.delta", content_index=0, delta=SLASHED[14:]),
            ],
            id="responses-refusal-part",
        ),
        # [AO] the SDK appends a part where its list ends and applies deltas by content_index:
        # indexes that disagree put the part's start text before another part's deltas
        pytest.param(
            "openai",
            "/v1/responses",
            [
                _resp(
                    "response.output_item.added",
                    item={"type": "message", "content": [{"type": "output_text", "text": ""}]},
                ),
                _resp(
                    "response.content_part.added",
                    content_index=0,
                    part={"type": "output_text", "text": SLASHED[:13]},
                ),
                _resp("response.output_text.delta", content_index=0, delta=" ok"),
                _resp("response.output_text.delta", content_index=1, delta=SLASHED[13:]),
            ],
            id="responses-part-indexes-disagree",
        ),
        # [AP] the SDK starts its snapshot with the items response.created carries
        pytest.param(
            "openai",
            "/v1/responses",
            [
                ev(
                    {
                        "type": "response.created",
                        "response": {
                            "output": [
                                {
                                    "type": "message",
                                    "content": [{"type": "output_text", "text": SLASHED[:13]}],
                                }
                            ]
                        },
                    },
                    "response.created",
                ),
                _resp("response.output_text.delta", content_index=0, delta=SLASHED[13:]),
            ],
            id="responses-created-output",
        ),
        # [AQ] response.in_progress lists items the SDK does not apply to one being written:
        # counting its parts again lost the SDK's position
        pytest.param(
            "openai",
            "/v1/responses",
            [
                _resp("response.output_item.added", item={"type": "message", "content": []}),
                _resp(
                    "response.content_part.added",
                    content_index=0,
                    part={"type": "output_text", "text": ""},
                ),
                _resp(
                    "response.content_part.added",
                    content_index=1,
                    part={"type": "output_text", "text": ""},
                ),
                ev(
                    {
                        "type": "response.in_progress",
                        "response": {"output": [{"type": "message", "content": []}]},
                    },
                    "response.in_progress",
                ),
                _resp(
                    "response.content_part.added",
                    content_index=0,
                    part={"type": "output_text", "text": SLASHED[:15]},
                ),
                _resp("response.output_text.delta", content_index=2, delta=SLASHED[15:]),
            ],
            id="responses-in-progress-output",
        ),
    ],
)
def test_a_key_begun_in_a_start_event_and_continued_by_deltas_is_cut(
    provider: str, path: str, events: list[bytes]
) -> None:
    """The SDKs start a block's (part's) text with its start event's and append the deltas:
    the start events were not watched."""
    g, _ = guard(provider, path, secrets=(SLASHED,))
    assert _cut(b"".join(g(e) for e in events) + g(b""))


def test_a_completion_ending_in_a_keys_public_start_is_released_whole() -> None:
    """Text ending in the key's first characters is held until the next event shows whether a
    key follows, and at the stream's end it was cut as a leak: "keys start with sk-proj-" is
    every such key's public start, no leak."""
    key = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
    events = [
        *chat_stream(["OpenAI project keys start with ", "sk-proj-"], usage=True),
    ]
    g, _ = guard(secrets=(key,))
    out = b"".join(g(e) for e in events) + g(b"")
    assert out == b"".join(events) and g.cut is None
    g, _ = guard(secrets=(key,))  # one character past it: held, and cut at the end
    events = chat_stream(["keys start with ", key[:9]], usage=True)
    out = b"".join(g(e) for e in events) + g(b"")
    assert _cut(out) and key[:9].encode() not in out


def test_blank_lines_run_together_as_one_event() -> None:
    """Every blank line was an event of its own, through the scrubber, the tracker and the
    watch: 5.5 us a byte of a stream of blank lines (1 MiB: 5.7 s on the event loop)."""
    sp = EventSplitter()
    events = sp.feed(b"data: 1\n\n" + b"\n" * 10_000 + b"\r\n" * 10 + b"data: 2\n\n")
    assert events == [b"data: 1\n\n", b"\n" * 10_000 + b"\r\n" * 10, b"data: 2\n\n"]
    sp = EventSplitter()  # a CR at a chunk's end: its LF in the next chunk is the same line end
    assert sp.feed(b"data: 1\n\n\r") == [b"data: 1\n\n", b"\r"]
    assert sp.feed(b"\ndata: 2\n\n") == [b"\ndata: 2\n\n"]


def test_events_without_data_are_checked_in_one_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """Comments and keep-alives carry nothing to dispatch: a run of them is one pass through the
    scrubber, the tracker and the watch, not one per event (counted, not timed)."""
    g, _ = guard(secrets=(SLASHED,))
    seen: list[bytes] = []
    real = g._event

    def counted(event: bytes, out: bytearray) -> None:
        seen.append(event)
        real(event, out)

    monkeypatch.setattr(g, "_event", counted)
    body = ev({"choices": [{"index": 0, "delta": {"content": "a"}}]})
    out = g(body + b": keep-alive\n\n" * 1000 + b"\n" * 500 + body)
    assert out == body + b": keep-alive\n\n" * 1000 + b"\n" * 500 + body
    assert len(seen) == 3


def test_the_tracker_skips_runs_of_blank_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    t = tracker()
    calls: list[int] = []
    real = t._end_line

    def counted() -> None:
        calls.append(1)
        real()

    monkeypatch.setattr(t, "_end_line", counted)
    t.feed(b"data: {}\n\n" + b"\n" * 10_000 + b"data: [DONE]\n\n")
    assert len(calls) == 4 and t.finished


def test_responses_items_past_the_count_cap_cut_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """[AP] Past the cap on counted items, parts' positions were no longer known and a part
    whose index disagreed with the SDK's position leaked again: cut instead."""
    from aiid_proxy.providers import usage

    monkeypatch.setattr(usage, "_MAX_ITEMS", 3)  # a count an item with content
    g, _ = guard("openai", "/v1/responses", secrets=(SLASHED,))
    empty = [
        _resp("response.output_item.added", output_index=i, item={"type": "message", "content": []})
        for i in range(3)
    ]
    out = b"".join(g(e) for e in empty)
    assert g.cut is None and out == b"".join(empty)
    assert b"too_many_channels" in g(empty[-1].replace(b'"output_index": 2', b'"output_index": 9'))


@pytest.mark.parametrize(
    ("provider", "path", "event"),
    [
        pytest.param(
            "openai",
            "/v1/responses",
            _resp("response.output_text.delta", content_index=-1, delta="x"),
            id="negative-content-index",
        ),
        pytest.param(
            "openai",
            "/v1/responses",
            _resp("response.output_text.delta", content_index=True, delta="x"),
            id="boolean-content-index",
        ),
        pytest.param(
            "openai",
            "/v1/responses",
            ev(
                {
                    "type": "response.function_call_arguments.delta",
                    "output_index": 0.0,
                    "delta": "x",
                },
                "response.function_call_arguments.delta",
            ),
            id="float-output-index",
        ),
        pytest.param(
            "openai",
            "/v1/chat/completions",
            ev({"choices": [{"index": -1, "delta": {"content": "x"}}]}),
            id="negative-choice-index",
        ),
        pytest.param(
            "openai",
            "/v1/chat/completions",
            ev(
                {
                    "choices": [
                        {
                            "index": 0,
                            "delta": {
                                "tool_calls": [{"index": "1", "function": {"arguments": "x"}}]
                            },
                        }
                    ]
                }
            ),
            id="string-tool-call-index",
        ),
        pytest.param(
            "anthropic",
            "/v1/messages",
            _block_delta(1.0, "x"),
            id="float-block-index",
        ),
    ],
)
def test_an_event_with_a_position_the_watch_cannot_follow_cuts_the_stream(
    provider: str, path: str, event: bytes
) -> None:
    """[AR] The SDKs read -1 (the last), true (1) and 0.0 (0) as positions the watch named
    otherwise: a key begun under one and continued under the other reached the snapshot."""
    g, _ = guard(provider, path, secrets=(SLASHED,))
    assert b"cannot follow" in g(event) and g.cut == INDEX_CUT_REASON


def test_indexes_that_are_null_or_absent_are_fine() -> None:
    g, _ = guard(secrets=(SLASHED,))
    out = g(ev({"choices": [{"index": None, "delta": {"content": "x"}}]}))
    out += g(ev({"choices": [{"delta": {"content": "y"}}]}))
    assert g.cut is None and b"unplaceable" not in out


@pytest.mark.parametrize(
    ("provider", "path", "events"),
    [
        pytest.param(
            "anthropic",
            "/v1/messages",
            [
                _block_start(3, SECRET[:3]),
                _block_delta(0, SECRET[3:]),
            ],
            id="anthropic-block-started-under-another-index",
        ),
        pytest.param(
            "openai",
            "/v1/chat/completions",
            [
                ev(
                    {
                        "choices": [
                            {"index": 0, "delta": {"parts": [{"index": 0, "text": SECRET[:3]}]}}
                        ]
                    }
                ),
                ev(
                    {
                        "choices": [
                            {"index": 0, "delta": {"parts": [{"index": 4, "text": SECRET[3:]}]}}
                        ]
                    }
                ),
            ],
            id="chat-list-items-the-sdk-merges-by-position",
        ),
    ],
)
def test_a_key_the_sdk_joins_from_pieces_named_apart_is_cut(
    provider: str, path: str, events: list[bytes]
) -> None:
    """[AS] The SDKs join text the tracker names apart: Anthropic's appends a started block
    whatever its index and applies deltas by position; openai's merges any list of a delta by
    its items' index, as a list position. Every piece is also read in the order it came."""
    g, _ = guard(provider, path, secrets=(SECRET,))
    out = b"".join(g(e) for e in events) + g(b"")
    assert g.cut == KEY_CUT_REASON and SECRET.encode() not in out


PROJ = "sk-proj-a1B2c3D4e5F6g7H8i9J0kLmNoPqRsTuV"


@pytest.mark.parametrize(
    ("continued", "cut"),
    [
        pytest.param("a", False, id="one-past-the-public-start"),
        pytest.param("a1B", False, id="three-past"),
        pytest.param("a1B2", True, id="four-past"),
    ],
)
def test_a_public_start_in_one_choice_and_the_next_characters_in_another(
    continued: str, cut: bool
) -> None:
    """[AT] Read on one field, "...sk-proj-" in choice 0 and "a" in choice 1 ended the stream
    held, and it was cut as a leak: no SDK joins two choices. At the end, a field may end in
    up to HOLD - 1 characters past the public start, as a channel's text may pass."""
    events = [
        ev({"choices": [{"index": 0, "delta": {"content": "Keys look like sk-proj-"}}]}),
        ev({"choices": [{"index": 1, "delta": {"content": continued}}]}),
        ev({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        ev("[DONE]"),
    ]
    g, _ = guard(secrets=(PROJ,))
    out = b"".join(g(e) for e in events) + g(b"")
    if cut:
        assert g.cut == KEY_CUT_REASON and continued.encode() not in out
    else:
        assert g.cut is None and out == b"".join(events)


def test_fields_do_not_count_towards_the_channel_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiid_proxy.scrub import scrubber

    monkeypatch.setattr(scrubber, "MAX_CHANNELS", 3)
    w = TextWatch([PROJ])
    w.feed([("c0.content", "a"), ("c1.content", "b"), ("c2.content", "c")])
    assert not w.overflowed


def test_an_anthropic_block_is_watched_at_the_position_the_sdk_gives_it() -> None:
    """[AU] The SDK appends a started block whatever its index: a block announced as 5 is its
    first, which a delta of index 0 continues. Watched under the announced index, with
    another block between them, the key split at its public start passed whole."""
    events = [
        _block_start(5, "Key: " + PROJ[:8]),
        _block_start(6, "zz"),
        _block_delta(0, PROJ[8:]),
    ]
    g, _ = guard("anthropic", "/v1/messages", secrets=(PROJ,))
    out = b"".join(g(e) for e in events) + g(b"")
    assert g.cut == KEY_CUT_REASON and PROJ[8:].encode() not in out
