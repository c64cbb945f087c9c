"""uvicorn's server with a drain a load balancer can rely on.

On the first SIGTERM (or Ctrl-C) the server does not stop listening at once, which would refuse every connection
opened while the load balancer still routes here: it starts draining instead. Readiness fails at once (`/readyz` and
`/v2/health/ready` answer 503), and for `drain_s` seconds every new request, on a kept-alive connection or a new one,
gets 503 `shutting_down` with `Retry-After` and `Connection: close` (probes and `/metrics` still answer), while the
requests already accepted finish. Then uvicorn's own graceful shutdown runs: it stops listening, waits up to
`timeout_graceful_shutdown` for the requests in flight, the lifespan drains the batch queues, and the process exits
with status 0. A second signal during the drain skips the rest of it (a second Ctrl-C during the shutdown forces it).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Callable

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` whose first exit signal starts a drain of `drain_s` seconds (`start_draining()` is called)
    before the usual graceful shutdown."""

    def __init__(self, config: uvicorn.Config, start_draining: Callable[[], bool], drain_s: float) -> None:
        super().__init__(config)
        self._start_draining = start_draining
        self.drain_s = drain_s
        self._drain_timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn re-raises the signals it caught once it has shut down, so that the process dies of them (status
        # -15 for SIGTERM); a drained shutdown is a clean exit, status 0: nothing is recorded.
        if self.should_exit:
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        if self._drain_timer is not None:  # a second signal during the drain: shut down now
            self._drain_timer.cancel()
            self.should_exit = True
            return
        if self.drain_s <= 0 or not self._start_draining():  # no drain asked for, or not started yet
            self.should_exit = True
            return
        log.info("signal %s: draining for %g s (readiness fails, new requests get 503 shutting_down), then "
                 "shutting down", signal.Signals(sig).name, self.drain_s)
        self._drain_timer = threading.Timer(self.drain_s, self._drained)
        self._drain_timer.daemon = True
        self._drain_timer.start()

    def _drained(self) -> None:
        log.info("drain over: finishing the requests in flight and shutting down")
        self.should_exit = True
