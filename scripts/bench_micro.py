"""In-process microbenchmarks of the gateway's hot paths.

    .venv/bin/python scripts/bench_micro.py [--quick] [--json OUT]

- token verification (``TokenVerifier.verify``): signature checked every time (no cache) and
  with the verified-token cache hit;                                   target <= 150 µs
- policy decision on a 200-rule policy (``scripts/bench_policy.py``'s generator): p50/p99;
                                                                       target p99 <= 50 µs
- vault decrypt (``Vault.get``): p50/p99;
- audit: durable group-committed appends with 16 writer threads, and ``verify_db`` records/s
  (``scripts/bench_audit.py``);                       targets >= 10,000/s and >= 300,000/s
- the floor under one request's latency: a bare SQLite WAL commit (synchronous=FULL) on this
  disk, and one ``request`` record awaited from an event loop through the writer thread and
  through the writer process (``aiid run``'s default);
- the checks a whole (non-streamed) response body takes on its way back (``Scrubber.scrub``,
  ``redact_escaped``, ``escaped_anywhere``): a 2 KB English completion, the same length in
  Chinese as Python's json.dumps escapes it, and 1 MiB of escaped Chinese;
- the mitmproxy addons' own CPU time per allowed request: each pipeline hook of
  ``addons/pipeline.py`` driven directly on one request after another (no network, no
  mitmproxy core), measured with the thread's CPU clock.

A benchmark, not a test: prints a table, optionally writes JSON, exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# appended, not prepended: PYTHONPATH=<another tree> benchmarks that tree's code (A/B runs)
sys.path.append(str(ROOT))
sys.path.append(str(ROOT / "scripts"))

TENANT = "bench"
AGENT = "bench-agent"
SECRET = "sk-bench-upstream-0123456789abcdef"


def pct(sorted_ns: list[int], p: float) -> float:
    """Percentile of nanosecond samples, in µs."""
    k = min(len(sorted_ns) - 1, max(0, round(p / 100 * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[k] / 1000


def timed(fn: Callable[[], object], n: int) -> list[int]:
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    out.sort()
    return out


def stats(ns: list[int]) -> dict[str, float]:
    return {
        "n": len(ns),
        "mean_us": statistics.fmean(ns) / 1000,
        "p50_us": pct(ns, 50),
        "p99_us": pct(ns, 99),
        "p999_us": pct(ns, 99.9),
    }


class Bench:
    def __init__(self, root: Path, quick: bool) -> None:
        from aiid_proxy.admin import add_tenant, init_home, issue_token
        from aiid_proxy.home import Home
        from aiid_proxy.vault import ReloadingKeyring, Vault

        self.quick = quick
        self.root = root
        self.home = Home(root / "home")
        init_home(self.home)
        add_tenant(self.home, TENANT)
        with Vault(self.home.vault_path(TENANT), TENANT, ReloadingKeyring(self.home, {})) as v:
            v.put("openai", SECRET)
        self.token = issue_token(self.home, TENANT, AGENT, 3600)
        self.results: dict[str, Any] = {}

    # ------------------------------------------------------------------ token
    def token_verify(self) -> None:
        from aiid_proxy.identity import RevocationList, TokenVerifier

        n = 2000 if self.quick else 20000
        revs = RevocationList(self.home)
        pem = self.home.verify_key_pem()
        cold = TokenVerifier(pem, revs, tenants=self.home.tenants, cache_size=0)
        warm = TokenVerifier(pem, revs, tenants=self.home.tenants)
        tok = self.token
        for v in (cold, warm):
            for _ in range(200):
                v.verify(tok)
        self.results["token_verify_nocache"] = stats(timed(lambda: cold.verify(tok), n))
        self.results["token_verify_cached"] = stats(timed(lambda: warm.verify(tok), n * 5))

    # ------------------------------------------------------------------ policy
    def policy(self) -> None:
        import bench_policy

        n = 10000 if self.quick else 50000
        pol = bench_policy.build_policy(200)
        warm = bench_policy.contexts(n, cold=False)
        bench_policy.run(pol, warm[:2000])
        s = sorted(bench_policy.run(pol, warm))
        self.results["policy_warm"] = stats(s)
        cold = bench_policy.contexts(n, cold=True, seed=2)
        s = sorted(bench_policy.run(bench_policy.build_policy(200), cold))
        self.results["policy_cold"] = stats(s)

    # ------------------------------------------------------------------ vault
    def vault(self) -> None:
        from aiid_proxy.gateway.core import VAULT_CACHE_S
        from aiid_proxy.vault import ReloadingKeyring, Vault

        n = 5000 if self.quick else 50000
        with Vault(self.home.vault_path(TENANT), TENANT, ReloadingKeyring(self.home, {})) as v:
            for _ in range(200):
                v.get("openai")
            self.results["vault_get"] = stats(timed(lambda: v.get("openai"), n))
        # as the gateway opens it: the encrypted entry re-read from disk at most once a second
        path = self.home.vault_path(TENANT)
        ring = ReloadingKeyring(self.home, {})
        with Vault(path, TENANT, ring, cache_for=VAULT_CACHE_S) as v:
            for _ in range(200):
                v.get("openai")
            self.results["vault_get_gateway"] = stats(timed(lambda: v.get("openai"), n))

    # ------------------------------------------------------------------ audit
    def audit(self) -> None:
        import bench_audit

        with contextlib.redirect_stdout(sys.stderr):
            d = self.root / "audit"
            d.mkdir()
            seconds = 2.0 if self.quick else 5.0
            n, secs = bench_audit.bench_append(d, 16, seconds)
            pn, psecs = bench_audit.bench_append(d, 16, seconds, "process")
            records = 100_000 if self.quick else 300_000
            v, vsecs = bench_audit.bench_verify(d, records)
        self.results["audit_append"] = {"records_per_s": n / secs, "threads": 16}
        self.results["audit_append_process"] = {"records_per_s": pn / psecs, "threads": 16}
        self.results["audit_verify"] = {"records_per_s": v / vsecs, "records": v}
        self.commit_floor()

    def commit_floor(self) -> None:
        """What one request's wait for its ``request`` record costs at one connection: a
        bare SQLite WAL commit with synchronous=FULL on this disk, and the AuditLog round
        trip as the gateway awaits it, through the writer thread and the writer process."""
        import sqlite3

        from aiid_proxy.audit.log import AuditLog

        n = 300 if self.quick else 1000
        d = self.root / "floor"
        d.mkdir()
        conn = sqlite3.connect(d / "raw.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, v TEXT)")
        row = "x" * 300

        def raw() -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (row,))
            conn.execute("COMMIT")

        for _ in range(50):
            raw()
        self.results["sqlite_commit"] = stats(timed(raw, n))
        conn.close()
        from addons.runtime import settled
        from aiid_proxy.audit.service import AuditAppender, AuditWriterProcess

        async def awaited(log: AuditAppender, proc: AuditWriterProcess | None) -> list[int]:
            if proc is not None:
                proc.attach(asyncio.get_running_loop())  # as `aiid run` does
            out = []
            clock = time.perf_counter_ns
            for i in range(n + 50):
                t0 = clock()
                await settled(
                    log.append("request", agent=AGENT, provider="openai", model="gpt-4o-mini")
                )
                if i >= 50:
                    out.append(clock() - t0)
            return sorted(out)

        key = os.urandom(32)
        log = AuditLog(d / "audit.db", TENANT, key)
        try:
            self.results["audit_round_trip"] = stats(asyncio.run(awaited(log, None)))
        finally:
            log.close()
        proc = AuditWriterProcess()
        try:
            remote = proc.open(d / "audit.db", TENANT, key)
            self.results["audit_round_trip_process"] = stats(asyncio.run(awaited(remote, proc)))
            remote.close()
        finally:
            proc.close()

    # ------------------------------------------------------------------ bodies
    def bodies(self) -> None:
        """The whole-body checks of addons/response.py on a 200 body (no key in it)."""
        from aiid_proxy.scrub import Scrubber, escaped_anywhere, redact_escaped

        def completion(text: str) -> bytes:
            doc = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 500, "total_tokens": 507},
            }
            return json.dumps(doc).encode()  # ensure_ascii: non-ASCII text escaped

        en = completion("The gateway checks every response on its way back. " * 40)
        zh = completion("\u7f51\u5173\u68c0\u67e5\u6bcf\u4e00\u4e2a\u54cd\u5e94\u3002" * 200)
        big = completion("\u4e2d" * 174_000)
        # [AO] strings of a few escapes far apart: the escape pattern re-read them 128 ways
        sparse = (
            b'{"a":[' + b",".join([b'"' + (b"\\u0041" + b"x" * 1000) * 3 + b'"'] * 1000) + b"]}"
        )

        def checks(body: bytes) -> None:
            clean = Scrubber([SECRET]).scrub(body)
            clean, _ = redact_escaped(clean, [SECRET])
            escaped_anywhere(clean, [SECRET])

        n = 200 if self.quick else 2000
        for key, body, count in (
            ("body_checks_en", en, n),
            ("body_checks_zh", zh, n),
            ("body_checks_1mib", big, 5 if self.quick else 20),
            ("body_checks_sparse", sparse, 5 if self.quick else 20),
        ):
            self.results[key] = {
                **stats(timed(lambda b=body: checks(b), count)),
                "bytes": len(body),
            }

    # ------------------------------------------------------------------ pipeline
    def pipeline(self) -> None:
        """CPU time of each addon hook per allowed request, driven directly (no proxy core)."""
        from mitmproxy import http
        from mitmproxy.test import taddons, tflow

        from addons.pipeline import make_addons
        from addons.runtime import Runtime
        from aiid_proxy.gateway import Gateway

        # after the imports above: bench_gateway puts the work tree first on sys.path
        bench_policy_text = importlib.import_module("bench_gateway").bench_policy_text

        policies = self.root / "policies"
        policies.mkdir()
        (policies / f"{TENANT}.yaml").write_text(bench_policy_text())
        gw = Gateway(self.home, policies, env={}, watch=False)
        addons = make_addons(Runtime(gateway=gw))
        body = json.dumps(
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "Say hello in five words."}],
                "max_tokens": 16,
            }
        ).encode()
        upstream_body = json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": "gpt-4o-mini",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Hello from"}}
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
            }
        ).encode()

        def make_flow() -> http.HTTPFlow:
            f = tflow.tflow()
            req = f.request
            req.scheme, req.host, req.port = "https", "api.openai.com", 443
            req.method, req.path, req.authority = "POST", "/v1/chat/completions", ""
            req.headers = http.Headers(
                [
                    (b"Host", b"api.openai.com"),
                    (b"Authorization", b"Bearer " + self.token.encode()),
                    (b"Content-Type", b"application/json"),
                    (b"Accept", b"application/json"),
                    (b"User-Agent", b"OpenAI/Python 1.50.0"),
                    (b"Content-Length", str(len(body)).encode()),
                ]
            )
            req.content = body
            f.client_conn.tls = True
            f.client_conn.sni = "api.openai.com"
            f.server_conn.address = ("api.openai.com", 443)
            f.response = None
            return f

        cpu = time.thread_time_ns
        acc: dict[str, int] = {}
        AFTER = "ResponseFilter accounting, after the response is released"

        class Drive:
            """Run a hook's coroutine, charging only the CPU it uses while running."""

            def __init__(self, coro: Any, key: str) -> None:
                self.coro, self.key = coro, key

            def __await__(self) -> Generator[Any, Any, Any]:
                value: Any = None
                while True:
                    t = cpu()
                    try:
                        y = self.coro.send(value)
                    except StopIteration as s:
                        acc[self.key] = acc.get(self.key, 0) + cpu() - t
                        return s.value
                    acc[self.key] = acc.get(self.key, 0) + cpu() - t
                    value = yield y

        hooks: list[tuple[str, str, Any]] = []
        for a in addons:
            for h in ("requestheaders", "request", "responseheaders", "response"):
                fn = getattr(a, h, None)
                if fn is not None:
                    hooks.append((f"{type(a).__name__}.{h}", h, fn))

        async def one(f: http.HTTPFlow) -> None:
            for key, h, fn in hooks:
                if h == "responseheaders" and f.response is None:
                    if f.error is not None:
                        raise RuntimeError(f"flow refused: {f.error}")
                    f.response = http.Response.make(
                        200, upstream_body, {"content-type": "application/json"}
                    )
                if asyncio.iscoroutinefunction(fn):
                    await Drive(fn(f), key)
                else:
                    t = cpu()
                    fn(f)
                    acc[key] = acc.get(key, 0) + cpu() - t
            # what runs once the response is on its way (addons.response.after_release: its
            # usage, settlement and record), on the loop's next turn
            t = cpu()
            await asyncio.sleep(0)
            acc[AFTER] = acc.get(AFTER, 0) + cpu() - t
            if f.response is None or f.response.status_code != 200:
                raise RuntimeError("flow not allowed through the pipeline")

        # Blocks of requests; other processes on the machine only ever add CPU time (cache
        # and core sharing), so each hook's figure is its lowest block mean, and the total is
        # the lowest block total (the median block total is reported too).
        block, blocks = 100, (10 if self.quick else 40)
        per_block: list[dict[str, int]] = []
        with taddons.context(*addons) as tctx:
            loop = tctx.master.event_loop
            for _ in range(200):  # warm-up
                loop.run_until_complete(one(make_flow()))
            for _ in range(blocks):
                flows = [make_flow() for _ in range(block)]
                acc.clear()
                for f in flows:
                    loop.run_until_complete(one(f))
                per_block.append(dict(acc))
            gw.close()
        keys = sorted(per_block[0], key=lambda k: -per_block[0][k])
        per = {k: min(b.get(k, 0) for b in per_block) / block / 1000 for k in keys}
        totals = sorted(sum(b.values()) / block / 1000 for b in per_block)
        self.results["pipeline_hooks_us"] = dict(sorted(per.items(), key=lambda kv: -kv[1]))
        self.results["pipeline_total_us"] = totals[0]
        self.results["pipeline_total_median_us"] = totals[len(totals) // 2]


TARGETS = {
    "token_verify_nocache": ("p50_us", 150.0, "<="),
    "token_verify_cached": ("p50_us", 150.0, "<="),
    "policy_warm": ("p99_us", 50.0, "<="),
    "policy_cold": ("p99_us", 50.0, "<="),
}


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    out: list[tuple[str, str, str, str]] = []

    def lat(key: str, label: str, target: str = "", ok: bool | None = None) -> None:
        s = r.get(key)
        if not s:
            return
        verdict = "" if ok is None else (" met" if ok else " NOT MET")
        out.append(
            (
                label,
                f"p50 {s['p50_us']:.1f} µs / p99 {s['p99_us']:.1f} µs",
                f"{1e6 / s['mean_us']:,.0f}/s",
                target + verdict,
            )
        )

    if "token_verify_nocache" in r:
        tv = r["token_verify_nocache"]
        lat(
            "token_verify_nocache",
            "token verify, signature (no cache)",
            "<= 150 µs",
            tv["p50_us"] <= 150,
        )
        lat(
            "token_verify_cached",
            "token verify, cache hit",
            "<= 150 µs",
            r["token_verify_cached"]["p50_us"] <= 150,
        )
    if "policy_warm" in r:
        lat(
            "policy_warm",
            "policy decide, 200 rules (warm)",
            "p99 <= 50 µs",
            r["policy_warm"]["p99_us"] <= 50,
        )
        lat(
            "policy_cold",
            "policy decide, 200 rules (unseen models)",
            "p99 <= 50 µs",
            r["policy_cold"]["p99_us"] <= 50,
        )
    lat("vault_get", "vault decrypt (Vault.get), entry read from disk")
    lat("vault_get_gateway", "vault decrypt as the gateway does (entry cached <= 1 s)")
    for key, label in (
        ("audit_append", "audit append, 16 writers, durable (writer thread)"),
        ("audit_append_process", "audit append, 16 writers, durable (writer process)"),
    ):
        if key in r:
            a = r[key]["records_per_s"]
            out.append(
                (label, "", f"{a:,.0f} rec/s", f">= 10,000/s {'met' if a >= 10_000 else 'NOT MET'}")
            )
    if "audit_verify" in r:
        v = r["audit_verify"]["records_per_s"]
        out.append(
            (
                f"audit verify ({r['audit_verify']['records']:,} records)",
                "",
                f"{v:,.0f} rec/s",
                f">= 300,000/s {'met' if v >= 300_000 else 'NOT MET'}",
            )
        )
    for key, label in (
        ("body_checks_en", "200 body checks, English completion"),
        ("body_checks_zh", "200 body checks, Chinese completion, escaped"),
        ("body_checks_1mib", "200 body checks, 1 MiB of escaped Chinese"),
        ("body_checks_sparse", "200 body checks, 1,000 strings of 3 escapes 1 KB apart"),
    ):
        if key in r:
            lat(key, f"{label} ({r[key]['bytes']:,} B)")
    lat("sqlite_commit", "SQLite WAL commit, synchronous=FULL (the disk's floor)")
    lat("audit_round_trip", "request record awaited from the event loop (writer thread)")
    lat("audit_round_trip_process", "request record awaited from the event loop (writer process)")
    if "pipeline_total_us" in r:
        for k, v in r["pipeline_hooks_us"].items():
            out.append((f"addon hook {k}", f"{v:.1f} µs CPU/req (best block)", "", ""))
        out.append(
            (
                "addon hooks, total per request",
                f"{r['pipeline_total_us']:.1f} µs CPU (median block "
                f"{r['pipeline_total_median_us']:.1f})",
                "",
                "",
            )
        )
    return out


def table(r: dict[str, Any]) -> str:
    lines = ["| benchmark | latency | rate | target |", "|---|---:|---:|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows(r)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    ap.add_argument(
        "--only",
        default="token,policy,vault,audit,bodies,pipeline",
        help="comma-separated subset",
    )
    a = ap.parse_args()
    only = set(a.only.split(","))
    with tempfile.TemporaryDirectory(prefix="aiid-micro-", dir=os.environ.get("TMPDIR")) as tmp:
        b = Bench(Path(tmp), a.quick)
        for name, fn in (
            ("token", b.token_verify),
            ("policy", b.policy),
            ("vault", b.vault),
            ("audit", b.audit),
            ("bodies", b.bodies),
            ("pipeline", b.pipeline),
        ):
            if name in only:
                t0 = time.perf_counter()
                fn()
                print(f"  {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    print(table(b.results))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(b.results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
