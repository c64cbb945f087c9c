"""timm pretrained weights from the Hugging Face hub: the local cache first, the network only when reachable."""

from __future__ import annotations

import logging
import socket
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlparse

import timm
from torch import nn

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub answer from its local cache only (as HF_HUB_OFFLINE=1 does)."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens (avoids minutes of retries when offline)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def create_pretrained_model(architecture: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model(architecture, pretrained=True)`, from the local cache when it has the weights."""
    from huggingface_hub import constants

    try:
        with _hub_offline():
            return timm.create_model(architecture, pretrained=True, **kwargs)
    except Exception as cache_miss:  # noqa: BLE001
        if constants.HF_HUB_OFFLINE:
            raise
        log.info("%s: not in the local Hugging Face cache (%s); downloading", architecture, type(cache_miss).__name__)
    if not hub_reachable():
        raise ConnectionError(
            f"the weights are not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and {constants.ENDPOINT} cannot be reached"
        )
    return timm.create_model(architecture, pretrained=True, **kwargs)
