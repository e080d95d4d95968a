"""The audit records of the flows: the half of the :class:`~aiid_proxy.gateway.Gateway`
that writes them (``request``, ``deny``, ``held``, ``approval``, ``error``, ``response``,
``policy``) and settles each flow's reservation and budget hold with its usage."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiid_proxy.audit import AppendResult
from aiid_proxy.audit.service import AuditAppender
from aiid_proxy.budget import COSTLESS_KINDS, pico_to_usd
from aiid_proxy.clock import Clock
from aiid_proxy.errors import AiidError, AuditError, AuditFieldError, RequestRefused
from aiid_proxy.gateway.accounting import Accounting
from aiid_proxy.gateway.flow import FlowState
from aiid_proxy.policy import Policy
from aiid_proxy.policystore import PolicyEvent
from aiid_proxy.providers import Usage
from aiid_proxy.vault import Vault

log = logging.getLogger("aiid.gateway")

RESPONSE_RETRIES = 5
RESPONSE_RETRY_S = 2.0
"""A ``response`` record its writer process failed (it died) is written again this long
after, on the replacement (RESPAWN_AFTER is 1 s), up to RESPONSE_RETRIES times."""

RESPONSE_FLUSH_S = 5.0  # seconds the shutdown gives those records in all (and a replacement)

RECORDED_BYTES = 65536
"""Of a prompt (the request body) and a completion (the response body, scrubbed), what a
record keeps when the tenant's policy sets ``audit: {record_prompts: true}``."""


