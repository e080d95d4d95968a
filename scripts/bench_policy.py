"""Benchmark: decision latency of a 200-rule policy (target p99 < 50 µs).

Builds a 200-rule policy (LLM rules with globs and `when` conditions, host rules, overrides),
then times ``Policy.decide`` over 50k varied request contexts with ``time.perf_counter_ns``.
Runs: "warm" draws agents/models from realistic pools (the candidate caches are hit), "cold"
gives every request a never-seen model (every LLM decision misses the model-level cache); the
"flat" runs repeat both with a policy where no rule names agents (every rule applies to everyone).
A benchmark, not a test: it prints numbers and exits 0.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiid_proxy.policy import Policy, RequestContext, load_policy_text

PROVIDERS = ["openai", "anthropic", "google", "mistral"]
MODELS = [
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4o-mini-2024-07-18",
    "o1-mini",
    "claude-3-5-haiku-latest",
    "claude-sonnet-4-5",
    "gemini-1.5-pro",
    "mistral-large-latest",
]
TEAMS = ["support", "coder", "research", "ops", "sales", "intern", "batch", "eval"]


def build_policy(n_rules: int = 200, flat: bool = False) -> Policy:
    """``flat``: no rule names agents, so every rule applies to every agent (the worst case)."""
    lines = ["version: 1", "tenant: bench", "default: deny", "rules:"]
    rnd = random.Random(7)
    for i in range(n_rules):
        team = TEAMS[i % len(TEAMS)]
        lines.append(f"  - id: r{i}")
        if not flat:
            lines.append(f'    agents: ["{team}-*", "{team}{i % 10}-?"]')
        if i % 10 == 9:  # every tenth rule governs non-LLM egress
            lines.append(f'    hosts: ["api{i}.example.com", "*.svc{i % 7}.example.net"]')
            lines.append("    methods: [GET, POST]")
            lines.append(f'    paths: ["/v{i % 3}/*", "/health"]')
            lines.append("    effect: allow")
            continue
        lines.append(f"    providers: [{PROVIDERS[i % len(PROVIDERS)]}]")
        model = rnd.choice(MODELS)
        lines.append(f'    models: ["{model}*", "{model[:4]}?-{i}*"]')
        lines.append("    when:")
        lines.append(f"      max_tokens: {{max: {512 * (1 + i % 8)}}}")
        if i % 3 == 0:
            lines.append(f"      stream: {'true' if i % 2 else 'false'}")
        if i % 5 == 0:
            tz = "Europe/Berlin" if i % 2 else "UTC"
            lines.append(f'      hours: "{i % 24:02d}:00-{(i + 9) % 24:02d}:30 {tz}"')
        lines.append(f"    effect: {['allow', 'allow', 'approve', 'deny'][i % 4]}")
        lines.append(f'    reason: "rule {i}"')
    lines.append("overrides:")
    for i in range(5):
        lines += [
            f"  - id: INC-{i}",
            f"    agents: [support-{i}]",
            "    models: [gpt-4o]",
            "    effect: allow",
            "    approved_by: alice@example.com",
            "    expires: 2031-01-01T00:00:00Z",
        ]
    return load_policy_text("\n".join(lines) + "\n", "bench.yaml", "bench")


def contexts(n: int, cold: bool, seed: int = 1) -> list[RequestContext]:
    rnd = random.Random(seed)
    now = datetime(2030, 6, 1, tzinfo=UTC).timestamp()
    agents = [f"{t}-{k}" for t in TEAMS for k in range(6)]
    out = []
    for i in range(n):
        agent = rnd.choice(agents)
        t = now + rnd.randrange(0, 7 * 86400)
        if rnd.random() < 0.1:
            host = f"api{rnd.randrange(0, 200)}.example.com"
            path = rnd.choice(["/v0/x", "/v1/items/7", "/health", "/admin"])
            out.append(RequestContext("bench", agent, None, None, host, "GET", path, t))
            continue
        model = rnd.choice(MODELS)
        if cold:
            model = f"{model}-{i}"
        out.append(
            RequestContext(
                "bench",
                agent,
                rnd.choice(PROVIDERS),
                model,
                "api.example.com",
                "POST",
                "/v1/chat/completions",
                t,
                max_tokens=rnd.choice([None, 256, 1024, 4096]),
                stream=rnd.random() < 0.5,
            )
        )
    return out


def run(policy: Policy, ctxs: list[RequestContext]) -> list[int]:
    decide = policy.decide
    clock = time.perf_counter_ns
    samples = []
    for ctx in ctxs:
        t0 = clock()
        decide(ctx)
        samples.append(clock() - t0)
    return samples


def report(name: str, samples: list[int]) -> float:
    s = sorted(samples)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(p / 100 * len(s)))] / 1000

    p99 = pct(99)
    print(
        f"{name:<9} n={len(s):>6}  mean={statistics.fmean(s) / 1000:6.2f}µs  p50={pct(50):6.2f}µs"
        f"  p99={p99:6.2f}µs  p99.9={pct(99.9):7.2f}µs  max={s[-1] / 1000:8.2f}µs"
    )
    return p99


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50_000, help="decisions per run")
    ap.add_argument("--rules", type=int, default=200)
    args = ap.parse_args()
    t0 = time.perf_counter()
    policy = build_policy(args.rules)
    print(
        f"policy: {len(policy.rules)} rules, {len(policy.overrides)} overrides, "
        f"load+compile {(time.perf_counter() - t0) * 1000:.1f} ms"
    )
    warm = contexts(args.n, cold=False)
    run(policy, warm[:2000])  # warm-up: fill caches, settle the interpreter
    p99 = report("warm", run(policy, warm))
    report("cold", run(build_policy(args.rules), contexts(args.n, cold=True, seed=2)))
    flat = build_policy(args.rules, flat=True)
    report("flat-warm", run(flat, contexts(args.n, cold=False, seed=3)))
    report("flat-cold", run(flat, contexts(args.n, cold=True, seed=4)))
    verdict = "OK" if p99 < 50 else "OVER TARGET"
    print(f"warm p99 {p99:.2f}µs vs target 50µs: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
