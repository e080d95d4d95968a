"""The live operator console in `aiid run` (rich), fed by gateway events.

- The view is redrawn from :class:`ConsoleState` at most every ``REFRESH_S``, and only when the
  state changed (or the terminal was resized, or a pending approval's countdown moved): an idle
  gateway costs one cheap wake-up per ``REFRESH_S`` and no drawing.
- Keys (stdin in cbreak mode, read by the event loop): ``a`` approves the selected (or oldest)
  pending approval once, ``A`` approves it for ``APPROVE_TTL_S``, ``d`` denies it, up/down (or
  ``k``/``j``) move the selection, ``q`` stops the gateway. The terminal is restored on exit.
- While the view is on, log lines go to ``<home>/gateway.log`` so nothing scrolls over it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import sys
import termios
import time
import tty
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.live import Live

from addons.runtime import Runtime
from aiid_proxy.console import (
    ConsoleState,
    FlowRow,
    OverrideRow,
    PendingRow,
    TenantInfo,
    parse_keys,
    render,
    tenant_info,
)
from aiid_proxy.control import Answer, operator_name
from aiid_proxy.errors import AiidError
from aiid_proxy.gateway import FlowState, Gateway
from aiid_proxy.home import Home
from aiid_proxy.policy.model import Override

log = logging.getLogger("aiid")
REFRESH_S = 0.5  # the most often the view is redrawn
IDLE_REDRAW_S = 60.0  # redraw at least this often (clock-dependent parts: overrides expiring)
APPROVE_TTL_S = 600.0  # the `A` key: approve for ten minutes
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _scope(o: Override) -> str:
    parts = []
    for name in ("agents", "providers", "models", "hosts"):
        v = getattr(o, name)
        if v is not None:
            parts.append(f"{name}={','.join(v)}")
    return " ".join(parts) or "everything"


class KeyReader:
    """stdin in cbreak mode, read by the event loop; ``stop`` restores the terminal."""

    def __init__(self, on_keys: Callable[[list[str]], None], fd: int | None = None) -> None:
        self.on_keys = on_keys
        self.fd = sys.stdin.fileno() if fd is None else fd
        self._saved: list[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> bool:
        if not os.isatty(self.fd):
            return False
        self._saved = termios.tcgetattr(self.fd)
        atexit.register(self.stop)  # even if `done` never runs
        tty.setcbreak(self.fd, termios.TCSANOW)
        loop.add_reader(self.fd, self._readable)
        self._loop = loop
        return True

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 256)
        except OSError:
            data = b""
        if not data:  # stdin closed: stop listening, keep running
            self._remove_reader()
            return
        keys = parse_keys(data)
        if keys:
            self.on_keys(keys)

    def _remove_reader(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.fd)
            self._loop = None

    def stop(self) -> None:
        self._remove_reader()
        if self._saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None


def agent_hints(home: Home, listen: str) -> list[str]:
    """What an agent needs, shown until the first request: the three lines `make run` printed
    before the console took the screen. The token itself is never shown here: the file
    `make run` left it in, or the command that issues one."""
    tenants = home.tenants()
    tenant = tenants[0] if len(tenants) == 1 else "TENANT"
    agent = "demo-agent" if tenant == "demo" else "AGENT"
    key = f"$(aiid token issue {tenant} {agent})   (an agent token, not a key)"
    if tenant == "demo" and home.demo_token_path.is_file():
        key = f"$(cat {home.demo_token_path})   (the token `make run` printed)"
    return [
        "no requests yet. Agents need:",
        f"  HTTPS_PROXY=http://{listen}",
        f"  SSL_CERT_FILE={home.ca_cert_path}",
        f"  OPENAI_API_KEY={key}",
    ]


class ConsoleAddon:
    def __init__(
        self,
        rt: Runtime,
        home: Home,
        listen: str,
        *,
        console: Console | None = None,
        user: str | None = None,
        shutdown: Callable[[], None] | None = None,
    ) -> None:
        self.rt = rt
        self.home = home
        self.state = ConsoleState(listen=listen)
        self.state.hints = agent_hints(home, listen)
        self.console = console or Console()
        self.user = user or operator_name()
        self._shutdown = shutdown
        self._task: asyncio.Task[None] | None = None
        self._live: Live | None = None
        self._keys: KeyReader | None = None
        self._drawn_version = -1
        self._drawn_at = 0.0
        self._drawn_size: tuple[int, int] | None = None
        self.draws = 0
        rt.on_gateway.append(self._attach)
        if rt.gateway is not None:
            self._attach(rt.gateway)

    def _attach(self, gw: Gateway) -> None:
        gw.listeners.append(self._on_event)
        # the policies loaded before we listened
        for tenant in gw.policies.tenants():
            pol = gw.policies.get(tenant)
            at = gw.policies.loaded_at(tenant)
            if pol is not None and at is not None:
                self.state.add_policy_event(at, True, f"{tenant}: loaded {pol.source_hash[:12]}")

    # -- events (on the event loop thread; policy events from the watcher thread) -------------
    def _now(self) -> float:
        gw = self.rt.gateway
        return gw.clock.now() if gw is not None else time.time()

    def _on_event(self, kind: str, data: Mapping[str, Any]) -> None:
        now = self._now()
        s = self.state
        if kind == "policy":
            ev = data["event"]
            text = ev.describe().removeprefix("policy ")
            gw = self.rt.gateway
            if gw is not None:  # file:line is enough on a console line
                text = text.replace(f"{gw.policies.directory}{os.sep}", "")
            s.add_policy_event(ev.at, ev.ok, text)
            return
        if kind == "audit":  # a tenant's audit chain failed its check at start
            s.add_event(now, "refused", str(data.get("text", "")))
            return
        st = data.get("state")
        if not isinstance(st, FlowState):
            return
        tenant = st.tenant or "-"
        agent = st.identity.agent if st.identity else "-"
        provider = st.provider_name or st.target.host
        model = st.model or ""
        rule = st.decision.rule_id if st.decision else "-"
        if kind == "pending":
            s.add_pending(
                PendingRow(
                    st.request_id,
                    tenant,
                    agent,
                    f"{provider}/{model}" if model else provider,
                    rule,
                    now,
                    float(data["deadline"]),
                )
            )
            return
        if kind == "resolved":
            s.resolve(st.request_id, now, bool(data.get("approved")), str(data.get("by")))
            return
        c = s.counters(tenant, agent)
        if kind == "deny":
            r = data["refusal"]
            c.requests += 1
            c.denials += 1
            if r.status == 429:
                c.rate_limited += 1
                c.last_limited = now
            s.add_flow(
                FlowRow(
                    now,
                    st.request_id,
                    tenant,
                    agent,
                    provider,
                    model,
                    "deny",
                    r.rule or rule,
                    str(r.status),
                    latency_ms=self._latency(st),
                )
            )
            s.add_denial(now, tenant, agent, r.rule or rule, r.message)
        elif kind == "response":
            u = data.get("usage")
            toks = ""
            if u is not None:
                toks = f"{u.input_tokens}/{u.output_tokens}{'~' if u.estimated else ''}"
                c.tokens += u.input_tokens + u.output_tokens
            spend = data.get("cost_usd")
            spend_usd = float(spend) if isinstance(spend, (int, float)) else None
            if spend_usd is not None:
                c.spend_usd += spend_usd
            c.requests += 1
            s.add_flow(
                FlowRow(
                    now,
                    st.request_id,
                    tenant,
                    agent,
                    provider,
                    model,
                    "approved" if st.approved_by else "allow",
                    rule,
                    str(data.get("status")),
                    data.get("latency_ms"),
                    toks,
                    spend_usd,
                )
            )
        elif kind == "error":
            c.requests += 1
            s.add_flow(
                FlowRow(now, st.request_id, tenant, agent, provider, model, "error", rule, "kill")
            )
            s.add_event(now, "error", f"{tenant}/{agent} {st.request_id}: {data.get('reason')}")

    def _latency(self, st: FlowState) -> float | None:
        gw = self.rt.gateway
        if gw is None:
            return None
        return (gw.clock.monotonic() - st.started) * 1000.0

    # -- keys -------------------------------------------------------------------------------------
    def handle_keys(self, keys: list[str]) -> None:
        for key in keys:
            self.handle_key(key)

    def handle_key(self, key: str) -> None:
        s = self.state
        now = self._now()
        if key in ("up", "k"):
            s.move_selection(-1)
        elif key in ("down", "j"):
            s.move_selection(1)
        elif key in ("a", "A", "d"):
            row = s.selected_pending()
            if row is None:
                s.add_event(now, "console", "nothing is waiting for approval")
                return
            ttl = APPROVE_TTL_S if key == "A" else None
            ans = Answer(
                approved=key != "d",
                by=f"{self.user} (console)",
                reason="" if key != "d" else "denied in the console",
                ttl=ttl,
            )
            try:
                self.rt.broker.answer(row.tenant, row.request_id, ans)
            except AiidError as e:
                s.pending.pop(row.request_id, None)  # gone meanwhile (timed out)
                s.add_event(now, "console", e.one_line())
                return
            s.mark_answered(row.request_id)  # the next key answers the next one
            if ttl:
                s.add_event(
                    now,
                    "console",
                    f"{row.tenant}/{row.agent} {row.target} [{row.rule}] approved for "
                    f"{int(ttl // 60)}m by {self.user}",
                )
        elif key == "q":
            s.add_event(now, "console", "stopping")
            self._stop_gateway()

    def _stop_gateway(self) -> None:
        if self._shutdown is not None:
            self._shutdown()
            return
        from mitmproxy import ctx

        ctx.master.shutdown()  # type: ignore[no-untyped-call]

    # -- drawing ----------------------------------------------------------------------------------
    def refresh_static(self) -> None:
        """Tenants (policy hash, load time, audit head) and the overrides now in force."""
        gw = self.rt.gateway
        if gw is None:
            return
        now = gw.clock.now()
        tenants: dict[str, TenantInfo] = {}
        overrides: list[OverrideRow] = []
        for t in gw.tenants():
            pol = gw.policies.get(t.name)
            tenants[t.name] = tenant_info(
                pol.source_hash if pol else None,
                gw.policies.loaded_at(t.name),
                t.audit.head(),
                gw.policies.refused(t.name),
            )
            for o in pol.overrides if pol else ():
                if now < o.expires:
                    overrides.append(
                        OverrideRow(t.name, o.id, o.effect, _scope(o), o.expires, o.approved_by)
                    )
        self.state.set_tenants(tenants)
        self.state.set_overrides(overrides)

    def due(self, mono: float, size: tuple[int, int]) -> bool:
        """Whether the view must be redrawn now."""
        if self._drawn_version != self.state.version or size != self._drawn_size:
            return True
        since = mono - self._drawn_at
        if self.state.pending and since >= 1.0:
            return True  # the countdown of a pending approval
        return since >= IDLE_REDRAW_S

    def tick(self, mono: float) -> bool:
        self.refresh_static()
        size = self.console.size
        wh = (size.width, size.height)
        if not self.due(mono, wh):
            return False
        self._drawn_version = self.state.version
        self._drawn_at = mono
        self._drawn_size = wh
        self.draws += 1
        if self._live is not None:
            self._live.update(render(self.state, wh[0], wh[1], self._now()), refresh=True)
        return True

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                self.tick(time.monotonic())
            except Exception:  # the view must never take the gateway down
                log.exception("console redraw failed")

    # -- lifecycle --------------------------------------------------------------------------------
    def _log_to(self, handler: logging.Handler) -> None:
        root = logging.getLogger()
        for h in list(root.handlers):
            # only what would write over the view: stream handlers on a terminal
            if type(h) is logging.StreamHandler and getattr(h.stream, "isatty", lambda: False)():
                root.removeHandler(h)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        logging.captureWarnings(True)

    def running(self) -> None:
        if self._live is not None:
            return
        if not self.console.is_terminal:
            # no terminal to draw on: plain log lines on stderr instead
            self._log_to(logging.StreamHandler(sys.stderr))
            return
        path = self.home.root / "gateway.log"
        # private like the rest of the home: request ids, agents, models, hosts
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        with contextlib.suppress(OSError):
            path.chmod(0o600)
        self._log_to(logging.FileHandler(path))
        log.info("console on; log lines go to %s", self.home.root / "gateway.log")
        loop = asyncio.get_running_loop()
        try:
            keys = KeyReader(self.handle_keys)
            if keys.start(loop):
                self._keys = keys
        except (OSError, termios.error, ValueError) as e:
            log.warning("console keys unavailable: %s", e)
        self.refresh_static()
        size = self.console.size
        self._live = Live(
            render(self.state, size.width, size.height, self._now()),
            console=self.console,
            auto_refresh=False,
            screen=True,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start(refresh=True)
        atexit.register(self._restore_terminal)  # even if `done` never runs
        self._drawn_size = (size.width, size.height)
        self._drawn_at = time.monotonic()
        self._task = loop.create_task(self._loop())

    def _restore_terminal(self) -> None:
        if self._keys is not None:
            self._keys.stop()
            self._keys = None
        if self._live is not None:
            with contextlib.suppress(Exception):
                self._live.stop()
            self._live = None

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._restore_terminal()
