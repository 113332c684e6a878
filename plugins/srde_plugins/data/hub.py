"""Whether a hub look-up can reach the hub, decided once before the libraries' own retries.

Without a network, ``huggingface_hub`` retries a failed request five times over about half a
minute, logging each retry. A tokenizer or dataset named by its hub id is therefore looked up in
the local HF cache only when ``HF_HUB_OFFLINE`` is set or the hub's host does not take a
connection within a few seconds (tried once per process; skipped behind a proxy, which only the
libraries know how to use), and a miss is one line at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")
PROBE_TIMEOUT_S = 3.0


def offline_reason() -> str | None:
    """Why the hub cannot be used now (``None`` when it may be)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    return _unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=None)
def _unreachable(endpoint: str) -> str | None:
    parsed = urlparse(endpoint)
    host = parsed.hostname or endpoint
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{host} cannot be reached: {err.strerror or type(err).__name__}"
    return None


@contextlib.contextmanager
def datasets_offline() -> Iterator[None]:
    """``datasets`` in offline mode for the block (it reads the setting once, at import)."""
    from datasets import config

    before = config.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE = before
