"""The console screen: a pure function of :class:`ConsoleState` and the time (see the package
doc), laid out by line budget."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.text import Text

from aiid_proxy.clock import SYSTEM_CLOCK
from aiid_proxy.console.state import (
    KEYS_HELP,
    LIMITED_FOR_S,
    MIN_HEIGHT,
    MIN_WIDTH,
    WIDE,
    ConsoleState,
)


# -- formatting ---------------------------------------------------------------------------------
def _t(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


def _date(ts: float) -> str:
    """UTC, to the minute; to the second when it is not a whole minute (an override that ends
    at 14:40:48 must not read as ending at 14:40)."""
    t = time.gmtime(ts)
    return time.strftime("%Y-%m-%d %H:%MZ" if t.tm_sec == 0 else "%Y-%m-%d %H:%M:%SZ", t)


def _left(seconds: float) -> str:
    s = max(0, int(seconds + 0.999))
    return f"{s}s" if s < 120 else f"{s // 60}m{s % 60:02d}s"


def _ms(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.0f}" if v < 10_000 else f"{v / 1000:.1f}s"


def _usd(v: float | None) -> str:
    if v is None:
        return ""
    if 0 < v < 0.0001:
        return "<$0.0001"
    return f"${v:.4f}" if v < 1 else f"${v:.2f}"


_DECISION_STYLE = {
    "allow": "green",
    "approved": "green",
    "deny": "bold red",
    "error": "magenta",
}
_EVENT_STYLE = {
    "deny": "red",
    "error": "magenta",
    "approval": "yellow",
    "policy": "green",
    "refused": "bold red",
    "console": "cyan",
}


# C0 and C1 control characters (ESC among them) and DEL: shown as "?". Model names, paths and
# reasons come from agents' requests; an escape sequence in one must not drive the terminal.
_CONTROLS = {i: "?" for i in (*range(0x20), *range(0x7F, 0xA0))}


def _clean(text: str) -> str:
    return text.translate(_CONTROLS)


def _line(*parts: str | tuple[str, str], style: str = "") -> Text:
    """One screen line: never wraps, ends in an ellipsis when it does not fit."""
    clean = [_clean(p) if isinstance(p, str) else (_clean(p[0]), p[1]) for p in parts]
    return Text.assemble(*clean, style=style, no_wrap=True, overflow="ellipsis")


@dataclass(frozen=True)
class _Col:
    name: str
    width: int = 0  # fixed width; 0 = flexible, sharing what is left by ``ratio``
    ratio: int = 1
    right: bool = False


Cell = str | tuple[str, str]  # text, or (text, style)


def _fit(text: str, width: int, right: bool) -> str:
    """``text`` in exactly ``width`` cells: cut with an ellipsis, or padded."""
    if width <= 0:
        return ""
    n = cell_len(text)
    if n > width:
        return set_cell_size(text, width - 1) + "…"
    pad = " " * (width - n)
    return pad + text if right else text + pad


def _grid(cols: list[_Col], rows: list[list[Cell]], width: int) -> list[Text]:
    """A header line and one line per row, columns one space apart, exactly ``width`` wide.

    Much cheaper than a rich Table (no measuring, no wrapping): a frame is drawn every
    half second while requests flow, on the proxy's event loop."""
    fixed = sum(c.width for c in cols) + len(cols) - 1
    flex = [c for c in cols if not c.width]
    left = max(0, width - fixed)
    total = sum(c.ratio for c in flex) or 1
    widths = []
    given = 0
    for c in cols:
        if c.width:
            widths.append(c.width)
            continue
        w = left * c.ratio // total
        given += w
        widths.append(w)
    if flex and given < left:  # the rounding remainder goes to the last flexible column
        i = max(i for i, c in enumerate(cols) if not c.width)
        widths[i] += left - given
    out = [
        _line(
            " ".join(_fit(c.name, w, c.right) for c, w in zip(cols, widths, strict=True)),
            style="bold",
        )
    ]
    for row in rows:
        parts: list[str | tuple[str, str]] = []
        for i, (c, w, cell) in enumerate(zip(cols, widths, row, strict=True)):
            text, style = (cell, "") if isinstance(cell, str) else cell
            parts.append((_fit(_clean(text), w, c.right), style))
            if i < len(cols) - 1:
                parts.append(" ")
        out.append(_line(*parts))
    return out


