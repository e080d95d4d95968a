"""What the operator console costs, and the README's console capture.

    .venv/bin/python scripts/bench_console.py                 # render + event cost, idle CPU
    .venv/bin/python scripts/bench_console.py --requests 400  # + CPU per request, console on/off
    .venv/bin/python scripts/bench_console.py --capture docs/console.txt

- render: one full frame (200 flows, 50 events, pending approvals, overrides, agents) rendered
  with colours into a terminal-sized buffer, at 80x24, 100x30 and 160x50. The console draws at
  most one frame per 0.5 s, whatever the request rate, so this bounds its share of the loop.
- event: what the console does per flow on the proxy's event loop (``_on_event``).
- idle: CPU time (utime+stime from /proc/<pid>/stat) of an idle `aiid run` with the console in a
  tmux terminal, over ``--idle`` seconds, and the same without the console.
- requests: CPU time per request of the gateway process with and without the console, for
  sequential requests through the proxy to the local stand-in.
"""

from __future__ import annotations

import argparse
import io
import os
import ssl
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from addons.console import ConsoleAddon  # noqa: E402
from addons.runtime import Runtime  # noqa: E402
from aiid_proxy.console import (  # noqa: E402
    ConsoleState,
    FlowRow,
    OverrideRow,
    PendingRow,
    render,
    tenant_info,
)
from aiid_proxy.gateway import FlowState, Target  # noqa: E402
from aiid_proxy.home import Home  # noqa: E402
from aiid_proxy.identity import AgentIdentity  # noqa: E402
from aiid_proxy.providers import Usage  # noqa: E402

POLICY = """\
version: 1
tenant: {tenant}
default: deny
approval: {{timeout: {timeout}}}
rules:
  - id: no-gpt-4o
    providers: [openai]
    models: ["gpt-4o"]
    effect: deny
    reason: "gpt-4o is not allowed here"
  - id: support-small-models
    providers: [openai]
    models: ["gpt-4o-mini*"]
    effect: allow
  - id: o1-needs-human
    providers: [openai]
    models: ["o1*"]
    effect: approve
    reason: "o1 needs a human"
limits:
  agents:
    "batch-*": {{requests_per_minute: 2}}
overrides:
  - id: INC-4711
    agents: [support-7]
    models: [gpt-4o]
    effect: allow
    approved_by: alice@example.com
    expires: 2099-01-01T00:00:00Z
"""


def full_state() -> ConsoleState:
    now = time.time()
    s = ConsoleState(listen="127.0.0.1:8080", started=now - 600)
    s.tenants = {
        f"tenant-{i}": tenant_info("3f2a9c1b2d4e5f60718293a4", now - 300, (4242, "9ab3" * 16))
        for i in range(3)
    }
    for i in range(250):
        s.add_flow(
            FlowRow(
                now - 250 + i,
                f"req_{i:024x}",
                "tenant-0",
                f"support-{i % 9}",
                "openai",
                "gpt-4o-mini-2024-07-18",
                ("allow", "deny", "approved")[i % 3],
                "support-small-models",
                "200",
                123.4,
                "812/64",
                0.0004,
            )
        )
    for i in range(60):
        s.add_denial(now - 60 + i, "tenant-0", f"support-{i % 9}", "no-gpt-4o", "not allowed")
    s.add_policy_event(now - 20, False, "tenant-0: edit refused: tenant-0.yaml:12: unknown key")
    for i in range(6):
        s.add_pending(
            PendingRow(f"req_{i:024x}", "tenant-0", "coder", "openai/o1", "o1", now, now + 99)
        )
    s.overrides = [OverrideRow("tenant-0", "INC-1", "allow", "agents=a", now + 9e4, "alice")]
    for i in range(20):
        c = s.counters("tenant-0", f"support-{i}")
        c.requests, c.tokens = 100 + i, 5000 + i
    return s


def bench_render(repeat: int) -> None:
    state = full_state()
    print("render: one full frame, with colours (median of", repeat, "frames)")
    for w, h in ((80, 24), (100, 30), (160, 50)):
        con = Console(
            file=io.StringIO(), width=w, height=h, force_terminal=True, color_system="truecolor"
        )
        times = []
        for _ in range(repeat):
            con.file = io.StringIO()
            t0 = time.perf_counter()
            con.print(render(state, w, h))
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1000
        print(f"  {w:>3}x{h:<3} {ms:6.2f} ms/frame = {ms / 5:5.2f} % of one core at 2 frames/s")


def bench_events(n: int) -> None:
    home = Home(Path("/nonexistent"))
    addon = ConsoleAddon(Runtime(), home, "127.0.0.1:8080", console=Console(file=io.StringIO()))
    states = []
    for i in range(n):
        st = FlowState(f"req_{i:024x}", Target("https", "api.openai.com", 443, "POST", "/"), 0.0)
        st.identity = AgentIdentity("acme", f"agent-{i % 50}", "jti", 0, 0)
        states.append(st)
    usage = Usage(812, 64)
    t0 = time.perf_counter()
    for st in states:
        addon._on_event(
            "response", {"state": st, "status": 200, "usage": usage, "latency_ms": 12.0}
        )
    dt = time.perf_counter() - t0
    print(f"event: {dt / n * 1e6:.2f} us per flow on the event loop ({n} response events)")


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, root: Path) -> None:
        from e2e import OPENAI_CANARY, make_home
        from standin import StandIn

        self.root = root
        self.standin = StandIn(root)
        self.standin.start()
        self.home = make_home(root, {"acme": {"openai": OPENAI_CANARY}})
        self.policies = root / "policies"
        self.policies.mkdir()
        (self.policies / "acme.yaml").write_text(POLICY.format(tenant="acme", timeout="120s"))

    def console(self, width: int = 100, height: int = 30) -> Any:
        from e2e import start_console_gateway

        return start_console_gateway(
            self.home,
            self.policies,
            self.standin.port,
            self.standin.ca_path,
            width=width,
            height=height,
        )

    def plain(self) -> Any:
        from e2e import start_gateway

        return start_gateway(self.home, self.policies, self.standin.port, self.standin.ca_path)

    def close(self) -> None:
        self.standin.stop()


