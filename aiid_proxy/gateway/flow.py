"""One flow's verdict under construction: what the agent asked for, and each stage's result.

:class:`FlowState` knows the stage order: a flow may leave only when :meth:`FlowState.allows`
is true, i.e. every stage ran, in order, the decision allows, the ``request`` record is
durable and the verdict is sealed to the exact bytes that leave (:func:`request_digest`).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiid_proxy.audit import AppendResult
from aiid_proxy.budget import Hold
from aiid_proxy.errors import IncompleteVerdict, RequestRefused
from aiid_proxy.identity import AgentIdentity
from aiid_proxy.policy import Decision
from aiid_proxy.providers import Provider, RequestFacts, Route, Usage
from aiid_proxy.ratelimit import RateDecision, Reservation
from aiid_proxy.vault import Secret

STAGES = ("identity", "route", "policy", "ratelimit", "audit", "inject")


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
    # every (host, port) the request names: the absolute-form target or :authority, and each
    # Host header (lowercase, no trailing dot, 443 when no port; ("", 0) for one that does
    # not parse); a server or CDN may route by any of them, so they must all agree
    stated_hosts: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class RouteInfo:
    provider: Provider | None  # None: non-LLM egress
    route: Route | None
    facts: RequestFacts | None
    body: bytes  # decoded body, exactly what goes upstream


@dataclass(frozen=True)
class Injection:
    header: str  # "" for an egress rule without `inject`: nothing is injected
    value: Secret  # the header value, scheme included
    secret_name: str
    raw: Secret | None = None  # the vault secret alone: what scrubbing looks for
    extra_headers: tuple[tuple[str, str], ...] = ()

    def scrub_value(self) -> str:
        return (self.raw or self.value).reveal()


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
    standing_approval: bool = False  # approved by an earlier answer's --ttl, never held
    response_recorded: bool = False
    error_recorded: bool = False
    # what a response in transit has carried so far (a stream's counted pieces): what an
    # error that ends it (the gateway shutting down) charges, instead of no output at all
    usage_so_far: Callable[[], Usage] | None = None
    # a released response's accounting, due on the loop's next turn: a shutdown before
    # then runs it, so that the response it let out gets its `response` record
    finish: Callable[[], None] | None = None
    rate: RateDecision | None = None  # the allowing rate decision (x-ratelimit-* headers)
    hold: Hold | None = None  # the budget hold of the request's worst-case cost
    output_cap: int | None = None  # output tokens reserved, enforced on streams when not None
    output_limit: int | None = None  # max_tokens x n as the agent asked: no provider bills more
    # the agent token's signature: never sent upstream in a header, cookie or query parameter
    token_mark: str = ""

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


DIGEST_SIZE = hashlib.sha256().digest_size
"""Bytes of a :func:`request_digest`."""


def request_digest(
    method: str,
    url: str,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    authority: str = "",
) -> bytes:
    """What the verdict is bound to: method, URL, the request target's authority (an
    absolute-form target or :authority), every header (in order) and the body."""
    h = hashlib.sha256()
    for text in (method, url, authority):  # bytes as they came (undecodable ones included)
        h.update(text.encode("utf-8", "surrogateescape") + b"\0")
    for k, v in headers:
        h.update(len(k).to_bytes(4, "big") + k + len(v).to_bytes(4, "big") + v)
    h.update(b"\0")
    h.update(body)
    return h.digest()
