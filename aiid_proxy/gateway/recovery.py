"""At start: every tenant's audit chain is verified in the background, and the requests an
earlier run left with no record of how they ended are closed on record."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiid_proxy.audit import read_rows
from aiid_proxy.audit.record import format_ts
from aiid_proxy.audit.service import AuditAppender
from aiid_proxy.audit.writers import log_unwritten
from aiid_proxy.budget import usd_to_pico
from aiid_proxy.errors import AiidError
from aiid_proxy.home import Home

log = logging.getLogger("aiid.gateway")

UNFINISHED_WINDOW = 10_000
"""Records read at start, at the end of each log, for requests an earlier run left unfinished."""
UNFINISHED_REASON = (
    "no record of how this request ended: the gateway stopped before it completed "
    "(recorded when the gateway started again)"
)


def unfinished_requests(path: Path, started_wall: float) -> list[dict[str, Any]]:
    """``held``/``request`` records written before ``started_wall`` (among the last
    UNFINISHED_WINDOW) with no ``response``, ``error`` or ``deny`` after them."""
    rows = read_rows(path, last=UNFINISHED_WINDOW)
    started = format_ts(started_wall)
    open_: dict[str, dict[str, Any]] = {}
    for r in rows:
        rid = r["request_id"]
        if not isinstance(rid, str) or not rid:
            continue
        if r["event"] in ("held", "request"):
            if str(r["ts"]) < started:  # this run's own requests may be in flight
                open_[rid] = r
        elif r["event"] in ("response", "error", "deny"):
            open_.pop(rid, None)
    return list(open_.values())


def record_unfinished(
    audit: AuditAppender, tenant: str, rows: list[dict[str, Any]], now: float
) -> list[tuple[str, str | None, int]]:
    """An ``error`` record for each request of ``rows`` (from :func:`unfinished_requests`).
    A request that left under a budget hold is charged the hold, its worst-case cost (what
    it really used is unknown; charged nothing, a crash handed its spend back to the
    budget). Returns those charges as ``(ts, agent, pico-USD)`` for the ledger."""
    charged: list[tuple[str, str | None, int]] = []
    for r in rows:
        detail: dict[str, Any] = {"unfinished_seq": r["seq"], "last_event": r["event"]}
        hold = _hold_usd(r) if r["event"] == "request" else None
        if hold is not None:
            detail["cost_usd"] = hold
            detail["cost_is_hold"] = True
            agent = r["agent"] if isinstance(r["agent"], str) else None
            charged.append((format_ts(now), agent, usd_to_pico(hold)))
        fut = audit.append(
            "error",
            request_id=r["request_id"],
            agent=r["agent"],
            provider=r["provider"],
            model=r["model"],
            rule=r["rule"],
            reason=UNFINISHED_REASON,
            detail=detail,
        )
        fut.add_done_callback(log_unwritten)
    log.warning(
        "tenant %s: %d requests of an earlier run have no record of how they ended (the "
        "gateway stopped): recorded as errors",
        tenant,
        len(rows),
    )
    return charged


def _hold_usd(row: Mapping[str, Any]) -> float | None:
    try:
        hold = json.loads(row["detail"] or "{}").get("hold_usd")
    except (ValueError, AttributeError, TypeError):
        return None
    if isinstance(hold, bool) or not isinstance(hold, int | float) or not 0 <= hold < 1e9:
        return None
    return float(hold)


def check_chains(
    home: Home,
    audit_root: bytes,
    started_wall: float,
    *,
    closing: Callable[[], bool],
    emit: Callable[[str, Mapping[str, Any]], None],
    on_unfinished: Callable[[str, list[dict[str, Any]]], None] | None = None,
) -> None:
    """Verify every tenant's whole chain, each in a child process (``audit.startcheck``). A
    log that does not verify is logged (critical) and emitted as an ``audit`` event. With
    ``on_unfinished``, a chain that verified is searched for requests of an earlier run
    left unfinished, and ``on_unfinished(tenant, rows)`` is called when there are some."""
    from aiid_proxy.audit.chain import tenant_key
    from aiid_proxy.audit.startcheck import check_chain

    for tenant in home.tenants():
        path = home.audit_path(tenant)
        if closing():
            return
        if not path.is_file():
            continue
        key = tenant_key(audit_root, tenant)
        r = check_chain(path, key, home.checkpoint_path(tenant))
        ok, reason = r.get("ok"), r.get("reason")
        if ok is True:
            log.info("audit log of tenant %s verified: %s records", tenant, r.get("count"))
            if on_unfinished is not None:
                try:
                    rows = unfinished_requests(path, started_wall)
                except AiidError as e:
                    log.warning("tenant %s: unfinished requests not checked: %s", tenant, e)
                    continue
                if rows:
                    on_unfinished(tenant, rows)
            continue
        if ok is False:
            text = f"audit log of tenant {tenant} does not verify: {reason} "
            text += f"(aiid audit verify {tenant})"
            log.critical("%s", text)
        else:  # the check itself could not run
            text = f"audit log of tenant {tenant} not checked: {reason}"
            log.warning("%s", text)
        emit("audit", {"tenant": tenant, "text": text})
