"""The audit chain: per-tenant keys, canonical bytes, MACs and pure verification.

Every record's ``mac`` is ``HMAC-SHA256(tenant_key, prev_mac_bytes || canonical_bytes(row))``,
where ``canonical_bytes`` is the compact JSON array of every column but ``mac`` (``seq`` and
``prev_mac`` included), so a record cannot be modified, dropped, inserted, moved or copied from
another tenant's log without breaking the chain at that record.

Nothing here touches the disk; :mod:`aiid_proxy.audit.verify` streams a database through the
same checks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aiid_proxy.audit.verify_range import keyed_mac
from aiid_proxy.errors import UsageError
from aiid_proxy.home import validate_name

GENESIS_MAC = "0" * 64
GENESIS_BYTES = bytes(32)

COLUMNS: tuple[str, ...] = (
    "seq",
    "ts",
    "request_id",
    "agent",
    "event",
    "provider",
    "model",
    "rule",
    "status",
    "input_tokens",
    "output_tokens",
    "latency_ms",
    "reason",
    "detail",
    "prev_mac",
    "mac",
)
SEQ, PREV_MAC, MAC = 0, 14, 15
DETAIL = COLUMNS.index("detail")
MACED = COLUMNS[:MAC]  # every column the mac covers

_MAC_RE = re.compile(r"[0-9a-f]{64}")
_HEAD_RE = re.compile(r"([0-9]{1,19}):([0-9a-fA-F]{64})")
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _no_default(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _make_encode() -> Callable[[list[object]], str]:
    """``json.dumps(values, separators=(",", ":"), ensure_ascii=False, allow_nan=False)``,
    calling the C encoder directly when there is one (the per-call set-up of
    ``JSONEncoder.encode`` costs more than encoding a record)."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    c_basestring = getattr(json.encoder, "c_encode_basestring", None)
    if c_make_encoder is None or c_basestring is None:  # pragma: no cover - pure-Python json
        return _ENCODER.encode
    encoder = c_make_encoder(None, _no_default, c_basestring, None, ":", ",", False, False, False)

    def encode(values: list[object]) -> str:
        return "".join(encoder(values, 0))

    return encode


_encode = _make_encode()


def tenant_key(root_key: bytes, tenant: str) -> bytes:
    """The tenant's audit key: HKDF-SHA256 of the root key, bound to the tenant name."""
    if not isinstance(root_key, bytes | bytearray) or len(root_key) < 16:
        raise ValueError("audit root key must be at least 16 bytes")
    validate_name("tenant", tenant)
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"aiid-audit-v1:" + tenant.encode(),
    )
    return hkdf.derive(bytes(root_key))


