"""Can the Hugging Face Hub be reached? One quick answer before a load that would otherwise wait.

Without network, ``huggingface_hub`` retries a failed request five times (about a minute)
before the error comes. :func:`hub_offline` answers first, in at most a few seconds: the
callers (``encoders.py``, ``refcoco.py``) then read only the local Hugging Face caches, so a
model or dataset already there still loads, and anything else fails at once with one sentence.

The probe is a TCP connect to the host and port of the endpoint (``HF_ENDPOINT``, read at call
time, else ``huggingface_hub.constants.ENDPOINT``); where ``HTTPS_PROXY`` (``HTTP_PROXY`` for an
``http://`` endpoint) is set and ``NO_PROXY`` does not exempt the endpoint, it connects to the
proxy instead, which is where a request would go first. Its answer is kept for
:data:`PROBE_TTL_S` seconds per address, so a model and its tokenizer probe once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.request
from typing import Iterator, Optional
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
PROBE_TTL_S = 60.0
# huggingface_hub's truthy values of HF_HUB_OFFLINE
_TRUE = {"1", "ON", "YES", "TRUE"}

_probes: dict[tuple[str, int], tuple[float, Optional[str]]] = {}  # (host, port) -> (when, reason)
_lock = threading.Lock()


def offline_setting() -> Optional[str]:
    """``"HF_HUB_OFFLINE is set"`` when the environment forbids the Hub (now, or when
    ``huggingface_hub`` was imported), else None."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return None


def probe_address() -> tuple[str, int, bool]:
    """(host, port, via_proxy): where the first connection of a Hub request goes, the endpoint or its proxy."""
    from huggingface_hub import constants

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(endpoint.scheme or "https") or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass_environment(host, proxies):
        address = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if address.hostname:
            return address.hostname, address.port or (443 if address.scheme == "https" else 80), True
    return host, port, False


def cannot_connect(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """Why a TCP connection to ``host:port`` fails (DNS, refused, timeout), or None when it opens."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:  # socket.gaierror, ConnectionRefusedError, TimeoutError, ...
        return " ".join(str(err).split()) or type(err).__name__


def hub_offline() -> Optional[str]:
    """Why the Hugging Face Hub must not or cannot be used now, or None when it can.

    ``"HF_HUB_OFFLINE is set"``, or ``"cannot connect to HOST:PORT: why"`` when a TCP connect to
    the endpoint (or its proxy, see the module's docstring) fails; a probe's answer is kept for
    ``PROBE_TTL_S`` seconds.
    """
    setting = offline_setting()
    if setting is not None:
        return setting
    host, port, via_proxy = probe_address()
    with _lock:
        cached = _probes.get((host, port))
    if cached is not None and time.monotonic() - cached[0] < PROBE_TTL_S:
        return cached[1]
    error = cannot_connect(host, port)
    reason = None if error is None else f"cannot connect to {'the proxy ' if via_proxy else ''}{host}:{port}: {error}"
    with _lock:
        _probes[(host, port)] = (time.monotonic(), reason)
    return reason


@contextlib.contextmanager
def local_caches_only() -> Iterator[None]:
    """Inside, ``huggingface_hub`` and ``datasets`` behave as under ``HF_HUB_OFFLINE=1``: they read
    their local caches and raise at once instead of retrying.

    For loads that take no ``local_files_only`` argument (``datasets.load_dataset``). Both
    libraries read ``HF_HUB_OFFLINE`` into a module constant at import, so the switch sets those
    constants for the duration (process-wide: other threads' Hub calls are offline meanwhile).
    """
    import datasets.config
    from huggingface_hub import constants

    # datasets before 2.20 reads HF_DATASETS_OFFLINE, later versions HF_HUB_OFFLINE (and keep the other)
    switches = [(constants, "HF_HUB_OFFLINE")] + [
        (datasets.config, name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(datasets.config, name)
    ]
    saved = [getattr(module, name) for module, name in switches]
    for module, name in switches:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(switches, saved):
            setattr(module, name, value)
