"""The live operator console in `aiid run` (rich), fed by gateway events."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.live import Live

from addons.pipeline import Runtime
from aiid_proxy.console import ConsoleState, FlowRow, render, tenant_info
from aiid_proxy.gateway import FlowState, Gateway
from aiid_proxy.home import Home

log = logging.getLogger("aiid")
REFRESH_S = 0.5


class ConsoleAddon:
    def __init__(self, rt: Runtime, home: Home, listen: str) -> None:
        self.rt = rt
        self.home = home
        self.state = ConsoleState(listen=listen)
        self.console = Console(stderr=False)
        self._task: asyncio.Task[None] | None = None
        self._live: Live | None = None
        rt.on_gateway.append(self._attach)
        if rt.gateway is not None:
            self._attach(rt.gateway)

    def _attach(self, gw: Gateway) -> None:
        gw.listeners.append(self._on_event)

    # -- events (called on the event loop thread or the policy watcher thread) --
    def _on_event(self, kind: str, data: Mapping[str, Any]) -> None:
        now = time.time()
        s = self.state
        if kind == "policy":
            ev = data["event"]
            s.add_policy_event(ev.at, ev.ok, ev.describe())
            return
        st = data.get("state")
        if not isinstance(st, FlowState):
            return
        tenant = st.tenant or "-"
        agent = st.identity.agent if st.identity else "-"
        c = s.counters(tenant, agent)
        if kind == "deny":
            r = data["refusal"]
            c.requests += 1
            c.denials += 1
            if r.status == 429:
                c.rate_limited += 1
            s.add_flow(
                FlowRow(
                    now,
                    st.request_id,
                    tenant,
                    agent,
                    st.provider_name or st.target.host,
                    st.model or "",
                    "deny",
                    r.rule or "-",
                    str(r.status),
                )
            )
            s.add_denial(now, tenant, agent, r.rule or "-", r.message)
        elif kind == "response":
            u = data.get("usage")
            toks = ""
            if u is not None:
                toks = f"{u.input_tokens}/{u.output_tokens}{'~' if u.estimated else ''}"
                c.tokens += u.input_tokens + u.output_tokens
            c.requests += 1
            s.add_flow(
                FlowRow(
                    now,
                    st.request_id,
                    tenant,
                    agent,
                    st.provider_name or st.target.host,
                    st.model or "",
                    "allow",
                    st.decision.rule_id if st.decision else "-",
                    str(data.get("status")),
                    data.get("latency_ms"),
                    toks,
                )
            )
        elif kind == "error":
            c.requests += 1
            s.add_flow(
                FlowRow(
                    now,
                    st.request_id,
                    tenant,
                    agent,
                    st.provider_name or st.target.host,
                    st.model or "",
                    "error",
                    "-",
                    "killed",
                )
            )
            s.add_denial(now, tenant, agent, "error", str(data.get("reason")))
        elif kind == "pending":
            s.pending[st.request_id] = (now, tenant, agent, st.model or "", data["deadline"])
            s.version += 1
        elif kind == "resolved":
            s.pending.pop(st.request_id, None)
            s.version += 1

    def _refresh_tenants(self) -> None:
        gw = self.rt.gateway
        if gw is None:
            return
        for t in gw.tenants():
            pol = gw.policies.get(t.name)
            self.state.tenants[t.name] = dict(
                tenant_info(
                    pol.source_hash if pol else None, gw.policies.loaded_at(t.name), t.audit.head()
                )
            )

    async def _loop(self) -> None:
        seen = -1
        last_draw = 0.0
        assert self._live is not None
        while True:
            await asyncio.sleep(REFRESH_S)
            now = time.monotonic()
            if self.state.version == seen and now - last_draw < 5:
                continue  # idle: no redraw, no CPU
            seen = self.state.version
            last_draw = now
            self._refresh_tenants()
            size = self.console.size
            self._live.update(render(self.state, size.width, size.height), refresh=True)

    def running(self) -> None:
        if not self.console.is_terminal:
            return
        # Log lines must not scroll over the view: send them to a file.
        logfile = self.home.root / "gateway.log"
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        fh = logging.FileHandler(logfile)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
        self._refresh_tenants()
        size = self.console.size
        self._live = Live(
            render(self.state, size.width, size.height),
            console=self.console,
            auto_refresh=False,
            screen=True,
            transient=False,
        )
        self._live.start()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._live is not None:
            self._live.stop()
