"""Providers: the registry of LLM provider hosts and routes (data-driven), strict reading of
request bodies for policy, and token usage from responses and event streams.

* :mod:`.model` -- :class:`Provider`, :class:`Route`, host/path matching;
* :mod:`.registry` -- :class:`Registry`, built from data (``providers.yaml``);
* :mod:`.request` -- :func:`parse_request` and :class:`RequestFacts`;
* :mod:`.usage` -- :func:`parse_usage`, :class:`SSEUsageTracker` and :class:`Usage`.
"""

from __future__ import annotations

from aiid_proxy.providers.model import (
    ACCOUNT_HEADERS,
    CREDENTIAL_HEADERS,
    CREDENTIAL_QUERY_PARAMS,
    USAGE_FORMATS,
    Provider,
    Route,
    RouteMatch,
    compile_path_template,
    normalize_host,
)
from aiid_proxy.providers.registry import Registry
from aiid_proxy.providers.request import RequestFacts, check_model, parse_request
from aiid_proxy.providers.usage import (
    MAX_EVENT_BYTES,
    SSEUsageTracker,
    Usage,
    estimate_body_usage,
    parse_usage,
)

__all__ = [
    "ACCOUNT_HEADERS",
    "CREDENTIAL_HEADERS",
    "CREDENTIAL_QUERY_PARAMS",
    "MAX_EVENT_BYTES",
    "USAGE_FORMATS",
    "Provider",
    "Registry",
    "RequestFacts",
    "Route",
    "RouteMatch",
    "SSEUsageTracker",
    "Usage",
    "check_model",
    "compile_path_template",
    "estimate_body_usage",
    "normalize_host",
    "parse_request",
    "parse_usage",
]
