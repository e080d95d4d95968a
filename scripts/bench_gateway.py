"""End-to-end benchmark: the full gateway (`aiid run`) against plain mitmdump, same machine.

    .venv/bin/python scripts/bench_gateway.py [--quick] [--rounds N] [--mem-requests N]
    .venv/bin/python scripts/bench_gateway.py --soak 600      # `make soak`: RSS slope only

Starts the local HTTPS provider stand-in (tests/standin.py), a plain ``mitmdump`` with the same
TLS and routing options as the gateway (``connection_strategy=lazy``, the stand-in CA as
``ssl_verify_upstream_trusted_ca``, ``map_remote`` of the provider hosts, the same confdir/CA)
and the full gateway (``aiid run --no-console``: a 200-rule policy with limits, the vault, the
durable audit log). Agents talk to both exactly as SDKs do: ``HTTPS_PROXY`` (HTTP CONNECT to the
proxy, TLS to the proxy's interception certificate), keep-alive HTTP/1.1 connections, small
OpenAI chat completion requests.

Measured, interleaving plain (A) and gateway (B) in A B / B A order over several rounds, medians
reported:
- capacity: requests/s at 1, 16 and 64 connections (closed loop), gateway/plain ratio;
- latency at one connection: p50 / p99 / p99.9, and what the gateway adds;
- latency at fixed rates (open loop, Poisson arrivals, 25/50/75 % of plain capacity), measured
  from each request's scheduled send time (no coordinated omission);
- streaming (SSE): time to first token and inter-event p99, added by the gateway;
- CPU: proxy process CPU time per request (utime+stime from /proc);
- memory: gateway RSS after N requests; ``--soak SECONDS``: RSS slope per 10k requests.

Load generators: ``hey`` (Debian package, Go) for the closed-loop capacity runs when it is
installed (it speaks HTTP CONNECT proxies and keeps connections alive; ``wrk`` cannot use a
proxy), else the built-in one; the latency, open-loop and SSE runs use the built-in asyncio
generator (raw asyncio + ssl: CONNECT, start_tls, sequential keep-alive HTTP/1.1 requests),
which runs in its own process. On a 2-core machine the load generator and the stand-in compete
with the proxy for CPU: absolute numbers are lower bounds, the ratios are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

HOST = "api.openai.com"
PATH = "/v1/chat/completions"
TENANT = "bench"
AGENT = "bench-agent"
VAULT_SECRET = "sk-bench-upstream-0123456789abcdef"
BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": 16,
    },
    separators=(",", ":"),
).encode()
SSE_EVENTS = 20
SSE_DELAY_MS = 5
TARGETS = {
    "throughput_ratio_16": 0.85,
    "added_p50_ms_1": 0.5,
    "added_p99_ms_1": 1.0,
    "added_ttft_ms": 1.0,
    "rss_slope_mib_per_10k": 1.0,
}


# =========================================================================== load generator
# Runs in a child process (``_load`` sub-command) so that it does not share a GIL with the
# stand-in; prints one JSON object.


def _pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, round(p / 100 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[k]


def _summary(lat_ns: list[int]) -> dict[str, float]:
    s = sorted(x / 1e6 for x in lat_ns)
    return {
        "n": len(s),
        "p50": _pct(s, 50),
        "p90": _pct(s, 90),
        "p99": _pct(s, 99),
        "p999": _pct(s, 99.9),
        "max": s[-1] if s else float("nan"),
        "mean": statistics.fmean(s) if s else float("nan"),
    }


class _Conn:
    """One agent connection: CONNECT through the proxy, TLS to the interception cert."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r = reader
        self.w = writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext) -> _Conn:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        w.write(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"CONNECT refused: {head[:80]!r}")
        await w.start_tls(ctx, server_hostname=HOST)
        return cls(r, w)

    async def _head(self) -> tuple[int, bytes]:
        head = await self.r.readuntil(b"\r\n\r\n")
        return int(head[9:12]), head.lower()

    async def request(self, raw: bytes) -> int:
        """Send one request, read the whole response; returns the status."""
        self.w.write(raw)
        status, head = await self._head()
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            await self.r.readexactly(int(head[i + 17 : j]))
        elif b"transfer-encoding: chunked" in head:
            async for _ in self._chunks():
                pass
        else:
            raise RuntimeError("response without length")
        return status

    async def _chunks(self) -> Any:
        while True:
            line = await self.r.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                await self.r.readuntil(b"\r\n")
                return
            data = await self.r.readexactly(size + 2)
            yield data[:-2]

    async def stream(self, raw: bytes) -> tuple[int, list[int]]:
        """Send a streaming request; returns (status, arrival time ns of each SSE data event)."""
        self.w.write(raw)
        status, head = await self._head()
        if b"transfer-encoding: chunked" not in head:
            raise RuntimeError(f"stream not chunked (status {status})")
        times: list[int] = []
        buf = b""
        async for chunk in self._chunks():
            now = time.perf_counter_ns()
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if event.startswith(b"data:"):
                    times.append(now)
        return status, times

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.w.close()


