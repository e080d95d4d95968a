"""Spend: what a request costs, what each tenant and agent spent, and the budgets over it.

* :class:`PriceTable` (:mod:`.prices`) -- USD per million tokens per provider and model
  glob: the built-in list (``aiid_proxy/data/prices.yaml``) with ``<policies dir>/prices.yaml``
  on top (an entry there replaces the built-in entry of the same provider and glob).
  :class:`PriceBook` re-reads the file when it changes; a bad edit keeps the last good table.
* :class:`Ledger` (:mod:`.ledger`) -- spend per (tenant, agent) and per tenant, per UTC day
  and UTC month, in integer pico-USD (1e-12 USD) so sums are exact. Rebuilt at start from the
  tenant's audit records (``detail.cost_usd``), then kept up to date as responses settle.
* Budgets (``budgets:`` in a policy, see :class:`aiid_proxy.policy.BudgetSpec`) are enforced
  before a request leaves by *holding* its worst-case cost -- estimated input plus the whole
  output reservation, at the model's price -- so concurrent requests can never together spend
  past a budget: a request is refused when spent + held + its own worst case would exceed it.
  When the response reports its usage the hold is replaced by the real cost.

Models without a price: a tenant with any budget that applies to the request refuses it (403
``policy_denied``: "no price for model X; budgets need prices.yaml"), because its spend could not
be counted; a tenant without budgets is not affected (nothing is recorded as its cost).
"""

from __future__ import annotations

from aiid_proxy.budget.ledger import (
    BudgetRefusal,
    Hold,
    Ledger,
    Periods,
    Spent,
    month_start_ts,
    periods,
    spend_records,
)
from aiid_proxy.budget.prices import (
    ANY_PROVIDER,
    MAX_USD_PER_MTOK,
    PICO_PER_USD,
    PRICES_FILE,
    RELOAD_EVERY,
    Price,
    PriceBook,
    PriceTable,
    format_usd,
    pico_to_usd,
    usd_to_pico,
)
from aiid_proxy.policy.model import BudgetSpec, Policy

NON_GENERATING_KINDS = frozenset({"embeddings", "models", "count_tokens", "moderations"})
"""Route kinds that produce no output tokens: nothing is reserved for output."""
COSTLESS_KINDS = frozenset({"models", "count_tokens"})
"""Route kinds that cost nothing: no price needed, no budget hold."""


def reservation_tokens(
    kind: str | None, max_tokens: int | None, n: int | None, input_estimate: int, default: int
) -> tuple[int, int]:
    """(input, output) tokens to reserve before a request leaves: the input estimate, and for a
    generating route ``max_tokens`` times ``n`` (choices / candidates), or ``default`` times
    ``n`` when the request sets no ``max_tokens``."""
    if kind is None or kind in COSTLESS_KINDS:
        return 0, 0
    if kind in NON_GENERATING_KINDS:
        return max(0, input_estimate), 0
    per_choice = max_tokens if max_tokens is not None else default
    return max(0, input_estimate), per_choice * max(1, n or 1)


def agent_budget_of(policy: Policy, agent: str) -> tuple[str, BudgetSpec] | None:
    """The agent's budget with the glob that gave it (for the refusal message)."""
    spec = policy.agent_budget(agent)
    if spec is None:
        return None
    for glob, s in policy.agent_budgets:
        if s is spec:
            return glob, spec
    for glob, s in policy.agent_budgets:  # pragma: no cover - engine returns the same object
        if s == spec:
            return glob, spec
    return "?", spec


def budgets_apply(policy: Policy | None, agent: str) -> bool:
    return policy is not None and (
        policy.tenant_budget is not None or policy.agent_budget(agent) is not None
    )


__all__ = [
    "ANY_PROVIDER",
    "COSTLESS_KINDS",
    "MAX_USD_PER_MTOK",
    "NON_GENERATING_KINDS",
    "PICO_PER_USD",
    "PRICES_FILE",
    "RELOAD_EVERY",
    "BudgetRefusal",
    "Hold",
    "Ledger",
    "Periods",
    "Price",
    "PriceBook",
    "PriceTable",
    "Spent",
    "agent_budget_of",
    "budgets_apply",
    "format_usd",
    "month_start_ts",
    "periods",
    "pico_to_usd",
    "reservation_tokens",
    "spend_records",
    "usd_to_pico",
]
