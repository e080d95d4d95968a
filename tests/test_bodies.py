"""decode_body: every content-encoding undone, with a hard cap on raw and decoded size."""

from __future__ import annotations

import gzip
import random
import tracemalloc
import zlib
from collections.abc import Callable

import brotli
import pytest

from aiid_proxy.bodies import decode_body
from aiid_proxy.errors import RequestRefused

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef]

MiB = 1024 * 1024
BODY = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}' * 20


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": lambda data: brotli.compress(data, quality=5),
    "zstd": zstd.compress,
}


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        pytest.param(BODY, None, id="no-header"),
        pytest.param(BODY, "", id="empty-header"),
        pytest.param(BODY, "identity", id="identity"),
        pytest.param(BODY, "Identity, identity", id="identity-twice"),
        pytest.param(gzip.compress(BODY), "gzip", id="gzip"),
        pytest.param(gzip.compress(BODY), "GZIP", id="gzip-uppercase"),
        pytest.param(gzip.compress(BODY), "x-gzip", id="x-gzip"),
        pytest.param(zlib.compress(BODY), "deflate", id="deflate-zlib"),
        pytest.param(raw_deflate(BODY), "deflate", id="deflate-raw"),
        pytest.param(brotli.compress(BODY), "br", id="br"),
        pytest.param(zstd.compress(BODY), "zstd", id="zstd"),
        pytest.param(brotli.compress(gzip.compress(BODY)), "gzip, br", id="stacked-gzip-br"),
        pytest.param(gzip.compress(zstd.compress(BODY)), " zstd ,gzip ", id="stacked-spaces"),
        pytest.param(gzip.compress(BODY), "identity, gzip", id="identity-and-gzip"),
    ],
)
def test_decode(data: bytes, encoding: str | None) -> None:
    assert decode_body(data, encoding, 1 * MiB) == BODY


def test_decode_empty_gzip() -> None:
    assert decode_body(gzip.compress(b""), "gzip", 1 * MiB) == b""


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        pytest.param(BODY, "compress", id="unknown-compress"),
        pytest.param(BODY, "gzip, snappy", id="unknown-in-stack"),
        pytest.param(BODY, "gzip", id="not-gzip"),
        pytest.param(b"\x1f\x8b\x08\x00garbage", "gzip", id="corrupt-gzip"),
        pytest.param(gzip.compress(BODY)[:-8], "gzip", id="truncated-gzip-trailer"),
        pytest.param(
            gzip.compress(BODY)[: len(gzip.compress(BODY)) // 2], "gzip", id="truncated-gzip-half"
        ),
        pytest.param(zlib.compress(BODY)[:-4], "deflate", id="truncated-deflate"),
        pytest.param(b"\x00\x01\x02 not deflate", "deflate", id="corrupt-deflate"),
        pytest.param(brotli.compress(BODY)[:-3], "br", id="truncated-br"),
        pytest.param(b"not brotli at all", "br", id="corrupt-br"),
        pytest.param(zstd.compress(BODY)[:-4], "zstd", id="truncated-zstd"),
        pytest.param(b"not zstd", "zstd", id="corrupt-zstd"),
        pytest.param(gzip.compress(BODY), "br, gzip", id="stack-in-wrong-order"),
    ],
)
def test_undecodable_is_400(data: bytes, encoding: str) -> None:
    with pytest.raises(RequestRefused) as e:
        decode_body(data, encoding, 1 * MiB)
    assert (e.value.status, e.value.type) == (400, "bad_request")


ZEROS = 40 * MiB


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """40 MiB of zeros, compressed by each coding (a few tens of KiB each)."""
    zeros = bytes(ZEROS)
    return {name: enc(zeros) for name, enc in ENCODERS.items() if name != "x-gzip"}


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_decompression_bomb_is_413(bombs: dict[str, bytes], coding: str) -> None:
    bomb = bombs[coding]
    assert len(bomb) < 1 * MiB < ZEROS
    with pytest.raises(RequestRefused) as e:
        decode_body(bomb, coding, 1 * MiB)
    assert (e.value.status, e.value.type) == (413, "too_large")


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_decompression_bomb_never_inflates_far_past_the_limit(
    bombs: dict[str, bytes], coding: str
) -> None:
    """Refusing is not enough: memory must stay bounded while refusing (no 40 MiB buffer)."""
    tracemalloc.start()
    try:
        with pytest.raises(RequestRefused):
            decode_body(bombs[coding], coding, 1 * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, f"{coding}: peak {peak / MiB:.1f} MiB for a 1 MiB limit"


def test_stacked_bomb_is_413(bombs: dict[str, bytes]) -> None:
    with pytest.raises(RequestRefused) as e:
        decode_body(brotli.compress(bombs["gzip"]), "gzip, br", 1 * MiB)
    assert e.value.status == 413


@pytest.mark.parametrize(
    ("size", "encoding", "status"),
    [
        pytest.param(1024, None, None, id="at-limit"),
        pytest.param(1025, None, 413, id="one-over"),
        pytest.param(1025, "identity", 413, id="one-over-identity"),
        pytest.param(1025, "gzip", 413, id="raw-over-before-decoding"),
    ],
)
def test_raw_size_limit(size: int, encoding: str | None, status: int | None) -> None:
    data = b"x" * size
    if status is None:
        assert decode_body(data, encoding, 1024) == data
    else:
        with pytest.raises(RequestRefused) as e:
            decode_body(data, encoding, 1024)
        assert (e.value.status, e.value.type) == (status, "too_large")


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize(
    ("decoded", "ok"),
    [pytest.param(4096, True, id="exactly-limit"), pytest.param(4097, False, id="one-over")],
)
def test_decoded_size_limit_is_exact(coding: str, decoded: int, ok: bool) -> None:
    data = ENCODERS[coding](b"a" * decoded)
    if ok:
        assert decode_body(data, coding, 4096) == b"a" * decoded
    else:
        with pytest.raises(RequestRefused) as e:
            decode_body(data, coding, 4096)
        assert e.value.status == 413


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(random.Random(7).randbytes(300 * 1024), id="incompressible-300k"),
        pytest.param(b"0123456789abcdef" * (60 * 1024), id="compressible-960k"),
    ],
)
def test_large_valid_bodies_decode_across_many_internal_steps(coding: str, payload: bytes) -> None:
    assert decode_body(ENCODERS[coding](payload), coding, 1 * MiB) == payload
