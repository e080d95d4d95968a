"""What a request may spend: its rate-limit reservation and its budget hold, taken before it
leaves (or refused) and settled with the usage the provider reports."""

from __future__ import annotations

from aiid_proxy.budget import (
    COSTLESS_KINDS,
    BudgetRefusal,
    Hold,
    Ledger,
    PriceBook,
    agent_budget_of,
    budgets_apply,
    reservation_tokens,
)
from aiid_proxy.errors import RequestRefused
from aiid_proxy.gateway.flow import FlowState
from aiid_proxy.gateway.wire import ratelimit_headers
from aiid_proxy.policy import Policy
from aiid_proxy.providers import Usage
from aiid_proxy.ratelimit import RateDecision, RateLimiter

DEFAULT_MAX_TOKENS_RESERVE = 4096
"""Output tokens reserved (per choice) for a generating request that sets no max_tokens; a
stream under a token limit or budget is cut when it runs past its reservation."""


class Accounting:
    """Rate limits and budgets of every tenant and agent of one gateway."""

    def __init__(self, ratelimiter: RateLimiter, ledger: Ledger, prices: PriceBook) -> None:
        self.ratelimiter = ratelimiter
        self.ledger = ledger
        self.prices = prices

    def reserve(self, state: FlowState, policy: Policy | None) -> RateDecision:
        """Reserve the request's tokens under the rate limits and hold its worst-case cost
        under the budgets of ``policy`` (the tenant's, in force), or refuse it (429, or 403
        for a model without a price under a budget). Nothing stays held after a refusal."""
        assert state.identity is not None and state.route is not None
        ident = state.identity
        f = state.route.facts
        kind = state.route.route.kind if state.route.route is not None else None
        est_in, out_cap = (0, 0)
        if f is not None:
            est_in, out_cap = reservation_tokens(
                kind, f.max_tokens, f.n, f.estimated_input_tokens, DEFAULT_MAX_TOKENS_RESERVE
            )
        if f is not None and f.max_tokens is not None:
            state.output_limit = f.max_tokens * max(1, f.n or 1)
        tenant_limit = policy.tenant_limit if policy else None
        agent_limit = policy.agent_limit(ident.agent) if policy else None
        if f is not None and f.max_tokens is None and out_cap:
            # No max_tokens: the default reservation is only a guess; under a token limit it
            # is no more than what the limit leaves after the input, so the request can pass
            # (the stream is cut there, as for a max_tokens that size).
            per_minute = [
                lim.tokens_per_minute
                for lim in (tenant_limit, agent_limit)
                if lim is not None and lim.tokens_per_minute is not None
            ]
            room = min(per_minute, default=0) - est_in
            if room > 0:
                out_cap = min(out_cap, room)
        hold = self._hold_budget(state, policy, est_in, out_cap)  # may refuse; holds nothing then
        decision, reservation = self.ratelimiter.acquire(
            ident.tenant, ident.agent, tenant_limit, agent_limit, est_in + out_cap
        )
        if not decision.allowed or reservation is None:
            if hold is not None:
                self.ledger.release(hold)
            message = (
                f"request needs {est_in + out_cap} tokens, more than the {decision.limit} "
                "limit ever allows: it can never pass; lower max_tokens or the prompt"
                if decision.never
                else f"rate limit reached: {decision.limit}; retry after {decision.retry_after} s"
            )
            headers = ratelimit_headers(decision, refused=True)
            if decision.never:
                # both SDKs obey it: a request that can never pass is not retried (they sent
                # it 3 times, waiting out Retry-After between the tries)
                headers["x-should-retry"] = "false"
            raise RequestRefused(429, "rate_limited", message, decision.limit, headers=headers)
        state.reservation = reservation
        state.hold = hold
        state.rate = decision
        token_limited = any(
            lim is not None and lim.tokens_per_minute is not None
            for lim in (tenant_limit, agent_limit)
        )
        if out_cap and (token_limited or budgets_apply(policy, ident.agent)):
            state.output_cap = out_cap
        return decision

    def refuse_unpriced(self, state: FlowState, policy: Policy | None) -> None:
        """Refuse (403, rule ``budgets``) a priced route whose model has no price while a
        budget applies to the agent: such a request can never pass. Checked before a hold for
        approval too, so that no human approves what is refused anyway."""
        assert state.identity is not None and state.route is not None
        r = state.route
        if r.provider is None or r.route is None or r.route.kind in COSTLESS_KINDS:
            return
        if not budgets_apply(policy, state.identity.agent):
            return
        if self.prices.current().lookup(r.provider.name, state.model) is None:
            message = (
                f"no price for model {state.model!r} of provider {r.provider.name!r}; "
                "budgets need prices.yaml"
                if state.model is not None
                else f"the request names no model ({r.route.kind} at {r.provider.name!r}): a "
                "budget prices requests by their model, so one must be named in the request"
            )
            raise RequestRefused(403, "policy_denied", message, "budgets")

    def _hold_budget(
        self, state: FlowState, policy: Policy | None, est_in: int, out_cap: int
    ) -> Hold | None:
        """Hold the request's worst-case cost against its budgets, or refuse it: 429
        ``budget_exceeded`` naming the budget, or 403 when a budget applies and the model has
        no price. None when the request costs nothing or nothing can be priced."""
        assert state.identity is not None and state.route is not None
        r = state.route
        if r.provider is None or r.route is None or r.route.kind in COSTLESS_KINDS:
            return None
        ident = state.identity
        price = self.prices.current().lookup(r.provider.name, state.model)
        tenant_budget = policy.tenant_budget if policy else None
        agent_budget = agent_budget_of(policy, ident.agent) if policy else None
        if price is None:
            self.refuse_unpriced(state, policy)
            return None
        got = self.ledger.hold(
            ident.tenant,
            ident.agent,
            price.cost(est_in, out_cap),
            price,
            tenant_budget,
            agent_budget,
        )
        if isinstance(got, BudgetRefusal):
            raise RequestRefused(
                429,
                "budget_exceeded",
                f"{got.message}, more than the whole budget: it can never pass; lower "
                "max_tokens or the prompt"
                if got.never
                else f"{got.message}; retry after {got.retry_after} s",
                got.budget,
                # the budget resets in hours: an SDK obeying Retry-After (anthropic's does, up
                # to 49 days) would sleep that long, then send it again
                headers={"retry-after": str(got.retry_after), "x-should-retry": "false"},
            )
        return got

    def settle(self, state: FlowState, usage: Usage | None) -> int | None:
        """Settle the rate reservation and the budget hold with the real usage (None: the
        request produced none, e.g. a provider error). The cost in pico-USD, when priced."""
        if state.reservation is not None:
            actual = usage.input_tokens + usage.output_tokens if usage else 0
            self.ratelimiter.settle(state.reservation, actual)
            state.reservation = None
        hold, state.hold = state.hold, None
        if hold is None or hold.price is None:
            return None
        cost = hold.price.cost(usage.billed_input_tokens, usage.output_tokens) if usage else 0
        self.ledger.settle(hold, cost)
        return cost if usage is not None else None

    def release(self, state: FlowState) -> None:
        """The request never reached the provider: give back everything it reserved."""
        if state.reservation is not None:
            self.ratelimiter.release(state.reservation)
            state.reservation = None
        if state.hold is not None:
            self.ledger.release(state.hold)
            state.hold = None
