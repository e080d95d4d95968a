"""`make fuzz`: the long fuzzing session (issue 6).

1. hypothesis: tests/test_fuzz.py with many more examples per property (``--examples``);
2. atheris (coverage-guided, libFuzzer) on the same targets, ``--seconds`` each, when atheris
   imports (``make fuzz`` tries ``pip install atheris``; without it this phase is skipped).

Crash inputs land in ``--artifacts`` (default: $TMPDIR/aiid-fuzz). Exit status 1 if any target
found a failure. Every run is bounded: by example count (hypothesis) and by time (atheris).

    python scripts/fuzz.py [--examples 20000] [--seconds 60] [--only NAME ...]
    python scripts/fuzz.py --atheris TARGET [libFuzzer args...]   (one harness, used internally)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- atheris harnesses


def _harnesses() -> dict[str, Callable[[bytes], None]]:
    import atheris

    with atheris.instrument_imports(include=["aiid_proxy"]):
        from aiid_proxy.audit import COLUMNS, verify_rows
        from aiid_proxy.bodies import decode_body
        from aiid_proxy.errors import PolicyError, RequestRefused
        from aiid_proxy.gateway import extract_token, is_ip_literal, path_problem
        from aiid_proxy.policy.loader import load_policy_text
        from aiid_proxy.providers import Registry, SSEUsageTracker, parse_request, parse_usage

    registry = Registry.builtin()
    routes = [r for p in registry.providers for r in p.routes]
    pairs = [(p, r) for p in registry.providers for r in (*p.routes, None)]
    codings = ["gzip", "deflate", "br", "zstd", "identity", "x-gzip", "GZIP", "compress", ""]
    names = ["authorization", "x-api-key", "api-key", "x-goog-api-key", "proxy-authorization"]

    def parse(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        route = routes[fdp.ConsumeIntInRange(0, len(routes) - 1)]
        params = {"model": fdp.ConsumeUnicodeNoSurrogates(20)}
        params["deployment"] = params["model"]
        try:
            facts = parse_request(route, fdp.ConsumeBytes(fdp.remaining_bytes()), params)
        except RequestRefused:
            return
        m = facts.model
        if m is not None and not (m.isascii() and m.isprintable() and " " not in m):
            raise AssertionError(f"model {m!r} passed the checks")

    def decode(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        enc = ", ".join(
            codings[fdp.ConsumeIntInRange(0, len(codings) - 1)]
            for _ in range(fdp.ConsumeIntInRange(0, 3))
        )
        limit = fdp.ConsumeIntInRange(0, 1 << 16)
        try:
            out = decode_body(fdp.ConsumeBytes(fdp.remaining_bytes()), enc or None, limit)
        except RequestRefused:
            return
        if len(out) > limit:
            raise AssertionError("decoded past the limit")

    def token(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        headers = []
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            name = names[fdp.ConsumeIntInRange(0, len(names) - 1)]
            if fdp.ConsumeBool():
                name = name.upper()
            headers.append((name, fdp.ConsumeUnicodeNoSurrogates(40)))
        conn = fdp.ConsumeUnicodeNoSurrogates(10) if fdp.ConsumeBool() else None
        try:
            extract_token(headers, conn)
        except RequestRefused:
            return

    def path(data: bytes) -> None:
        text = data.decode("latin-1")
        path_problem(text)
        is_ip_literal(text)

    def policy(data: bytes) -> None:
        try:
            load_policy_text(data.decode("utf-8", "replace"), "acme.yaml", "acme")
        except PolicyError:
            return

    def audit(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        rows = []
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            row: dict[str, object] = {}
            for col in COLUMNS:
                kind = fdp.ConsumeIntInRange(0, 4)
                if kind == 0:
                    continue
                row[col] = (
                    None,
                    fdp.ConsumeInt(8),
                    fdp.ConsumeUnicodeNoSurrogates(16),
                    fdp.ConsumeBytes(4),
                    fdp.ConsumeRegularFloat(),
                )[kind - 1 if kind < 5 else 0]
            rows.append(row)
        verify_rows(rows, fdp.ConsumeBytes(16))

    def usage(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        provider, route = pairs[fdp.ConsumeIntInRange(0, len(pairs) - 1)]
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
        parse_usage(provider, route, body)
        t = SSEUsageTracker(provider, route)
        for i in range(0, len(body), 7):
            t.feed(body[i : i + 7])
        t.close()
        t.usage()

    return {
        "parse_request": parse,
        "decode_body": decode,
        "extract_token": token,
        "path": path,
        "policy": policy,
        "verify_rows": audit,
        "usage": usage,
    }


ATHERIS_TARGETS = [
    "parse_request",
    "decode_body",
    "extract_token",
    "path",
    "policy",
    "verify_rows",
    "usage",
]


def run_one_harness(target: str, libfuzzer_args: list[str]) -> None:
    import atheris

    fn = _harnesses()[target]
    atheris.Setup([sys.argv[0], *libfuzzer_args], fn)
    atheris.Fuzz()


# --------------------------------------------------------------------------- the session


def hypothesis_phase(examples: int, only: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "AIID_FUZZ_EXAMPLES": str(examples)}
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    args += ["--hypothesis-show-statistics", "-rfE", "--tb=short", "tests/test_fuzz.py"]
    if only:
        args += ["-k", " or ".join(only)]
    try:
        import xdist  # noqa: F401

        args += ["-n", str(min(8, os.cpu_count() or 2))]
    except ImportError:
        pass
    t0 = time.monotonic()
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=6 * 3600)
    took = time.monotonic() - t0
    passing = sum(int(n) for n in re.findall(r"(\d+) passing, \d+ failing", p.stdout))
    failing = sum(int(n) for n in re.findall(r"\d+ passing, (\d+) failing", p.stdout))
    tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-500:]
    ok = p.returncode == 0
    if not ok:
        failures = p.stdout.split("= FAILURES =", 1)[-1].split("= Hypothesis Statistics =")[0]
        print(failures[-20000:], p.stderr[-2000:], sep="\n")
    line = f"hypothesis: {passing} passing, {failing} failing examples in {took:.0f} s ({tail})"
    return ok, line


def atheris_phase(seconds: int, only: list[str], artifacts: Path) -> tuple[bool, list[str]]:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return True, ["atheris: not installed, skipped (pip install atheris)"]
    artifacts.mkdir(parents=True, exist_ok=True)
    ok = True
    lines = []
    for target in ATHERIS_TARGETS:
        if only and not any(o in target for o in only):
            continue
        corpus = artifacts / f"corpus-{target}"
        corpus.mkdir(exist_ok=True)
        args = [sys.executable, __file__, "--atheris", target, str(corpus)]
        args += [f"-max_total_time={seconds}", f"-artifact_prefix={artifacts}/{target}-"]
        args += ["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=4096"]
        t0 = time.monotonic()
        p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
        took = time.monotonic() - t0
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", p.stderr)
        done = re.findall(r"Done (\d+) runs", p.stderr)
        count = runs[-1] if runs else (done[-1] if done else "?")
        status = "ok" if p.returncode == 0 else f"FAILED (exit {p.returncode})"
        if p.returncode != 0:
            ok = False
            print(p.stderr[-4000:])
        lines.append(f"atheris {target}: {count} executions in {took:.0f} s: {status}")
    return ok, lines


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--atheris":
        run_one_harness(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20000, help="hypothesis examples per property")
    ap.add_argument("--seconds", type=int, default=60, help="atheris time per target")
    ap.add_argument("--only", nargs="*", default=[], help="targets whose name contains these")
    ap.add_argument("--no-atheris", action="store_true")
    ap.add_argument("--artifacts", type=Path, default=Path(tempfile.gettempdir()) / "aiid-fuzz")
    a = ap.parse_args()
    ok1, line = hypothesis_phase(a.examples, a.only)
    print(line, flush=True)
    ok2, lines = (True, ["atheris: skipped (--no-atheris)"])
    if not a.no_atheris:
        ok2, lines = atheris_phase(a.seconds, a.only, a.artifacts)
    for line in lines:
        print(line, flush=True)
    print(f"artifacts (crash inputs, corpora): {a.artifacts}")
    return 0 if ok1 and ok2 else 1


if __name__ == "__main__":
    sys.exit(main())