def _request_bytes(token: str, *, stream: bool = False) -> bytes:
    body = BODY
    extra = b""
    if stream:
        obj = json.loads(BODY)
        obj["stream"] = True
        obj["max_tokens"] = 4 * SSE_EVENTS  # the gateway cuts a stream past its reservation
        body = json.dumps(obj, separators=(",", ":")).encode()
        extra = b"x-standin-events: %d\r\nx-standin-delay-ms: %d\r\n" % (SSE_EVENTS, SSE_DELAY_MS)
    return (
        b"POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nAccept: application/json\r\n%s"
        b"Content-Length: %d\r\n\r\n%s"
        % (PATH.encode(), HOST.encode(), token.encode(), extra, len(body), body)
    )


async def _closed(
    port: int, ctx: ssl.SSLContext, raw: bytes, conns: int, seconds: float, warmup: float
) -> dict[str, Any]:
    pool = [await _Conn.open(port, ctx) for _ in range(conns)]
    lat: list[int] = []
    errors = 0
    t_start = time.perf_counter_ns()
    t_meas = t_start + int(warmup * 1e9)
    t_end = t_meas + int(seconds * 1e9)
    counted = 0

    async def worker(c: _Conn) -> None:
        nonlocal errors, counted
        clock = time.perf_counter_ns
        while True:
            t0 = clock()
            if t0 >= t_end:
                return
            status = await c.request(raw)
            t1 = clock()
            if t0 >= t_meas:
                counted += 1
                lat.append(t1 - t0)
                if status != 200:
                    errors += 1

    await asyncio.gather(*(worker(c) for c in pool))
    for c in pool:
        c.close()
    return {"rps": counted / seconds, "errors": errors, **_summary(lat)}


