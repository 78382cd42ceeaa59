"""Is the Hugging Face hub reachable? Asked once before a hub load, so that an offline machine
fails in a second with a clear message instead of after a minute of retries."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True
