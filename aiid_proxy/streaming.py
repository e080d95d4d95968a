"""Server-sent event streams on their way back to the agent: passed on event by event, as they
arrive, while the injected key is scrubbed, usage is counted and the output reservation is
enforced.

:class:`StreamGuard` is what the mitmproxy adapter installs as ``response.stream``: it is fed
the body in whatever chunks the provider's bytes arrive and returns what goes to the agent.

* Latency: each chunk is split at SSE event boundaries (a blank line; CRLF, LF or CR line
  ends). Every complete event is released in the same call that completed it; only the
  unfinished tail of an event is held, and an agent can do nothing with half an event anyway. So
  streaming adds no time to the first token.
* Scrubbing: the released events go through a :class:`~aiid_proxy.scrub.Scrubber`, which holds
  back only a suffix that could start a secret: nothing, at an event boundary. A secret the
  bytes do not show, spelled out in the text of several events or with JSON escapes, is
  caught in the decoded text (:class:`~aiid_proxy.scrub.TextWatch`): the stream is cut there,
  before the event that completes it. An event whose text ends in the first characters of a
  secret waits for the next event (text rarely ends so: no delay otherwise).
* Usage: an :class:`~aiid_proxy.providers.SSEUsageTracker` reads every byte (also after a cut).
* Reservation: with ``output_cap`` set, an event after which the output generated so far
  (:meth:`SSEUsageTracker.output_floor`, counted low so that a stream within its limit is never
  cut) exceeds the cap is not released. Instead the agent gets one provider-shaped error event
  (which the OpenAI and Anthropic SDKs raise as an API error), nothing after it, and
  ``on_cut`` is called so the adapter can close the upstream connection.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

from aiid_proxy.providers import MAX_EVENT_BYTES, SSEUsageTracker, Usage
from aiid_proxy.scrub import Scrubber, TextWatch, escaped_anywhere, escaped_secrets

log = logging.getLogger("aiid.stream")
_EOL = re.compile(rb"\r\n|\r|\n")
_EOLS = re.compile(rb"[\r\n]+")
_SSE_START = re.compile(rb"\A(?:\xef\xbb\xbf)?[\r\n]*(?:data|event|id|retry)?:")
CUT_REASON = "reservation exceeded"
KEY_CUT_REASON = "injected key in the output"
LARGE_CUT_REASON = "event too large to check"
CHANNELS_CUT_REASON = "too many interleaved texts to check"
INDEX_CUT_REASON = "an index the gateway cannot follow"


def looks_like_sse(body: bytes) -> bool:
    """``body`` reads as an event stream (its first line a field or a comment), whatever its
    content type says: an SDK that asked for a stream parses it as one."""
    return _SSE_START.match(body) is not None


def cut_event(
    wire_format: str, message: str, request_id: str = "", code: str = "reservation_exceeded"
) -> bytes:
    """One SSE event that the provider's SDKs surface as an error, in ``wire_format``; it
    carries the request id (as the gateway's refusals do) when there is one."""
    ours: dict[str, object] = {"rule": None, "request_id": request_id} if request_id else {}
    body: dict[str, object]
    if wire_format == "anthropic":
        body = {"type": "error", "error": {"type": "aiid_stream_cut", "message": message, **ours}}
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
    if wire_format == "gemini":
        body = {"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED", **ours}}
        return b"data: " + json.dumps(body).encode() + b"\n\n"
    body = {
        "type": "error",
        "error": {
            "message": message,
            "type": "aiid_stream_cut",
            "code": code,
            **ours,
        },
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class EventSplitter:
    """Splits a byte stream into complete SSE events (each with its terminating blank line).

    Exact over any chunking, including a CRLF split across chunks. The unfinished tail is held;
    a tail longer than ``max_event`` bytes (no blank line in sight) is handed out as is by
    :meth:`feed` too, so memory stays bounded.
    """

    def __init__(self, max_event: int = MAX_EVENT_BYTES) -> None:
        self.max_event = max_event
        self._buf = bytearray()
        self._scanned = 0  # offset in _buf up to which lines are known
        self._line_start = 0  # offset in _buf where the current line starts; -1: mid-line
        self._skip_lf = False  # the previous byte was a CR at the end of the data seen

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        out: list[bytes] = []
        buf = self._buf
        pos = self._scanned
        while pos < len(buf):
            if self._skip_lf:
                self._skip_lf = False
                if buf[pos] == 0x0A:  # the LF of a CRLF split across chunks
                    pos += 1
                    self._line_start = pos
                    continue
            m = _EOL.search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            blank = m.start() == self._line_start
            end = m.end()
            if blank and m.start() == 0:
                # an event of nothing but line ends: every blank line that follows joins it
                # (each would be an event of its own: work per byte, for nothing)
                end = _EOLS.match(buf, end - 1).end()  # type: ignore[union-attr]
            if buf[end - 1] == 0x0D and end == len(buf):
                self._skip_lf = True  # a LF may follow in the next chunk
            if blank:
                out.append(bytes(buf[:end]))
                del buf[:end]
                pos = 0
                self._line_start = 0
                continue
            self._line_start = end
            pos = end
        self._scanned = pos
        if len(buf) > self.max_event:
            out.append(bytes(buf))
            buf.clear()
            self._scanned = 0
            self._line_start = -1  # the next line ending ends a line, not an event
        return out

    def rest(self) -> bytes:
        """The unfinished tail, at the end of the stream."""
        data = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        self._line_start = 0
        return data


class StreamGuard:
    """The ``response.stream`` filter of one event stream (see the module docstring)."""

    def __init__(
        self,
        scrubber: Scrubber,
        tracker: SSEUsageTracker,
        *,
        output_cap: int | None = None,
        request_id: str = "",
        on_cut: Callable[[], None] | None = None,
        keep: int = 0,
    ) -> None:
        self.scrubber = scrubber
        self.tracker = tracker
        self.output_cap = output_cap
        self.request_id = request_id
        self.on_cut = on_cut
        self.splitter = EventSplitter()
        self.cut: str | None = None
        """Why the stream was cut (:data:`CUT_REASON`), or None."""
        self.released = 0
        """Bytes handed to the agent."""
        self.closed = False
        self.keep = keep
        self.kept = bytearray()
        """The first ``keep`` bytes handed to the agent (scrubbed): the completion, for a
        tenant whose policy records prompts and completions."""
        self.watch = TextWatch(scrubber.secrets)
        self.held = bytearray()
        """Scrubbed events waiting while their text ends in the start of a secret."""
        if self.watch.active:
            tracker.texts = []

    def __call__(self, chunk: bytes) -> bytes:
        if chunk:
            return self.feed(chunk)
        return self.close()

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        quiet = bytearray()  # events with no data line (comments, keep-alives): one go
        for event in self.splitter.feed(chunk):
            if b"data" not in event:
                quiet += event
                continue
            if quiet:
                self._event(bytes(quiet), out)
                quiet.clear()
            self._event(event, out)
        if quiet:
            self._event(bytes(quiet), out)
        self._released(out)
        return bytes(out)

    def _released(self, out: bytearray) -> None:
        self.released += len(out)
        room = self.keep - len(self.kept)
        if room > 0 and out:
            self.kept += out[:room]

    def close(self) -> bytes:
        """End of stream: the unfinished tail (if any) goes out like an event."""
        if self.closed:
            return b""
        self.closed = True
        out = bytearray()
        rest = self.splitter.rest()
        if self.cut is None and self.watch.active:
            clean = self.scrubber.feed(rest) + self.scrubber.flush()
            self.tracker.feed(clean)
            self.tracker.close()  # dispatches an unterminated last event
            if not self._check(out) and not self._watched(clean, out):
                if self.watch.holding_at_end:  # text ends in a secret's start: not released
                    self._key_cut(out)
                else:
                    out += self.held + clean
                    self.held.clear()
            self._released(out)
            return bytes(out)
        if rest:
            self.tracker.feed(rest)
        self.tracker.close()  # dispatches an unterminated last event: check it before release
        if self.cut is None and not self._check(out):
            out += self.scrubber.feed(rest)
            out += self.scrubber.flush()
        self._released(out)
        return bytes(out)

    def _event(self, event: bytes, out: bytearray) -> None:
        if self.cut is not None:
            self.tracker.feed(event)
            return  # after a cut: counted, never forwarded
        if not self.watch.active:
            self.tracker.feed(event)
            if not self._check(out):
                out += self.scrubber.feed(event)
            return
        # the tracker reads the scrubbed bytes, so the text it hands the watch shows only
        # secrets the byte scrubber missed
        clean = self.scrubber.feed(event)
        dropped = self.tracker.dropped
        self.tracker.feed(clean)
        if self.tracker.dropped != dropped:  # an event too large to read: its text unchecked
            self.held.clear()
            self._cut(
                out,
                LARGE_CUT_REASON,
                "aiid: stream cut: an event too large to check for the key the gateway injected",
                "event_too_large",
            )
            return
        if self._check(out) or self._watched(clean, out):
            return
        if self.watch.holding:
            self.held += clean
            return
        if self.held:
            out += self.held
            self.held.clear()
        out += clean

    def _watched(self, clean: bytes, out: bytearray) -> bool:
        """Cut the stream if the text of the events so far spells a secret; True if cut."""
        texts = self.tracker.texts
        if texts is None:
            texts = self.tracker.texts = []
        found = max(self.watch.feed(texts), escaped_secrets(clean, self.scrubber.secrets, sse=True))
        if not found and escaped_anywhere(clean, self.scrubber.secrets):
            found = 1  # escaped where no JSON parse reaches it (a field over several lines)
        texts.clear()
        if not found and self.tracker.odd_index:
            self.held.clear()
            self._cut(
                out,
                INDEX_CUT_REASON,
                "aiid: stream cut: an event names a position (index) the gateway cannot follow "
                "to check for the key it injected",
                "unplaceable_index",
            )
            return True
        if not found and (self.watch.overflowed or self.tracker.items_overflowed):
            self.held.clear()
            self._cut(
                out,
                CHANNELS_CUT_REASON,
                "aiid: stream cut: too many interleaved texts to check for the key the gateway "
                "injected",
                "too_many_channels",
            )
            return True
        if not found:
            return False
        self.scrubber.hits += found
        self._key_cut(out)
        return True

    def _key_cut(self, out: bytearray) -> None:
        self.held.clear()  # the secret's first characters: never released
        self._cut(
            out,
            KEY_CUT_REASON,
            "aiid: stream cut: the provider's output spelled out the key the gateway injected",
            "injected_key_in_output",
        )

    def _check(self, out: bytearray) -> bool:
        cap = self.output_cap
        if cap is None or self.tracker.output_floor() <= cap:
            return False
        self.held.clear()  # text ending in a secret's start: not released, cut or not
        self._cut(
            out,
            CUT_REASON,
            f"aiid: stream cut: the output exceeded this request's reservation of {cap} "
            f"tokens (max_tokens, or the gateway's default when it is absent)",
        )
        return True

    def _cut(
        self, out: bytearray, reason: str, message: str, code: str = "reservation_exceeded"
    ) -> None:
        self.cut = reason
        out += self.scrubber.flush()
        if self.request_id:
            message += f"; request {self.request_id}"
        out += cut_event(self.tracker.wire_format, message, self.request_id, code)
        if self.on_cut is not None:
            try:
                self.on_cut()
            except Exception:  # best effort: nothing more is forwarded anyway
                log.exception("closing the upstream of a cut stream failed")

    def usage(self, input_estimate: int) -> Usage:
        """The provider's reported usage, else an estimate (flagged); never zero for a stream
        that carried text."""
        return self.tracker.usage() or self.tracker.estimate(input_estimate)


def spelled_in_array(body: bytes, tracker: SSEUsageTracker, secrets: tuple[str, ...]) -> bool:
    """A JSON-array stream read whole (Gemini's ``streamGenerateContent`` without
    ``alt=sse``): True if the text of its elements spells a secret, or ends in its start, as
    :class:`StreamGuard` would have cut it."""
    watch = TextWatch(secrets)
    if not watch.active or not body.lstrip().startswith(b"["):
        return False
    try:
        items = json.loads(body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(items, list):
        return False
    tracker.texts = []
    for item in items:
        tracker.feed(b"data: " + json.dumps(item).encode() + b"\n\n")
        if watch.feed(tracker.texts):
            return True
        tracker.texts.clear()
    return watch.holding_at_end


__all__ = [
    "CHANNELS_CUT_REASON",
    "CUT_REASON",
    "INDEX_CUT_REASON",
    "KEY_CUT_REASON",
    "LARGE_CUT_REASON",
    "EventSplitter",
    "StreamGuard",
    "cut_event",
    "looks_like_sse",
    "spelled_in_array",
]