def recordable(text: str) -> str:
    """``text`` as valid UTF-8 for a record: mitmproxy keeps undecodable request bytes as
    surrogate escapes, which the audit log refuses (and a refusal would go unrecorded)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class TenantRuntime:
    name: str
    vault: Vault
    audit: AuditAppender
    region: str | None


class Records:
    """What the :class:`Gateway` records: its record methods, kept apart from its stages.
    The Gateway provides what they read (declared here)."""

    clock: Clock
    accounting: Accounting
    _closing: bool
    _loop: asyncio.AbstractEventLoop | None
    # response records waiting for a retry, by id() of their outcome future
    _retrying: dict[int, tuple[str, dict[str, Any], concurrent.futures.Future[AppendResult]]]

    def tenant(self, name: str) -> TenantRuntime:
        raise NotImplementedError

    def emit(self, kind: str, data: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def policy_for(self, tenant: str) -> Policy | None:
        raise NotImplementedError

    @staticmethod
    def _audit_policy_event(rt: TenantRuntime, ev: PolicyEvent) -> None:
        try:
            rt.audit.append(
                "policy",
                rule=None,
                status=None if ev.ok else 1,
                reason=ev.describe(),
                detail={
                    "ok": ev.ok,
                    "hash": ev.source_hash,
                    "removed": ev.removed,
                    **({"expired": ev.expired} if ev.expired else {}),
                },
            )
        except AiidError:
            log.exception("could not audit policy event")

    def _record_fields(self, state: FlowState, *, with_prompt: bool = False) -> dict[str, Any]:
        t = state.target
        d = state.decision
        detail: dict[str, Any] = {
            "method": recordable(t.method),
            "host": recordable(t.host),
            "path": recordable(t.path),
        }
        if state.identity is not None:
            detail["jti"] = state.identity.jti
        f = state.route.facts if state.route else None
        if f is not None:
            detail["stream"] = f.stream
            if f.max_tokens is not None:
                detail["max_tokens"] = f.max_tokens
        if d is not None and d.override:
            detail["override"] = d.override
        if state.approved_by:
            detail["approved_by"] = state.approved_by
        if with_prompt and state.route and state.route.body and self.records_prompts(state):
            detail["prompt"] = state.route.body[:RECORDED_BYTES].decode("utf-8", "replace")
        return {
            "request_id": state.request_id,
            "agent": state.identity.agent if state.identity else None,
            "provider": state.provider_name,
            "model": state.model,
            "rule": d.rule_id if d else None,
            "reason": self._reason(state),
            "detail": detail,
        }

    def records_prompts(self, state: FlowState) -> bool:
        """The tenant's policy keeps prompts and completions (``audit.record_prompts``)."""
        if state.identity is None:
            return False
        policy = self.policy_for(state.identity.tenant)
        return policy is not None and policy.record_prompts

    @staticmethod
    def _reason(state: FlowState) -> str | None:
        d = state.decision
        if d is None or d.effect == "allow":
            return None
        if d.effect == "approve" and state.approved_by:
            how = " (standing approval, not held)" if state.standing_approval else ""
            return f"approved by {state.approved_by}{how}"
        return d.reason

    def record_refusal(
        self, state: FlowState, refusal: RequestRefused
    ) -> concurrent.futures.Future[AppendResult] | None:
        """Audit a refusal (``deny``) in the agent's tenant; unauthenticated refusals have no
        tenant to write to and are logged only."""
        state.refusal = refusal
        self.accounting.release(state)
        self.emit("deny", {"state": state, "refusal": refusal})
        if state.identity is None:
            log.info(
                "refused %s %s %s: %s",
                state.request_id,
                state.target.host,
                refusal.status,
                refusal.message,
            )
            return None
        log.info(
            "refused %s %s/%s %s %s: %s",
            state.request_id,
            state.identity.tenant,
            state.identity.agent,
            refusal.status,
            refusal.rule or "-",
            refusal.message,
        )
        fields = self._record_fields(state)
        fields["rule"] = refusal.rule or fields["rule"]
        fields["reason"] = recordable(f"{refusal.type}: {refusal.message}")
        try:
            return self.tenant(state.identity.tenant).audit.append(
                "deny", status=refusal.status, **fields
            )
        except AiidError:
            log.exception("could not audit refusal")
            return None

    def record_hold(
        self, state: FlowState, timeout: float
    ) -> concurrent.futures.Future[AppendResult] | None:
        """Audit that a request is held for a human's answer (``held``), when the hold starts:
        a request waiting for approval is on record even if the answer never comes."""
        if state.identity is None or state.decision is None:
            return None
        fields = self._record_fields(state)
        fields["reason"] = (
            f"held for approval by rule {state.decision.rule_id}, {int(timeout)} s to answer: "
            f"aiid approve {state.identity.tenant} {state.request_id}"
        )
        return self.tenant(state.identity.tenant).audit.append("held", **fields)

    def record_approval(
        self, state: FlowState, approved: bool, by: str, reason: str
    ) -> concurrent.futures.Future[AppendResult] | None:
        """Audit a human's answer (or the timeout) for a held request."""
        if state.identity is None:
            return None
        fields = self._record_fields(state)
        fields["detail"]["decided_by"] = by
        fields["reason"] = reason
        self.emit("resolved", {"state": state, "approved": approved, "by": by})
        return self.tenant(state.identity.tenant).audit.append(
            "approval", status=200 if approved else 403, **fields
        )

    def record_error(
        self, state: FlowState, reason: str, *, sent: bool = False, killed: bool = True
    ) -> concurrent.futures.Future[AppendResult] | None:
        """Audit a killed or failed flow. ``sent``: the request may have reached the provider
        (the error came after it left), so its input is charged as estimated -- an agent that
        hangs up early must not get its reservation back for free; else everything reserved
        is given back. ``killed``: the gateway ended the flow (else it failed on its own, or
        its answer was on its way already), as the log line says."""
        if state.error_recorded:
            return None
        state.error_recorded = True
        usage: Usage | None = None
        cost: int | None = None
        f = state.route.facts if state.route else None
        if sent and f is not None and (state.reservation is not None or state.hold is not None):
            usage = Usage(f.estimated_input_tokens, 0, estimated=True)
            if state.usage_so_far is not None:
                try:
                    usage = self._counted(state, state.usage_so_far())
                except Exception:  # the estimate above stands
                    log.exception("flow %s: usage so far unknown", state.request_id)
            cost = self.accounting.settle(state, usage)
        else:
            self.accounting.release(state)
        self.emit("error", {"state": state, "reason": reason})
        log.warning("flow %s %s: %s", state.request_id, "killed" if killed else "failed", reason)
        if state.identity is None:
            return None
        fields = self._record_fields(state)
        fields["reason"] = recordable(reason[:500])
        if usage is not None:
            fields["input_tokens"] = usage.input_tokens
            fields["output_tokens"] = usage.output_tokens
            if usage.estimated:
                fields["detail"]["usage_estimated"] = True
        if cost is not None:
            fields["detail"]["cost_usd"] = pico_to_usd(cost)
        try:
            return self.tenant(state.identity.tenant).audit.append("error", **fields)
        except AiidError as e:
            if self._closing:  # closed already: this flow's error record was written then
                log.info("flow %s ended after shutdown: %s", state.request_id, e.one_line())
            else:
                log.exception("could not audit error")
            return None

    @staticmethod
    def _counted(state: FlowState, usage: Usage) -> Usage:
        """``usage`` as limits and budgets count it."""
        route = state.route.route if state.route is not None else None
        if route is not None and route.kind in COSTLESS_KINDS:
            # a model list, a token count: nothing generated, nothing consumed (count_tokens'
            # answer is the count, not usage), so nothing counts against limits or budgets
            return Usage(0, 0)
        if usage.estimated and state.output_limit is not None:
            # an estimate (chars / 4, one per piece) never above what max_tokens allows: the
            # provider cannot bill more, and a budget must not count more than it holds
            return dataclasses.replace(
                usage, output_tokens=min(usage.output_tokens, state.output_limit)
            )
        return usage

    def record_response(
        self,
        state: FlowState,
        status: int,
        usage: Usage | None,
        scrubbed: int = 0,
        extra: Mapping[str, Any] | None = None,
        completion: bytes | None = None,
    ) -> concurrent.futures.Future[AppendResult] | None:
        """Audit the response, settle the reservation and the budget hold with its usage.
        ``extra`` goes into ``detail`` (``cut``, ``incomplete``); ``completion`` (the body the
        agent got, scrubbed) only when the tenant's policy records prompts and completions."""
        if state.response_recorded or state.identity is None:
            return None
        if self._closing and state.error_recorded:
            return None  # the shutdown recorded how this flow ended; the log is closed
        state.response_recorded = True
        latency_ms = (self.clock.monotonic() - state.started) * 1000.0
        if usage is not None:
            usage = self._counted(state, usage)
        cost = self.accounting.settle(state, usage)
        fields = self._record_fields(state)
        fields["reason"] = None
        detail = fields["detail"]
        if usage is not None and usage.estimated:
            detail["usage_estimated"] = True
        if scrubbed:
            detail["scrubbed_secrets"] = scrubbed
        cost_usd = pico_to_usd(cost) if cost is not None else None
        if cost_usd is not None:
            detail["cost_usd"] = cost_usd
        if extra:
            detail.update(extra)
        if completion and self.records_prompts(state):
            detail["completion"] = completion[:RECORDED_BYTES].decode("utf-8", "replace")
        self.emit(
            "response",
            {
                "state": state,
                "status": status,
                "usage": usage,
                "latency_ms": latency_ms,
                "cost_usd": cost_usd,
            },
        )
        record = {
            "status": status,
            "input_tokens": usage.input_tokens if usage else None,
            "output_tokens": usage.output_tokens if usage else None,
            "latency_ms": round(latency_ms, 3),
            **fields,
        }
        written: concurrent.futures.Future[AppendResult] = concurrent.futures.Future()
        self._write_response(state.identity.tenant, record, written, 0)
        return written

    def _flush_response_retries(self, join: Callable[[float], None] | None) -> None:
        """At shutdown: the response records waiting for a retry are written now (their
        answers went out), on a replacement writer if one is starting; those that cannot be
        within RESPONSE_FLUSH_S in all are named in the log (the next start records their
        requests as unfinished). Called on the loop's thread, blocked: ``write_once`` reads
        the writer's replies itself."""
        pending, self._retrying = self._retrying, {}
        if not pending:
            return
        deadline = time.monotonic() + RESPONSE_FLUSH_S  # a real wait: the wall's clock
        joined = False
        for tenant, record, written in pending.values():
            while not written.done():
                left = max(0.0, deadline - time.monotonic())
                try:
                    audit = self.tenant(tenant).audit
                    written.set_result(audit.write_once("response", left, **record))
                except (AuditError, concurrent.futures.TimeoutError) as e:
                    if not joined and join is not None and left > 0:
                        joined = True  # the failed attempt started a replacement: wait once
                        join(left)
                        continue
                    why = e.one_line() if isinstance(e, AiidError) else "timed out"
                    log.error(
                        "response record of %s not written before the gateway stopped (%s): "
                        "the next start records its request as unfinished",
                        record.get("request_id"),
                        why,
                    )
                    written.set_exception(AuditError(f"not written at shutdown: {why}"))

    def _write_response(
        self,
        tenant: str,
        record: dict[str, Any],
        written: concurrent.futures.Future[AppendResult],
        attempt: int,
    ) -> None:
        """Write a ``response`` record; if its writer fails (the writer process died: what it
        held is lost), again on the replacement, up to RESPONSE_RETRIES times, never twice
        (``append_once``: it may have committed before dying). ``written`` gets the outcome."""
        self._retrying.pop(id(written), None)
        if written.done():  # written at shutdown meanwhile
            return
        try:
            audit = self.tenant(tenant).audit
            fut = (audit.append_once if attempt else audit.append)("response", **record)
        except AuditError as e:
            self._response_unwritten(tenant, record, written, attempt, e)
            return

        def done(f: concurrent.futures.Future[AppendResult]) -> None:
            e = f.exception()
            if written.done():
                return
            if e is None:
                written.set_result(f.result())
            else:
                self._response_unwritten(tenant, record, written, attempt, e)

        fut.add_done_callback(done)

    def _response_unwritten(
        self,
        tenant: str,
        record: dict[str, Any],
        written: concurrent.futures.Future[AppendResult],
        attempt: int,
        e: BaseException,
    ) -> None:
        loop = self._loop
        if (
            isinstance(e, AuditError)
            and not isinstance(e, AuditFieldError)  # the record itself: no retry helps
            and attempt < RESPONSE_RETRIES
            and loop is not None
            and not self._closing
        ):
            log.warning(
                "response record of %s not written (%s): trying again in %g s",
                record.get("request_id"),
                e.one_line(),
                RESPONSE_RETRY_S,
            )
            self._retrying[id(written)] = (tenant, record, written)
            try:
                loop.call_soon_threadsafe(
                    loop.call_later,
                    RESPONSE_RETRY_S,
                    self._write_response,
                    tenant,
                    record,
                    written,
                    attempt + 1,
                )
                return
            except RuntimeError:  # the loop is closed: the gateway is stopping
                self._retrying.pop(id(written), None)
        if not written.done():
            written.set_exception(e)
