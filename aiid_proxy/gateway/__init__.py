"""The gateway pipeline as a library: identity -> route -> policy -> rate limit -> audit -> inject.

Each stage is one method of :class:`Gateway` that takes the flow's :class:`FlowState`, does
its check and records its result. The state knows the stage order; a flow may leave only when
:meth:`FlowState.allows` is true, i.e. every stage ran, in order, and the decision is an
allow. mitmproxy adapters (in ``addons/``) call these methods; this package never imports
mitmproxy.

- :mod:`.flow`: the verdict under construction (:class:`FlowState`) and its seal;
- :mod:`.wire`: the agent token among the headers, paths and hosts refused, refusal bodies;
- :mod:`.accounting`: rate-limit reservations and budget holds, settled with the usage;
- :mod:`.recovery`: the start-up chain check, and requests an earlier run left unfinished;
- :mod:`.records`: the audit records of the flows (a half of the :class:`Gateway`);
- :mod:`.core`: the :class:`Gateway`.
"""

from __future__ import annotations

from aiid_proxy.gateway.accounting import DEFAULT_MAX_TOKENS_RESERVE
from aiid_proxy.gateway.core import Gateway
from aiid_proxy.gateway.flow import (
    STAGES,
    FlowState,
    Injection,
    RouteInfo,
    Target,
    new_request_id,
    request_digest,
)
from aiid_proxy.gateway.records import RECORDED_BYTES, TenantRuntime
from aiid_proxy.gateway.wire import (
    extract_token,
    is_ip_literal,
    path_problem,
    ratelimit_headers,
    refusal_body,
    token_from_value,
    unauthenticated,
)
from aiid_proxy.providers import CREDENTIAL_HEADERS

__all__ = [
    "CREDENTIAL_HEADERS",
    "DEFAULT_MAX_TOKENS_RESERVE",
    "RECORDED_BYTES",
    "STAGES",
    "FlowState",
    "Gateway",
    "Injection",
    "RouteInfo",
    "Target",
    "TenantRuntime",
    "extract_token",
    "is_ip_literal",
    "new_request_id",
    "path_problem",
    "ratelimit_headers",
    "refusal_body",
    "request_digest",
    "token_from_value",
    "unauthenticated",
]