def _client(gw: Any) -> Any:
    import openai  # its httpx flavour: the one the SDK agents use

    tls = ssl.create_default_context(cafile=str(gw.ca))
    return openai.DefaultHttpxClient(proxy=gw.proxy, verify=tls, trust_env=False, timeout=60)


def _chat(client: Any, token: str, model: str = "gpt-4o-mini") -> int:
    r = client.post(
        "https://api.openai.com/v1/chat/completions",
        headers={"authorization": f"Bearer {token}"},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
    )
    return int(r.status_code)


def bench_idle(b: Bench, seconds: float) -> None:
    for name in ("console", "no console"):
        gw = b.console() if name == "console" else b.plain()
        pid = gw.pid() if name == "console" else gw.proc.pid
        try:
            time.sleep(3)  # settle after start
            c0, t0 = _cpu(pid), time.monotonic()
            time.sleep(seconds)
            c1, t1 = _cpu(pid), time.monotonic()
        finally:
            gw.stop()
        pct = 100 * (c1 - c0) / (t1 - t0)
        print(f"idle ({name}): {c1 - c0:.2f} s CPU over {t1 - t0:.1f} s = {pct:.2f} % of a core")


def bench_requests(b: Bench, n: int) -> None:
    for name in ("console", "no console"):
        gw = b.console() if name == "console" else b.plain()
        pid = gw.pid() if name == "console" else gw.proc.pid
        try:
            token = gw.token("acme", "support-1", "1h")
            with _client(gw) as client:
                for _ in range(20):
                    _chat(client, token)
                c0, t0 = _cpu(pid), time.monotonic()
                for _ in range(n):
                    assert _chat(client, token) == 200
                c1, t1 = _cpu(pid), time.monotonic()
        finally:
            gw.stop()
        per = (c1 - c0) / n * 1000
        print(f"requests ({name}): {per:.2f} ms CPU per request, {n / (t1 - t0):.0f} req/s")


def capture(b: Bench, out: Path) -> None:
    """A 100x30 console with allowed, denied, overridden, rate-limited and held requests."""
    from concurrent.futures import ThreadPoolExecutor

    gw = b.console(100, 30)
    try:
        tok = {a: gw.token("acme", a, "1h") for a in ("support-1", "support-7", "batch-1")}
        tok["coder-3"] = gw.token("acme", "coder-3", "1h")
        with _client(gw) as client, ThreadPoolExecutor(2) as pool:
            for _ in range(3):
                _chat(client, tok["support-1"])
            _chat(client, tok["support-1"], "gpt-4o")
            _chat(client, tok["support-7"], "gpt-4o")
            for _ in range(3):
                _chat(client, tok["batch-1"])
            first = pool.submit(_chat, _client(gw), tok["coder-3"], "o1-mini")
            gw.wait_screen(lambda s: "pending approvals (1)" in s, what="a pending approval")
            rid = next(
                w
                for line in gw.screen().splitlines()
                if "coder-3" in line
                for w in line.split()
                if w.startswith("req_")
            )
            from e2e import aiid

            aiid(gw.home, "approve", "acme", rid, "--as", "alice")
            assert first.result(60) == 200
            bad = b.policies / "acme.yaml"
            good = bad.read_text()
            bad.write_text(good.replace("effect: deny", "efect: deny", 1))
            gw.wait_screen(lambda s: "refused" in s, what="the refused edit")
            bad.write_text(good)
            gw.wait_screen(lambda s: s.rfind("loaded") > s.rfind("refused"), what="the reload")
            pool.submit(_chat, _client(gw), tok["coder-3"], "o1-preview")
            gw.wait_screen(lambda s: "pending approvals (1)" in s, what="a pending approval")
            time.sleep(2)
            text = "\n".join(line.rstrip() for line in gw.screen().splitlines())
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
            print(text)
            rid = next(
                w
                for line in text.splitlines()
                if "o1-preview" in line
                for w in line.split()
                if w.startswith("req_")
            )
            aiid(gw.home, "deny", "acme", rid, "--as", "alice")
    finally:
        gw.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=200, help="frames to render per size")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU to measure")
    ap.add_argument("--requests", type=int, default=0, help="requests for CPU per request")
    ap.add_argument("--capture", type=Path, default=None, help="write a 100x30 screen capture")
    args = ap.parse_args()
    import tempfile

    if args.capture is None:
        bench_render(args.repeat)
        bench_events(20000)
    with tempfile.TemporaryDirectory(prefix="aiid-bench-", dir="/tmp") as d:
        b = Bench(Path(d))
        try:
            if args.capture is not None:
                capture(b, args.capture)
                return
            if args.idle > 0:
                bench_idle(b, args.idle)
            if args.requests > 0:
                bench_requests(b, args.requests)
        finally:
            b.close()


if __name__ == "__main__":
    main()
