"""Crash suite: kill -9 `aiid run` at random points under concurrent load, N rounds on one
home. After every round: the chain verifies, SQLite's ``integrity_check`` is ok, and every
request the provider stand-in received has a durable ``request`` record (matched by the
``x-aiid-request-id`` the gateway sends upstream).

N is ``$AIID_CRASH_ROUNDS`` (default 50; ``make crash-soak`` runs 500). Most rounds start the
gateway through a fork server (``tests/gatewayfork.py``: the very ``aiid_proxy.cli.main`` the
``aiid`` script runs, minus ~1 s of imports); every 25th round execs the real ``aiid`` binary.
One round in eight kills the gateway while it starts (before or just after it listens).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from e2e import OPENAI_CANARY, aiid, free_port, make_home
from gatewayfork import ForkServer, GatewayProc, gateway_args, gateway_env
from standin import StandIn

from aiid_proxy.audit import tenant_key, verify_db, verify_rows
from aiid_proxy.home import Home

pytestmark = pytest.mark.e2e

ROUNDS = int(os.environ.get("AIID_CRASH_ROUNDS", "50"))
THREADS = int(os.environ.get("AIID_CRASH_THREADS", "6"))
SEED = int(os.environ.get("AIID_CRASH_SEED", str(random.randrange(1 << 30))))

POLICY = """\
version: 1
tenant: acme
default: deny
rules:
  - id: small
    providers: [openai]
    models: ["gpt-4o-mini*"]
    effect: allow
