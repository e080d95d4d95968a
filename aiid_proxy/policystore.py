"""Live policies: load every tenant's file, reload on change, keep the last good one on error."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import AiidError, InvalidName, PolicyError
from aiid_proxy.home import NAME_RE
from aiid_proxy.policy import NON_POLICY_FILES, Policy, load_policy_file

log = logging.getLogger("aiid.policy")


@dataclass(frozen=True)
class PolicyEvent:
    tenant: str
    ok: bool
    at: float
    source_hash: str | None
    error: str | None
    removed: bool = False
    kept: bool = True  # a refused edit: a last good policy stays (else the tenant has none)
    expired: str | None = None  # an override that ran out: "INC-4711 (approved by alice)"

    def describe(self) -> str:
        if NAME_RE.fullmatch(self.tenant) is None:  # a stray "Acme.yaml": no tenant's policy
            if self.removed:
                return f"policy file {self.tenant!r} removed (it named no tenant: ignored)"
            return f"policy file {self.tenant!r} ignored, no tenant has that name: {self.error}"
        if self.expired is not None:
            return f"policy {self.tenant}: override {self.expired} expired; the rules decide again"
        if self.removed:
            return f"policy {self.tenant}: file removed, last good policy stays in force"
        if self.ok:
            return f"policy {self.tenant}: loaded {self.source_hash and self.source_hash[:12]}"
        if not self.kept:
            return (
                f"policy {self.tenant}: refused, no policy in force: every request of this "
                f"tenant is denied: {self.error}"
            )
        return f"policy {self.tenant}: edit refused, last good policy stays: {self.error}"


def _policy_files(directory: Path) -> dict[str, Path]:
    """Each tenant's policy file: ``<tenant>.yaml``, else ``<tenant>.yml`` (with both, the
    ``.yaml`` is the one in force, as ``policy explain`` reads it and ``policy check`` names
    the ``.yml`` as a second policy)."""
    out: dict[str, Path] = {}
    if not directory.is_dir():
        return out
    for p in sorted(directory.iterdir()):
        if (
            p.suffix in (".yaml", ".yml")
            and not p.name.startswith(".")
            and p.name not in NON_POLICY_FILES
            and p.is_file()
            and (p.suffix == ".yaml" or p.stem not in out)
        ):
            out[p.stem] = p
    return out


class PolicyStore:
    """Holds the current good policy per tenant.

    ``get`` is a dict lookup (no I/O). ``refresh`` re-reads files whose (mtime, size, ctime,
    inode) changed; it is driven by watchdog events and by a 1 s poll, so an edit applies
    within 2 s even where file events are unavailable.
    """

    def __init__(
        self,
        directory: Path,
        *,
        clock: Clock = SYSTEM_CLOCK,
        on_event: Callable[[PolicyEvent], None] | None = None,
        lint: Callable[[Policy], tuple[list[str], list[str]]] | None = None,
    ) -> None:
        """``lint``: the errors that refuse a policy that validates and the warnings logged
        when it loads (``policy.lint``: an unknown region, a deny that never matches, a dead
        limit), as ``aiid policy check`` reports them."""
        self.directory = directory
        self._clock = clock
        self._on_event = on_event
        self._lint = lint
        self._policies: dict[str, Policy] = {}
        self._loaded_at: dict[str, float] = {}
        self._stamps: dict[str, tuple[int, int, int, int]] = {}
        self._refused: set[str] = set()  # tenants whose file was refused last
        self._yaml: set[str] = set()  # tenants whose <t>.yaml was read in this run
        self._expired_seen: dict[str, set[tuple[str, str]]] = {}  # (policy hash, override id)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: object | None = None
        self._dir_ok: bool | None = None  # last seen state of the directory, to log changes

    def get(self, tenant: str) -> Policy | None:
        return self._policies.get(tenant)

    def loaded_at(self, tenant: str) -> float | None:
        return self._loaded_at.get(tenant)

    def tenants(self) -> list[str]:
        return sorted(self._policies)

    def refresh(self) -> list[PolicyEvent]:
        """Reload changed files. Returns (and reports) one event per change."""
        events: list[PolicyEvent] = []
        with self._lock:
            files = _policy_files(self.directory)
            dir_ok = self.directory.is_dir()
            if dir_ok != self._dir_ok:
                self._dir_ok = dir_ok
                if not dir_ok:  # a warning: an error at start-up would stop mitmproxy
                    log.warning(
                        "policy directory %s is missing or not a directory: tenants without "
                        "a loaded policy are denied (default deny)",
                        self.directory,
                    )
            for tenant, path in files.items():
                if path.suffix == ".yaml":
                    self._yaml.add(tenant)
                elif tenant in self._yaml:
                    # the .yaml vanished and a stray .yml is left: like any vanished file, the
                    # last good policy stays (an editor's delete-and-rewrite must not swap in
                    # an old file); a restart reads the .yml
                    if tenant in self._stamps:
                        del self._stamps[tenant]
                        events.append(
                            PolicyEvent(tenant, True, self._clock.now(), None, None, removed=True)
                        )
                        log.warning(
                            "policy %s: %s.yaml is gone; %s is not read in its place (the last "
                            "good policy stays until a restart)",
                            tenant,
                            tenant,
                            path.name,
                        )
                    continue
                try:
                    st = path.stat()
                except OSError:
                    continue
                # ctime and inode too: an edit that keeps size and mtime (cp -p, rsync -t,
                # touch -r) still changes the inode's ctime, or the inode itself
                stamp = (st.st_mtime_ns, st.st_size, st.st_ctime_ns, st.st_ino)
                if self._stamps.get(tenant) == stamp:
                    continue
                self._stamps[tenant] = stamp
                ev = self._load(tenant, path)
                if ev is not None:
                    events.append(ev)
            for tenant in list(self._stamps):
                if tenant not in files:
                    del self._stamps[tenant]
                    events.append(
                        PolicyEvent(tenant, True, self._clock.now(), None, None, removed=True)
                    )
            events += self._expired_overrides()
        for ev in events:
            log.info(ev.describe())
            if self._on_event is not None:
                try:
                    self._on_event(ev)
                except Exception:  # one event's failure must not lose the others
                    log.exception("policy %s: the event could not be reported", ev.tenant)
        return events

    def refused(self, tenant: str) -> bool:
        """The tenant's file was refused last: what is in force is an older policy (or none)."""
        return tenant in self._refused

    def _expired_overrides(self) -> list[PolicyEvent]:
        """One event for each override of a policy in force that ran out since the last
        refresh (the poll runs every second): an override's end is on record like its start.
        Overrides already expired when their policy was loaded are not news."""
        now = self._clock.now()
        out: list[PolicyEvent] = []
        for tenant, policy in self._policies.items():
            seen = self._expired_seen.setdefault(tenant, set())
            for o in policy.overrides:
                key = (policy.source_hash, o.id)
                if o.expires <= now and key not in seen:
                    seen.add(key)
                    if self._loaded_at.get(tenant, now) < o.expires:  # in force since loaded
                        who = f" (approved by {o.approved_by})" if o.approved_by else ""
                        out.append(
                            PolicyEvent(tenant, True, now, policy.source_hash, None,
                                        expired=f"{o.id}{who}")
                        )  # fmt: skip
        return out

    def _load(self, tenant: str, path: Path) -> PolicyEvent | None:
        """The event of (re)reading ``path``; None when its content is the policy in force
        already (saved unchanged, touched): nothing to log or audit."""
        now = self._clock.now()
        try:
            if NAME_RE.fullmatch(tenant) is None:
                raise PolicyError("file name is not a valid tenant name", str(path))
            policy = load_policy_file(path)
            problems, warnings = self._lint(policy) if self._lint is not None else ([], [])
            if problems:
                more = f" (and {len(problems) - 1} more: aiid policy check)" if problems[1:] else ""
                raise PolicyError(problems[0] + more)
            for w in warnings:
                log.warning("policy %s: %s", tenant, w)
        except (AiidError, InvalidName, OSError) as e:
            msg = e.one_line() if isinstance(e, AiidError) else f"{path}: {e.strerror}"
            if isinstance(e, PolicyError) and e.others:
                msg += f" (and {len(e.others)} more: aiid policy check)"
            self._refused.add(tenant)
            return PolicyEvent(tenant, False, now, None, msg, kept=tenant in self._policies)
        current = self._policies.get(tenant)
        if (
            current is not None
            and current.source_hash == policy.source_hash
            and tenant not in self._refused
        ):
            return None  # saved unchanged or touched: nothing new to log or audit
        self._refused.discard(tenant)
        self._policies[tenant] = policy
        self._loaded_at[tenant] = now
        return PolicyEvent(tenant, True, now, policy.source_hash, None)

    # -- watching -----------------------------------------------------------
    def start(self) -> None:
        """Start watching the directory (watchdog + 1 s poll fallback)."""
        if self._thread is not None:
            return
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer

            store = self

            class _Handler(FileSystemEventHandler):
                def on_any_event(self, event: object) -> None:
                    store._wake.set()

            observer = Observer()
            observer.schedule(_Handler(), str(self.directory), recursive=False)
            observer.daemon = True
            observer.start()
            self._observer = observer
        except Exception as e:  # inotify limits etc.: the poll below still applies edits
            log.warning("policy file watching unavailable (%s); polling every second", e)
        self._thread = threading.Thread(target=self._run, name="aiid-policy-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            if self._stop.is_set():
                return
            if self._wake.is_set():
                self._wake.clear()
                self._stop.wait(0.1)  # debounce editors that write in several steps
            try:
                self.refresh()
            except Exception:
                log.exception("policy refresh failed; last good policies stay")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        obs = self._observer
        if obs is not None:
            obs.stop()  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
