"""Secrets and credentials kept out of every log line, mitmproxy's own included."""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable
from typing import Any

from aiid_proxy.scrub import Scrubber

log = logging.getLogger("aiid")


# Credentials an agent may send, whatever the gateway makes of them: an agent token (a JWT),
# the value after Bearer/Basic (also on a header line mitmproxy could not parse, which it logs
# verbatim: "Invalid header line: b'Authorization Bearer eyJ...'"), a provider-style key.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")
_SCHEME = re.compile(r"(?i)\b(bearer|basic)(\s+|%20|\+)[A-Za-z0-9._~+/=%-]{8,}")
_KEYLIKE = re.compile(r"\bsk-[A-Za-z0-9_-]{16,}")


def redact_credentials(text: str) -> str:
    """``text`` with every agent-credential-shaped string replaced by ``[REDACTED]``."""
    if "eyJ" in text:
        text = _JWT.sub("[REDACTED]", text)
    if "sk-" in text:
        text = _KEYLIKE.sub("[REDACTED]", text)
    return _SCHEME.sub(lambda m: f"{m.group(1)} [REDACTED]", text)


class LogScrubber:
    """Every log record of this process is scrubbed of every secret the gateway injected, and
    of anything shaped like an agent's credential (:func:`redact_credentials`): mitmproxy logs
    raw upstream bytes ("Unexpected data from server: b'...'") and its errors quote upstream
    status lines and unparsable request lines. Installed (as the log record factory) when the
    gateway loads."""

    def __init__(self) -> None:
        self.secrets: frozenset[str] = frozenset()  # replaced, never mutated: other threads log
        self.scrubber = Scrubber(())
        self._base: Callable[..., logging.LogRecord] | None = None

    def install(self) -> None:
        if self._base is None:
            self._base = logging.getLogRecordFactory()
            logging.setLogRecordFactory(self._record)

    def add(self, secret: str) -> None:
        if secret and secret not in self.secrets:
            # also as a bytes repr quotes a JSON-escaped echo ("\\/" for "/"), and its first 8
            # characters: mitmproxy quotes undecodable upstream bodies cut short ("LookupError
            # when decoding b'sk-CANAR with 'bogus'")
            more = {secret, secret.replace("/", "\\\\/")}
            if len(secret) >= 16:
                more.add(secret[:8])
            secrets = self.secrets | more
            self.scrubber = Scrubber(secrets)  # built once per new secret, not per log line
            self.secrets = secrets
        self.install()

    def scrub(self, text: str) -> str:
        """``text`` without any secret injected so far (or a piece of one, in any letter case),
        or anything credential-shaped."""
        return redact_credentials(self.scrubber.redact_any_case(self.scrubber.scrub_text(text)))

    def _record(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        assert self._base is not None
        rec = self._base(*args, **kwargs)
        try:
            scrubber = self.scrubber
            try:
                msg = rec.getMessage()
            except Exception:
                msg = str(rec.msg)
            clean = redact_credentials(scrubber.redact_any_case(scrubber.scrub_text(msg)))
            if clean != msg:
                rec.msg, rec.args = clean, ()
            if rec.exc_info and rec.exc_info[1] is not None:
                text = "".join(traceback.format_exception(*rec.exc_info)).rstrip("\n")
                tb = redact_credentials(scrubber.redact_any_case(scrubber.scrub_text(text)))
                if tb != text:
                    # into the message, exc_info gone: mitmproxy's formatter formats exc_info
                    # itself (it ignores exc_text), so nothing else would keep it out
                    rec.msg, rec.args = f"{clean}\n{tb}", ()
                    rec.exc_info, rec.exc_text = None, None
        except Exception:  # never break the caller's logging; never log unscrubbed text
            rec.msg, rec.args, rec.exc_info, rec.exc_text = "(log line withheld)", (), None, None
        return rec


LOG_SCRUBBER = LogScrubber()
