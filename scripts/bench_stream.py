"""Benchmark: many concurrent slow SSE streams through a real `aiid run`.

    .venv/bin/python scripts/bench_stream.py                      # 500 streams, 50 ms, 30 s
    .venv/bin/python scripts/bench_stream.py --streams 100 --seconds 10

Starts the provider stand-in (tests/standin.py) in its own process and a real gateway
(`aiid run`, as tests/e2e.py does), then opens N concurrent streaming chat completions, each
one event every ``--interval-ms`` for ``--seconds``, first straight to the stand-in (the
baseline) and then through the gateway (CONNECT + TLS to the gateway, like an SDK with
HTTPS_PROXY). Clients are raw asyncio + ssl, so the client side costs little.

Reported, per path: every stream completed with every event and ``[DONE]``; time to first
token (request written -> first text event) p50/p99; the gap between the response headers and
the first text event (the pure streaming path: what buffering would delay); inter-event gap
p99; and for the gateway its peak RSS (VmHWM from /proc) and CPU seconds, plus a check that
every stream's usage landed in its audit record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from e2e import make_home, start_gateway  # noqa: E402

HOST = "api.openai.com"
POLICY = """\
version: 1
tenant: bench
default: deny
rules:
  - id: mini
    providers: [openai]
    models: ["gpt-4o-mini*"]
    effect: allow
limits:   # generous, so that reservations and the stream cap are exercised, never hit
  tenant: {requests_per_minute: 1000000, tokens_per_minute: 1000000000}
  agents:
    "*": {requests_per_minute: 1000000, tokens_per_minute: 1000000000}
budgets:
  tenant: {usd_per_day: 1000000}
