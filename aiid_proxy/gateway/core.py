"""The :class:`Gateway`: runtime state shared by all flows, and one method per stage."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from aiid_proxy.audit import AppendResult
from aiid_proxy.audit.writers import writer_factory
from aiid_proxy.bodies import DEFAULT_BODY_LIMIT, decode_body
from aiid_proxy.budget import (
    PRICES_FILE,
    Ledger,
    PriceBook,
    month_start_ts,
    pico_to_usd,
    spend_records,
)
from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import (
    AiidError,
    ConfigError,
    IncompleteVerdict,
    RequestRefused,
    SecretNotFound,
    TokenError,
    VaultError,
)
from aiid_proxy.gateway import recovery
from aiid_proxy.gateway.accounting import Accounting
from aiid_proxy.gateway.flow import (
    DIGEST_SIZE,
    STAGES,
    FlowState,
    Injection,
    RouteInfo,
    Target,
    new_request_id,
    request_digest,
)
from aiid_proxy.gateway.records import Records, TenantRuntime
from aiid_proxy.gateway.wire import extract_token, refuse_target, unauthenticated
from aiid_proxy.home import NAME_RE, Home
from aiid_proxy.identity import AgentIdentity, RevocationList, TokenVerifier
from aiid_proxy.policy import Decision, Policy, RequestContext
from aiid_proxy.policy.lint import GatewayLint
from aiid_proxy.policystore import PolicyEvent, PolicyStore
from aiid_proxy.providers import (
    Registry,
    parse_request,
)
from aiid_proxy.ratelimit import RateDecision, RateLimiter
from aiid_proxy.vault import ReloadingKeyring, Secret, Vault, wrong_master_key

VAULT_RULE_ID = "vault"  # the rule a refusal for a missing vault key names

log = logging.getLogger("aiid.gateway")

VAULT_CACHE_S = 1.0  # a vault entry is read from disk at most once a second
PROVIDERS_FILE = "providers.yaml"


class Gateway(Records):
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
        audit_writer: str = "thread",
        keep_fds: tuple[int, ...] = (),
    ) -> None:
        """``audit_writer``: "thread" keeps each tenant's audit writer in this process,
        "process" in one child process (:mod:`aiid_proxy.audit.service`), which keeps
        ``keep_fds`` (the home lock) open for as long as it runs."""
        env = os.environ if env is None else env
        home.require()
        self.home = home
        self.clock = clock
        self._started_wall = clock.now()  # records from before are an earlier run's
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retrying = {}
        self.body_limit = body_limit
        providers_file = policies_dir / PROVIDERS_FILE
        self.registry = registry or Registry.load(
            providers_file if providers_file.is_file() else None
        )
        if registry is None and providers_file.is_file():
            log.info("providers and routes from %s (read at start only)", providers_file)
        self.prices = PriceBook(policies_dir / PRICES_FILE, clock)
        self.ledger = Ledger(clock)
        self.revocations = RevocationList(home, clock=clock)
        self.verifier = TokenVerifier(
            home.verify_key_pem(), self.revocations, tenants=home.tenants, clock=clock
        )
        self.keyring = ReloadingKeyring(home, env, clock=clock)
        self.keyring()  # fail at start, not on the first request, if the key is unusable
        self._audit_root = home.audit_key(env)
        self.ratelimiter = RateLimiter(clock)
        self.accounting = Accounting(self.ratelimiter, self.ledger, self.prices)
        self.listeners: list[Callable[[str, Mapping[str, Any]], None]] = []
        self._tenants: dict[str, TenantRuntime] = {}
        self._tenant_lock = threading.Lock()
        self._live: weakref.WeakSet[FlowState] = weakref.WeakSet()  # flows not yet done
        self._closing = False
        self.policies = PolicyStore(
            policies_dir,
            clock=clock,
            on_event=self._policy_event,
            lint=GatewayLint(self.registry, providers_file),  # as `aiid policy check` does
        )
        self._audit_writers = writer_factory(audit_writer, keep_fds)
        try:
            for t in home.tenants():
                self.tenant(t)
            self._check_master_key()
        except BaseException:
            self.close()
            raise
        self.policies.refresh()
        if watch:
            self.policies.start()

    # -- plumbing -----------------------------------------------------------
    def check_chains(self, close_unfinished: bool = False) -> threading.Thread:
        """Verify every tenant's whole audit chain in the background, each in a child process
        (``audit.startcheck``): a log altered while the gateway was down is named at once, in
        the log (critical) and as an ``audit`` event (the console), not at the next
        ``aiid audit verify``. Opening a log checks only its head.

        ``close_unfinished`` (no other gateway runs on this home): requests of an earlier run
        whose end is on no record (the gateway was killed, or the power cut took their lazy
        ``response`` record) get an ``error`` record saying so, in a chain that verified."""
        loop = self._loop
        on_unfinished = None
        if close_unfinished and loop is not None:

            def on_unfinished(tenant: str, rows: list[dict[str, Any]]) -> None:
                loop.call_soon_threadsafe(self._record_unfinished, tenant, rows)

        t = threading.Thread(
            target=recovery.check_chains,
            args=(self.home, self._audit_root, self._started_wall),
            kwargs={
                "closing": lambda: self._closing,
                "emit": self.emit,
                "on_unfinished": on_unfinished,
            },
            name="aiid-chain-check",
            daemon=True,
        )
        t.start()
        return t

    def _record_unfinished(self, tenant: str, rows: list[dict[str, Any]]) -> None:
        charged = recovery.record_unfinished(
            self.tenant(tenant).audit, tenant, rows, self.clock.now()
        )
        self.ledger.count(tenant, charged)

    def emit(self, kind: str, data: Mapping[str, Any]) -> None:
        for fn in list(self.listeners):
            try:
                fn(kind, data)
            except Exception:
                log.exception("event listener failed")

    def _check_master_key(self) -> None:
        """Fail at start, with one clear line, when the master key in use cannot open a vault
        entry (wrong ``AIID_MASTER_KEY`` or key file): key ids are public, keys are not shown."""
        ring = self.keyring()
        for rt in list(self._tenants.values()):
            for info in rt.vault.list():
                if info.key_id not in ring:
                    raise wrong_master_key(rt.name, info.provider, info.key_id, ring.current_id)

    def tenant(self, name: str) -> TenantRuntime:
        rt = self._tenants.get(name)
        if rt is not None:
            return rt
        with self._tenant_lock:
            rt = self._tenants.get(name)
            if rt is None:
                self.home.require_tenant(name)
                vault_path = self.home.vault_path(name)
                # Vault() would create an empty one, also in a truncated (0-byte) file
                if not vault_path.is_file() or vault_path.stat().st_size == 0:
                    what = "missing" if not vault_path.is_file() else "empty (truncated?)"
                    raise ConfigError(
                        f"tenant {name!r}: vault database {what}: {vault_path} (never created "
                        "here: restore it from backup; every request of this tenant is refused)"
                    )
                rt = TenantRuntime(
                    name=name,
                    vault=Vault(
                        self.home.vault_path(name),
                        name,
                        self.keyring,
                        clock=self.clock,
                        cache_for=VAULT_CACHE_S,
                    ),
                    audit=self._audit_writers.open(
                        self.home.audit_path(name),
                        name,
                        self._audit_root,
                        checkpoint_path=self.home.checkpoint_path(name),
                        clock=self.clock,
                        create=False,  # a missing audit.db is restored, never silently restarted
                    ),
                    region=self.home.tenant_region(name),
                )
                self.rebuild_spend(name)
                in_force = self.policies.get(name)
                if in_force is not None:
                    # loaded before the tenant was added (its log did not exist then): its
                    # log starts with the policy its requests are decided by
                    self._audit_policy_event(
                        rt,
                        PolicyEvent(name, True, self.clock.now(), in_force.source_hash, None),
                    )
                # published last: the event loop reads it without the lock, and a request
                # must find the spend rebuilt and the policy on record before its own record
                self._tenants[name] = rt
        return rt

    def rebuild_spend(self, name: str) -> int:
        """The tenant's spend this UTC month and day, from its audit records' ``cost_usd``."""
        since = month_start_ts(self.clock.now())
        n = self.ledger.load(name, spend_records(self.home.audit_path(name), since))
        if n:
            log.info("tenant %s: spend rebuilt from %d audit records", name, n)
        return n

    def tenants(self) -> list[TenantRuntime]:
        return list(self._tenants.values())

    def _policy_event(self, ev: PolicyEvent) -> None:
        self.emit("policy", {"event": ev})
        if ev.tenant not in self._tenants and (
            NAME_RE.fullmatch(ev.tenant) is None  # a stray "Acme.yaml": no tenant's log
            or not self.home.has_tenant(ev.tenant)
        ):
            return
        fresh = ev.tenant not in self._tenants
        try:
            rt = self.tenant(ev.tenant)
        except AiidError:
            log.exception("could not audit policy event")
            return
        if fresh and ev.ok and ev.source_hash is not None:
            return  # opening the log recorded the policy in force: this one
        self._audit_policy_event(rt, ev)

    def close(self) -> None:
        """Stop: every request still in flight gets its ``error`` record first (a stream cut
        by the shutdown, a request held for approval), then the audit logs commit and close."""
        self._closing = True
        self.policies.stop()
        for state in list(self._live):
            if state.finish is not None:  # released: its response record, not an error
                try:
                    state.finish()
                except Exception:
                    log.exception("flow %s: accounting at shutdown failed", state.request_id)
        for state in list(self._live):
            if (
                state.identity is not None
                and state.refusal is None
                and not state.response_recorded
                and not state.error_recorded
            ):
                self.record_error(
                    state,
                    "gateway shut down before the request completed",
                    sent=state.digest is not None,
                )
        self._flush_response_retries(getattr(self._audit_writers, "join", None))
        for rt in self._tenants.values():
            rt.audit.close()
        self._audit_writers.close()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on ``loop`` what can (the audit writer process's replies); from its thread."""
        self._audit_writers.attach(loop)
        self._loop = loop

    def new_flow(self, target: Target, connection_token: str | None = None) -> FlowState:
        state = FlowState(
            request_id=new_request_id(),
            target=target,
            started=self.clock.monotonic(),
            connection_token=connection_token,
        )
        self._live.add(state)  # weakly: a finished flow's state goes with its flow
        return state

    # -- stages -------------------------------------------------------------
    def identify(self, state: FlowState, headers: Iterable[tuple[str, str]]) -> AgentIdentity:
        state.expect("identity")
        token = extract_token(headers, state.connection_token)
        try:
            ident = self.verifier.verify(token)
        except TokenError as e:
            # Signed by the admin key but expired or revoked: the refusal is audited in the
            # tenant it names (a revoked token still in use is that tenant's business). The
            # flow is refused all the same: "identity" is never marked.
            if isinstance(e.identity, AgentIdentity):
                state.identity = e.identity
            raise unauthenticated(str(e)) from None
        state.identity = ident
        # the signature part: what makes the token a credential, and what no other header,
        # cookie or query parameter may carry upstream (InjectStage drops any that does)
        state.token_mark = token.rsplit(".", 1)[-1]
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
        refuse_target(t, headers)
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
            if match.route.json or body or match.route.model_param is not None:
                facts = parse_request(match.route, body, match.params)
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
            tenant_region=self.tenant(state.identity.tenant).region,
        )

    def policy_for(self, tenant: str) -> Policy | None:
        return self.policies.get(tenant)

    def _decide(self, state: FlowState) -> Decision:
        """The tenant's policy in force on this request; deny (rule default) without one."""
        assert state.identity is not None
        policy = self.policy_for(state.identity.tenant)
        if policy is None:
            return Decision("deny", "default", "no policy is loaded for this tenant")
        return policy.decide(self.context(state))

    def decide(self, state: FlowState) -> Decision:
        state.expect("policy")
        decision = self._decide(state)
        state.decision = decision
        if decision.effect == "deny":
            raise RequestRefused(403, "policy_denied", decision.reason, decision.rule_id)
        state.mark("policy")
        return decision

    def recheck_held(self, state: FlowState) -> None:
        """After a hold for approval (minutes may have passed): the token must still be valid
        and the policy in force now must not deny the request; else it is refused as it would
        be now. A human's approval never outlives a revocation or a policy edit that denies."""
        assert state.identity is not None
        try:
            self.verifier.recheck(state.identity)
        except TokenError as e:
            raise unauthenticated(f"{e} while the request was held for approval") from None
        decision = self._decide(state)
        if decision.effect == "deny":
            state.decision = decision
            raise RequestRefused(
                403,
                "policy_denied",
                f"{decision.reason} (the policy changed while the request was held)",
                decision.rule_id,
            )

    def reserve(self, state: FlowState) -> RateDecision:
        state.expect("ratelimit")
        assert state.identity is not None
        decision = self.accounting.reserve(state, self.policy_for(state.identity.tenant))
        state.mark("ratelimit")
        return decision

    def refuse_unpriced(self, state: FlowState) -> None:
        """Refuse (403, rule ``budgets``) a priced route whose model has no price while a
        budget applies to the agent: such a request can never pass. Checked before a hold for
        approval too, so that no human approves what is refused anyway."""
        assert state.identity is not None
        self.accounting.refuse_unpriced(state, self.policy_for(state.identity.tenant))

    def audit_request(self, state: FlowState) -> concurrent.futures.Future[AppendResult]:
        """Queue the ``request`` record (the ``audit`` stage). The caller may :meth:`inject`
        while it commits, then awaits the future and calls :meth:`audit_done`: :meth:`seal`
        (so the way out) needs the committed record."""
        state.expect("audit")
        assert state.identity is not None and state.decision is not None
        rt = self.tenant(state.identity.tenant)
        fields = self._record_fields(state, with_prompt=True)
        if state.hold is not None and state.hold.price is not None:
            # its worst-case cost: what a start after a crash charges it, its end unknown
            fields["detail"]["hold_usd"] = pico_to_usd(state.hold.amount)
        fut = rt.audit.append("request", **fields)
        state.mark("audit")
        return fut

    def audit_done(self, state: FlowState, result: AppendResult) -> None:
        """The request record is durable."""
        if "audit" not in state.done:
            raise IncompleteVerdict("request record committed for a flow that never queued it")
        state.audit = result

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
            # an egress rule without `inject`: the request leaves with no credential at all
            # (every one the agent sent is stripped all the same)
            state.injection = Injection(header="", value=Secret(""), secret_name="")
            state.mark("inject")
            return state.injection
        try:
            secret = rt.vault.get(secret_name)
        except SecretNotFound:
            # named "vault", not the rule that allowed it: no rule refused this ([AB])
            raise RequestRefused(
                403,
                "policy_denied",
                f"tenant {rt.name!r} has no key for {secret_name!r} in its vault "
                f"(`aiid vault put {rt.name} {secret_name}`); rule "
                f"{state.decision.rule_id!r} allowed the request",
                VAULT_RULE_ID,
            ) from None
        except VaultError:
            # an error inside the gateway, not a refusal: the caller kills the flow and
            # writes an `error` record (the contract's fail-closed path)
            raise VaultError(
                f"tenant {rt.name!r}: vault entry {secret_name!r} cannot be decrypted "
                "(corrupted entry or wrong master key)"
            ) from None
        value = secret.reveal()
        if scheme:
            value = f"{scheme} {value}"
        inj = Injection(
            header=header,
            value=Secret(value),
            secret_name=secret_name,
            raw=secret,
            extra_headers=provider.extra_headers if provider is not None else (),
        )
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
        authority: str = "",
    ) -> None:
        """Bind the completed verdict to the exact request that leaves."""
        self.seal_digest(state, request_digest(method, url, body, headers, authority))

    def seal_digest(self, state: FlowState, digest: bytes) -> None:
        """:meth:`seal` with the request's :func:`request_digest` computed beforehand (while
        its record commits): :meth:`check_sealed` computes it again from the request as it
        leaves, so a request changed after the digest was taken never passes."""
        if tuple(state.done) != STAGES:
            raise IncompleteVerdict("seal before every stage completed")
        if state.audit is None:
            raise IncompleteVerdict("seal before the request record is durable")
        if len(digest) != DIGEST_SIZE:
            raise IncompleteVerdict("seal with something that is not a request digest")
        state.digest = digest

    def check_sealed(
        self,
        state: FlowState,
        method: str,
        url: str,
        body: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
        authority: str = "",
    ) -> bool:
        return (
            state.allows()
            and state.digest is not None
            and secrets.compare_digest(
                state.digest, request_digest(method, url, body, headers, authority)
            )
        )

    # -- records ------------------------------------------------------------