async def _open(
    port: int, ctx: ssl.SSLContext, raw: bytes, rate: float, seconds: float, pool_size: int
) -> dict[str, Any]:
    idle: asyncio.Queue[_Conn] = asyncio.Queue()
    pool = [await _Conn.open(port, ctx) for _ in range(pool_size)]
    for c in pool:
        idle.put_nowait(c)
    # warm every connection once (first request on a connection pays upstream connect + TLS)
    for c in pool:
        await c.request(raw)
    rnd = random.Random(42)
    lat: list[int] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(t_sched: int) -> None:
        nonlocal errors
        c = await idle.get()
        try:
            status = await c.request(raw)
        finally:
            idle.put_nowait(c)
        lat.append(time.perf_counter_ns() - t_sched)
        if status != 200:
            errors += 1

    t0 = time.perf_counter_ns()
    t = float(t0)
    end = t0 + seconds * 1e9
    sent = 0
    while True:
        t += rnd.expovariate(rate) * 1e9
        if t >= end:
            break
        delay = (t - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(int(t)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    for c in pool:
        c.close()
    return {"rate": rate, "sent": sent, "errors": errors, **_summary(lat)}


async def _sse(port: int, ctx: ssl.SSLContext, raw: bytes, n: int) -> dict[str, Any]:
    c = await _Conn.open(port, ctx)
    await c.stream(raw)  # warm the upstream connection
    ttft: list[int] = []
    gaps: list[int] = []
    total: list[int] = []
    errors = 0
    for _ in range(n):
        t0 = time.perf_counter_ns()
        status, times = await c.stream(raw)
        if status != 200 or not times:
            errors += 1
            continue
        ttft.append(times[0] - t0)
        total.append(times[-1] - t0)
        gaps.extend(b - a for a, b in itertools.pairwise(times))
    c.close()
    return {
        "errors": errors,
        "ttft": _summary(ttft),
        "gap": _summary(gaps),
        "total": _summary(total),
    }


def _load_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_gateway.py _load")
    ap.add_argument("mode", choices=["closed", "open", "sse"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--rate", type=float, default=100)
    ap.add_argument("--n", type=int, default=50)
    a = ap.parse_args(argv)
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.set_alpn_protocols(["http/1.1"])

    async def go() -> dict[str, Any]:
        if a.mode == "closed":
            raw = _request_bytes(a.token)
            return await _closed(a.port, ctx, raw, a.conns, a.seconds, a.warmup)
        if a.mode == "open":
            raw = _request_bytes(a.token)
            return await _open(a.port, ctx, raw, a.rate, a.seconds, a.conns)
        return await _sse(a.port, ctx, _request_bytes(a.token, stream=True), a.n)

    out = asyncio.run(go())
    print(json.dumps(out))
    return 0


# =========================================================================== processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds user+system, RSS KiB) of a process and its descendants (the gateway's
    audit writer process counts as the gateway)."""
    cpu, rss = 0.0, 0
    ticks = os.sysconf("SC_CLK_TCK")
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / ticks
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
        except OSError:
            if p == pid:
                raise
            continue
        todo += _children(p)
    return cpu, rss


@dataclass
class Proxy:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _wait_listening(p: Proxy, needle: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p.alive()
        if needle in p.log.read_text(errors="replace"):
            try:
                socket.create_connection(("127.0.0.1", p.port), timeout=1).close()
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"{p.name} did not start: {p.log.read_text()[-2000:]}")


SSE_ADDON = '''"""Plain mitmdump's only addon: stream SSE responses, as the gateway does."""


def responseheaders(flow):
    if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
        flow.response.stream = True
'''


def _common_sets(standin_port: int, standin_ca: Path) -> list[str]:
    sets = ["--set", f"ssl_verify_upstream_trusted_ca={standin_ca}"]
    for host in ("api.openai.com", "api.anthropic.com"):
        sets += ["--set", f"map_remote=|//{host}/|//localhost:{standin_port}/"]
    return sets


def start_plain(root: Path, home: Path, standin_port: int, standin_ca: Path) -> Proxy:
    port = free_port()
    addon = root / "sse_stream.py"
    addon.write_text(SSE_ADDON)
    log = root / "mitmdump.log"
    args = [
        str(BIN / "mitmdump"),
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"confdir={home / 'certs'}",
        "--set",
        "connection_strategy=lazy",
        "--set",
        "tls_version_client_min=TLS1_2",
        "--set",
        "tls_version_server_min=TLS1_2",
        "--set",
        "flow_detail=0",
        "-s",
        str(addon),
        *_common_sets(standin_port, standin_ca),
    ]
    with log.open("wb") as lf:
        proc = subprocess.Popen(args, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    p = Proxy("mitmdump", port, proc, log)
    _wait_listening(p, "listening at")
    return p


def start_gateway(root: Path, home: Path, policies: Path, standin_port: int, ca: Path) -> Proxy:
    port = free_port()
    log = root / "gateway.log"
    args = [
        str(BIN / "aiid"),
        "run",
        "--no-console",
        "--listen",
        f"127.0.0.1:{port}",
        "--policies",
        str(policies),
        *_common_sets(standin_port, ca),
    ]
    env = {**os.environ, "AIID_HOME": str(home)}
    with log.open("wb") as lf:
        proc = subprocess.Popen(
            args, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    p = Proxy("gateway", port, proc, log)
    _wait_listening(p, "listening on")
    return p


def bench_policy_text(n_rules: int = 200) -> str:
    """A realistic 200-rule tenant policy: the bench agent's allow rule among 199 others, with
    explicit denies that every request is checked against, limits and budgets."""
    teams = ["support", "coder", "research", "ops", "sales", "intern", "batch", "eval"]
    models = ["gpt-4o-mini", "gpt-4o", "o1-mini", "claude-sonnet-4-5", "claude-3-5-haiku-latest"]
    providers = ["openai", "anthropic"]
    lines = ["version: 1", f"tenant: {TENANT}", "default: deny", "rules:"]
    for i in range(n_rules - 1):
        team = teams[i % len(teams)]
        lines.append(f"  - id: r{i}")
        lines.append(f'    agents: ["{team}-*", "{team}{i % 10}-?"]')
        if i % 10 == 9:
            lines += [
                f'    hosts: ["api{i}.example.com"]',
                "    methods: [GET]",
                f'    paths: ["/v{i % 3}/*"]',
                "    effect: allow",
            ]
            continue
        lines.append(f"    providers: [{providers[i % 2]}]")
        lines.append(f'    models: ["{models[i % len(models)]}*"]')
        lines.append(f"    when: {{max_tokens: {{max: {512 * (1 + i % 8)}}}}}")
        lines.append(f"    effect: {['allow', 'allow', 'approve', 'deny'][i % 4]}")
        lines.append(f'    reason: "rule {i}"')
    lines += [
        "  - id: bench-allow",
        f'    agents: ["{AGENT}"]',
        "    providers: [openai]",
        '    models: ["gpt-4o-mini*"]',
        "    when: {max_tokens: {max: 1024}}",
        "    effect: allow",
        "limits:",
        "  tenant: {requests_per_minute: 100000000, tokens_per_minute: 100000000000}",
        "  agents:",
        '    "bench-*": {requests_per_minute: 100000000, tokens_per_minute: 100000000000}',
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Stand:
    root: Path
    standin: Any
    home: Path
    token: str
    plain: Proxy
    gateway: Proxy
    ca: Path

    @property
    def proxies(self) -> dict[str, Proxy]:
        return {"plain": self.plain, "gateway": self.gateway}


@contextlib.contextmanager
def stand(keep: bool = False) -> Iterator[Stand]:
    from e2e import aiid
    from standin import StandIn

    root = Path(tempfile.mkdtemp(prefix="aiid-bench-"))
    started: list[Any] = []
    try:
        si = StandIn(root)
        si.start()
        started.append(si)
        home = root / "home"
        aiid(home, "init")
        aiid(home, "tenant", "add", TENANT)
        aiid(home, "vault", "put", TENANT, "openai", input=VAULT_SECRET + "\n")
        token = aiid(home, "token", "issue", TENANT, AGENT, "--ttl", "24h").stdout.strip()
        policies = root / "policies"
        policies.mkdir()
        (policies / f"{TENANT}.yaml").write_text(bench_policy_text())
        chk = aiid(home, "policy", "check", str(policies), check=False)
        if chk.returncode != 0:
            raise RuntimeError(f"bench policy invalid: {chk.stdout}{chk.stderr}")
        plain = start_plain(root, home, si.port, si.ca_path)
        started.append(plain)
        gw = start_gateway(root, home, policies, si.port, si.ca_path)
        started.append(gw)
        yield Stand(root, si, home, token, plain, gw, home / "certs" / "mitmproxy-ca-cert.pem")
    finally:
        for thing in reversed(started):
            with contextlib.suppress(Exception):
                thing.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


# =========================================================================== measuring


def loadgen(st: Stand, proxy: Proxy, mode: str, **kw: Any) -> dict[str, Any]:
    args = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_load",
        mode,
        "--port",
        str(proxy.port),
        "--ca",
        str(st.ca),
        "--token",
        st.token,
    ]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    timeout = 120 + float(kw.get("seconds", 0)) + float(kw.get("warmup", 0))
    cpu0, _ = proc_stat(proxy.pid)
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    cpu1, rss = proc_stat(proxy.pid)
    proxy.alive()
    if p.returncode != 0:
        raise RuntimeError(f"load generator failed: {p.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    out["proxy_cpu_s"] = cpu1 - cpu0
    out["rss_kib"] = rss
    return out


HEY_LAT = re.compile(r"^\s+(\d+)% in ([\d.]+) secs", re.M)


def hey_closed(
    st: Stand, proxy: Proxy, conns: int, seconds: float, requests: int = 0
) -> dict[str, Any]:
    """Closed loop with hey (Go): ``-c`` keep-alive connections, each CONNECTs once; for
    ``seconds``, or ``requests`` requests in all."""
    body = st.root / "body.json"
    body.write_bytes(BODY)
    args = [
        "hey",
        *(["-n", str(requests)] if requests else ["-z", f"{seconds}s"]),
        "-c",
        str(conns),
        "-cpus",
        "1",
        "-x",
        f"http://127.0.0.1:{proxy.port}",
        "-m",
        "POST",
        "-T",
        "application/json",
        "-H",
        f"Authorization: Bearer {st.token}",
        "-D",
        str(body),
        f"https://{HOST}{PATH}",
    ]
    cpu0, _ = proc_stat(proxy.pid)
    p = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120 + requests / 50)
    cpu1, rss = proc_stat(proxy.pid)
    proxy.alive()
    text = p.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    ok = re.search(r"\[200\]\s+(\d+) responses", text)
    total = sum(int(x) for x in re.findall(r"\[\d+\]\s+(\d+) responses", text))
    if p.returncode != 0 or m is None or ok is None:
        raise RuntimeError(f"hey failed: {text[-2000:]}{p.stderr[-2000:]}")
    pcts = {int(a): float(b) * 1000 for a, b in HEY_LAT.findall(text)}
    return {
        "rps": float(m.group(1)),
        "n": total,
        "errors": total - int(ok.group(1)) + len(re.findall(r"Error distribution", text)),
        "p50": pcts.get(50, float("nan")),
        "p99": pcts.get(99, float("nan")),
        "proxy_cpu_s": cpu1 - cpu0,
        "rss_kib": rss,
    }


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Results:
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, metric: str, plain: str, gw: str, delta: str, target: str = "") -> None:
        self.rows.append((metric, plain, gw, delta, target))
        print(f"  {metric:<44} {plain:>12} {gw:>12} {delta:>14}  {target}", flush=True)


def _ab(round_no: int) -> list[str]:
    return ["plain", "gateway"] if round_no % 2 == 0 else ["gateway", "plain"]


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def run_bench(st: Stand, a: argparse.Namespace, res: Results) -> None:
    rounds = a.rounds
    use_hey = shutil.which("hey") is not None and not a.no_hey
    res.raw["capacity_tool"] = "hey" if use_hey else "asyncio"
    print(
        f"capacity tool: {res.raw['capacity_tool']}; {rounds} rounds; {a.seconds}s per run",
        flush=True,
    )
    # warm both proxies (certificate generation, upstream connections, imports, caches)
    for name in ("plain", "gateway"):
        loadgen(st, st.proxies[name], "closed", conns=4, seconds=1, warmup=0.5)

    # ---- capacity, closed loop
    cap: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in range(rounds):
        for c in a.conns:
            for name in _ab(r):
                proxy = st.proxies[name]
                if use_hey:
                    out = hey_closed(st, proxy, c, a.seconds)
                else:
                    out = loadgen(st, proxy, "closed", conns=c, seconds=a.seconds, warmup=0.5)
                out["cpu_us_per_req"] = out["proxy_cpu_s"] / max(1, out["rps"] * a.seconds) * 1e6
                cap.setdefault((c, name), []).append(out)
                print(
                    f"  round {r + 1} c={c:<3} {name:<8} {out['rps']:8.1f} req/s "
                    f"p50 {out['p50']:.2f} ms  cpu {out['cpu_us_per_req']:.0f} µs/req",
                    flush=True,
                )
    # ---- latency at one connection (built-in generator: ns timers, p99.9)
    one: dict[str, list[dict[str, Any]]] = {}
    for r in range(rounds):
        for name in _ab(r):
            out = loadgen(st, st.proxies[name], "closed", conns=1, seconds=a.seconds, warmup=0.5)
            one.setdefault(name, []).append(out)
    res.raw["capacity"] = {f"{c}/{n}": v for (c, n), v in cap.items()}
    res.raw["one_conn"] = one

    print("\nresults (medians over rounds)", flush=True)
    print(f"  {'metric':<44} {'plain':>12} {'gateway':>12} {'gw vs plain':>14}  target")
    plain_cap = 0.0
    for c in a.conns:
        p = med([o["rps"] for o in cap[(c, "plain")]])
        g = med([o["rps"] for o in cap[(c, "gateway")]])
        ratios = [
            go["rps"] / po["rps"]
            for po, go in zip(cap[(c, "plain")], cap[(c, "gateway")], strict=True)
        ]
        ratio = med(ratios)
        plain_cap = max(plain_cap, p)
        tgt = ""
        if c == 16:
            tgt = f">= 0.85x: {_verdict(ratio >= 0.85)}"
            res.raw["throughput_ratio_16"] = ratio
        res.add(f"capacity, {c} conn (req/s)", f"{p:.0f}", f"{g:.0f}", f"{ratio:.3f}x", tgt)
    for c in a.conns:
        p = med([o["cpu_us_per_req"] for o in cap[(c, "plain")]])
        g = med([o["cpu_us_per_req"] for o in cap[(c, "gateway")]])
        res.add(f"proxy CPU per request, {c} conn (µs)", f"{p:.0f}", f"{g:.0f}", f"+{g - p:.0f}")
    for key, label in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")):
        p = med([o[key] for o in one["plain"]])
        g = med([o[key] for o in one["gateway"]])
        added = med(
            [go[key] - po[key] for po, go in zip(one["plain"], one["gateway"], strict=True)]
        )
        tgt = ""
        if key == "p50":
            tgt = f"<= 0.5 ms: {_verdict(added <= 0.5)}"
            res.raw["added_p50_ms_1"] = added
        elif key == "p99":
            tgt = f"<= 1 ms: {_verdict(added <= 1.0)}"
            res.raw["added_p99_ms_1"] = added
        res.add(f"latency 1 conn {label} (ms)", f"{p:.3f}", f"{g:.3f}", f"+{added:.3f} ms", tgt)

    # ---- open loop at fixed rates
    res.raw["plain_capacity"] = plain_cap
    opened: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in range(rounds):
        for frac in a.fractions:
            rate = plain_cap * frac / 100
            for name in _ab(r):
                out = loadgen(
                    st, st.proxies[name], "open", rate=rate, seconds=a.seconds, conns=a.pool
                )
                opened.setdefault((frac, name), []).append(out)
    res.raw["open_loop"] = {f"{f}/{n}": v for (f, n), v in opened.items()}
    for frac in a.fractions:
        rate = plain_cap * frac / 100
        for key, label in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")):
            p = med([o[key] for o in opened[(frac, "plain")]])
            g = med([o[key] for o in opened[(frac, "gateway")]])
            added = med(
                [
                    go[key] - po[key]
                    for po, go in zip(
                        opened[(frac, "plain")], opened[(frac, "gateway")], strict=True
                    )
                ]
            )
            res.add(
                f"open loop {frac}% ({rate:.0f} req/s) {label} (ms)",
                f"{p:.3f}",
                f"{g:.3f}",
                f"+{added:.3f} ms",
            )

    # ---- streaming
    sse: dict[str, list[dict[str, Any]]] = {}
    for r in range(rounds):
        for name in _ab(r):
            sse.setdefault(name, []).append(loadgen(st, st.proxies[name], "sse", n=a.sse_n))
    res.raw["sse"] = sse
    for part, key, label in (
        ("ttft", "p50", "TTFT p50"),
        ("ttft", "p99", "TTFT p99"),
        ("gap", "p50", "inter-event p50"),
        ("gap", "p99", "inter-event p99"),
    ):
        p = med([o[part][key] for o in sse["plain"]])
        g = med([o[part][key] for o in sse["gateway"]])
        added = med(
            [
                go[part][key] - po[part][key]
                for po, go in zip(sse["plain"], sse["gateway"], strict=True)
            ]
        )
        tgt = ""
        if part == "ttft" and key == "p50":
            tgt = f"<= 1 ms: {_verdict(added <= 1.0)}"
            res.raw["added_ttft_ms"] = added
        res.add(
            f"SSE {label} (ms; {SSE_EVENTS} ev, {SSE_DELAY_MS} ms apart)",
            f"{p:.3f}",
            f"{g:.3f}",
            f"+{added:.3f} ms",
            tgt,
        )

    # ---- memory after N requests
    if a.mem_requests:
        memory_run(st, a.mem_requests, res)


def _drive(st: Stand, proxy: Proxy, n: int, conns: int = 16) -> int:
    """About ``n`` requests through ``proxy``, closed loop; returns the count sent."""
    if shutil.which("hey"):
        out = hey_closed(st, proxy, conns, 0, requests=n)
        if out["errors"]:
            raise RuntimeError(f"{out['errors']} failed requests while driving {proxy.name}")
        return int(out["n"])
    sent = 0
    while sent < n:
        out = loadgen(st, proxy, "closed", conns=conns, seconds=2.0, warmup=0)
        sent += int(out["rps"] * 2.0)
    return sent


def memory_run(st: Stand, n: int, res: Results) -> None:
    gw = st.gateway
    _, rss0 = proc_stat(gw.pid)
    _drive(st, gw, min(5000, n // 5))  # warm-up
    _, rss1 = proc_stat(gw.pid)
    sent = _drive(st, gw, n)
    _, rss2 = proc_stat(gw.pid)
    res.raw["memory"] = {"start_kib": rss0, "warm_kib": rss1, "after_kib": rss2, "requests": sent}
    per10k = (rss2 - rss1) / 1024 / max(1, sent) * 10_000
    res.add(
        f"gateway RSS after {sent} req (MiB)",
        "",
        f"{rss2 / 1024:.1f}",
        f"{(rss2 - rss1) / 1024:+.1f} MiB",
        f"warm {rss1 / 1024:.1f} MiB; {per10k:+.3f} MiB/10k",
    )


def soak(st: Stand, seconds: float, res: Results) -> None:
    """Drive the gateway for ``seconds``; RSS against request count, slope per 10k after
    warm-up (least squares over the samples after the first fifth)."""
    gw = st.gateway
    _drive(st, gw, 5000)
    samples: list[tuple[int, int]] = []
    total = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        total += _drive(st, gw, 10_000)
        samples.append((total, proc_stat(gw.pid)[1]))
        print(f"  soak {total:>8} requests  RSS {samples[-1][1] / 1024:7.1f} MiB", flush=True)
    tail = samples[len(samples) // 5 :]
    xs = [float(x) for x, _ in tail]
    ys = [y / 1024 for _, y in tail]
    slope = statistics.linear_regression(xs, ys).slope * 10_000 if len(tail) >= 2 else 0.0
    res.raw["soak"] = {"samples": samples, "slope_mib_per_10k": slope, "seconds": seconds}
    res.add(
        f"soak {seconds / 60:.0f} min: RSS slope (MiB/10k req)",
        "",
        f"{slope:+.3f}",
        f"{total} req",
        f"< 1 MiB/10k: {_verdict(slope < 1.0)}",
    )
    res.add(
        "soak RSS first/last sample (MiB)",
        "",
        f"{samples[0][1] / 1024:.1f} -> {samples[-1][1] / 1024:.1f}",
        "",
    )


# =========================================================================== report


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mitm = subprocess.run(
        [str(BIN / "mitmdump"), "--version"], capture_output=True, text=True
    ).stdout
    m = re.search(r"Mitmproxy:\s*(\S+)", mitm)
    hey = "not installed"
    if shutil.which("hey"):
        q = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "hey"], capture_output=True, text=True
        )
        hey = q.stdout.strip() or "installed"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "mitmproxy": m.group(1) if m else "?",
        "hey": hey,
        "kernel": platform.release(),
    }


def write_markdown(path: Path, section: str, text: str) -> None:
    """Replace (or add) the ``<!-- section -->`` block of ``path``."""
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else "# aiid-proxy benchmark results\n\n"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        _, tail = rest.split(end, 1)
        tail = tail.lstrip("\n")
        new = head + block + ("\n" + tail if tail else "")
    else:
        new = old.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def table(rows: list[tuple[str, str, str, str, str]]) -> str:
    out = [
        "| metric | plain mitmdump | gateway | gateway vs plain | target |",
        "|---|---:|---:|---:|---|",
    ]
    out += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_load"]:
        return _load_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (~2 min)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seconds", type=float, help="seconds per measurement run")
    ap.add_argument("--mem-requests", type=int, help="requests for the RSS figure")
    ap.add_argument("--soak", type=float, help="only the soak: seconds to run")
    ap.add_argument("--no-hey", action="store_true", help="capacity with the built-in generator")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--micro-json", type=Path, help="bench_micro.py results to put in results.md too"
    )
    a = ap.parse_args(argv)
    a.rounds = a.rounds or (2 if a.quick else 5)
    a.seconds = a.seconds or (2.0 if a.quick else 6.0)
    if a.mem_requests is None:
        a.mem_requests = 5000 if a.quick else 100_000
    a.conns = [1, 16, 64]
    a.fractions = [25, 50, 75]
    a.pool = 16
    a.sse_n = 20 if a.quick else 60
    info = machine()
    print(
        f"machine: {info['nproc']} cores, {info['cpu']}; python {info['python']}, "
        f"mitmproxy {info['mitmproxy']}",
        flush=True,
    )
    res = Results()
    load_before = os.getloadavg()
    with stand() as st:
        if a.soak:
            soak(st, a.soak, res)
            section = "soak"
            title = f"## Soak ({info['date']})"
        else:
            run_bench(st, a, res)
            section = "gateway"
            title = (
                f"## Gateway vs plain mitmdump ({info['date']}, {'quick' if a.quick else 'full'})"
            )
    load_after = os.getloadavg()
    md = [
        title,
        "",
        f"Machine: {info['nproc']} cores ({info['cpu']}), kernel {info['kernel']}; "
        f"Python {info['python']}, mitmproxy {info['mitmproxy']}, hey {info['hey']}.",
        (
            f"Load: {'hey' if shutil.which('hey') else 'the built-in generator'}, closed loop, 16 "
            "connections, 10,000 requests between RSS samples (VmRSS of the gateway process "
            "and its audit writer process)."
            if a.soak
            else f"Load: {res.raw.get('capacity_tool', 'asyncio')} for capacity, the built-in "
            "asyncio generator (separate process) for latency/open loop/SSE. Load generator, "
            "stand-in and proxy share the same cores: absolute figures are lower bounds; "
            "compare the ratios."
        ),
        f"Load average (1 min) before/after the run: {load_before[0]:.1f} / {load_after[0]:.1f} "
        "(anything above ~1 is other work on the machine competing with the benchmark).",
        "",
        table(res.rows),
    ]
    if not a.no_write:
        write_markdown(a.out, section, "\n".join(md))
        if a.micro_json is not None and a.micro_json.exists():
            from bench_micro import table as micro_table

            micro = json.loads(a.micro_json.read_text())
            text = [
                f"## In-process microbenchmarks ({info['date']})",
                "",
                f"Machine: {info['nproc']} cores ({info['cpu']}); Python {info['python']}.",
                "",
                micro_table(micro),
            ]
            write_markdown(a.out, "micro", "\n".join(text))
        raw = a.out.with_suffix(f".{section}.json")
        raw.write_text(json.dumps({"machine": info, **res.raw}, indent=1, default=str))
        print(f"\nwritten: {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
