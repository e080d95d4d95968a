"""What policy needs to know about a request body, read strictly.

The gateway decides on these facts and then forwards the *same bytes* upstream, so any
ambiguity in how the body could be read is refused rather than guessed: duplicate keys at any
depth, non-JSON constants (``NaN``), invalid UTF-8, a model name with Unicode look-alikes or
invisible characters, a key given under two spellings that the provider treats as one
(Gemini accepts both ``generationConfig`` and ``generation_config``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiid_proxy.errors import RequestRefused
from aiid_proxy.providers.model import MODEL_FROM_BODY, Route

MAX_MODEL_CHARS = 256
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4

_MODEL_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space
_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_TEXT_FIELDS = ("messages", "input", "system", "prompt", "instructions")
_MESSAGE_LISTS = ("messages", "input")
MEDIA_PART_TOKENS = 1600
"""Input tokens an image, audio clip or file part is reserved at: about the most Anthropic
bills an image (~1,600), twice OpenAI's gpt-4o at high detail (765). An estimate, settled
to the provider's count; models that bill images far above it (gpt-4o-mini: ~25,000 an
image) can pass their limits and budgets by that much while such requests run at once."""
# Content parts (by their "type") and part keys that carry an image, audio or a file.
_MEDIA_TYPES = frozenset(
    {"image", "image_url", "input_image", "document", "file", "input_file", "audio"}
    | {"input_audio"}
)
_MEDIA_KEYS = ("inlineData", "inline_data", "fileData", "file_data", "input_audio", "image_url")
# Top-level fields that are no input text: the prompt fields (counted on their own), the
# model and the knobs. Everything else counts: tool definitions, response_format and
# text.format schemas, a prediction, fields no provider had when this was written.
_NOT_INPUT = frozenset(
    {"model", *_TEXT_FIELDS, *_MAX_TOKEN_FIELDS, "temperature", "top_p", "top_k", "n"}
    | {"best_of", "stream", "stream_options", "seed", "user", "metadata", "store", "stop"}
    | {"stop_sequences", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty"}
    | {"logit_bias", "parallel_tool_calls", "service_tier", "reasoning_effort", "reasoning"}
    | {"truncation", "include", "modalities", "previous_response_id", "background"}
    | {"thinking", "safety_identifier", "prompt_cache_key", "verbosity", "tool_choice"}
)
# Gemini's: what generationConfig holds besides its knobs is a response schema.
_GEMINI_INPUT = ("tools", "toolConfig", "tool_config")
_GEMINI_SCHEMAS = ("responseSchema", "response_schema", "responseJsonSchema")


@dataclass(frozen=True)
class RequestFacts:
    model: str | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    n: int | None
    stream: bool
    tools: bool
    include_usage: bool
    prompt_chars: int
    estimated_input_tokens: int
    """An estimate, not a count: ``ceil(prompt_chars / 4) + 4`` per message. Good enough to
    reserve rate-limit tokens before the provider reports the real number."""


def bad_request(message: str) -> RequestRefused:
    return RequestRefused(400, "bad_request", message)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _BadConstant(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    raise _BadConstant(name)


def _shown(text: str, limit: int = 64) -> str:
    """A safe, bounded rendering of agent-supplied text for an error message."""
    shown = ascii(text[:limit])
    return shown + ("..." if len(text) > limit else "")


def decode_json_object(body: bytes) -> dict[str, Any]:
    """``body`` as a JSON object, or RequestRefused(400) saying exactly why not."""
    if not body.strip():
        raise bad_request("request body is empty; this endpoint expects a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("request body is not valid UTF-8") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as e:
        raise bad_request(f"duplicate key {_shown(e.key)} in JSON body") from None
    except _BadConstant as e:
        raise bad_request(f"JSON body contains {e}, which is not valid JSON") from None
    except RecursionError:
        raise bad_request("JSON body is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {' '.join(str(e).split())}") from None
    except ValueError:  # Python's cap on integer digits: its message names Python internals
        raise bad_request("JSON body holds a number over 4,300 digits long") from None
    if not isinstance(value, dict):
        raise bad_request(f"request body must be a JSON object, not {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


# -- field readers ----------------------------------------------------------------------------
def check_model(model: object, where: str = "model") -> str:
    """A model name is non-empty printable ASCII without whitespace, at most 256 chars.

    Nothing is normalised: ``gpt\\u20114o`` (non-breaking hyphen) or a zero-width space could
    slip past a policy glob while the provider reads a different (or the same) model, so such
    names are refused outright.
    """
    if not isinstance(model, str):
        raise bad_request(f"{where} must be a string")
    if not model:
        raise bad_request(f"{where} must not be empty")
    if len(model) > MAX_MODEL_CHARS:
        raise bad_request(f"{where} is longer than {MAX_MODEL_CHARS} characters")
    if _MODEL_RE.fullmatch(model) is None:
        raise bad_request(
            f"{where} {_shown(model)} contains whitespace, control or non-ASCII characters"
        )
    return model


def _opt_int(obj: Mapping[str, Any], key: str, minimum: int) -> int | None:
    v = obj.get(key)
    if v is None:
        return None
    if type(v) is not int or v < minimum:
        what = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
        raise bad_request(f"{key} must be {what}")
    return v


def _opt_number(obj: Mapping[str, Any], key: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise bad_request(f"{key} must be a finite number")
    return float(v)


def _opt_bool(obj: Mapping[str, Any], key: str) -> bool:
    v = obj.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_request(f"{key} must be true or false")
    return v


def _opt_list(obj: Mapping[str, Any], key: str) -> list[Any]:
    v = obj.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise bad_request(f"{key} must be an array")
    return v


def _opt_object(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = obj.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad_request(f"{key} must be an object")
    return v


def _largest(values: list[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


class _Count:
    """Input a request carries, as the estimate counts it: characters of text (those beyond
    ASCII apart: about a token each, where English runs four characters a token) and media
    parts (a fixed allowance each)."""

    __slots__ = ("chars", "media", "wide")

    def __init__(self) -> None:
        self.chars = self.wide = self.media = 0

    def text(self, s: str) -> None:
        self.chars += len(s)
        if not s.isascii():
            self.wide += len(s) - len(s.encode("ascii", "ignore"))

    def tokens(self) -> int:
        narrow = self.chars - self.wide
        return -(-narrow // CHARS_PER_TOKEN) + self.wide + MEDIA_PART_TOKENS * self.media

    def prompt(self, value: object) -> None:
        """A prompt-like value: every string in it but short labels (a part's type, a
        role, an id); a bare integer (a token id) counts as one token's worth; a media part
        counts its allowance and whatever else it holds (:meth:`part`)."""
        stack: list[object] = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                self.text(v)
            elif isinstance(v, bool) or v is None:
                continue
            elif isinstance(v, int):
                self.chars += CHARS_PER_TOKEN
            elif isinstance(v, list):
                stack.extend(v)
            elif isinstance(v, dict):
                if _is_media(v):
                    self.media += 1
                    self.part(v)
                else:  # every value: tool calls and results, thinking, free-form tool input
                    stack.extend(x for k, x in v.items() if not _label(k, x))

    def part(self, value: object) -> None:
        """A media part: its allowance covers the bytes of an image, audio clip or video,
        where the part itself says they are such (a ``data:image/...`` URL under ``url``,
        ``image_url`` or ``file_data``; base64 ``data`` beside an image/audio/video
        ``media_type``, ``mimeType`` or ``format``). Other base64 bytes count as what they
        decode to (text/*: text; a PDF or other file: a token per ~12 bytes, as pages bill);
        everything else, as text (a document's text, a title: the provider reads it)."""
        stack: list[tuple[str | None, object, Mapping[str, Any] | None]] = [(None, value, None)]
        while stack:
            key, v, parent = stack.pop()
            if isinstance(v, str):
                mime = _payload_mime(key, v, parent)
                if mime is None:
                    self.text(v)
                elif not mime.startswith(_MEDIA_MIME):
                    # base64: 3 bytes a 4 characters
                    self.chars += len(v) * 3 // 4 if mime.startswith("text/") else len(v) // 4
            elif isinstance(v, list):
                stack.extend((key, x, parent) for x in v)
            elif isinstance(v, dict):
                if v is not value and _is_media(v):  # an image in a document's content
                    self.media += 1
                for k, x in v.items():
                    self.chars += len(k)
                    stack.append((k, x, v))
            elif isinstance(v, int | float) and not isinstance(v, bool):
                self.chars += 1

    def everything(self, value: object) -> None:
        """Every key and string in ``value``, as text: tool definitions, schemas."""
        stack: list[object] = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                self.text(v)
            elif isinstance(v, list):
                stack.extend(v)
            elif isinstance(v, dict):
                for k, x in v.items():
                    self.chars += len(k)
                    stack.append(x)
            elif isinstance(v, int | float) and not isinstance(v, bool):
                self.chars += 1


# Keys whose short string values are labels, not input: a part's type, a message's role, a
# call's id. Only short ones: the same key inside a free-form tool input may hold text the
# provider bills (a list of keys skipped at any depth held 100,000 characters at 1 token).
_LABEL_KEYS = frozenset({"type", "role", "id", "call_id", "tool_call_id", "tool_use_id", "status"})


def _label(key: str, value: object) -> bool:
    return key in _LABEL_KEYS and isinstance(value, str) and len(value) <= 64


def _is_media(d: Mapping[str, Any]) -> bool:
    kind = d.get("type")
    return (isinstance(kind, str) and kind in _MEDIA_TYPES) or any(k in d for k in _MEDIA_KEYS)


_MEDIA_MIME = ("image/", "audio/", "video/")
_URL_KEYS = frozenset({"url", "image_url", "file_data", "audio_url", "video_url"})


def _payload_mime(key: str | None, s: str, parent: Mapping[str, Any] | None) -> str | None:
    """The declared type (lower case, "" if none) of base64 bytes in a media part, or None
    for a string that is not such a payload (text, whatever it starts with)."""
    if key in _URL_KEYS and s.startswith("data:"):
        head = s[5:80].split(",", 1)[0].lower()
        return head.removesuffix(";base64") if head.endswith(";base64") else None
    if key != "data" or parent is None:
        return None
    for k in ("mimeType", "mime_type"):  # Gemini's inlineData: base64, always
        mime = parent.get(k)
        if isinstance(mime, str):
            return mime.lower()
    if parent.get("type") == "base64":  # Anthropic's source of an image or a document
        mime = parent.get("media_type")
        return mime.lower() if isinstance(mime, str) else ""
    fmt = parent.get("format")  # OpenAI's input_audio: {"data": base64, "format": "wav"}
    if isinstance(fmt, str):
        return f"audio/{fmt.lower()}"
    return None


def _estimate(count: _Count, messages: int) -> int:
    return count.tokens() + TOKENS_PER_MESSAGE * messages


# -- the entry point --------------------------------------------------------------------------
def parse_request(
    route: Route, body: bytes, path_params: Mapping[str, str] | None = None
) -> RequestFacts:
    """The facts policy decides on. Raises RequestRefused(400, "bad_request") on any body the
    gateway cannot read unambiguously (JSON routes only; other routes ignore the body)."""
    params = path_params or {}
    path_model: str | None = None
    param = route.model_param
    if param is not None:
        raw = params.get(param)
        if raw is None:
            raise bad_request(f"the request path names no {param}")
        path_model = check_model(raw, f"{param} in path")
        if "%" in path_model:
            # The provider would percent-decode it and see another name than policy did.
            raise bad_request(f"{param} in path must not be percent-encoded")

    if not route.json:
        return RequestFacts(
            model=path_model,
            max_tokens=None,
            temperature=None,
            top_p=None,
            n=None,
            stream=False,
            tools=False,
            include_usage=False,
            prompt_chars=0,
            estimated_input_tokens=0,
        )
    obj = decode_json_object(body)
    if route.wire_format == "gemini":
        return _gemini_facts(route, obj, path_model)
    return _generic_facts(route, obj, path_model)


def _generic_facts(route: Route, obj: dict[str, Any], path_model: str | None) -> RequestFacts:
    """OpenAI-, Anthropic- and Mistral-style bodies: every knob at the top level."""
    model = path_model
    if route.model_from == MODEL_FROM_BODY and obj.get("model") is not None:
        model = check_model(obj["model"])
    if obj.get("models") is not None:
        # OpenRouter's fallback list: the provider may serve any of them, policy sees one.
        raise bad_request("a 'models' fallback list is not supported; name one model")
    if route.kind == "responses" and obj.get("background") not in (None, False):
        # queued: the answer carries no usage, the work is done later and reported only to a
        # later GET: no limit or budget could count it
        raise RequestRefused(
            403,
            "policy_denied",
            "background responses are not supported: their usage is reported later, where "
            "the gateway cannot count it against limits and budgets; drop 'background'",
            "default",
        )
    max_tokens = _largest([_opt_int(obj, k, 0) for k in _MAX_TOKEN_FIELDS])
    tools = bool(_opt_list(obj, "tools")) or bool(_opt_list(obj, "functions"))
    tools = tools or bool(_opt_list(obj, "mcp_servers"))
    # OpenAI chat's built-in web search: a tool the provider runs (search-preview models)
    tools = tools or obj.get("web_search_options") is not None
    for choice in ("tool_choice", "function_call"):
        v = obj.get(choice)
        # "none" (OpenAI) or {"type": "none"} (Anthropic): no tool may be called
        if v not in (None, "none") and not (isinstance(v, dict) and v.get("type") == "none"):
            tools = True
    stream_options = obj.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    prompt = _Count()
    for k in _TEXT_FIELDS:
        prompt.prompt(obj.get(k))
    prompt_chars = prompt.chars
    # billed as input too: tool definitions, schemas (response_format, text.format), ...
    prompt.everything([v for k, v in obj.items() if k not in _NOT_INPUT])
    messages = sum(len(v) for k in _MESSAGE_LISTS if isinstance(v := obj.get(k), list))
    return RequestFacts(
        model=model,
        max_tokens=max_tokens,
        temperature=_opt_number(obj, "temperature"),
        top_p=_opt_number(obj, "top_p"),
        # completions generated (and billed): legacy completions' best_of makes as many
        n=_largest([_opt_int(obj, "n", 1), _opt_int(obj, "best_of", 1)]),
        stream=_opt_bool(obj, "stream"),
        tools=tools,
        include_usage=include_usage,
        prompt_chars=prompt_chars,
        estimated_input_tokens=_estimate(prompt, messages),
    )


def _alias(obj: Mapping[str, Any], camel: str, snake: str) -> Any:
    """Gemini (proto3 JSON) accepts both spellings of a field; both at once is ambiguous."""
    if camel in obj and snake in obj:
        raise bad_request(f"both {camel} and {snake} given; use one")
    return obj.get(camel, obj.get(snake))


def _gemini_facts(route: Route, obj: dict[str, Any], path_model: str | None) -> RequestFacts:
    body_model = obj.get("model")
    if body_model is not None and body_model not in (path_model, f"models/{path_model}"):
        raise bad_request("the body's model differs from the model in the request path")
    config_v = _alias(obj, "generationConfig", "generation_config")
    config = _opt_object({"generationConfig": config_v}, "generationConfig")
    knobs: dict[str, Any] = {
        "maxOutputTokens": _alias(config, "maxOutputTokens", "max_output_tokens"),
        "temperature": config.get("temperature"),
        "topP": _alias(config, "topP", "top_p"),
        "candidateCount": _alias(config, "candidateCount", "candidate_count"),
    }
    tool_config = _alias(obj, "toolConfig", "tool_config")
    calling = (
        _alias(tool_config, "functionCallingConfig", "function_calling_config")
        if isinstance(tool_config, dict)
        else None
    )
    # mode NONE: no function may be called (as OpenAI's tool_choice "none")
    no_calls = isinstance(calling, dict) and calling.get("mode") in ("NONE", "none")
    tools = bool(_opt_list(obj, "tools")) or (tool_config is not None and not no_calls)
    contents = _opt_list(obj, "contents")
    system = _alias(obj, "systemInstruction", "system_instruction")
    prompt = _Count()
    prompt.prompt(contents)
    prompt.prompt(system)
    prompt_chars = prompt.chars
    # tool declarations, a response schema
    prompt.everything([obj.get(k) for k in _GEMINI_INPUT])
    prompt.everything([config.get(k) for k in _GEMINI_SCHEMAS])
    return RequestFacts(
        model=path_model,
        max_tokens=_opt_int(knobs, "maxOutputTokens", 0),
        temperature=_opt_number(knobs, "temperature"),
        top_p=_opt_number(knobs, "topP"),
        n=_opt_int(knobs, "candidateCount", 1),
        stream=route.kind == "stream_generate_content",
        tools=tools,
        include_usage=True,  # Gemini reports usageMetadata in every response
        prompt_chars=prompt_chars,
        estimated_input_tokens=_estimate(prompt, len(contents)),
    )
