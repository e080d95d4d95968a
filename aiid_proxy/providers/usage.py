"""Token usage as providers report it, in whole responses and in server-sent event streams.

Nothing here raises on a malformed response: a provider (or anything pretending to be one)
may send junk, and junk yields ``None`` (or is counted in :attr:`SSEUsageTracker.junk`).
Response bodies must already be decoded (no gzip).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiid_proxy.providers.model import Provider, Route

# An event over this is not read (memory is bounded by one event). A provider's events are
# far smaller, but a Responses stream's partial images run to a few MB; a stream whose
# key is watched is cut at such an event (StreamGuard), since its text cannot be checked.
MAX_EVENT_BYTES = 16 << 20
"""An SSE event larger than this is dropped (and counted in ``dropped``), never buffered."""

_EOL = re.compile(rb"\r\n|\r|\n")
_EOLS = re.compile(rb"[\r\n]+")
_CHARS_PER_TOKEN = 4
_RESPONSES_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_WATCH_NODES = 10_000
_MAX_ITEMS = 4096  # Responses items whose parts are counted (the watch's channels cap too)
# Part-start events of the Responses API, and the delta kind that continues their text (None:
# named by the part's type, "output_text" -> "response.output_text.delta").
_RESPONSES_PART_ADDED: dict[str, str | None] = {
    "response.content_part.added": None,
    "response.reasoning_summary_part.added": "response.reasoning_summary_text.delta",
}
# Item types of the Responses API whose start (output_item.added) may hold text a delta kind
# continues: the field, and that delta kind.
_RESPONSES_ITEM_STARTS: dict[str, tuple[str, str]] = {
    "function_call": ("arguments", "response.function_call_arguments.delta"),
    "custom_tool_call": ("input", "response.custom_tool_call_input.delta"),
    "code_interpreter_call": ("code", "response.code_interpreter_call_code.delta"),
}
_RESPONSES_TEXT = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
    }
)


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    estimated: bool = False
    cache_write_tokens: int = 0
    """Of ``input_tokens``, those written to a prompt cache, which a provider bills above its
    input price (Anthropic: 1.25x, or 2x for an hour's cache): costed at twice the input
    price, so that spend stays an upper bound."""

    @property
    def billed_input_tokens(self) -> int:
        """Input tokens as the price book should cost them (cache writes counted twice)."""
        return self.input_tokens + self.cache_write_tokens


def _count(v: object) -> int | None:
    """A token count: a non-negative int (bools are not counts)."""
    return v if type(v) is int and v >= 0 else None


def _optional_count(obj: Mapping[str, Any], key: str) -> int | None:
    """0 when absent or null, the count when valid, None when present but junk."""
    v = obj.get(key)
    return 0 if v is None else _count(v)


def _openai_usage(usage: object) -> Usage | None:
    """Chat/completions/embeddings (prompt/completion) or Responses (input/output)."""
    if not isinstance(usage, dict):
        return None
    for inp, out in (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")):
        if inp in usage:
            i = _count(usage[inp])
            o = _optional_count(usage, out)  # embeddings report no output
            return None if i is None or o is None else Usage(i, o)
    return None


def _anthropic_input(usage: Mapping[str, Any]) -> int | None:
    """input_tokens plus cache writes and reads: all of them are input the tenant pays for."""
    base = _count(usage.get("input_tokens"))
    created = _optional_count(usage, "cache_creation_input_tokens")
    read = _optional_count(usage, "cache_read_input_tokens")
    if base is None or created is None or read is None:
        return None
    return base + created + read


def _anthropic_cache_writes(usage: Mapping[str, Any]) -> int:
    return _optional_count(usage, "cache_creation_input_tokens") or 0


def _anthropic_usage(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    i = _anthropic_input(usage)
    o = _count(usage.get("output_tokens"))
    if i is None or o is None:
        return None
    return Usage(i, o, cache_write_tokens=_anthropic_cache_writes(usage))


def _gemini_usage(meta: object) -> Usage | None:
    """promptTokenCount in; candidatesTokenCount plus thoughtsTokenCount (billed as output)."""
    if not isinstance(meta, dict):
        return None
    i = _count(meta.get("promptTokenCount"))
    o = _optional_count(meta, "candidatesTokenCount")
    t = _optional_count(meta, "thoughtsTokenCount")
    return None if i is None or o is None or t is None else Usage(i, o + t)


def _loads(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def parse_usage(provider: Provider, route: Route | None, body: bytes) -> Usage | None:
    """The usage a whole (non-streamed) response body reports, or None."""
    fmt = route.wire_format if route is not None else provider.usage_format
    obj = _loads(body)
    if fmt == "gemini":
        # streamGenerateContent without alt=sse answers with an array of responses.
        items = obj if isinstance(obj, list) else [obj]
        for item in reversed(items):
            if isinstance(item, dict) and "usageMetadata" in item:
                return _gemini_usage(item["usageMetadata"])
        return None
    if not isinstance(obj, dict):
        return None
    if fmt == "anthropic":
        return _anthropic_usage(obj.get("usage"))
    return _openai_usage(obj.get("usage"))


_OUTPUT_TEXT_KEYS = frozenset(
    {"text", "content", "arguments", "thinking", "refusal", "partial_json"}
)


def estimate_body_usage(body: bytes, input_tokens: int = 0) -> Usage | None:
    """An estimate for a whole response body that reports no usage: output from the generated
    text in it (every string under ``text``/``content``/``arguments``/... outside ``usage``,
    chars / 4), input the caller's estimate. None when the body is not JSON."""
    obj = _loads(body)
    if not isinstance(obj, dict | list):
        return None
    chars = 0
    stack: list[tuple[object, bool]] = [(obj, False)]
    while stack:
        v, counted = stack.pop()
        if isinstance(v, str):
            chars += len(v) if counted else 0
        elif isinstance(v, list):
            stack.extend((x, counted) for x in v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if k in ("usage", "usageMetadata"):
                    continue
                if k == "input" and isinstance(x, dict):  # Anthropic tool_use arguments
                    chars += len(json.dumps(x))
                    continue
                stack.append((x, k in _OUTPUT_TEXT_KEYS))
    return Usage(max(0, input_tokens), -(-chars // _CHARS_PER_TOKEN), estimated=True)


class SSEUsageTracker:
    """Reads a streamed (``text/event-stream``) response as it passes, for its usage.

    Feed it the bytes in whatever chunks they arrive: events may be split anywhere, lines end
    in CRLF, LF or CR, and ``data:`` may span lines. Memory is bounded by the current
    incomplete event, itself capped at :data:`MAX_EVENT_BYTES`.
    """

    def __init__(self, provider: Provider, route: Route | None) -> None:
        self._format = route.wire_format if route is not None else provider.usage_format
        self.events = 0
        """Events dispatched (each with at least one ``data:`` line)."""
        self.junk = 0
        """Events whose data is not a JSON object."""
        self.dropped = 0
        """Events over :data:`MAX_EVENT_BYTES`, skipped unread."""
        self.output_chars = 0
        """Characters of generated text (and tool-call arguments) seen in deltas."""
        self.text_deltas = 0
        """Non-empty pieces of generated text seen (each holds at least one token)."""
        self.finished = False
        """A terminal marker was seen ([DONE], message_stop, response.completed, ...)."""
        self.texts: list[tuple[str, str]] | None = None
        """When a list: every piece of generated text is appended to it, in order, with its
        channel (a choice, content block or candidate: they interleave), for
        :class:`~aiid_proxy.scrub.TextWatch`; whoever set it empties it."""
        # Responses API: per (output_index, part-added kind), how many parts the SDK holds
        self._responses_parts: dict[tuple[object, str], int] = {}
        self._blocks = 0  # Anthropic: the content blocks started so far (the SDK's list)
        self.items_overflowed = False
        self.odd_index = False
        """An event named a position (choice, block, item, part, tool call) other than a
        non-negative whole number: the SDKs read ``-1``, ``true`` and ``0.0`` as positions
        the watch cannot follow ([AR]), so the stream is cut."""
        """More Responses items than their parts can be counted for (_MAX_ITEMS)."""
        self._line = bytearray()
        self._line_len = 0
        self._data: list[str] = []
        self._data_bytes = 0
        self._event_name: str | None = None
        self._dropping = False
        self._pending_cr = False
        self._final: Usage | None = None
        self._input: int | None = None  # input tokens known before the final usage
        self._cache_writes = 0  # of them, written to a prompt cache (Anthropic)
        self._output: int | None = None

    # -- the byte level ---------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        pos, end = 0, len(chunk)
        if end and self._pending_cr:
            self._pending_cr = False
            if chunk[0] == 0x0A:
                pos = 1  # the LF of a CRLF split across chunks
        while pos < end:
            m = _EOL.search(chunk, pos)
            if m is None:
                self._append(chunk[pos:])
                return
            self._append(chunk[pos : m.start()])
            self._end_line()
            pos = m.end()
            if not (self._data or self._line or self._dropping or self._event_name):
                # at a line's start with nothing pending: more blank lines change nothing
                pos = _EOLS.match(chunk, pos - 1).end()  # type: ignore[union-attr]
            self._pending_cr = chunk[pos - 1] == 0x0D and pos == end

    def close(self) -> None:
        """End of stream: treat a last unterminated line and event as complete (lenient)."""
        if self._line_len:
            self._end_line()
        self._end_line()

    def _append(self, segment: bytes) -> None:
        if not segment:
            return
        self._line_len += len(segment)
        if self._dropping:
            return
        if self._data_bytes + len(self._line) + len(segment) > MAX_EVENT_BYTES:
            self._dropping = True
            self.dropped += 1
            self._line.clear()
            self._data.clear()
            self._data_bytes = 0
            return
        self._line += segment

    def _end_line(self) -> None:
        blank = self._line_len == 0
        line = bytes(self._line)
        self._line.clear()
        self._line_len = 0
        if blank:
            if self._dropping:
                self._dropping = False
            elif self._data:
                self._dispatch(self._event_name, "\n".join(self._data))
            self._data.clear()
            self._data_bytes = 0
            self._event_name = None
            return
        if self._dropping:
            return
        text = line.decode("utf-8", errors="replace")
        if text.startswith(":"):
            return  # comment / keep-alive
        name, _, value = text.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
            self._data_bytes += len(line)
        elif name == "event":
            self._event_name = value

    # -- the event level --------------------------------------------------------------------
    def _dispatch(self, name: str | None, data: str) -> None:
        self.events += 1
        if data.strip() == "[DONE]":
            self.finished = True
            return
        obj = _loads(data)
        if isinstance(obj, dict) and not self.odd_index and _odd_index(obj):
            self.odd_index = True
        if not isinstance(obj, dict):
            self.junk += 1
            return
        if self._format == "anthropic":
            self._anthropic(obj)
        elif self._format == "gemini":
            self._gemini(obj)
        else:
            kind = obj.get("type")
            if isinstance(kind, str) and kind.startswith("response."):
                self._responses(kind, obj)
            elif name is not None and name.startswith("response."):
                self._responses(name, obj)
            else:
                self._chat(obj)

    def _chat(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usage")
        if usage is None and isinstance(obj.get("x_groq"), dict):
            usage = obj["x_groq"].get("usage")
        found = _openai_usage(usage)
        if found is not None:
            self._final = found
            self.finished = True
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for i, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            ch = f"c{choice.get('index', i)}"  # choices interleave: one text each
            self._text(choice.get("text"), ch)  # legacy completions
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            # Counted: the generated text. Watched: every string of the delta and the logprobs,
            # so a key spelled over deltas in a field not counted (content parts, an audio
            # transcript, logprob tokens) is seen too.
            self._watch(delta, ch)
            self._watch(choice.get("logprobs"), ch + "lp")
            self._text(delta.get("content"), ch, watch=False)
            for key in ("reasoning_content", "reasoning", "refusal"):
                self._text(delta.get(key), f"{ch}{key}", watch=False)
            fc = delta.get("function_call")  # legacy functions
            if isinstance(fc, dict):
                self._text(fc.get("arguments"), f"{ch}f", watch=False)
            calls = delta.get("tool_calls")
            for j, call in enumerate(calls if isinstance(calls, list) else []):
                if not isinstance(call, dict):
                    continue
                fn = call.get("function")
                if isinstance(fn, dict):
                    self._text(fn.get("arguments"), f"{ch}t{call.get('index', j)}", watch=False)

    def _responses(self, kind: str, obj: dict[str, Any]) -> None:
        if "delta" in obj:  # any kind of delta is watched (an audio transcript too)
            part = obj.get("content_index", obj.get("summary_index"))
            self._watch(obj["delta"], f"{kind}{obj.get('output_index')}:{part}")
        elif kind in _RESPONSES_PART_ADDED and isinstance(obj.get("part"), dict):
            # a part may start with text, which its deltas continue: one channel for both.
            # The SDK appends the part where its list ends, whatever content_index says, and
            # applies deltas by content_index: a provider whose indexes disagree has the
            # text continued in the other part ([AO]): watched under both.
            out = obj.get("output_index")
            index = obj.get("content_index", obj.get("summary_index"))
            at = self._responses_parts.get((out, kind), 0)
            self._count_parts(out, kind, at + 1)
            for i in {str(index): index, str(at): at}.values():
                self._responses_part(obj["part"], out, i, kind)
        elif kind == "response.output_item.added" and isinstance(obj.get("item"), dict):
            # an item may start with text too (a message's parts, a call's arguments), which
            # the SDK's snapshot continues with the deltas ([AN])
            self._responses_item(obj["item"], obj.get("output_index"))
        elif kind == "response.created":
            # the SDK starts its snapshot with the items it carries ([AP]); not with those of
            # response.in_progress, which it applies to no item still being written ([AQ])
            response = obj.get("response")
            items = response.get("output") if isinstance(response, dict) else None
            for out, item in enumerate(items if isinstance(items, list) else []):
                if isinstance(item, dict):
                    self._responses_item(item, out)
        if kind in _RESPONSES_TEXT:
            part = obj.get("content_index", obj.get("summary_index"))
            self._text(obj.get("delta"), f"{kind}{obj.get('output_index')}:{part}", watch=False)
        elif kind in _RESPONSES_FINAL:
            self.finished = True
            response = obj.get("response")
            if isinstance(response, dict):
                found = _openai_usage(response.get("usage"))
                if found is not None:
                    self._final = found

    def _responses_item(self, item: dict[str, Any], out: object) -> None:
        """Watch an item's start texts (a call's arguments, its parts' texts) on the channels
        of the deltas that continue them, and count its parts where the SDK holds them."""
        started = _RESPONSES_ITEM_STARTS.get(str(item.get("type")))
        if started is not None:
            field, deltas = started
            self._watch(item.get(field), f"{deltas}{out}:None")
        for key, added in (
            ("content", "response.content_part.added"),
            ("summary", "response.reasoning_summary_part.added"),
        ):
            parts = item.get(key)
            if not isinstance(parts, list):
                continue  # a call: no parts, no count ([AQ]: each took a slot of the cap)
            self._count_parts(out, added, len(parts))  # where the SDK adds the next one
            for i, part in enumerate(parts):
                if isinstance(part, dict):
                    self._responses_part(part, out, i, added)

    def _count_parts(self, out: object, added: str, n: int) -> None:
        if (out, added) in self._responses_parts or len(self._responses_parts) < _MAX_ITEMS:
            self._responses_parts[(out, added)] = n
        else:  # ([AP]) past the cap the positions are unknown: the stream is cut (fail closed)
            self.items_overflowed = True

    def _responses_part(self, part: dict[str, Any], out: object, index: object, added: str) -> None:
        """Watch a Responses part's start text on the channel of the deltas that continue it:
        ``response.<type>.delta`` (output_text, refusal, reasoning_text) or, for a reasoning
        summary part, ``response.reasoning_summary_text.delta``."""
        deltas = _RESPONSES_PART_ADDED[added] or f"response.{part.get('type')}.delta"
        text = part.get("refusal") if part.get("type") == "refusal" else part.get("text")
        self._watch(text, f"{deltas}{out}:{index}")

    def _anthropic(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind == "message_start":
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._input = _anthropic_input(usage)
                self._cache_writes = _anthropic_cache_writes(usage)
                self._output = _count(usage.get("output_tokens"))
        elif kind == "message_delta":
            usage = obj.get("usage")
            if not isinstance(usage, dict):
                return
            out = _count(usage.get("output_tokens"))  # cumulative: the last one wins
            if "input_tokens" in usage:  # newer API versions repeat (updated) input counts
                inp = _anthropic_input(usage)
                if inp is not None:
                    self._input = inp
                    self._cache_writes = _anthropic_cache_writes(usage)
            if out is not None:
                self._output = out
                if self._input is not None:
                    self._final = Usage(self._input, out, cache_write_tokens=self._cache_writes)
        elif kind == "content_block_start":
            start = obj.get("content_block")
            if isinstance(start, dict):  # its text, if any, is continued by the deltas
                # The SDK appends a started block where its list ends, whatever its index
                # says, and applies deltas by index as a position ([AU]): watched at the
                # position it takes, which its deltas name.
                block = f"b{self._blocks}"
                self._blocks += 1
                self._watch(start, block)
                for key in ("text", "thinking"):
                    self._text(start.get(key), block + key, watch=False)
        elif kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                block = f"b{obj.get('index')}"  # blocks interleave: one text each
                self._watch(delta, block)  # every string; citations are watched, not counted
                for key in ("text", "partial_json", "thinking"):
                    self._text(delta.get(key), block + key, watch=False)
        elif kind == "message_stop":
            self.finished = True

    def _gemini(self, obj: dict[str, Any]) -> None:
        if "usageMetadata" in obj:
            found = _gemini_usage(obj["usageMetadata"])
            if found is not None:
                self._final = found  # cumulative: the last one wins
                self._input = found.input_tokens
        candidates = obj.get("candidates")
        for i, cand in enumerate(candidates if isinstance(candidates, list) else []):
            if not isinstance(cand, dict):
                continue
            ch = f"g{cand.get('index', i)}"  # candidates interleave: one text each
            if cand.get("finishReason") is not None:
                self.finished = True
            content = cand.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            for part in parts if isinstance(parts, list) else []:
                if isinstance(part, dict):
                    self._watch(part, ch)
                    self._text(part.get("text"), ch, watch=False)
                    call = part.get("functionCall")
                    if isinstance(call, dict) and call.get("args") is not None:
                        self._text(json.dumps(call.get("args")), ch + "f")

    def _text(self, value: object, channel: str = "", *, watch: bool = True) -> None:
        if isinstance(value, str):
            self.output_chars += len(value)
            if value:
                self.text_deltas += 1
                if watch and self.texts is not None:
                    self.texts.append((channel, value))

    def _watch(self, value: object, channel: str) -> None:
        """Hand every string in ``value`` to the secret watch (not counted), in document order,
        on one channel per key path (list positions left out, so a part's text continues from
        the previous event's part), at most _WATCH_NODES values an event."""
        texts = self.texts
        if texts is None or value is None:
            return
        stack: list[tuple[str, object]] = [(channel, value)]
        budget = _WATCH_NODES
        while stack and budget:
            budget -= 1
            ch, v = stack.pop()
            if isinstance(v, str):
                if v:
                    texts.append((ch, v))
            elif isinstance(v, dict):
                stack.extend((f"{ch}.{k}", x) for k, x in reversed(v.items()))
            elif isinstance(v, list):
                stack.extend((_item_channel(ch, x), x) for x in reversed(v))

    # -- results ----------------------------------------------------------------------------
    @property
    def buffered(self) -> int:
        """Bytes held for the current incomplete event (never above MAX_EVENT_BYTES)."""
        return len(self._line) + self._data_bytes

    def usage(self) -> Usage | None:
        """The usage the provider reported at the end of the stream, if it did."""
        return self._final

    def estimate(self, input_tokens: int = 0) -> Usage:
        """A stand-in when :meth:`usage` is None: input as far as the stream told it (else
        ``input_tokens``, the caller's own estimate), output from the text seen (chars / 4,
        and at least one per non-empty text piece)."""
        output = max(-(-self.output_chars // _CHARS_PER_TOKEN), self.text_deltas)
        if self._output is not None:
            output = max(output, self._output)
        inp = self._input if self._input is not None else max(0, input_tokens)
        return Usage(inp, output, estimated=True)

    def output_floor(self) -> int:
        """Output tokens generated so far, counted low: what the provider reported (cumulative
        counts, the final usage), else one per non-empty text piece. Never more than the
        provider will bill, so a stream cut on it is never cut early."""
        floor = self.text_deltas
        if self._output is not None:
            floor = max(floor, self._output)
        if self._final is not None:
            floor = max(floor, self._final.output_tokens)
        return floor

    @property
    def wire_format(self) -> str:
        return self._format


def _item_channel(channel: str, item: object) -> str:
    """The watch channel of a list item: its own for an item that names its ``index`` (tool
    calls interleave: each one's arguments continue only its own), else the list's (a part's
    text continues from the previous event's part)."""
    if isinstance(item, dict):
        index = item.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            return f"{channel}[{index}]"
    return channel


_INDEX_KEYS = ("index", "output_index", "content_index", "summary_index")


def _odd_index(obj: dict[str, Any]) -> bool:
    """Whether an event (or its choices, candidates, tool calls) names a position that is not
    a non-negative whole number (null or absent is fine)."""

    def odd(d: dict[str, Any]) -> bool:
        return any(
            (v := d.get(k)) is not None and (type(v) is not int or v < 0) for k in _INDEX_KEYS
        )

    if odd(obj):
        return True
    for key in ("choices", "candidates"):
        items = obj.get(key)
        for c in items if isinstance(items, list) else []:
            if not isinstance(c, dict):
                continue
            if odd(c):
                return True
            delta = c.get("delta")
            calls = delta.get("tool_calls") if isinstance(delta, dict) else None
            for t in calls if isinstance(calls, list) else []:
                if isinstance(t, dict) and odd(t):
                    return True
    return False
