"""Submitting work to a batch queue, with queue failures turned into HTTP errors."""

from __future__ import annotations

import logging
from typing import Any

from service.batching import BatchedResult, BatchQueue, QueueClosedError, QueueFullError, RequestTimeoutError
from service.errors import ApiError

log = logging.getLogger(__name__)


async def submit_or_raise(queue: BatchQueue, payload: Any) -> BatchedResult:
    """Submit and wait; 503 when full or closing, 504 on timeout, the item's own ApiError, else 500."""
    try:
        return await queue.submit(payload)
    except QueueFullError as exc:
        raise ApiError(503, "queue_full", str(exc), {"Retry-After": "1"}) from None
    except QueueClosedError as exc:
        raise ApiError(503, "shutting_down", str(exc), {"Retry-After": "5"}) from None
    except RequestTimeoutError as exc:
        raise ApiError(504, "timeout", str(exc)) from None
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - one item's failure, reported to its own client only
        log.exception("model %r: computing a request failed", queue.name)
        raise ApiError(500, "inference_failed", f"computing this request failed: {type(exc).__name__}: {exc}") from None
