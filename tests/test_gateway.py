"""The pipeline as a library: token extraction, IP literals, stage ordering, sealing."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CANARY_OPENAI, NOKEY_TENANT, TENANT, audit_rows

from aiid_proxy.budget import pico_to_usd, usd_to_pico
from aiid_proxy.clock import FakeClock
from aiid_proxy.errors import ConfigError, IncompleteVerdict, RequestRefused
from aiid_proxy.gateway import (
    STAGES,
    FlowState,
    Gateway,
    Target,
    extract_token,
    is_ip_literal,
    refusal_body,
    request_digest,
)
from aiid_proxy.gateway.recovery import unfinished_requests
from aiid_proxy.home import Home
from aiid_proxy.providers import Usage

URL = "https://api.openai.com/v1/chat/completions"
BODY = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --------------------------------------------------------------------------------------------
# extract_token
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "connection_token", "expected"),
    [
        pytest.param([("Authorization", "Bearer tok")], None, "tok", id="bearer"),
        pytest.param(
            [("authorization", "bearer   tok  ")], None, "tok", id="bearer-lowercase-spaces"
        ),
        pytest.param([("x-api-key", "tok")], None, "tok", id="x-api-key"),
        pytest.param([("Api-Key", "tok")], None, "tok", id="azure-api-key"),
        pytest.param([("X-Goog-Api-Key", "tok")], None, "tok", id="goog-api-key"),
        pytest.param([("Authorization", basic("agent", "tok"))], None, "tok", id="basic-password"),
        pytest.param([("Authorization", basic("", "tok"))], None, "tok", id="basic-empty-user"),
        pytest.param(
            [("Authorization", basic("a", "t:o:k"))], None, "t:o:k", id="basic-colon-in-password"
        ),
        pytest.param(
            [("Authorization", "Basic " + base64.b64encode(b"tok").decode())],
            None,
            "tok",
            id="basic-no-colon",
        ),
        pytest.param([("Proxy-Authorization", basic("x", "tok"))], None, "tok", id="proxy-basic"),
        pytest.param([("Proxy-Authorization", "Bearer tok")], None, "tok", id="proxy-bearer"),
        pytest.param(
            [("Authorization", "Bearer tok"), ("x-api-key", "tok")],
            None,
            "tok",
            id="same-token-twice",
        ),
        pytest.param(
            [("Proxy-Authorization", "Bearer tok"), ("Authorization", "Bearer junk")],
            None,
            "tok",
            id="proxy-wins-over-sdk-key",
        ),
        pytest.param(
            [("Authorization", "Digest junk")],
            "tok",
            "tok",
            id="connection-token-sdk-header-unread",
        ),
        pytest.param([("x-api-key", "junk")], "tok", "tok", id="connection-token-wins"),
        # [AL] HTTPS_PROXY=http://agent@gateway: a user name and an empty password is no token
        pytest.param(
            [("Proxy-Authorization", basic("agent", "")), ("Authorization", "Bearer tok")],
            None,
            "tok",
            id="empty-proxy-password-api-key-token",
        ),
        pytest.param([("Authorization", "Bearer tok")], "", "tok", id="empty-connection-token"),
        pytest.param([], "tok", "tok", id="connection-token-alone"),
        pytest.param(
            [("content-type", "application/json"), ("Authorization", "Bearer tok")],
            None,
            "tok",
            id="other-headers-ignored",
        ),
    ],
)
def test_extract_token(
    headers: list[tuple[str, str]], connection_token: str | None, expected: str
) -> None:
    assert extract_token(headers, connection_token) == expected


@pytest.mark.parametrize(
    ("headers", "connection_token", "message"),
    [
        pytest.param([], None, "no agent token", id="nothing"),
        pytest.param(
            [("content-type", "application/json")],
            None,
            "no agent token",
            id="no-credential-header",
        ),
        pytest.param([("Authorization", "Bearer ")], None, "no agent token", id="empty-bearer"),
        pytest.param([("x-api-key", "")], None, "no agent token", id="empty-api-key"),
        pytest.param([], "", "no agent token", id="empty-connection-token"),
        pytest.param(
            [("Authorization", "Bearer a"), ("x-api-key", "b")],
            None,
            "conflicting",
            id="two-tokens",
        ),
        pytest.param(
            [("Authorization", "Bearer a"), ("Authorization", "Bearer b")],
            None,
            "conflicting",
            id="repeated-header-two-tokens",
        ),
        pytest.param(
            [("Authorization", "Bearer a"), ("x-api-key", "")],
            None,
            "conflicting",
            id="token-and-empty",
        ),
        pytest.param(
            [("Proxy-Authorization", "Bearer a")], "b", "conflicting", id="request-proxy-vs-connect"
        ),
        pytest.param(
            [("Proxy-Authorization", "Bearer a"), ("Proxy-Authorization", "Bearer b")],
            None,
            "conflicting",
            id="two-proxy-tokens",
        ),
        pytest.param([("Authorization", "Digest abc")], None, "unsupported", id="digest"),
        pytest.param([("Authorization", "tok")], None, "unsupported", id="no-scheme"),
        pytest.param([("Authorization", "Basic %%%")], None, "malformed", id="basic-not-base64"),
        pytest.param(
            [("Authorization", "Basic " + base64.b64encode(b"\xff\xfe").decode())],
            None,
            "malformed",
            id="basic-not-utf8",
        ),
        pytest.param(
            [("Proxy-Authorization", "Negotiate x"), ("Authorization", "Bearer tok")],
            None,
            "unsupported",
            id="bad-proxy-auth-not-ignored",
        ),
    ],
)
def test_extract_token_refusals(
    headers: list[tuple[str, str]], connection_token: str | None, message: str
) -> None:
    with pytest.raises(RequestRefused) as e:
        extract_token(headers, connection_token)
    assert e.value.status == 401 and e.value.type == "unauthenticated"
    assert message in e.value.message
    for _, v in headers:  # a refusal never echoes a credential
        secret = v.split(" ", 1)[-1]
        if len(secret) > 3:
            assert secret not in str(e.value)


# --------------------------------------------------------------------------------------------
# is_ip_literal
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        pytest.param("127.0.0.1", True, id="v4"),
        pytest.param("10.1.2.3", True, id="v4-private"),
        pytest.param("::1", True, id="v6"),
        pytest.param("[::1]", True, id="v6-bracketed"),
        pytest.param("[2001:db8::1]", True, id="v6-doc"),
        pytest.param("::ffff:127.0.0.1", True, id="v4-mapped-v6"),
        pytest.param("127.1", True, id="shorthand"),
        pytest.param("0x7f.1", True, id="hex-shorthand"),
        pytest.param("0X7F.0.0.1", True, id="hex-uppercase"),
        pytest.param("0177.0.0.1", True, id="octal"),
        pytest.param("2130706433", True, id="decimal"),
        pytest.param("0x7f000001", True, id="hex-whole"),
        pytest.param("api.openai.com", False, id="hostname"),
        pytest.param("localhost", False, id="localhost"),
        pytest.param("1password.com", False, id="leading-digit"),
        pytest.param("123.example", False, id="numeric-label"),
        pytest.param("0xdeadbeef.com", False, id="hex-looking-label"),
        pytest.param("", False, id="empty"),
    ],
)
def test_is_ip_literal(host: str, expected: bool) -> None:
    assert is_ip_literal(host) is expected


# --------------------------------------------------------------------------------------------
# FlowState: stage order and the verdict
# --------------------------------------------------------------------------------------------


def bare_state() -> FlowState:
    return FlowState("req_x", Target("https", "api.openai.com", 443, "POST", "/v1/x"), 0.0)


@pytest.mark.parametrize(
    "order",
    [
        pytest.param(["route"], id="route-first"),
        pytest.param(["identity", "policy"], id="skip-route"),
        pytest.param(["identity", "route", "policy", "audit"], id="skip-ratelimit"),
        pytest.param(["identity", "identity"], id="repeat"),
        pytest.param([*STAGES[:5], "inject", "inject"], id="inject-twice"),
        pytest.param(["inject"], id="inject-first"),
    ],
)
def test_mark_out_of_order_raises(order: list[str]) -> None:
    st = bare_state()
    with pytest.raises(IncompleteVerdict):
        for stage in order:
            st.mark(stage)


def test_mark_after_refusal_raises() -> None:
    st = bare_state()
    st.mark("identity")
    st.refusal = RequestRefused(403, "policy_denied", "no")
    with pytest.raises(IncompleteVerdict):
        st.mark("route")
    with pytest.raises(IncompleteVerdict):
        st.expect("route")


@pytest.mark.parametrize("stage", STAGES)
def test_expect_requires_every_earlier_stage(stage: str) -> None:
    st = bare_state()
    i = STAGES.index(stage)
    for s in STAGES[:i]:
        st.mark(s)
    st.expect(stage)  # fine
    if i > 0:
        st.done.pop()
        with pytest.raises(IncompleteVerdict):
            st.expect(stage)


def run_pipeline(gw: Gateway, token: str, body: bytes = BODY) -> FlowState:
    """Every library stage in order, the way the addons call them."""
    st = gw.new_flow(Target("https", "api.openai.com", 443, "POST", "/v1/chat/completions"))
    gw.identify(st, [("authorization", f"Bearer {token}")])
    gw.route(st, {"content-type": "application/json"}, body)
    gw.decide(st)
    gw.reserve(st)
    gw.audit_done(st, gw.audit_request(st).result(timeout=10))
    inj = gw.inject(st)
    assert inj.header == "authorization" and inj.value.reveal() == f"Bearer {CANARY_OPENAI}"
    return st


def test_allows_only_when_every_stage_ran_and_the_verdict_is_sealed(
    gateway: Gateway, issue: Callable[..., str]
) -> None:
    st = run_pipeline(gateway, issue())
    assert tuple(st.done) == STAGES
    assert not st.allows()  # not sealed yet
    gateway.seal(st, "POST", URL, BODY)
    assert st.allows()


def test_no_seal_before_the_request_record_is_durable(
    gateway: Gateway, issue: Callable[..., str]
) -> None:
    st = gateway.new_flow(Target("https", "api.openai.com", 443, "POST", "/v1/chat/completions"))
    gateway.identify(st, [("authorization", f"Bearer {issue()}")])
    gateway.route(st, {"content-type": "application/json"}, BODY)
    gateway.decide(st)
    gateway.reserve(st)
    fut = gateway.audit_request(st)  # queued: the key may be prepared meanwhile
    gateway.inject(st)
    assert tuple(st.done) == STAGES
    with pytest.raises(IncompleteVerdict, match="durable"):
        gateway.seal(st, "POST", URL, BODY)
    assert not st.allows() and not gateway.check_sealed(st, "POST", URL, BODY)
    gateway.audit_done(st, fut.result(timeout=10))
    gateway.seal(st, "POST", URL, BODY)
    assert st.allows()


@pytest.mark.parametrize("stray", ["Acme.yaml", "acme.old.yaml", "acme copy.yaml"])
def test_a_file_named_after_no_tenant_is_refused_and_the_gateway_runs(
    make_gateway: Callable[..., Gateway], policies_dir: Path, gateway_home: Home, stray: str
) -> None:
    """A backup or a wrongly cased copy in the policy directory stopped `aiid run` from
    starting ("invalid tenant name"), and on a live gateway hid the events after it."""
    (policies_dir / stray).write_text((policies_dir / "acme.yaml").read_text())
    gw = make_gateway(policies_dir)
    stem = stray.rsplit(".", 1)[0]
    assert gw.policy_for(stem) is None and gw.policies.refused(stem)
    gw.close()  # commits what was queued
    loads = [r for r in audit_rows(gateway_home) if r["event"] == "policy"]
    assert loads and json.loads(loads[-1]["detail"])["ok"]


def test_a_policy_loaded_before_its_tenant_was_added_starts_the_tenant_log(
    make_gateway: Callable[..., Gateway], policies_dir: Path, gateway_home: Home
) -> None:
    """The policy file came first, the tenant second: the tenant's log opened with requests
    decided by a policy it had no record of (until a restart)."""
    from aiid_proxy.admin import add_tenant

    (policies_dir / "delta.yaml").write_text(
        (policies_dir / "acme.yaml").read_text().replace("tenant: acme", "tenant: delta")
    )
    gw = make_gateway(policies_dir)
    in_force = gw.policy_for("delta")
    assert in_force is not None
    assert add_tenant(gateway_home, "delta")
    gw.tenant("delta")
    # an edit of a registered tenant whose log is not open yet: recorded once
    assert add_tenant(gateway_home, "gamma")
    (policies_dir / "gamma.yaml").write_text(
        (policies_dir / "acme.yaml").read_text().replace("tenant: acme", "tenant: gamma")
    )
    gw.policies.refresh()
    gw.close()
    for tenant in ("delta", "gamma"):
        rows = audit_rows(gateway_home, tenant)
        assert [r["event"] for r in rows] == ["policy"], tenant
        assert json.loads(rows[0]["detail"])["ok"] and "loaded" in rows[0]["reason"]
    assert json.loads(audit_rows(gateway_home, "delta")[0]["detail"])["hash"] == (
        in_force.source_hash
    )


def test_a_truncated_vault_is_refused_not_recreated_empty(
    make_gateway: Callable[..., Gateway], policies_dir: Path, gateway_home: Home
) -> None:
    """`aiid run` turned a 0-byte vault.db into a valid empty vault: the damage was erased and
    looked like a vault with no keys (pass [Z])."""
    path = gateway_home.vault_path(NOKEY_TENANT)
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"vault database empty \(truncated\?\)"):
        Gateway(gateway_home, policies_dir, watch=False, env={})
    assert path.stat().st_size == 0


def test_a_digest_taken_beforehand_seals_the_same_request(
    gateway: Gateway, issue: Callable[..., str]
) -> None:
    st = run_pipeline(gateway, issue())
    with pytest.raises(IncompleteVerdict, match="not a request digest"):
        gateway.seal_digest(st, b"short")
    assert not st.allows()
    gateway.seal_digest(st, request_digest("POST", URL, BODY))
    assert st.allows() and gateway.check_sealed(st, "POST", URL, BODY)
    assert not gateway.check_sealed(st, "POST", URL, BODY + b" ")


def test_audit_done_needs_a_queued_record(gateway: Gateway, issue: Callable[..., str]) -> None:
    other = run_pipeline(gateway, issue())
    st = gateway.new_flow(Target("https", "api.openai.com", 443, "POST", "/v1/chat/completions"))
    assert other.audit is not None
    with pytest.raises(IncompleteVerdict):
        gateway.audit_done(st, other.audit)
    assert st.audit is None


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda st: st.done.pop(), id="stage-missing"),
        pytest.param(
            lambda st: setattr(st, "refusal", RequestRefused(403, "x", "y")), id="refused"
        ),
        pytest.param(lambda st: setattr(st, "digest", None), id="no-digest"),
        pytest.param(lambda st: setattr(st, "audit", None), id="no-audit-result"),
        pytest.param(lambda st: setattr(st, "injection", None), id="no-injection"),
        pytest.param(lambda st: setattr(st, "identity", None), id="no-identity"),
    ],
)
def test_allows_is_false_when_anything_is_missing(
    gateway: Gateway, issue: Callable[..., str], spoil: Callable[[FlowState], None]
) -> None:
    st = run_pipeline(gateway, issue())
    gateway.seal(st, "POST", URL, BODY)
    spoil(st)
    assert not st.allows()
    assert not gateway.check_sealed(st, "POST", URL, BODY)


def test_approve_decision_allows_only_once_approved(
    gateway: Gateway, issue: Callable[..., str]
) -> None:
    body = BODY.replace(b"gpt-4o-mini", b"o1-mini")
    st = run_pipeline(gateway, issue(), body)
    assert st.decision is not None and st.decision.effect == "approve"
    gateway.seal(st, "POST", URL, body)
    assert not st.allows()
    st.approved_by = "alice"
    assert st.allows()


def test_seal_before_every_stage_raises(gateway: Gateway, issue: Callable[..., str]) -> None:
    st = run_pipeline(gateway, issue())
    st.done.pop()
    with pytest.raises(IncompleteVerdict):
        gateway.seal(st, "POST", URL, BODY)


HEADERS = ((b"host", b"api.openai.com"), (b"authorization", b"Bearer k"))


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(HEADERS, id="unchanged"),
        pytest.param((*HEADERS, (b"x-extra", b"1")), id="added"),
        pytest.param(HEADERS[:1], id="removed"),
        pytest.param(HEADERS[::-1], id="reordered"),
        pytest.param(((b"host", b"evil.example"), HEADERS[1]), id="value-changed"),
        pytest.param(
            ((b"host", b"api.openai.co"), (b"mauthorization", b"Bearer k")), id="boundary-shift"
        ),
    ],
)
def test_check_sealed_covers_headers(
    gateway: Gateway, issue: Callable[..., str], headers: tuple[tuple[bytes, bytes], ...]
) -> None:
    st = run_pipeline(gateway, issue())
    gateway.seal(st, "POST", URL, BODY, HEADERS)
    assert gateway.check_sealed(st, "POST", URL, BODY, headers) is (headers == HEADERS)


@pytest.mark.parametrize(
    ("method", "url", "body", "ok"),
    [
        pytest.param("POST", URL, BODY, True, id="unchanged"),
        pytest.param("PUT", URL, BODY, False, id="method"),
        pytest.param("POST", URL.replace("api.openai.com", "evil.example"), BODY, False, id="host"),
        pytest.param("POST", URL + "?x=1", BODY, False, id="query"),
        pytest.param("POST", URL.replace("https", "http"), BODY, False, id="scheme"),
        pytest.param("POST", URL.replace(".com/", ".com:8443/"), BODY, False, id="port"),
        pytest.param("POST", URL, BODY + b" ", False, id="body-appended"),
        pytest.param("POST", URL, BODY.replace(b"mini", b"mino"), False, id="body-changed"),
        pytest.param("POST", URL, b"", False, id="body-dropped"),
        pytest.param("POST", URL + "\0", BODY[:-1], False, id="boundary-shift"),
    ],
)
def test_check_sealed_detects_changes(
    gateway: Gateway, issue: Callable[..., str], method: str, url: str, body: bytes, ok: bool
) -> None:
    st = run_pipeline(gateway, issue())
    gateway.seal(st, "POST", URL, BODY)
    assert gateway.check_sealed(st, method, url, body) is ok


# --------------------------------------------------------------------------------------------
# refusal_body
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("refusal", "rule"),
    [
        pytest.param(
            RequestRefused(403, "policy_denied", "gpt-4o is off", "no-gpt-4o"),
            "no-gpt-4o",
            id="with-rule",
        ),
        pytest.param(RequestRefused(401, "unauthenticated", "no agent token"), None, id="no-rule"),
        pytest.param(
            RequestRefused(429, "rate_limited", 'quote " and \\ and ü', "default"),
            "default",
            id="escaping",
        ),
    ],
)
def test_refusal_body_shape(refusal: RequestRefused, rule: str | None) -> None:
    doc = json.loads(refusal_body(refusal, "req_abc"))
    assert doc == {
        "type": "error",
        "error": {
            "type": refusal.type,
            "message": refusal.message,
            "rule": rule,
            "request_id": "req_abc",
        },
    }


def test_close_records_how_each_request_in_flight_ended(
    gateway: Gateway, gateway_home: Home, issue: Callable[..., str]
) -> None:
    sent = run_pipeline(gateway, issue())
    gateway.seal(sent, "POST", URL, BODY)  # left for the provider; no response yet
    done = run_pipeline(gateway, issue())
    gateway.seal(done, "POST", URL, BODY)
    assert gateway.record_response(done, 200, None) is not None
    refused = gateway.new_flow(Target("https", "api.openai.com", 443, "POST", "/v1/x"))
    with pytest.raises(RequestRefused):
        gateway.identify(refused, [("authorization", "Bearer nope")])
    gateway.close()
    rows = audit_rows(gateway_home)
    by_request = {r["request_id"]: [x["event"] for x in rows if x["request_id"] == r["request_id"]]
                  for r in rows}  # fmt: skip
    assert by_request[sent.request_id] == ["request", "error"]
    assert by_request[done.request_id] == ["request", "response"]  # nothing added
    err = next(r for r in rows if r["request_id"] == sent.request_id and r["event"] == "error")
    assert err["reason"] == "gateway shut down before the request completed"
    # Hooks that run after the shutdown find the log closed: no error, no second record.
    assert gateway.record_response(sent, 200, None) is None
    assert gateway.record_error(sent, "connection closed") is None


def test_a_stream_cut_by_the_shutdown_is_charged_what_it_carried(
    gateway: Gateway, gateway_home: Home, issue: Callable[..., str]
) -> None:
    """The agents had 450 pieces each; the records said 0 output tokens, so the spend was
    lost and the budget reopened after the restart (pass [U])."""
    st = run_pipeline(gateway, issue())
    gateway.seal(st, "POST", URL, BODY)
    assert st.reservation is not None
    st.usage_so_far = lambda: Usage(9, 451, estimated=True)
    gateway.close()
    (err,) = [r for r in audit_rows(gateway_home) if r["event"] == "error"]
    assert err["reason"] == "gateway shut down before the request completed"
    assert (err["input_tokens"], err["output_tokens"]) == (9, 451)
    assert json.loads(err["detail"])["usage_estimated"] is True


def test_usage_so_far_that_fails_falls_back_to_the_input_estimate(
    gateway: Gateway, gateway_home: Home, issue: Callable[..., str]
) -> None:
    st = run_pipeline(gateway, issue())
    gateway.seal(st, "POST", URL, BODY)

    def broken() -> Usage:
        raise RuntimeError("tracker gone")

    st.usage_so_far = broken
    gateway.close()
    (err,) = [r for r in audit_rows(gateway_home) if r["event"] == "error"]
    assert err["output_tokens"] == 0 and err["input_tokens"] > 0


def test_the_whole_chain_of_each_tenant_is_checked_at_start(
    make_gateway: Callable[..., Gateway],
    policies_dir: Path,
    gateway_home: Home,
    issue: Callable[..., str],
) -> None:
    first = make_gateway(policies_dir)
    for _ in range(3):
        run_pipeline(first, issue())
    first.close()
    # altered while no gateway ran: opening the log checks only its head
    conn = sqlite3.connect(gateway_home.audit_path(TENANT))
    conn.execute("UPDATE audit SET model = 'x' WHERE seq = 2")
    conn.commit()
    conn.close()
    gw = make_gateway(policies_dir)
    seen: list[tuple[str, dict[str, Any]]] = []
    gw.listeners.append(lambda kind, data: seen.append((kind, dict(data))))
    gw.check_chains().join(120)
    assert [(k, d["tenant"]) for k, d in seen] == [("audit", TENANT)]  # the other one is fine
    text = seen[0][1]["text"]
    assert text.startswith(f"audit log of tenant {TENANT} does not verify: ")
    assert "seq 2" in text and text.endswith(f"(aiid audit verify {TENANT})")


def test_requests_an_earlier_run_left_unfinished_get_an_error_record_at_start(
    make_gateway: Callable[..., Gateway],
    policies_dir: Path,
    gateway_home: Home,
    issue: Callable[..., str],
    fake_clock: Any,
) -> None:
    """kill -9 (or a power cut that took a lazy `response` record): the log shows a request
    that was let through and never how it ended. The next start says so, on record."""
    first = make_gateway(policies_dir)
    done = run_pipeline(first, issue())
    first.record_response(done, 200, None).result(timeout=10)  # type: ignore[union-attr]
    cut = run_pipeline(first, issue())
    first._live.discard(cut)  # noqa: SLF001 - as after kill -9: shutdown cannot record its end
    first.close()
    fake_clock.advance(1)
    gw = make_gateway(policies_dir)

    async def start_and_wait() -> list[dict[str, Any]]:
        gw.attach(asyncio.get_running_loop())
        gw.check_chains(close_unfinished=True).join(120)
        for _ in range(500):  # bounded: the records are queued on this loop
            rows = [r for r in audit_rows(gateway_home) if r["event"] == "error"]
            if rows:
                return rows
            await asyncio.sleep(0.01)
        return []

    errors = asyncio.run(start_and_wait())
    assert [r["request_id"] for r in errors] == [cut.request_id]
    (err,) = errors
    assert err["reason"].startswith("no record of how this request ended")
    assert (err["agent"], err["provider"], err["model"]) == ("bot", "openai", "gpt-4o-mini")
    assert json.loads(err["detail"])["last_event"] == "request"
    # it left under a hold of its worst-case cost, and is charged that: charged nothing, a
    # crash handed its spend back to the budget (pass [U])
    (req,) = [
        r
        for r in audit_rows(gateway_home)
        if r["request_id"] == cut.request_id and r["event"] == "request"
    ]
    hold = json.loads(req["detail"])["hold_usd"]
    assert hold > 0 and cut.hold is not None and hold == pico_to_usd(cut.hold.amount)
    assert json.loads(err["detail"])["cost_usd"] == hold
    assert json.loads(err["detail"])["cost_is_hold"] is True
    spent_done = json.loads(
        next(
            r["detail"]
            for r in audit_rows(gateway_home)
            if r["request_id"] == done.request_id and r["event"] == "response"
        )
    ).get("cost_usd", 0)
    assert gw.ledger.spent(TENANT, "bot").day == usd_to_pico(spent_done) + usd_to_pico(hold)
    # this run's own requests are never taken for an earlier run's
    mine = run_pipeline(gw, issue())
    left = unfinished_requests(gateway_home.audit_path(TENANT), gw._started_wall)  # noqa: SLF001
    assert left == [], [(r["seq"], r["ts"], r["event"]) for r in audit_rows(gateway_home)]
    assert mine.request_id


def test_the_gateway_refuses_a_policy_that_policy_check_refuses(
    gateway_home: Home, fake_clock: FakeClock, tmp_path: Path
) -> None:
    """The gateway lints as `aiid policy check` does ([AB]): `region: mars` loaded and cut the
    tenant off with no word of it."""
    policies = tmp_path / "p"
    policies.mkdir()
    (policies / f"{TENANT}.yaml").write_text(
        f"version: 1\ntenant: {TENANT}\ndefault: deny\nregion: mars\n"
        "rules:\n  - {id: a, effect: allow}\n"
    )
    gw = Gateway(gateway_home, policies, clock=fake_clock, watch=False, env={})
    try:
        assert gw.policy_for(TENANT) is None
    finally:
        gw.close()


def test_a_refusal_after_a_providers_file_edit_says_to_restart(
    gateway_home: Home, fake_clock: FakeClock, tmp_path: Path
) -> None:
    """providers.yaml is read at start only: `policy check` read the edited one and passed,
    the gateway refused against the old one and said to run `policy check` ([AE])."""
    policies = tmp_path / "p"
    policies.mkdir()
    pol = policies / f"{TENANT}.yaml"
    pol.write_text(
        f"version: 1\ntenant: {TENANT}\ndefault: deny\nrules:\n  - {{id: a, effect: allow}}\n"
    )
    gw = Gateway(gateway_home, policies, clock=fake_clock, watch=False, env={})
    try:
        assert gw.policy_for(TENANT) is not None
        (policies / "providers.yaml").write_text(
            "version: 1\nproviders:\n  acme-llm:\n    openai_compatible: true\n"
            "    hosts: [llm.acme.example]\n    region: moon\n"
        )
        pol.write_text(pol.read_text().replace("default: deny\n", "default: deny\nregion: moon\n"))
        (ev,) = gw.policies.refresh()
        assert not ev.ok and ev.error is not None
        assert "unknown region 'moon'" in ev.error and "restart it" in ev.error
        # a problem a restart would not fix gets no such hint ([AG])
        pol.write_text(
            pol.read_text().replace("region: moon\n", "")
            + "limits:\n  agents:\n    '*': {requests_per_minute: 5}\n"
            "    bot: {requests_per_minute: 1}\n"
        )
        (ev,) = gw.policies.refresh()
        assert not ev.ok and ev.error is not None
        assert "never applies" in ev.error and "restart" not in ev.error
    finally:
        gw.close()


# -- [AM] a response record its writer lost is written again, once --------------------------
@pytest.mark.parametrize(
    "failure",
    [
        pytest.param("future", id="writer-died-with-it"),
        pytest.param("submit", id="writer-dead-at-submit"),
    ],
)
def test_a_response_record_the_writer_failed_is_written_again_never_twice(
    gateway: Gateway,
    gateway_home: Home,
    issue: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    """When the audit writer process died, the `response` records it held were lost (34 of 50
    in one kill): the next start called them unfinished requests. They are written again on
    the replacement writer, with append_once: one that did commit before the writer died is
    not written twice."""
    from concurrent.futures import Future

    from aiid_proxy.audit import AppendResult
    from aiid_proxy.errors import AuditError
    from aiid_proxy.gateway import records

    monkeypatch.setattr(records, "RESPONSE_RETRY_S", 0.0)
    loop = asyncio.new_event_loop()
    gateway._loop = loop
    audit = gateway.tenant(TENANT).audit
    real_append = audit.append
    committed_then_died = failure == "future"

    def dying(event: str, **fields: object) -> Future[AppendResult]:
        if event != "response":
            return real_append(event, **fields)
        if committed_then_died:  # it commits, and its reply is lost with the writer
            real_append(event, **fields).result(timeout=10)
            lost: Future[AppendResult] = Future()
            lost.set_exception(AuditError("audit writer process exited (status -9)"))
            return lost
        raise AuditError("audit writer process is gone")

    monkeypatch.setattr(audit, "append", dying)
    st = run_pipeline(gateway, issue())
    gateway.seal(st, "POST", URL, BODY)
    written = gateway.record_response(st, 200, Usage(3, 5))
    assert written is not None
    try:
        result = loop.run_until_complete(
            asyncio.wait_for(asyncio.wrap_future(written, loop=loop), 10)
        )
    finally:
        loop.close()
    rows = [r for r in audit_rows(gateway_home) if r["request_id"] == st.request_id]
    assert [r["event"] for r in rows] == ["request", "response"]  # once, in both cases
    assert result.seq == rows[-1]["seq"]
    assert (rows[-1]["input_tokens"], rows[-1]["output_tokens"]) == (3, 5)


def test_a_response_record_waiting_for_its_retry_is_written_at_shutdown(
    gateway: Gateway,
    gateway_home: Home,
    issue: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """[AN] A gateway stopped within the retry's 2 s lost the record (its answer had gone
    out): the next start charged the request as unfinished, with its whole hold."""
    from aiid_proxy.errors import AuditError
    from aiid_proxy.gateway import records

    monkeypatch.setattr(records, "RESPONSE_RETRY_S", 3600.0)  # never fires in this test
    loop = asyncio.new_event_loop()
    gateway._loop = loop
    audit = gateway.tenant(TENANT).audit
    real_append = audit.append

    def dead(event: str, **fields: object) -> Any:
        if event == "response":
            raise AuditError("audit writer process is gone")
        return real_append(event, **fields)

    monkeypatch.setattr(audit, "append", dead)
    st = run_pipeline(gateway, issue())
    gateway.seal(st, "POST", URL, BODY)
    written = gateway.record_response(st, 200, Usage(3, 5))
    assert written is not None and not written.done()
    gateway.close()
    loop.close()
    assert written.result(timeout=0).seq > 0
    rows = [r for r in audit_rows(gateway_home) if r["request_id"] == st.request_id]
    assert [r["event"] for r in rows] == ["request", "response"]
