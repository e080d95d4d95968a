"""Removing injected secrets from what flows back to the agent, streamed bodies included.

- :mod:`.scrubber`: :class:`Scrubber` (whole secrets in bytes, across chunk boundaries; runs of
  a secret's characters in any case in error bodies) and :class:`TextWatch` (a secret spelled
  over streamed events);
- :mod:`.fragments`: runs of :data:`FRAGMENT` characters of a secret, and public key starts;
- :mod:`.escapes`: secrets behind JSON ``\\u`` escapes.
"""

from __future__ import annotations

from aiid_proxy.scrub.escapes import (
    _ESCAPES,
    _unescape,
    escaped_anywhere,
    escaped_secrets,
    redact_escaped,
    scrub_fragments_in_json,
)
from aiid_proxy.scrub.fragments import (
    FRAGMENT,
    MAX_FRAGMENT_SCAN,
    PUBLIC_PREFIXES,
    REDACTED,
    SCAN_BUDGET,
    Fragments,
    public_prefix,
)
from aiid_proxy.scrub.scrubber import MAX_CHANNELS, MIN_WATCHED, Scrubber, TextWatch

__all__ = [
    "FRAGMENT",
    "MAX_CHANNELS",
    "MAX_FRAGMENT_SCAN",
    "MIN_WATCHED",
    "PUBLIC_PREFIXES",
    "REDACTED",
    "SCAN_BUDGET",
    "_ESCAPES",
    "Fragments",
    "Scrubber",
    "TextWatch",
    "_unescape",
    "escaped_anywhere",
    "escaped_secrets",
    "public_prefix",
    "redact_escaped",
    "scrub_fragments_in_json",
]
