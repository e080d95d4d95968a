"""Bounded request-body decoding (content-encoding) and request-size checks.

The policy must read exactly what the provider will read, so the gateway decodes the body
itself, with a hard cap on the decoded size (a 32 MiB gzip bomb must not become 32 GiB), and
forwards the decoded bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from aiid_proxy.errors import RequestRefused

DEFAULT_BODY_LIMIT = 32 * 1024 * 1024


def too_large(limit: int) -> RequestRefused:
    return RequestRefused(
        413, "too_large", f"request body exceeds the gateway limit of {limit} bytes"
    )


def _zlib(data: bytes, limit: int, wbits: int) -> bytes:
    d = zlib.decompressobj(wbits)
    out = d.decompress(data, limit + 1)
    if len(out) > limit or d.unconsumed_tail:
        raise too_large(limit)
    out += d.flush()
    if len(out) > limit:
        raise too_large(limit)
    if not d.eof:
        raise ValueError("truncated stream")
    return out


def _gzip(data: bytes, limit: int) -> bytes:
    return _zlib(data, limit, 16 + zlib.MAX_WBITS)


def _deflate(data: bytes, limit: int) -> bytes:
    # RFC 9110 "deflate" is zlib-wrapped; some clients send raw deflate: accept both.
    try:
        return _zlib(data, limit, zlib.MAX_WBITS)
    except zlib.error:
        return _zlib(data, limit, -zlib.MAX_WBITS)


def _brotli(data: bytes, limit: int) -> bytes:
    import brotli  # a mitmproxy dependency

    d = brotli.Decompressor()
    out = bytearray()
    step = 64 * 1024
    pos = 0
    # A few bytes of brotli can inflate to gigabytes in one call: bound every call's output
    # (brotli >= 1.2); feed input only when it accepts more, drain with empty input.
    while True:
        piece = b""
        if pos < len(data) and d.can_accept_more_data():
            piece, pos = data[pos : pos + step], pos + step
        produced = d.process(piece, output_buffer_limit=step)
        out += produced
        if len(out) > limit:
            raise too_large(limit)
        if not piece and not produced:
            break  # no input left to give and no output left to take
    if not d.is_finished():
        raise ValueError("truncated stream")
    return bytes(out)


def _zstd(data: bytes, limit: int) -> bytes:
    try:
        from compression import zstd  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        from backports import zstd  # type: ignore[import-not-found,no-redef,unused-ignore]
    d = zstd.ZstdDecompressor()
    out: bytes = d.decompress(data, max_length=limit + 1)
    if len(out) > limit or not d.eof:
        if len(out) > limit:
            raise too_large(limit)
        raise ValueError("truncated stream")
    return out


_DECODERS: dict[str, Callable[[bytes, int], bytes]] = {
    "gzip": _gzip,
    "x-gzip": _gzip,
    "deflate": _deflate,
    "br": _brotli,
    "zstd": _zstd,
}


def decode_body(
    data: bytes, content_encoding: str | None, limit: int = DEFAULT_BODY_LIMIT
) -> bytes:
    """Undo every ``content-encoding`` (applied in order, so undone in reverse).

    Raises RequestRefused 413 when the raw or decoded size exceeds ``limit`` and 400 when the
    encoding is unknown or the data does not decode.
    """
    if len(data) > limit:
        raise too_large(limit)
    if not content_encoding:
        return data
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        decoder = _DECODERS.get(coding)
        if decoder is None:
            raise RequestRefused(400, "bad_request", f"unsupported content-encoding {coding!r}")
        try:
            data = decoder(data, limit)
        except RequestRefused:
            raise
        except Exception:
            raise RequestRefused(
                400, "bad_request", f"request body does not decode as {coding}"
            ) from None
    return data
