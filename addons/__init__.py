"""mitmproxy addons for aiid-proxy: thin adapters from flows to the ``aiid_proxy`` library."""
