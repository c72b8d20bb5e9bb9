"""Whether this machine can reach the internet, decided once per process with one short attempt.

Without a network, Hugging Face's hub client retries each file for tens of seconds before open_clip reports it
missing. :func:`settle_offline_mode` probes once (a TCP connection to the hub with a 3 s limit) and, when that fails,
switches the hub libraries to their offline mode (``HF_HUB_OFFLINE``), so that a missing file is reported at once.
``HF_HUB_OFFLINE=1`` or ``ANOMALYCLIP_OFFLINE=1`` set by the user mean offline without a probe.
"""

from __future__ import annotations

import functools
import os
import socket
import sys

__all__ = ["OFFLINE_ENV_VAR", "network_available", "settle_offline_mode"]

OFFLINE_ENV_VAR = "ANOMALYCLIP_OFFLINE"
PROBE_HOST = ("huggingface.co", 443)
PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


@functools.cache
def network_available() -> bool:
    """Whether the hub answers a TCP connection within :data:`PROBE_TIMEOUT_S` (asked once per process)."""
    if any(os.environ.get(name, "").strip().lower() in _TRUE for name in (OFFLINE_ENV_VAR, "HF_HUB_OFFLINE")):
        return False
    try:
        with socket.create_connection(PROBE_HOST, timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def settle_offline_mode() -> bool:
    """Probe once; when offline, set the hub libraries' offline switches. Returns whether the network is there."""
    online = network_available()
    if not online:
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:  # read at import: change the imported value too
            constants.HF_HUB_OFFLINE = True
    return online