"""


@dataclass
class Env:
    root: Path
    home: Path
    policies: Path
    si: StandIn
    token: str
    forks: ForkServer
    ca: ssl.SSLContext
    rounds: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("crash")
    si = StandIn(root)
    si.start()
    forks: ForkServer | None = None
    try:
        home = make_home(root, {"acme": {"openai": OPENAI_CANARY}})
        policies = root / "policies"
        policies.mkdir()
        (policies / "acme.yaml").write_text(POLICY)
        token = aiid(home, "token", "issue", "acme", "crash-bot", "--ttl", "6h").stdout.strip()
        forks = ForkServer(max_seconds=max(600, ROUNDS * 10))
        ca = ssl.create_default_context(cafile=str(home / "certs" / "mitmproxy-ca-cert.pem"))
        yield Env(root, home, policies, si, token, forks, ca)
    finally:
        if forks is not None:
            forks.close()
        si.stop()


class Load:
    """THREADS agents using the openai SDK (max_retries=0) through the gateway."""

    def __init__(self, env: Env, port: int) -> None:
        self.env = env
        self.proxy = f"http://127.0.0.1:{port}"
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok_ids: list[str] = []
        self.errors: Counter[str] = Counter()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(THREADS)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)
        assert not any(t.is_alive() for t in self.threads), "a load thread hung"

    def _run(self) -> None:
        http = openai.DefaultHttpxClient(proxy=self.proxy, verify=self.env.ca, timeout=10.0)
        client = openai.OpenAI(
            api_key=self.env.token, max_retries=0, http_client=http, timeout=10.0
        )
        try:
            while not self.stop.is_set():
                try:
                    r = client.chat.completions.with_raw_response.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": "crash test"}],
                        max_tokens=8,
                    )
                    rid = r.headers.get("x-aiid-request-id")
                    with self.lock:
                        self.ok_ids.append(rid)
                except Exception as e:  # the gateway dies under us: expected
                    with self.lock:
                        self.errors[type(e).__name__] += 1
                    self.stop.wait(0.01)
        finally:
            http.close()


def _db_state(home: Path) -> tuple[list[str], set[str], list[dict[str, Any]]]:
    """integrity_check rows, durable request ids, all records; the connection neither
    checkpoints nor removes the WAL, so the next gateway recovers what the crash left."""
    db = home / "tenants" / "acme" / "audit.db"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.setconfig(sqlite3.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, True)
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        durable = {
            r[0] for r in conn.execute("SELECT request_id FROM audit WHERE event = 'request'")
        }
        cols = [d[1] for d in conn.execute("PRAGMA table_info(audit)")]
        rows = [dict(zip(cols, r)) for r in conn.execute("SELECT * FROM audit ORDER BY seq")]
    finally:
        conn.close()
    return integrity, durable, rows


def _unfinished(rows: list[dict[str, Any]]) -> list[int]:
    """seq of every held/request record with no response, error or deny after it."""
    open_: dict[str, int] = {}
    for r in rows:
        if r["event"] in ("held", "request"):
            open_[r["request_id"]] = r["seq"]
        elif r["event"] in ("response", "error", "deny"):
            open_.pop(r["request_id"], None)
    return sorted(open_.values())


def test_kill9_under_load_never_breaks_the_chain_or_loses_a_forwarded_request(env: Env) -> None:
    rng = random.Random(SEED)
    home = Home(env.home)
    key = tenant_key(home.audit_key({}), "acme")
    db = home.audit_path("acme")
    started = time.monotonic()
    client_ok: list[str] = []
    for n in range(1, ROUNDS + 1):
        exec_real = n % 25 == 0
        during_start = not exec_real and n % 8 == 3
        port = free_port()
        log = env.root / f"gw-{n:04d}.log"
        t0 = time.monotonic()
        seen_before = len(env.si.requests)
        args = gateway_args(port, env.policies, env.si.port, env.si.ca_path)
        gw = GatewayProc(args, gateway_env(env.home), log, None if exec_real else env.forks)
        outcome: dict[str, Any] = {"round": n, "exec": exec_real, "during_start": during_start}
        try:
            if during_start:
                time.sleep(rng.uniform(0.0, 0.3))
                outcome["listening"] = "listening on" in gw.output()
            else:
                gw.wait_listening()
                after_hit = n % 2 == 0
                outcome["after_first_upstream"] = after_hit
                with Load(env, port) as load:
                    if after_hit:  # surely mid-traffic: a random point after the first forward
                        deadline = time.monotonic() + 5.0
                        while len(env.si.requests) == seen_before and time.monotonic() < deadline:
                            time.sleep(0.005)
                        time.sleep(rng.uniform(0.0, 0.25))
                    else:  # anywhere from the first CONNECTs on
                        time.sleep(rng.uniform(0.05, 0.45))
                    gw.kill9()
                outcome["ok"] = len(load.ok_ids)
                outcome["errors"] = dict(load.errors)
                client_ok += load.ok_ids
        finally:
            gw.kill9()
        out = gw.output()
        assert "Traceback" not in out and "aiid: error" not in out, out[-3000:]
        # -- the checks, on what the crash left (hot WAL included) --------------------------
        integrity, durable, rows = _db_state(env.home)
        assert integrity == ["ok"], (n, integrity)
        res = verify_rows(rows, key)
        assert res.ok, f"round {n}: chain broken: {res.reason}"
        if n % 5 == 0 or n == ROUNDS:  # the file verifier, with the gateway's checkpoints
            res = verify_db(db, key, home.checkpoint_path("acme"))
            assert res.ok, f"round {n}: {res.reason}"
        upstream = [r.header("x-aiid-request-id") for r in list(env.si.requests)]
        assert None not in upstream, "a request reached the provider without its request id"
        missing = [u for u in upstream if u not in durable]
        assert not missing, f"round {n}: forwarded without a durable request record: {missing}"
        outcome.update(
            upstream=len(upstream) - seen_before,
            records=len(rows),
            seconds=round(time.monotonic() - t0, 3),
        )
        env.rounds.append(outcome)

    # Every answer an agent got came from the provider through a recorded request.
    assert set(client_ok) <= set(upstream)
    # A clean start after the last kill: every request an earlier run left without an end
    # (the kills' in-flight requests) gets its error record, in the chain.
    log = env.root / "gw-final.log"
    gw = GatewayProc(
        gateway_args(free_port(), env.policies, env.si.port, env.si.ca_path),
        gateway_env(env.home),
        log,
        env.forks,
    )
    try:
        gw.wait_listening()
        for _ in range(1000):  # bounded: the start check runs beside the proxy
            if "verified" in gw.output() and not _unfinished(_db_state(env.home)[2]):
                break
            time.sleep(0.02)
    finally:
        gw.stop()
    _, _, rows = _db_state(env.home)
    assert _unfinished(rows) == [], gw.output()[-2000:]
    assert any(r["event"] == "error" and "no record of how" in (r["reason"] or "") for r in rows)
    p = aiid(env.home, "audit", "verify", "acme")
    assert p.stdout.startswith(f"OK {len(rows)} records"), p.stdout
    load_rounds = [r for r in env.rounds if not r["during_start"]]
    busy = [r for r in load_rounds if r["upstream"] > 0]
    assert len(busy) >= len(load_rounds) // 3, f"the load rarely reached the provider: {env.rounds}"
    assert len(upstream) >= ROUNDS, "too little traffic to mean anything"
    summary = {
        "seed": SEED,
        "rounds": ROUNDS,
        "exec_rounds": sum(r["exec"] for r in env.rounds),
        "killed_during_start": sum(r["during_start"] for r in env.rounds),
        "killed_under_load": len(load_rounds),
        "agent_ok": len(client_ok),
        "agent_errors": dict(sum((Counter(r.get("errors", {})) for r in env.rounds), Counter())),
        "upstream_requests": len(upstream),
        "audit_records": len(rows),
        "durable_request_records": len(durable),
        "chain_breaks": 0,
        "integrity_failures": 0,
        "lost_forwarded_requests": 0,
        "seconds": round(time.monotonic() - started, 1),
    }
    (env.root / "crash-summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\ncrash summary: {json.dumps(summary)}")
