"""The audit database file: schema, connections and the read helpers behind ``aiid audit``."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from aiid_proxy.audit.chain import COLUMNS, GENESIS_MAC, MAC, ChainState, is_mac
from aiid_proxy.errors import AuditError

BUSY_TIMEOUT_MS = 5000
FETCH_BATCH = 4096

SCHEMA: tuple[tuple[str, str, int], ...] = (
    ("seq", "INTEGER", 1),
    ("ts", "TEXT", 0),
    ("request_id", "TEXT", 0),
    ("agent", "TEXT", 0),
    ("event", "TEXT NOT NULL", 0),
    ("provider", "TEXT", 0),
    ("model", "TEXT", 0),
    ("rule", "TEXT", 0),
    ("status", "INTEGER", 0),
    ("input_tokens", "INTEGER", 0),
    ("output_tokens", "INTEGER", 0),
    ("latency_ms", "REAL", 0),
    ("reason", "TEXT", 0),
    ("detail", "TEXT", 0),
    ("prev_mac", "TEXT NOT NULL", 0),
    ("mac", "TEXT NOT NULL", 0),
)
assert tuple(c[0] for c in SCHEMA) == COLUMNS

CREATE_SQL = (
    "CREATE TABLE IF NOT EXISTS audit (\n    "
    + ",\n    ".join(f"{name} {decl}{' PRIMARY KEY' if pk else ''}" for name, decl, pk in SCHEMA)
    + "\n)"
)
INDEX_SQL = (
    "CREATE INDEX IF NOT EXISTS audit_request_id ON audit(request_id)",
    "CREATE INDEX IF NOT EXISTS audit_ts ON audit(ts)",
)
# Every SQL string below is built once from the COLUMNS constant: nothing external reaches it.
COLS_SQL = ", ".join(COLUMNS)
INSERT_SQL = f"INSERT INTO audit ({COLS_SQL}) VALUES ({', '.join('?' * len(COLUMNS))})"  # noqa: S608
SELECT_SQL = f"SELECT {COLS_SQL} FROM audit"  # noqa: S608


def lenient_text(raw: bytes) -> str:
    """Decode TEXT that may have been tampered into invalid UTF-8 (for reading, not trusting)."""
    return raw.decode("utf-8", "surrogateescape")


def describe(exc: BaseException) -> str:
    """One line naming an exception, for AuditError messages (sqlite/OS errors hold no secret)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the table and indexes if missing (inside the caller's transaction or not)."""
    conn.execute(CREATE_SQL)
    for sql in INDEX_SQL:
        conn.execute(sql)


def schema_state(conn: sqlite3.Connection) -> str:
    """``"missing"``, ``"pristine"`` (exactly our schema) or ``"altered"``.

    Raises AuditError when a column is missing altogether.
    """
    info = conn.execute("PRAGMA table_info(audit)").fetchall()
    if not info:
        return "missing"
    names = [r[1] for r in info]
    lacking = [c for c in COLUMNS if c not in names]
    if lacking:
        raise AuditError(f"audit table lacks column {lacking[0]!r}")
    got = tuple((r[1], str(r[2]).upper(), int(r[5])) for r in info)
    want = tuple((n, d.split()[0], pk) for n, d, pk in SCHEMA)
    if got != want:
        return "altered"
    try:  # WITHOUT ROWID tables have no rowid alias for seq
        conn.execute("SELECT rowid FROM audit LIMIT 0")
    except sqlite3.OperationalError:
        return "altered"
    # seq must BE the rowid (never NULL, one per row). "INTEGER PRIMARY KEY DESC" looks the
    # same to table_info but is a plain column that may hold NULL, which `seq >= ?` skips.
    plan = conn.execute("EXPLAIN QUERY PLAN SELECT seq FROM audit WHERE seq = 1").fetchall()
    if not any("INTEGER PRIMARY KEY" in str(row[-1]) for row in plan):
        return "altered"
    return "pristine"


def committed_head(conn: sqlite3.Connection, key: bytes) -> tuple[int, str]:
    """The committed head (seq, mac) of the chain in ``conn`` under the tenant's ``key``;
    AuditError if its last record does not verify (a writer must not extend such a chain)."""
    row = conn.execute(f"{SELECT_SQL} ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None:
        return (0, GENESIS_MAC)
    seq = row[0]
    prev_hex: object = GENESIS_MAC
    if seq != 1:
        prev = conn.execute("SELECT mac FROM audit WHERE seq = ?", (seq - 1,)).fetchone()
        prev_hex = prev[0] if prev is not None else None
    ok = False
    if isinstance(prev_hex, str) and is_mac(prev_hex):
        state = ChainState(key)
        state.expected, state.prev_hex = seq, prev_hex
        state.prev_bytes = bytes.fromhex(prev_hex)
        ok = state.check_row(row)
    if not ok:
        raise AuditError(
            f"audit chain head is invalid at seq {seq} (tampered log or wrong audit key); "
            "refusing to extend it: run `aiid audit verify`"
        )
    return (seq, str(row[MAC]))


def create_db(path: Path) -> None:
    """Create an empty audit database (used by ``aiid tenant add``); no key needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            ensure_schema(conn)
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise AuditError(f"cannot create audit database {path}: {describe(e)}") from None


def open_existing(path: Path) -> sqlite3.Connection:
    """Open an existing audit database for reading (never creates it)."""
    if not path.is_file():
        raise AuditError(f"audit database not found: {path}")
    try:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=rw",
            uri=True,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
    except sqlite3.Error as e:
        raise AuditError(f"cannot open audit database {path}: {describe(e)}") from None
    return conn


def _display_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _reader(path: Path) -> sqlite3.Connection:
    conn = open_existing(path)
    conn.text_factory = _display_text
    try:
        if schema_state(conn) == "missing":
            raise AuditError(f"audit database {path} has no audit table")
    except BaseException:
        conn.close()
        raise
    return conn


def read_rows(
    path: Path, *, after_seq: int = 0, limit: int | None = None, last: int | None = None
) -> list[dict[str, object]]:
    """Records with seq > ``after_seq`` in seq order: the first ``limit``, or the ``last`` N."""
    if limit is not None and last is not None:
        raise ValueError("pass either limit or last, not both")
    if (limit is not None and limit < 0) or (last is not None and last < 0):
        raise ValueError("limit and last must not be negative")
    conn = _reader(path)
    try:
        if last is not None:
            inner = f"{SELECT_SQL} WHERE seq > ? ORDER BY seq DESC LIMIT ?"
            sql = f"SELECT * FROM ({inner}) ORDER BY seq"  # noqa: S608
            rows = conn.execute(sql, (after_seq, last)).fetchall()
        else:
            sql = f"{SELECT_SQL} WHERE seq > ? ORDER BY seq LIMIT ?"
            rows = conn.execute(sql, (after_seq, -1 if limit is None else limit)).fetchall()
    except sqlite3.Error as e:
        raise AuditError(f"cannot read audit database {path}: {describe(e)}") from None
    finally:
        conn.close()
    return [dict(zip(COLUMNS, r, strict=True)) for r in rows]


def iter_rows(path: Path) -> Iterator[tuple[object, ...]]:
    """Every record as a tuple in COLUMNS order, streamed in seq order."""
    conn = _reader(path)
    try:
        cur = conn.execute(f"{SELECT_SQL} ORDER BY seq")
        while batch := cur.fetchmany(FETCH_BATCH):
            yield from batch
    except sqlite3.Error as e:
        raise AuditError(f"cannot read audit database {path}: {describe(e)}") from None
    finally:
        conn.close()


def _json_default(value: object) -> object:
    if isinstance(value, bytes):  # only a tampered row holds a BLOB
        return "blob:" + value.hex()
    raise TypeError(f"cannot export {type(value).__name__}")


def export_record(values: tuple[object, ...]) -> str:
    """One record as a compact JSON object (detail parsed back to an object)."""
    obj = dict(zip(COLUMNS, values, strict=True))
    detail = obj["detail"]
    if isinstance(detail, str):
        try:
            parsed = json.loads(detail)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            obj["detail"] = parsed
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def export_jsonl(path: Path, out: IO[str]) -> int:
    """Write every record, with its mac, one JSON object a line; returns the count."""
    n = 0
    for values in iter_rows(path):
        out.write(export_record(values))
        out.write("\n")
        n += 1
    return n


_MAX_FIELD = 200


def _clean(value: object) -> str:
    """A field safe for a terminal: control characters escaped, long values cut."""
    text = str(value)
    if len(text) > _MAX_FIELD:
        text = text[:_MAX_FIELD] + "..."
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def format_row(row: Mapping[str, object]) -> str:
    """One human-readable line: ts, seq, event, agent, provider/model, rule, status, tokens..."""
    g = row.get
    parts = [_clean(g("ts") or "-"), f"#{_clean(g('seq'))}", _clean(g("event") or "-")]
    if g("agent") is not None:
        parts.append(f"agent={_clean(g('agent'))}")
    provider, model = g("provider"), g("model")
    if provider is not None or model is not None:
        parts.append(_clean(f"{provider or '-'}/{model or '-'}"))
    if g("rule") is not None:
        parts.append(f"rule={_clean(g('rule'))}")
    if g("status") is not None:
        parts.append(f"status={_clean(g('status'))}")
    tin, tout = g("input_tokens"), g("output_tokens")
    if tin is not None or tout is not None:
        parts.append(
            f"tokens={_clean(tin if tin is not None else '-')}/"
            f"{_clean(tout if tout is not None else '-')}"
        )
    if g("latency_ms") is not None:
        parts.append(f"latency={_clean(g('latency_ms'))}ms")
    if g("request_id") is not None:
        parts.append(f"req={_clean(g('request_id'))}")
    if g("reason") is not None:
        reason = _clean(str(g("reason")).replace("\\", "\\\\").replace('"', '\\"'))
        parts.append(f'reason="{reason}"')  # quoted as a shell or logfmt reader expects
    return " ".join(parts)