def dump_detail(detail: Mapping[str, object]) -> str:
    """The stored form of a ``detail`` object: compact, sorted keys, UTF-8."""
    return json.dumps(
        dict(detail), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def canonical_values(values: Sequence[object]) -> bytes:
    """Canonical bytes of the first 15 values of a row in :data:`COLUMNS` order.

    Raises ValueError/TypeError for anything JSON cannot hold (bytes, NaN, lone surrogates).
    """
    return _encode(list(values[:MAC])).encode()


def canonical_bytes(row: Mapping[str, object]) -> bytes:
    """Every column except ``mac``, in :data:`COLUMNS` order, as a compact JSON array.

    A ``detail`` given as an object (as :func:`export_jsonl` writes it) is serialised back to
    its stored form first, so exported records verify too.
    """
    values = [row[c] for c in MACED]
    detail = values[DETAIL]
    if isinstance(detail, Mapping):
        values[DETAIL] = dump_detail(detail)
    return canonical_values(values)


def is_mac(text: object) -> bool:
    """True for a well-formed stored mac: 64 lowercase hex digits."""
    return isinstance(text, str) and _MAC_RE.fullmatch(text) is not None


def compute_mac(key: bytes, prev_mac: str, row: Mapping[str, object]) -> str:
    """Hex HMAC-SHA256(key, bytes.fromhex(prev_mac) + canonical_bytes(row))."""
    if not is_mac(prev_mac):
        raise ValueError("prev_mac must be 64 lowercase hex digits")
    return hmac.new(key, bytes.fromhex(prev_mac) + canonical_bytes(row), hashlib.sha256).hexdigest()


def parse_head(text: str) -> tuple[int, str]:
    """Parse ``SEQ:MAC`` (as ``aiid audit verify --expect-head`` takes it)."""
    m = _HEAD_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        shown = text if isinstance(text, str) and len(text) <= 100 else "<too long>"
        raise UsageError(f"invalid audit head {shown!r}: expected SEQ:MAC (64 hex digits)")
    seq, mac = int(m.group(1)), m.group(2).lower()
    if seq == 0 and mac != GENESIS_MAC:
        raise UsageError("invalid audit head: seq 0 can only carry the genesis mac")
    if seq >= 2**63:
        raise UsageError("invalid audit head: seq out of range")
    return seq, mac


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int
    head: tuple[int, str] | None
    first_bad_seq: int | None
    reason: str


class Anchors:
    """Heads the chain must reach and match: ``--expect-head`` and every checkpoint line.

    Stored compactly (a checkpoint file of a busy gateway holds many lines) and checked in seq
    order as the rows stream past.
    """

    def __init__(self) -> None:
        self._seqs: array[int] = array("q")
        self._macs = bytearray()
        self._lines: array[int] = array("q")  # 0 = the expected head, else checkpoint line no.
        self._labels: list[str] = []  # named sources (exported checkpoints): line = -(i + 1)
        self._order: list[int] | None = None
        self._pos = 0
        self.next_seq = -1

    def add(self, seq: int, mac: str, line: int = 0, source: str | None = None) -> None:
        """Require the chain to reach ``seq`` with ``mac``; ``source`` names it in messages."""
        if seq == 0:  # the empty chain: always reached (parse_head checked the mac)
            return
        if source is not None:
            self._labels.append(source)
            line = -len(self._labels)
        self._seqs.append(seq)
        self._macs += bytes.fromhex(mac)
        self._lines.append(line)

    def __len__(self) -> int:
        return len(self._seqs)

    def start(self) -> None:
        seqs = self._seqs
        if any(seqs[i] > seqs[i + 1] for i in range(len(seqs) - 1)):
            self._order = sorted(range(len(seqs)), key=seqs.__getitem__)
        self._pos = 0
        self._set_next()

    def _index(self, pos: int) -> int:
        return pos if self._order is None else self._order[pos]

    def _set_next(self) -> None:
        self.next_seq = self._seqs[self._index(self._pos)] if self._pos < len(self._seqs) else -1

    def _source(self, i: int) -> str:
        line = self._lines[i]
        if line < 0:
            return self._labels[-line - 1]
        return "the expected head" if line == 0 else f"checkpoint line {line}"

    def pending(self, upto: int) -> list[int]:
        """The distinct anchored seqs from ``next_seq`` up to ``upto``, in order."""
        seqs = self._seqs
        out: list[int] = []
        for pos in range(self._pos, len(seqs)):
            seq = seqs[self._index(pos)]
            if seq > upto:
                break
            if not out or out[-1] != seq:
                out.append(seq)
        return out

    def check(self, seq: int, digest: bytes) -> str | None:
        """Called when the verified chain reaches ``next_seq``; a reason on mismatch."""
        while self._pos < len(self._seqs):
            i = self._index(self._pos)
            if self._seqs[i] != seq:
                break
            if self._macs[32 * i : 32 * i + 32] != digest:
                return f"mac at seq {seq} differs from {self._source(i)} (log rewritten?)"
            self._pos += 1
        self._set_next()
        return None

    def finish(self, last_seq: int) -> str | None:
        """After the last row: an anchor beyond it means the log was truncated."""
        if self._pos >= len(self._seqs):
            return None
        i = self._index(self._pos)
        return (
            f"log ends at seq {last_seq} but {self._source(i)} records seq {self._seqs[i]} "
            "(truncated?)"
        )


class ChainState:
    """Where a verification stands: the next expected seq and the last verified mac."""

    def __init__(self, key: bytes, anchors: Anchors | None = None) -> None:
        self.base = keyed_mac(key)
        self.anchors = anchors if anchors is not None else Anchors()
        self.anchors.start()
        self.expected = 1
        self.prev_bytes = GENESIS_BYTES
        self.prev_hex = GENESIS_MAC
        self.failure: tuple[int | None, str] | None = None

    def accept(self, seq: int, digest: bytes, mac: str) -> bool:
        """Record a verified row; False (with ``failure`` set) if an anchor disagrees."""
        if seq == self.anchors.next_seq:
            why = self.anchors.check(seq, digest)
            if why is not None:
                self.failure = (seq, why)
                return False
        self.expected = seq + 1
        self.prev_bytes = digest
        self.prev_hex = mac
        return True

    def check_row(self, values: Sequence[object]) -> bool:
        """Full check of one row (16 values in COLUMNS order), diagnosing any failure."""
        expected = self.expected
        seq = values[SEQ]
        if not isinstance(seq, int) or isinstance(seq, bool):
            return self.fail(expected, f"record after seq {expected - 1} has a malformed seq")
        if seq != expected:
            if seq < 1:
                why = f"record after seq {expected - 1} has an invalid seq {seq}"
                return self.fail(expected, why)
            if expected == 1 and seq > 1:
                why = f"log does not start at seq 1 (first record is seq {seq}; records deleted?)"
                return self.fail(1, why)
            if seq > expected:
                why = f"missing seq {expected} (next record is seq {seq}; records deleted?)"
                return self.fail(expected, why)
            if seq == expected - 1:
                return self.fail(seq, f"duplicate seq {seq}")
            why = f"seq {seq} out of order after seq {expected - 1} (records reordered?)"
            return self.fail(seq, why)
        if values[PREV_MAC] != self.prev_hex:
            why = f"prev_mac mismatch at seq {seq} (record deleted, inserted or moved before it?)"
            return self.fail(seq, why)
        try:
            canon = canonical_values(values)
        except (TypeError, ValueError):
            return self.fail(seq, f"mac mismatch at seq {seq} (record modified: bad value)")
        h = self.base.copy()
        h.update(self.prev_bytes)
        h.update(canon)
        digest = h.digest()
        mac = digest.hex()
        if values[MAC] != mac:
            # at the very first record, a key other than the one the log was written with is
            # as likely as an edit
            why = (
                "record modified, or not the audit key it was written with?"
                if seq == 1
                else ("record modified?")
            )
            return self.fail(seq, f"mac mismatch at seq {seq} ({why})")
        return self.accept(seq, digest, mac)

    def fail(self, seq: int | None, reason: str) -> bool:
        self.failure = (seq, reason)
        return False

    def result(self) -> VerifyResult:
        """The verdict once the rows are exhausted (or a failure was recorded)."""
        count = self.expected - 1
        head = (count, self.prev_hex) if count else None
        if self.failure is None:
            why = self.anchors.finish(count)
            if why is not None:
                self.failure = (count + 1, why)
        if self.failure is not None:
            seq, reason = self.failure
            return VerifyResult(False, count, head, seq, reason)
        return VerifyResult(True, count, head, None, f"OK {count} records")


def verify_rows(
    rows: Iterable[Mapping[str, object]],
    key: bytes,
    expect_head: tuple[int, str] | None = None,
) -> VerifyResult:
    """Verify rows given in storage order against the chain rules (pure; no I/O).

    Detects a modified column, a deleted/inserted/moved/duplicated row, a log not starting at
    seq 1 and, with ``expect_head``, truncation or a rewritten head.
    """
    anchors = Anchors()
    if expect_head is not None:
        anchors.add(expect_head[0], expect_head[1].lower())
    state = ChainState(key, anchors)
    for row in rows:
        try:
            values = [row[c] for c in COLUMNS]
        except KeyError as e:
            state.fail(state.expected, f"record after seq {state.expected - 1} lacks column {e}")
            break
        detail = values[DETAIL]
        if isinstance(detail, Mapping):
            try:
                values[DETAIL] = dump_detail(detail)
            except (TypeError, ValueError):
                values[MAC] = None  # not representable: the mac check fails below
        if not state.check_row(values):
            break
    return state.result()