"""
STANDIN = """
import socketserver, sys, signal, threading
sys.path.insert(0, sys.argv[1])
import standin
standin._Server.request_queue_size = 4096   # the default backlog of 5 drops a burst of SYNs
s = standin.StandIn(sys.argv[2])
s.start()
print(s.port, s.ca_path, flush=True)
sys.stdin.read()   # until the benchmark closes our stdin
s.stop()
"""


@dataclass
class Stream:
    ok: bool = False
    error: str = ""
    events: int = 0
    done: bool = False
    connect: float | None = None  # TCP + TLS (+ CONNECT through the gateway)
    ttft: float | None = None  # request written -> first text event
    head_to_first: float | None = None  # response headers -> first text event
    gaps: list[float] = field(default_factory=list)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


async def open_direct(
    port: int, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=HOST, limit=1 << 20
    )


async def open_proxied(
    port: int, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"CONNECT refused: {head[:80]!r}")
    await writer.start_tls(ctx, server_hostname=HOST)
    return reader, writer


async def one_stream(
    opener: object, port: int, ctx: ssl.SSLContext, token: str, events: int, interval_ms: int
) -> Stream:
    st = Stream()
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "stream, please"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": events + 10,
        }
    ).encode()
    try:
        tc = time.perf_counter()
        reader, writer = await opener(port, ctx)  # type: ignore[operator]
        st.connect = time.perf_counter() - tc
    except Exception as e:
        st.error = f"connect: {e!r}"
        return st
    try:
        writer.write(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nx-standin-events: {events}\r\n"
                f"x-standin-delay-ms: {interval_ms}\r\nConnection: close\r\n\r\n"
            ).encode()
            + body
        )
        await writer.drain()
        t0 = time.perf_counter()
        head = await reader.readuntil(b"\r\n\r\n")
        t_head = time.perf_counter()
        status = head.split(b"\r\n", 1)[0]
        if b" 200 " not in status:
            rest = await reader.read(4000)
            text = rest.decode(errors="replace")
            # mitmproxy's own error page: keep its message, not the HTML around it
            found = re.findall(r"<p>(.*?)</p>|\"message\": \"([^\"]*)", text, re.S)
            why = " ".join(a or b for a, b in found)[:160] if found else text[:160]
            st.error = f"{status.decode(errors='replace')}: {why}"
            return st
        buf = b""
        last: float | None = None
        while True:
            size_line = await reader.readline()
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            now = time.perf_counter()
            buf += data
            *complete, buf = buf.split(b"\n\n")
            for ev in complete:
                if b'"content":"' in ev:
                    st.events += 1
                    if st.ttft is None:
                        st.ttft = now - t0
                        st.head_to_first = now - t_head
                    elif last is not None:
                        st.gaps.append(now - last)
                    last = now
                elif ev.strip() == b"data: [DONE]":
                    st.done = True
        st.ok = st.done and st.events == events
        if not st.ok:
            st.error = f"incomplete: {st.events}/{events} events, done={st.done}"
    except Exception as e:
        st.error = f"{type(e).__name__}: {e}"
    finally:
        writer.close()
    return st


async def run_many(
    opener: object,
    port: int,
    ctx: ssl.SSLContext,
    token: str,
    n: int,
    events: int,
    interval_ms: int,
    ramp: float,
) -> list[Stream]:
    async def delayed(i: int) -> Stream:
        await asyncio.sleep(ramp * i / max(1, n))
        return await one_stream(opener, port, ctx, token, events, interval_ms)

    return list(await asyncio.gather(*(delayed(i) for i in range(n))))


def summarize(name: str, streams: list[Stream]) -> dict[str, object]:
    ok = [s for s in streams if s.ok]
    ttft = [s.ttft * 1000 for s in ok if s.ttft is not None]
    h2f = [s.head_to_first * 1000 for s in ok if s.head_to_first is not None]
    gaps = [g * 1000 for s in ok for g in s.gaps]
    conn = [s.connect * 1000 for s in ok if s.connect is not None]
    errors: dict[str, int] = {}
    for s in streams:
        if not s.ok:
            errors[s.error[:120]] = errors.get(s.error[:120], 0) + 1
    return {
        "path": name,
        "streams": len(streams),
        "completed": len(ok),
        "events": sum(s.events for s in streams),
        "connect_tls_ms_p50": round(pct(conn, 50), 3),
        "ttft_ms_p50": round(pct(ttft, 50), 3),
        "ttft_ms_p99": round(pct(ttft, 99), 3),
        "headers_to_first_token_ms_p50": round(pct(h2f, 50), 3),
        "headers_to_first_token_ms_p99": round(pct(h2f, 99), 3),
        "inter_event_gap_ms_p50": round(pct(gaps, 50), 3),
        "inter_event_gap_ms_p99": round(pct(gaps, 99), 3),
        "errors": errors,
    }


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each stream")
    ap.add_argument("--interval-ms", type=int, default=50, help="one event every this often")
    ap.add_argument("--ramp", type=float, default=5.0, help="spread the stream starts (s)")
    ap.add_argument("--skip-direct", action="store_true", help="no direct baseline run")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, audit)")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="passed to `aiid run` (e.g. aiid_audit_writer=thread)",
    )
    args = ap.parse_args()
    events = max(1, round(args.seconds * 1000 / args.interval_ms))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.streams + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the children

    work = Path(tempfile.mkdtemp(prefix="aiid-bench-stream-"))
    si = subprocess.Popen(
        [sys.executable, "-c", STANDIN, str(ROOT / "tests"), str(work / "standin")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert si.stdout is not None and si.stdin is not None
    port_s, ca = si.stdout.readline().split()
    si_port = int(port_s)
    gw = None
    results: list[dict[str, object]] = []
    try:
        home = make_home(work, {"bench": {"openai": "sk-bench-not-a-real-key-0123456789"}})
        policies = work / "policies"
        policies.mkdir()
        (policies / "bench.yaml").write_text(POLICY)
        extra = [arg for kv in args.sets for arg in ("--set", kv)]
        gw = start_gateway(home, policies, si_port, Path(ca), extra)
        token = gw.token("bench", "bench-agent", "1h")
        print(
            f"{args.streams} streams x {events} events every {args.interval_ms} ms "
            f"(~{args.seconds:g} s), starts spread over {args.ramp:g} s; "
            f"gateway pid {gw.proc.pid}",
            flush=True,
        )
        direct_ctx = ssl.create_default_context(cafile=ca)
        gw_ctx = ssl.create_default_context(cafile=str(gw.ca))
        if not args.skip_direct:
            t = time.perf_counter()
            direct = asyncio.run(
                run_many(
                    open_direct, si_port, direct_ctx, token, args.streams, events,
                    args.interval_ms, args.ramp,
                )
            )  # fmt: skip
            results.append(summarize("direct", direct))
            print(f"direct run: {time.perf_counter() - t:.1f} s", flush=True)
        cpu0 = cpu_seconds(gw.proc.pid)
        t = time.perf_counter()
        through = asyncio.run(
            run_many(
                open_proxied, gw.port, gw_ctx, token, args.streams, events,
                args.interval_ms, args.ramp,
            )
        )  # fmt: skip
        wall = time.perf_counter() - t
        cpu = cpu_seconds(gw.proc.pid) - cpu0
        summary = summarize("gateway", through)
        status = proc_status(gw.proc.pid)
        summary["gateway_peak_rss"] = status.get("VmHWM")
        summary["gateway_rss_now"] = status.get("VmRSS")
        summary["gateway_cpu_s"] = round(cpu, 1)
        summary["gateway_cpu_share"] = f"{100 * cpu / wall:.0f}% of one core over {wall:.1f} s"
        time.sleep(1.0)  # the last response records
        con = sqlite3.connect(home / "tenants" / "bench" / "audit.db")
        try:
            n_ok = con.execute(
                "SELECT count(*) FROM audit WHERE event = 'response' AND output_tokens = ? "
                "AND detail NOT LIKE '%usage_estimated%'",
                (events,),
            ).fetchone()[0]
        finally:
            con.close()
        summary["audited_with_usage"] = n_ok
        results.append(summary)
    finally:
        if gw is not None:
            gw.stop()
        si.stdin.close()
        try:
            si.wait(20)
        except subprocess.TimeoutExpired:
            si.kill()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    cols = [
        "completed",
        "connect_tls_ms_p50",
        "ttft_ms_p50",
        "ttft_ms_p99",
        "headers_to_first_token_ms_p50",
        "headers_to_first_token_ms_p99",
        "inter_event_gap_ms_p50",
        "inter_event_gap_ms_p99",
    ]
    print()
    print(f"{'':28}" + "".join(f"{r['path']:>14}" for r in results))
    for c in cols:
        print(f"{c:28}" + "".join(f"{r[c]!s:>14}" for r in results))
    if len(results) == 2:
        d, g = results
        for q in ("p50", "p99"):
            added = float(g[f"ttft_ms_{q}"]) - float(d[f"ttft_ms_{q}"])  # type: ignore[arg-type]
            stream_added = float(g[f"headers_to_first_token_ms_{q}"]) - float(  # type: ignore[arg-type]
                d[f"headers_to_first_token_ms_{q}"]  # type: ignore[arg-type]
            )
            print(f"added TTFT {q}: {added:.3f} ms (streaming path alone: {stream_added:.3f} ms)")
    g = results[-1]
    for k in ("gateway_peak_rss", "gateway_rss_now", "gateway_cpu_s", "gateway_cpu_share"):
        print(f"{k}: {g[k]}")
    print(f"response records with the stream's usage: {g['audited_with_usage']}/{args.streams}")
    for r in results:
        if r["errors"]:
            print(f"{r['path']} errors: {r['errors']}")
    if args.json:
        print(json.dumps(results, indent=2))
    failed = any(r["completed"] != args.streams for r in results)
    failed |= g["audited_with_usage"] != args.streams
    print("FAIL" if failed else "OK: every stream completed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
