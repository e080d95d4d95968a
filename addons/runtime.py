"""What every addon shares: the :class:`Runtime` that owns the library Gateway (options read
once in ``configure``), the flow's state in ``flow.metadata``, and the await of an audit record."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.net import tls
from mitmproxy.utils import human

from addons.logscrub import LOG_SCRUBBER
from aiid_proxy.audit.writers import WRITER_MODES
from aiid_proxy.bodies import DEFAULT_BODY_LIMIT
from aiid_proxy.control import Answer, ApprovalBroker, ControlServer, HomeLock
from aiid_proxy.errors import AiidError, AuditError
from aiid_proxy.gateway import (
    FlowState,
    Gateway,
)
from aiid_proxy.home import Home

log = logging.getLogger("aiid")


STATE = "aiid"  # flow.metadata key holding the FlowState
SHUTDOWN_TICKS = 100  # x 10 ms: how long shutdown waits for held requests to be refused
OURS = "aiid_refusal"  # flow.metadata key holding the refusal Response object we made

# Options that would let traffic bypass the pipeline or weaken TLS, and the value we pin.
PINNED: dict[str, Any] = {
    "connection_strategy": "lazy",
    "ssl_insecure": False,
    "ignore_hosts": [],
    "allow_hosts": [],
    "tcp_hosts": [],
    "rawtcp": False,
    "websocket": False,
    "http3": False,
    "stream_large_bodies": None,
    "validate_inbound_headers": True,
    "onboarding": False,
    "save_stream_file": None,  # would write injected keys to disk
    "hardump": "",
}
TLS_OK = ("TLS1_2", "TLS1_3")


class Runtime:
    """Owns the library Gateway; reads options once in ``configure``."""

    def __init__(self, gateway: Gateway | None = None) -> None:
        self.gateway = gateway
        self.on_gateway: list[Callable[[Gateway], None]] = []
        self._key: tuple[str, str, int, str] | None = None
        self._checked = False  # the audit chains were verified at start
        self._rollback = False  # a build was just refused: its rollback builds nothing
        self._skip: tuple[str, str, int, str] | None = None  # the options that rollback restored
        # on the gateway's clock: grants expire in the time the rest of the gateway keeps
        self.broker = ApprovalBroker(gateway.clock) if gateway is not None else ApprovalBroker()
        self._lock: HomeLock | None = None  # one gateway per home, for as long as this runs
        self.control: ControlServer | None = None
        self.holds: dict[str, set[tuple[str, str]]] = {}  # client id -> (tenant, request id)
        # request ids held for approval whose hook has not returned yet: at shutdown, their
        # refusal is recorded and set only after the hold itself is released
        self.answering: set[str] = set()

    async def running(self) -> None:
        if self.gateway is None:
            return
        self.gateway.attach(asyncio.get_running_loop())
        if self.control is None:
            self.control = ControlServer(self.gateway.home, self._answer)
            try:
                await self.control.start()
            except OSError as e:
                log.warning("approval control channel unavailable: %s", e)
                self.control = None
        if self._key is not None and not self._checked:  # built here: `aiid run`, not a test
            self._checked = True
            # the channel is ours: no other gateway runs on this home, so a request an
            # earlier run left without an end is unfinished for good
            self.gateway.check_chains(close_unfinished=self.control is not None)

    def _answer(self, msg: dict[str, Any]) -> str:
        answer = msg.get("answer")
        if answer not in ("approve", "deny"):
            raise AiidError("answer must be approve or deny")
        ttl = msg.get("ttl")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or abs(ttl) > 10**9
        ):  # a string, or an integer too big for a float: refused, not dropped
            raise AiidError("ttl must be a number of seconds")
        return self.broker.answer(
            str(msg.get("tenant")),
            str(msg.get("request_id")),
            Answer(
                approved=answer == "approve",
                by=str(msg.get("by") or "unknown")[:100],
                reason=str(msg.get("reason") or "")[:300],
                ttl=None if ttl is None else float(ttl),
            ),
        )

    def load(self, loader: Any) -> None:
        LOG_SCRUBBER.install()  # before the first request: agents' lines can be logged
        loader.add_option(
            "aiid_home", str, "", "aiid home directory (default $AIID_HOME or ./.aiid)"
        )
        loader.add_option(
            "aiid_policies", str, "", "policy directory (default $AIID_POLICIES or ./policies)"
        )
        loader.add_option(
            "aiid_body_limit", int, DEFAULT_BODY_LIMIT, "largest request body accepted, bytes"
        )
        loader.add_option(
            "aiid_audit_writer",
            str,
            "process",
            "where the tenants' audit logs are written: 'process' (a child process, no GIL "
            "shared with the proxy) or 'thread' (a writer thread per tenant in this process)",
            choices=sorted(WRITER_MODES),
        )

    def configure(self, updated: set[str]) -> None:
        # Every check first, then the gateway, and only then option updates of our own: an
        # update re-enters configure, and a refusal after one made mitmproxy's rollback
        # re-enter it again and again (~15 s and a RecursionError before a start failed).
        opts = ctx.options
        pin: dict[str, Any] = {}
        for name, want in PINNED.items():
            if name not in updated or not hasattr(opts, name) or getattr(opts, name) == want:
                continue
            if opts.has_changed(name):
                raise exceptions.OptionsError(
                    f"aiid-proxy requires {name}={want!r}: other values let traffic bypass checks"
                )
            pin[name] = want  # a mitmproxy default (e.g. under mitmdump -s): pin it
        for name in ("tls_version_client_min", "tls_version_server_min"):
            if name in updated and getattr(opts, name) not in TLS_OK:
                raise exceptions.OptionsError(f"aiid-proxy requires {name} of TLS1_2 or higher")
        if hasattr(opts, "flow_detail") and opts.flow_detail > 1:
            raise exceptions.OptionsError(
                "aiid-proxy requires flow_detail <= 1: higher levels print injected keys"
            )
        if tls.log_master_secret is not None:
            # read by mitmproxy when it is imported: every TLS session's keys would go to a
            # file, and the upstream ones decrypt the injected provider keys
            raise exceptions.OptionsError(
                "aiid-proxy refuses to run with SSLKEYLOGFILE or MITMPROXY_SSLKEYLOGFILE set: "
                "the TLS keys written there decrypt the injected provider keys; unset it"
            )
        if not all(str(m).startswith("regular") for m in (opts.mode or ["regular"])):
            raise exceptions.OptionsError("aiid-proxy runs in regular proxy mode only")
        if not self._build(opts):
            return  # a rollback of refused options: nothing of ours to apply either
        if pin:
            opts.update(**pin)
        if "aiid_body_limit" in updated or "body_size_limit" in updated:
            limit = opts.aiid_body_limit
            current = opts.body_size_limit
            # mitmproxy's own (plain-text) 413 is only the hard ceiling: declared lengths over
            # the limit get the contract's JSON 413 from Intake, decoded sizes from the Route.
            if current is None or human.parse_size(current) != 2 * limit:
                opts.update(body_size_limit=str(2 * limit))

    def _build(self, opts: Any) -> bool:
        """(Re)build the Gateway when the options it is made from changed; False for the
        rollback of options just refused (nothing built, nothing to apply)."""
        if self.gateway is not None and self._key is None:
            return True  # injected (tests)
        home = Home.resolve(opts.aiid_home or None)
        policies = Path(opts.aiid_policies or os.environ.get("AIID_POLICIES") or "policies")
        key = (
            str(home.root),
            str(policies.absolute()),
            int(opts.aiid_body_limit),
            str(opts.aiid_audit_writer),
        )
        if key == self._key:
            return True
        if self._rollback or key == self._skip:
            # mitmproxy's rollback of the options just refused re-enters configure with the
            # options from before (once per nested rollback), at start the defaults: ./.aiid
            # and ./policies, another home. Nothing is built from them: no policy record in
            # another home's log, and the refusal the user sees stays about their own home.
            self._rollback = False
            self._skip = key
            return False
        try:
            if self._lock is None or self._lock.root != home.root:
                if self._lock is not None:
                    self._lock.release()
                    self._lock = None
                self._lock = HomeLock(home)
            gw = Gateway(
                home,
                policies.absolute(),
                body_limit=int(opts.aiid_body_limit),
                audit_writer=str(opts.aiid_audit_writer),
                keep_fds=self._lock.fds,
            )
        except AiidError as e:
            self._rollback = True  # the next configure is mitmproxy undoing these options
            raise exceptions.OptionsError(f"aiid-proxy cannot start: {e.one_line()}") from None
        self._skip = None
        if self.gateway is not None:
            self.gateway.close()
        self.gateway = gw
        self.broker.clock = gw.clock
        self._key = key
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # not running yet: `running` attaches it
        if loop is not None:
            gw.attach(loop)
        for fn in self.on_gateway:
            fn(gw)
        return True

    async def done(self) -> None:
        if self.control is not None:
            await self.control.stop()
        await self._deny_held()
        if self.gateway is not None:
            self.gateway.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def _deny_held(self) -> None:
        """At shutdown, every request still held for approval is denied (403, its approval
        record says why) rather than left for the closing connection to drop."""
        held = [p for p in self.broker.pending.values() if not p.future.done()]
        for p in held:
            p.future.set_result(Answer(False, "shutdown", "the gateway is shutting down"))
        for _ in range(SHUTDOWN_TICKS):  # bounded: let the held requests send their refusals
            if not any(
                p.request_id in self.broker.pending or p.request_id in self.answering for p in held
            ):
                break
            await asyncio.sleep(0.01)
        if held:  # the hooks returned: mitmproxy writes their answers on the next turns
            await asyncio.sleep(0.05)

    def gw(self) -> Gateway:
        if self.gateway is None:
            raise AiidError("gateway is not configured")
        return self.gateway


AUDIT_WAIT = 10.0
"""Seconds a flow waits for an audit record (a writer stopped or stuck on its storage)
before it is refused: fail closed, but never hang an agent for ever."""


async def settled[T](fut: Future[T], timeout: float = AUDIT_WAIT) -> T:
    """Await a library future (an audit record): raise AuditError after ``timeout`` s.

    One resolved on this loop's own thread (the audit writer process's replies are read
    there) wakes the task directly, where ``asyncio.wrap_future`` would go through
    ``call_soon_threadsafe`` and the loop's self-pipe."""
    if not fut.done():
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        here = threading.get_ident()

        def wake(_: Future[T]) -> None:
            if not waiter.done():
                waiter.set_result(None)

        def done(f: Future[T]) -> None:
            if threading.get_ident() == here:
                wake(f)
            else:
                loop.call_soon_threadsafe(wake, f)

        def late() -> None:
            if not waiter.done():
                waiter.set_exception(
                    AuditError(
                        f"the audit log did not commit the record within {timeout:g} s (it may "
                        "still land; the request was not sent)"
                    )
                )

        fut.add_done_callback(done)
        timer = loop.call_later(timeout, late)
        try:
            await waiter
        except asyncio.CancelledError:
            fut.cancel()
            raise
        finally:
            timer.cancel()
    return fut.result()


def header_pairs(flow: http.HTTPFlow) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in flow.request.headers.fields]


def state_of(flow: http.HTTPFlow) -> FlowState | None:
    st = flow.metadata.get(STATE)
    return st if isinstance(st, FlowState) else None


def pending_state(flow: http.HTTPFlow) -> FlowState | None:
    """The flow's state if the pipeline should keep working on it."""
    if flow.response is not None or flow.error is not None or not flow.live:
        return None
    return state_of(flow)