# -- sections -----------------------------------------------------------------------------------
def _tenant_lines(state: ConsoleState, n: int) -> list[Text]:
    names = sorted(state.tenants)
    if not names:
        return [_line(("no tenants", "dim"))][:n]
    if n <= 0:
        return []
    if len(names) > 1 and n == 1:
        return [_line((f"{len(names)} tenants: ", "dim"), " ".join(names))]
    shown = names if len(names) <= n else names[: n - 1]
    out = []
    for name in shown:
        info = state.tenants[name]
        pol: list[str | tuple[str, str]] = (
            [("policy ", "dim"), info.policy] if info.policy else [("no policy", "bold red")]
        )
        # when the policy in force was loaded, beside it (after "EDIT REFUSED" it read as the
        # time of the refusal, which the events list shows)
        pol.append((f" @{_t(info.loaded)}" if info.loaded is not None else "", "dim"))
        if info.refused:  # until the file validates again: not just an event that scrolls
            pol.append((" EDIT REFUSED", "bold red"))
        out.append(
            _line(
                (name, "bold"),
                "  ",
                *pol,
                ("  audit ", "dim"),
                info.head or "-",
            )
        )
    if len(shown) < len(names):
        out.append(_line((f"+{len(names) - len(shown)} more tenants", "dim")))
    return out


def _pending_section(state: ConsoleState, n: int, inner: int, now: float) -> list[RenderableType]:
    """Title plus up to ``n - 1`` rows; the request id is never shortened."""
    rows = list(state.pending.values())
    sel = state.selected_pending()
    title = _line(
        (f"pending approvals ({len(rows)})", "bold yellow"),
        ("  aiid approve TENANT REQUEST_ID", "dim"),
    )
    shown = rows[: max(0, n - 1)]
    out: list[RenderableType] = [title]
    for r in shown:
        mark = ">" if sel is not None and r.request_id == sel.request_id else " "
        style = "reverse" if mark == ">" else ""
        out.append(
            _line(
                (f"{mark}{_left(r.deadline - now):>5} ", "bold yellow"),
                (r.request_id, "bold"),
                f"  {r.tenant}/{r.agent} {r.target} [{r.rule}]",
                style=style,
            )
        )
    if len(shown) < len(rows) and shown:
        out[-1] = _line((f"  ... and {len(rows) - len(shown) + 1} more", "yellow"))
    return out


def _override_lines(state: ConsoleState, n: int) -> list[Text]:
    ovs = state.overrides
    shown = ovs if len(ovs) <= n else ovs[: n - 1]
    out = [
        _line(
            ("override ", "bold magenta"),
            (o.id, "bold"),
            f" {o.tenant} {o.effect} {o.scope} ",
            ("until ", "dim"),
            _date(o.until),
            (f" by {o.approved_by}", "dim"),
        )
        for o in shown
    ]
    if len(shown) < len(ovs):
        out.append(_line((f"+{len(ovs) - len(shown)} more overrides", "magenta")))
    return out


def _event_lines(state: ConsoleState, n: int) -> list[Text]:
    """The latest events: up to two policy events, denials and approvals fill the rest."""
    if n <= 0:
        return []
    pol = list(state.policy_events)[-min(2, n) :]
    rest = list(state.events)[-(n - len(pol)) :] if n > len(pol) else []
    merged = sorted(pol + rest, key=lambda e: e.at)[-n:]
    return [
        _line(
            (f"{_t(e.at)} ", "dim"),
            (f"{e.kind:<8} ", _EVENT_STYLE.get(e.kind, "")),
            (e.text, "bold red" if e.kind == "refused" else ""),
        )
        for e in merged
    ]


def _agents_lines(state: ConsoleState, n_rows: int, now: float, width: int) -> list[Text]:
    # Narrow (the left two fifths of a 120-column screen): the counters give way before the
    # agent's name does (at 46 columns the name got 6 cells, and none with spend shown).
    tokens = width >= 56
    spend = width >= 72 and any(c.spend_usd for c in state.agents.values())
    cols = [
        _Col("agent"),
        _Col("req", 6, right=True),
        _Col("deny", 5, right=True),
    ]
    if tokens:
        cols.append(_Col("tokens", 9, right=True))
    if spend:
        cols.append(_Col("spend", 9, right=True))
    cols.append(_Col("rate limit", 16 if width >= 60 else 9))
    ranked = sorted(state.agents.items(), key=lambda kv: (-kv[1].requests, kv[0]))
    rows: list[list[Cell]] = []
    for (tenant, agent), c in ranked[: max(0, n_rows)]:
        if c.last_limited is not None and now - c.last_limited < LIMITED_FOR_S:
            rl: Cell = (f"LIMITED ({c.rate_limited}x429)", "bold red")
        elif c.rate_limited:
            rl = (f"ok ({c.rate_limited}x429)", "yellow")
        else:
            rl = ("ok", "green")
        row: list[Cell] = [f"{tenant}/{agent}", str(c.requests), str(c.denials)]
        if tokens:
            row.append(str(c.tokens))
        if spend:
            row.append(_usd(c.spend_usd))
        row.append(rl)
        rows.append(row)
    return _grid(cols, rows, width)


