"""The per-tenant, HMAC-chained, group-committed audit log.

``chain`` holds the pure rules (keys, canonical bytes, verification of rows), ``log`` the
durable writer, ``verify`` the streaming check of a database file, ``store`` the schema and
the read helpers behind ``aiid audit tail`` and ``aiid audit export``.
"""

from __future__ import annotations

from aiid_proxy.audit.chain import (
    COLUMNS,
    GENESIS_MAC,
    VerifyResult,
    canonical_bytes,
    compute_mac,
    parse_head,
    tenant_key,
    verify_rows,
)
from aiid_proxy.audit.log import AuditLog
from aiid_proxy.audit.record import AppendResult
from aiid_proxy.audit.store import create_db, export_jsonl, format_row, read_rows
from aiid_proxy.audit.verify import verify_db

__all__ = [
    "COLUMNS",
    "GENESIS_MAC",
    "AppendResult",
    "AuditLog",
    "VerifyResult",
    "canonical_bytes",
    "compute_mac",
    "create_db",
    "export_jsonl",
    "format_row",
    "parse_head",
    "read_rows",
    "tenant_key",
    "verify_db",
    "verify_rows",
]
