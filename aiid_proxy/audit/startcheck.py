"""The whole-chain check a gateway runs at start, one child process per tenant log.

``aiid run`` only checks a log's head when it opens it; a record altered while the gateway
was down would stay unnoticed until someone runs ``aiid audit verify``. This child verifies
the whole chain (as ``aiid audit verify`` does, checkpoints included) beside the proxy, without
sharing its GIL, and prints one JSON line. The tenant key comes on stdin, never in argv or the
environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiid_proxy.audit.verify import verify_db
from aiid_proxy.errors import AiidError
from aiid_proxy.home import child_env

TIMEOUT = 3600.0  # seconds; a long log verifies at ~300,000 records/s


def check_chain(path: Path, key: bytes, checkpoint: Path | None) -> dict[str, Any]:
    """Run the check in a child process: ``{"ok", "count", "seq", "reason"}``."""
    env = child_env(package=True)
    req = {"path": str(path), "key": key.hex(), "checkpoint": str(checkpoint or "")}
    try:
        done = subprocess.run(
            [sys.executable, "-P", "-m", "aiid_proxy.audit.startcheck"],
            input=json.dumps(req) + "\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=TIMEOUT,
        )
        out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return out
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        return {"ok": None, "count": 0, "seq": None, "reason": f"check did not run: {e}"}


def main() -> int:
    try:
        req = json.loads(sys.stdin.readline())
        path, key = Path(req["path"]), bytes.fromhex(req["key"])
        ckpt = Path(req["checkpoint"]) if req.get("checkpoint") else None
    except (ValueError, KeyError, TypeError):
        print(json.dumps({"ok": False, "count": 0, "seq": None, "reason": "bad request"}))
        return 2
    try:
        r = verify_db(path, key, checkpoint_path=ckpt)
        out = {"ok": r.ok, "count": r.count, "seq": r.first_bad_seq, "reason": r.reason}
    except AiidError as e:
        out = {"ok": False, "count": 0, "seq": None, "reason": e.one_line()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
