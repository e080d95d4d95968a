"""aiid-proxy: the identity and access gateway between AI agents and LLM providers.

This package is the pure library: it never imports mitmproxy. The mitmproxy addons in
``addons/`` translate flows into calls of this library.
"""

from __future__ import annotations

__version__ = "0.1.0"