def _flows_lines(state: ConsoleState, n_rows: int, width: int) -> list[Text]:
    wide = width >= WIDE - 4
    narrow = width < 56
    # the request id (28 cells) and spend only where tenant, agent and model still fit
    with_id = width >= 146
    spend = width >= 130 and any(r.spend_usd is not None for r in state.flows)
    cols = [_Col("time", 8)]
    if wide:
        cols.append(_Col("tenant", ratio=1))
    cols.append(_Col("agent", ratio=2))
    if wide:
        cols.append(_Col("provider", 10))
    cols.append(_Col("model", ratio=3))
    cols.append(_Col("decision", 8 if not narrow else 5))
    if not narrow:
        cols.append(_Col("rule", ratio=3))
    cols.append(_Col("st", 4, right=True))  # "kill" whole
    if not narrow:
        cols += [_Col("ms", 5, right=True), _Col("tokens", 8, right=True)]
    if spend:
        cols.append(_Col("spend", 8, right=True))
    if with_id:
        cols.append(_Col("request", 28))
    rows: list[list[Cell]] = []
    for r in list(state.flows)[-n_rows:] if n_rows > 0 else []:
        row: list[Cell] = [_t(r.at)]
        if wide:
            row += [r.tenant, r.agent, r.provider, r.model or "-"]
        else:
            row += [r.agent, r.model or r.provider]
        row.append((r.decision, _DECISION_STYLE.get(r.decision, "")))
        if not narrow:
            row.append(r.rule)
        row.append(r.status)
        if not narrow:
            row += [_ms(r.latency_ms), r.tokens]
        if spend:
            row.append(_usd(r.spend_usd))
        if with_id:
            row.append(r.request_id)
        rows.append(row)
    return _grid(cols, rows, width)


# -- the screen ---------------------------------------------------------------------------------
def render(
    state: ConsoleState, width: int = 80, height: int = 24, now: float | None = None
) -> RenderableType:
    """The whole screen, exactly ``width`` x ``height``: nothing wraps, nothing scrolls."""
    now = SYSTEM_CLOCK.now() if now is None else now
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        n = len(state.pending)
        text = (f"{n} pending | " if n else "") + f"aiid-proxy {state.listen}"
        return _line(text[: max(1, width - 1)], style="bold")
    inner_w = width - 4  # border and one column of padding each side
    rem = height - 2  # top and bottom border
    wide = width >= WIDE
    parts: list[RenderableType] = []

    def take(want: int, keep: int = 0) -> int:
        nonlocal rem
        got = max(0, min(want, rem - keep))
        rem -= got
        return got

    # header: one line per tenant (policy hash and load time, audit head)
    cap_t = 1 if rem < 10 else 2 if rem < 20 else 4
    parts += _tenant_lines(state, take(min(max(1, len(state.tenants)), cap_t)))
    # pending approvals come first: an operator has to act on them
    if state.pending and rem > 0:
        cap_p = 4 if rem < 20 else 8
        parts += _pending_section(state, take(1 + min(len(state.pending), cap_p)), inner_w, now)
    keep_flows = min(rem, 2 if rem < 10 else 4)  # the flows table keeps a header and rows
    if state.overrides:
        parts += _override_lines(
            state, take(min(len(state.overrides), 2 if rem < 24 else 4), keep_flows)
        )
    n_events = len(state.events) + min(2, len(state.policy_events))
    # lines the flows table will not need: the other sections may grow into them
    flows_need = 1 + (len(state.flows) or len(state.hints))
    cap_e = max(2, rem // 4)
    if wide:
        spare = max(cap_e, rem - flows_need)
        n_ag = min(len(state.agents), spare - 1)
        want = max(min(n_events, spare), n_ag + 1 if n_ag else 0)
        got = take(want, keep_flows)
        tail: list[RenderableType] = []
        if got:
            lw = inner_w * 2 // 5
            left = _agents_lines(state, got - 1, now, lw) if n_ag and got >= 2 else []
            right = _event_lines(state, got)
            for i in range(got):
                ln = left[i].copy() if i < len(left) else Text()
                ln.truncate(lw, pad=True)
                ln.append("  ")
                if i < len(right):
                    ln.append_text(right[i])
                ln.no_wrap, ln.overflow = True, "ellipsis"
                tail.append(ln)
    else:
        n_ag = min(len(state.agents), 3) if height >= 20 else 0
        spare = max(cap_e, rem - flows_need - (n_ag + 1 if n_ag else 0))
        tail = list(_event_lines(state, take(min(n_events, spare), keep_flows)))
        if n_ag and rem - keep_flows >= 3:
            more = max(n_ag, rem - flows_need - 1)
            got = take(1 + min(len(state.agents), more), keep_flows)
            tail += _agents_lines(state, got - 1, now, inner_w)
    if rem >= 1:
        if state.flows or not state.hints:
            parts += _flows_lines(state, rem - 1, inner_w)
        else:
            parts += [_line(h, style="dim") for h in state.hints[:rem]]
    parts += tail
    title = Text.assemble(
        ("aiid-proxy", "bold cyan"),
        f" {state.listen} ",
        (f"since {_t(state.started)}Z ", "dim"),
    )
    return Panel(
        Group(*parts),
        title=title,
        title_align="left",
        subtitle=Text(KEYS_HELP, style="dim"),
        subtitle_align="right",
        padding=(0, 1),
        height=height,
        width=width,
    )
