"""Benchmark the audit log: durable group-committed appends, and streaming verification.

    .venv/bin/python scripts/bench_audit.py [--seconds 3] [--threads 16] [--records 200000]

(1) N threads call ``append_sync`` (the gateway's pattern: each request waits for its record
    to be durable) for a few seconds: durable records/s.             target >= 10,000/s
(2) ``verify_db`` over a database of 200k+ records: records/s.       target >= 300,000/s
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiid_proxy.audit import AuditLog, tenant_key, verify_db
from aiid_proxy.audit.service import AuditAppender, AuditWriterProcess

ROOT_KEY = os.urandom(32)
TENANT = "bench"
APPEND_TARGET = 10_000
VERIFY_TARGET = 300_000


def _fields(i: int) -> dict[str, object]:
    """A realistic mix: request / response / deny records with varied values."""
    kind = i % 3
    base: dict[str, object] = {
        "request_id": f"req_{i:012x}",
        "agent": f"support-{i % 7}",
        "provider": "openai" if i % 2 else "anthropic",
        "model": "gpt-4o-mini" if i % 2 else "claude-3-5-sonnet",
        "rule": "support-small-models",
    }
    if kind == 1:
        base.update(
            status=200,
            input_tokens=100 + i % 900,
            output_tokens=10 + i % 500,
            latency_ms=(i % 5000) * 1.0371 + 0.123456,
        )
    elif kind == 2:
        base.update(status=403, reason="model not allowed for this agent", detail={"n": i})
    return base


def _event(i: int) -> str:
    # Kinds whose records are fsync'd before append resolves (`response` records are not:
    # see aiid_proxy.audit.record.LAZY_EVENTS), so every record counted here is durable.
    return ("request", "deny", "error")[i % 3]


def bench_append(
    directory: Path, threads: int, seconds: float, writer: str = "thread"
) -> tuple[int, float]:
    """Durable appends by ``threads`` threads for ``seconds``, through the in-process writer
    thread or the writer process (``aiid run``'s default)."""
    proc = AuditWriterProcess() if writer == "process" else None
    db, ckpt = directory / f"append-{writer}.db", directory / f"ck-{writer}"
    log: AuditAppender = (
        proc.open(db, TENANT, ROOT_KEY, checkpoint_path=ckpt)
        if proc is not None
        else AuditLog(db, TENANT, ROOT_KEY, checkpoint_path=ckpt)
    )
    start = threading.Barrier(threads + 1)
    stop = threading.Event()
    counts = [0] * threads
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def worker(t: int) -> None:
        start.wait()
        i = t
        while not stop.is_set():
            t0 = time.perf_counter()
            log.append_sync(_event(i), **_fields(i))
            latencies[t].append(time.perf_counter() - t0)
            counts[t] += 1
            i += threads

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    stop.wait(seconds)  # the benchmark's own timer, not a test waiting on a condition
    stop.set()
    for th in pool:
        th.join()
    elapsed = time.perf_counter() - t0
    log.close()
    if proc is not None:
        proc.close()
    all_lat = sorted(x for lst in latencies for x in lst)
    p50 = statistics.median(all_lat) * 1e3
    p99 = all_lat[int(len(all_lat) * 0.99)] * 1e3
    total = sum(counts)
    batches = log.committed_batches if isinstance(log, AuditLog) else 0
    print(
        f"  appends ({writer} writer): {total} in {elapsed:.2f}s"
        + (f", {batches} transactions (mean batch {total / batches:.1f})" if batches else "")
        + f", append latency p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    )
    return total, elapsed


def build_db(path: Path, records: int) -> None:
    """Fill a database through the real writer, pipelined so batches are large."""
    with AuditLog(path, TENANT, ROOT_KEY) as log:
        window = []
        for i in range(records):
            window.append(log.append(_event(i), **_fields(i)))
            if len(window) >= 8192:
                for f in window:
                    f.result()
                window.clear()
        for f in window:
            f.result()


def bench_verify(directory: Path, records: int) -> tuple[int, float]:
    path = directory / "verify.db"
    t0 = time.perf_counter()
    build_db(path, records)
    print(f"  built {records} records in {time.perf_counter() - t0:.1f}s")
    key = tenant_key(ROOT_KEY, TENANT)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        result = verify_db(path, key)
        best = min(best, time.perf_counter() - t0)
        if not result.ok or result.count != records:
            raise SystemExit(f"verify failed: {result}")
    return records, best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--records", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-audit-", dir=os.environ.get("TMPDIR")) as tmp:
        directory = Path(tmp)
        print(f"audit bench in {directory} (synchronous=FULL, WAL)")
        rates = {}
        for writer in ("thread", "process"):
            n, secs = bench_append(directory, args.threads, args.seconds, writer)
            rates[writer] = n / secs
        v, vsecs = bench_verify(directory, args.records)
        verify_rate = v / vsecs
    rows = [
        (f"append ({args.threads} threads, {w} writer, durable)", r, APPEND_TARGET)
        for w, r in rates.items()
    ] + [
        (f"verify_db ({args.records} records)", verify_rate, VERIFY_TARGET),
    ]
    print()
    print(f"{'benchmark':<52} {'records/s':>12} {'target':>10}  ok")
    print(f"{'-' * 52} {'-' * 12} {'-' * 10}  --")
    for name, rate, target in rows:
        print(f"{name:<52} {rate:>12,.0f} {target:>10,}  {'yes' if rate >= target else 'NO'}")
    return 0 if all(rate >= target for _, rate, target in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
