"""The gateway pipeline as a library: identity -> route -> policy -> rate limit -> audit -> inject.

Each stage is one method that takes the flow's :class:`FlowState`, does its check and records
its result. The state knows the stage order; a flow may leave only when :meth:`FlowState.allows`
is true, i.e. every stage ran, in order, and the decision is an allow. mitmproxy adapters (in
``addons/``) call these methods; this module never imports mitmproxy.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiid_proxy.audit import AppendResult, AuditLog
from aiid_proxy.bodies import DEFAULT_BODY_LIMIT, decode_body
from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import (
    AiidError,
    IncompleteVerdict,
    RequestRefused,
    SecretNotFound,
    TokenError,
    VaultError,
)
from aiid_proxy.home import Home
from aiid_proxy.identity import AgentIdentity, RevocationList, TokenVerifier
from aiid_proxy.policy import Decision, Policy, RequestContext
from aiid_proxy.policystore import PolicyEvent, PolicyStore
from aiid_proxy.providers import (
    CREDENTIAL_HEADERS,
    Provider,
    Registry,
    RequestFacts,
    Route,
    Usage,
    parse_request,
)
from aiid_proxy.ratelimit import RateDecision, RateLimiter, Reservation
from aiid_proxy.vault import ReloadingKeyring, Secret, Vault

log = logging.getLogger("aiid.gateway")

STAGES = ("identity", "route", "policy", "ratelimit", "audit", "inject")
TOKEN_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
DEFAULT_MAX_TOKENS_RESERVE = 4096


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


@dataclass(frozen=True)
class Target:
    """What the agent asked for, recorded before any rewriting option (map_remote) runs."""

    scheme: str
    host: str
    port: int
    method: str
    path: str
    query: str = ""
    connect_host: str | None = None  # the CONNECT authority, for HTTPS through the proxy
    sni: str | None = None


@dataclass(frozen=True)
class RouteInfo:
    provider: Provider | None  # None: non-LLM egress
    route: Route | None
    facts: RequestFacts | None
    body: bytes  # decoded body, exactly what goes upstream


@dataclass(frozen=True)
class Injection:
    header: str
    value: Secret
    secret_name: str


@dataclass(eq=False)
class FlowState:
    """The verdict under construction for one flow."""

    request_id: str
    target: Target
    started: float
    connection_token: str | None = None
    identity: AgentIdentity | None = None
    route: RouteInfo | None = None
    decision: Decision | None = None
    reservation: Reservation | None = None
    audit: AppendResult | None = None
    injection: Injection | None = None
    refusal: RequestRefused | None = None
    digest: bytes | None = None
    done: list[str] = field(default_factory=list)
    approved_by: str | None = None
    response_recorded: bool = False
    error_recorded: bool = False

    def mark(self, stage: str) -> None:
        i = STAGES.index(stage)
        if self.refusal is not None or tuple(self.done) != STAGES[:i]:
            raise IncompleteVerdict(f"stage {stage} out of order after {self.done}")
        self.done.append(stage)

    def expect(self, stage: str) -> None:
        """Raise unless every stage before ``stage`` has completed and nothing refused."""
        i = STAGES.index(stage)
        if self.refusal is not None or tuple(self.done) != STAGES[:i]:
            raise IncompleteVerdict(f"stage {stage} reached without {STAGES[:i]}")

    def allows(self) -> bool:
        return (
            self.refusal is None
            and tuple(self.done) == STAGES
            and self.identity is not None
            and self.route is not None
            and self.decision is not None
            and (self.decision.effect == "allow" or self.approved_by is not None)
            and self.audit is not None
            and self.injection is not None
            and self.digest is not None
        )

    @property
    def tenant(self) -> str | None:
        return self.identity.tenant if self.identity else None

    @property
    def provider_name(self) -> str | None:
        if self.route and self.route.provider:
            return self.route.provider.name
        return None

    @property
    def model(self) -> str | None:
        return self.route.facts.model if self.route and self.route.facts else None


def request_digest(
    method: str, url: str, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> bytes:
    """What the verdict is bound to: method, URL, every header (in order) and the body."""
    h = hashlib.sha256()
    for part in (method.encode(), b"\0", url.encode(), b"\0"):
        h.update(part)
    for k, v in headers:
        h.update(len(k).to_bytes(4, "big") + k + len(v).to_bytes(4, "big") + v)
    h.update(b"\0")
    h.update(body)
    return h.digest()


def refusal_body(refusal: RequestRefused, request_id: str) -> bytes:
    return json.dumps(
        {
            "type": "error",
            "error": {
                "type": refusal.type,
                "message": refusal.message,
                "rule": refusal.rule,
                "request_id": request_id,
            },
        }
    ).encode()


def unauthenticated(message: str) -> RequestRefused:
    return RequestRefused(401, "unauthenticated", message)


def _token_from_value(name: str, value: str) -> str:
    value = value.strip()
    if name in ("authorization", "proxy-authorization"):
        scheme, _, rest = value.partition(" ")
        scheme = scheme.lower()
        rest = rest.strip()
        if scheme == "bearer":
            return rest
        if scheme == "basic":
            try:
                decoded = base64.b64decode(rest, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                raise unauthenticated("malformed Basic credentials") from None
            _, sep, password = decoded.partition(":")
            return password if sep else decoded
        raise unauthenticated(f"unsupported authorization scheme {scheme!r}")
    return value


def extract_token(headers: Iterable[tuple[str, str]], connection_token: str | None) -> str:
    """Find the agent token among the request's credential headers.

    ``Proxy-Authorization`` (on the request, or on the CONNECT that opened the connection)
    identifies the agent and the SDK's own key headers are then ignored. Otherwise every
    token-bearing header must carry the same token: two different values are ambiguous and
    refused.
    """
    proxy: list[str] = []
    others: list[tuple[str, str]] = []
    for name, value in headers:
        lname = name.lower()
        if lname == "proxy-authorization":
            proxy.append(_token_from_value(lname, value))
        elif lname in TOKEN_HEADERS:
            others.append((lname, value))
    if connection_token is not None:
        proxy.append(connection_token)
    # with a proxy token the SDK's key headers may hold anything: they are not even parsed
    chosen = proxy if proxy else [_token_from_value(n, v) for n, v in others]
    distinct = set(chosen)
    if not distinct or distinct == {""}:
        raise unauthenticated("no agent token: send it as the API key or as Proxy-Authorization")
    if len(distinct) > 1:
        raise unauthenticated("conflicting credentials: more than one distinct token sent")
    return distinct.pop()


def is_ip_literal(host: str) -> bool:
    h = host.strip("[]")
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        pass
    # inet_aton-style shorthands that resolvers accept: 127.1, 0x7f.1, 2130706433
    parts = h.split(".")
    return all(p and (p.isdigit() or p.lower().startswith("0x")) for p in parts)


@dataclass
class TenantRuntime:
    name: str
    vault: Vault
    audit: AuditLog
    region: str | None


class Gateway:
    """Runtime state shared by all flows: keys, policies, vaults, audit logs, limits."""

    def __init__(
        self,
        home: Home,
        policies_dir: Path,
        *,
        registry: Registry | None = None,
        clock: Clock = SYSTEM_CLOCK,
        body_limit: int = DEFAULT_BODY_LIMIT,
        env: Mapping[str, str] | None = None,
        watch: bool = True,
    ) -> None:
        env = os.environ if env is None else env
        home.require()
        self.home = home
        self.clock = clock
        self.body_limit = body_limit
        self.registry = registry or Registry.builtin()
        self.revocations = RevocationList(home, clock=clock)
        self.verifier = TokenVerifier(
            home.verify_key_pem(), self.revocations, tenants=home.tenants, clock=clock
        )
        self.keyring = ReloadingKeyring(home, env)
        self.keyring()  # fail at start, not on the first request, if the key is unusable
        self._audit_root = home.audit_key(env)
        self.ratelimiter = RateLimiter(clock)
        self.listeners: list[Callable[[str, Mapping[str, Any]], None]] = []
        self._tenants: dict[str, TenantRuntime] = {}
        self._tenant_lock = threading.Lock()
        self.policies = PolicyStore(policies_dir, clock=clock, on_event=self._policy_event)
        for t in home.tenants():
            self.tenant(t)
        self.policies.refresh()
        if watch:
            self.policies.start()

    # -- plumbing -----------------------------------------------------------
    def emit(self, kind: str, data: Mapping[str, Any]) -> None:
        for fn in list(self.listeners):
            try:
                fn(kind, data)
            except Exception:
                log.exception("event listener failed")

    def tenant(self, name: str) -> TenantRuntime:
        rt = self._tenants.get(name)
        if rt is not None:
            return rt
        with self._tenant_lock:
            rt = self._tenants.get(name)
            if rt is None:
                self.home.require_tenant(name)
                rt = TenantRuntime(
                    name=name,
                    vault=Vault(self.home.vault_path(name), name, self.keyring, clock=self.clock),
                    audit=AuditLog(
                        self.home.audit_path(name),
                        name,
                        self._audit_root,
                        checkpoint_path=self.home.checkpoint_path(name),
                        clock=self.clock,
                    ),
                    region=self.home.tenant_region(name),
                )
                self._tenants[name] = rt
        return rt

    def tenants(self) -> list[TenantRuntime]:
        return list(self._tenants.values())

    def _policy_event(self, ev: PolicyEvent) -> None:
        self.emit("policy", {"event": ev})
        if ev.tenant not in self._tenants and not self.home.has_tenant(ev.tenant):
            return
        try:
            self.tenant(ev.tenant).audit.append(
                "policy",
                rule=None,
                status=None if ev.ok else 1,
                reason=ev.describe(),
                detail={"ok": ev.ok, "hash": ev.source_hash, "removed": ev.removed},
            )
        except AiidError:
            log.exception("could not audit policy event")

    def close(self) -> None:
        self.policies.stop()
        for rt in self._tenants.values():
            rt.audit.close()

    def new_flow(self, target: Target, connection_token: str | None = None) -> FlowState:
        return FlowState(
            request_id=new_request_id(),
            target=target,
            started=self.clock.monotonic(),
            connection_token=connection_token,
        )

    # -- stages -------------------------------------------------------------
    def identify(self, state: FlowState, headers: Iterable[tuple[str, str]]) -> AgentIdentity:
        state.expect("identity")
        token = extract_token(headers, state.connection_token)
        try:
            ident = self.verifier.verify(token)
        except TokenError as e:
            raise unauthenticated(str(e)) from None
        state.identity = ident
        state.mark("identity")
        return ident

    def route(
        self,
        state: FlowState,
        headers: Mapping[str, str],
        raw_body: bytes,
    ) -> RouteInfo:
        """Classify the target and read the body. ``headers`` lowercase-keyed."""
        state.expect("route")
        t = state.target
        if headers.get("upgrade") or "upgrade" in headers.get("connection", "").lower():
            raise RequestRefused(
                403, "policy_denied", "protocol upgrades (WebSocket) are not allowed", "default"
            )
        if t.method.upper() == "CONNECT":
            raise RequestRefused(403, "policy_denied", "CONNECT inside a tunnel", "default")
        if is_ip_literal(t.host):
            raise RequestRefused(
                403, "policy_denied", "raw IP addresses are not allowed; use a host name", "default"
            )
        if t.scheme != "https" or t.port != 443:
            raise RequestRefused(
                403,
                "policy_denied",
                f"only https on port 443 is allowed (got {t.scheme}://{t.host}:{t.port})",
                "default",
            )
        if t.connect_host is not None and t.connect_host.lower() != t.host.lower():
            raise RequestRefused(
                403, "policy_denied", "Host header does not match the CONNECT target", "default"
            )
        if t.sni is not None and t.sni.lower().rstrip(".") != t.host.lower().rstrip("."):
            raise RequestRefused(
                403, "policy_denied", "TLS SNI does not match the Host header", "default"
            )
        body = decode_body(raw_body, headers.get("content-encoding"), self.body_limit)
        match = self.registry.match(t.host, t.method, t.path)
        if match is None:
            info = RouteInfo(provider=None, route=None, facts=None, body=body)
        else:
            if match.route is None:
                raise RequestRefused(
                    403,
                    "policy_denied",
                    f"{t.method} {t.path} is not a known {match.provider.name} API route",
                    "default",
                )
            facts = None
            if match.route.json or body:
                facts = parse_request(match.route, body, getattr(match, "params", None))
            info = RouteInfo(provider=match.provider, route=match.route, facts=facts, body=body)
        state.route = info
        state.mark("route")
        return info

    def context(self, state: FlowState) -> RequestContext:
        assert state.identity is not None and state.route is not None
        r = state.route
        f = r.facts
        t = state.target
        return RequestContext(
            tenant=state.identity.tenant,
            agent=state.identity.agent,
            provider=r.provider.name if r.provider else None,
            model=f.model if f else None,
            host=t.host.lower(),
            method=t.method.upper(),
            path=t.path,
            now=self.clock.now(),
            region=r.provider.region if r.provider else None,
            max_tokens=f.max_tokens if f else None,
            temperature=f.temperature if f else None,
            top_p=f.top_p if f else None,
            n=f.n if f else None,
            stream=f.stream if f else False,
            tools=f.tools if f else False,
        )

    def policy_for(self, tenant: str) -> Policy | None:
        return self.policies.get(tenant)

    def decide(self, state: FlowState) -> Decision:
        state.expect("policy")
        assert state.identity is not None
        policy = self.policy_for(state.identity.tenant)
        if policy is None:
            decision = Decision("deny", "default", "no policy is loaded for this tenant")
        else:
            decision = policy.decide(self.context(state))
        state.decision = decision
        if decision.effect == "deny":
            raise RequestRefused(403, "policy_denied", decision.reason, decision.rule_id)
        state.mark("policy")
        return decision

    def reserve(self, state: FlowState) -> RateDecision:
        state.expect("ratelimit")
        assert state.identity is not None and state.route is not None
        ident = state.identity
        policy = self.policy_for(ident.tenant)
        tokens = 0
        f = state.route.facts
        if f is not None:
            tokens = f.estimated_input_tokens + (
                f.max_tokens if f.max_tokens is not None else DEFAULT_MAX_TOKENS_RESERVE
            )
        decision, reservation = self.ratelimiter.acquire(
            ident.tenant,
            ident.agent,
            policy.tenant_limit if policy else None,
            policy.agent_limit(ident.agent) if policy else None,
            tokens,
        )
        if not decision.allowed or reservation is None:
            raise RequestRefused(
                429,
                "rate_limited",
                f"rate limit reached: {decision.limit}; retry after {decision.retry_after} s",
                decision.limit,
                headers=ratelimit_headers(decision, refused=True),
            )
        state.reservation = reservation
        state.mark("ratelimit")
        return decision

    def audit_request(self, state: FlowState) -> concurrent.futures.Future[AppendResult]:
        """Append the ``request`` record; the caller awaits durability, then calls
        :meth:`audit_done`."""
        state.expect("audit")
        assert state.identity is not None and state.decision is not None
        rt = self.tenant(state.identity.tenant)
        return rt.audit.append("request", **self._record_fields(state, with_prompt=True))

    def audit_done(self, state: FlowState, result: AppendResult) -> None:
        state.audit = result
        state.mark("audit")

    def inject(self, state: FlowState) -> Injection:
        state.expect("inject")
        assert state.identity is not None and state.route is not None
        assert state.decision is not None
        rt = self.tenant(state.identity.tenant)
        provider = state.route.provider
        spec = state.decision.inject
        if provider is not None:
            secret_name, header, scheme = provider.name, provider.auth_header, provider.auth_scheme
        elif spec is not None:
            secret_name, header, scheme = spec.secret, spec.header.lower(), spec.scheme
        else:
            raise RequestRefused(
                403,
                "policy_denied",
                "egress rule names no secret to inject",
                state.decision.rule_id,
            )
        try:
            secret = rt.vault.get(secret_name)
        except SecretNotFound:
            raise RequestRefused(
                403,
                "no_credential",
                f"tenant {rt.name!r} has no key for {secret_name!r} in its vault",
                state.decision.rule_id,
            ) from None
        except VaultError:
            raise RequestRefused(
                503, "vault_error", "the tenant's key cannot be decrypted", state.decision.rule_id
            ) from None
        value = secret.reveal()
        if scheme:
            value = f"{scheme} {value}"
        inj = Injection(header=header, value=Secret(value), secret_name=secret_name)
        state.injection = inj
        state.mark("inject")
        return inj

    def seal(
        self,
        state: FlowState,
        method: str,
        url: str,
        body: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        """Bind the completed verdict to the exact request that leaves."""
        if tuple(state.done) != STAGES:
            raise IncompleteVerdict("seal before every stage completed")
        state.digest = request_digest(method, url, body, headers)

    def check_sealed(
        self,
        state: FlowState,
        method: str,
        url: str,
        body: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> bool:
        return (
            state.allows()
            and state.digest is not None
            and secrets.compare_digest(state.digest, request_digest(method, url, body, headers))
        )

    # -- records ------------------------------------------------------------
    def _record_fields(self, state: FlowState, *, with_prompt: bool = False) -> dict[str, Any]:
        t = state.target
        d = state.decision
        detail: dict[str, Any] = {"method": t.method, "host": t.host, "path": t.path}
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
        if with_prompt and state.identity is not None and state.route is not None:
            policy = self.policy_for(state.identity.tenant)
            if policy is not None and policy.record_prompts and state.route.body:
                detail["prompt"] = state.route.body[:65536].decode("utf-8", "replace")
        return {
            "request_id": state.request_id,
            "agent": state.identity.agent if state.identity else None,
            "provider": state.provider_name,
            "model": state.model,
            "rule": d.rule_id if d else None,
            "reason": d.reason if d and d.effect != "allow" else None,
            "detail": detail,
        }

    def record_refusal(
        self, state: FlowState, refusal: RequestRefused
    ) -> concurrent.futures.Future[AppendResult] | None:
        """Audit a refusal (``deny``) in the agent's tenant; unauthenticated refusals have no
        tenant to write to and are logged only."""
        state.refusal = refusal
        if state.reservation is not None:
            self.ratelimiter.release(state.reservation)
            state.reservation = None
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
        fields = self._record_fields(state)
        fields["rule"] = refusal.rule or fields["rule"]
        fields["reason"] = f"{refusal.type}: {refusal.message}"
        try:
            return self.tenant(state.identity.tenant).audit.append(
                "deny", status=refusal.status, **fields
            )
        except AiidError:
            log.exception("could not audit refusal")
            return None

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
        self, state: FlowState, reason: str
    ) -> concurrent.futures.Future[AppendResult] | None:
        if state.error_recorded:
            return None
        state.error_recorded = True
        if state.reservation is not None:
            self.ratelimiter.release(state.reservation)
            state.reservation = None
        self.emit("error", {"state": state, "reason": reason})
        log.warning("flow %s killed: %s", state.request_id, reason)
        if state.identity is None:
            return None
        fields = self._record_fields(state)
        fields["reason"] = reason[:500]
        try:
            return self.tenant(state.identity.tenant).audit.append("error", **fields)
        except AiidError:
            log.exception("could not audit error")
            return None

    def record_response(
        self, state: FlowState, status: int, usage: Usage | None, scrubbed: int = 0
    ) -> concurrent.futures.Future[AppendResult] | None:
        if state.response_recorded or state.identity is None:
            return None
        state.response_recorded = True
        latency_ms = (self.clock.monotonic() - state.started) * 1000.0
        if state.reservation is not None:
            actual = usage.input_tokens + usage.output_tokens if usage else 0
            self.ratelimiter.settle(state.reservation, actual)
            state.reservation = None
        fields = self._record_fields(state)
        fields["reason"] = None
        detail = fields["detail"]
        if usage is not None and usage.estimated:
            detail["usage_estimated"] = True
        if scrubbed:
            detail["scrubbed_secrets"] = scrubbed
        self.emit(
            "response",
            {"state": state, "status": status, "usage": usage, "latency_ms": latency_ms},
        )
        return self.tenant(state.identity.tenant).audit.append(
            "response",
            status=status,
            input_tokens=usage.input_tokens if usage else None,
            output_tokens=usage.output_tokens if usage else None,
            latency_ms=round(latency_ms, 3),
            **fields,
        )


def ratelimit_headers(d: RateDecision, *, refused: bool) -> dict[str, str]:
    h: dict[str, str] = {}
    if refused:
        h["retry-after"] = str(max(1, d.retry_after))
    if d.limit_requests is not None:
        h["x-ratelimit-limit-requests"] = str(d.limit_requests)
    if d.remaining_requests is not None:
        h["x-ratelimit-remaining-requests"] = str(max(0, d.remaining_requests))
    if d.reset_requests_s is not None:
        h["x-ratelimit-reset-requests"] = f"{d.reset_requests_s:.3f}s"
    if d.limit_tokens is not None:
        h["x-ratelimit-limit-tokens"] = str(d.limit_tokens)
    if d.remaining_tokens is not None:
        h["x-ratelimit-remaining-tokens"] = str(max(0, d.remaining_tokens))
    if d.reset_tokens_s is not None:
        h["x-ratelimit-reset-tokens"] = f"{d.reset_tokens_s:.3f}s"
    return h


__all__ = [
    "CREDENTIAL_HEADERS",
    "STAGES",
    "FlowState",
    "Gateway",
    "Injection",
    "RouteInfo",
    "Target",
    "extract_token",
    "refusal_body",
]
