"""Optional API keys and CORS.

With `api_keys` or `api_keys_file` set, every request but the probes (and `/metrics`, unless `metrics_require_key`)
and the API's own documentation must carry a key, as `Authorization: Bearer KEY` or `X-API-Key: KEY`; otherwise it is
answered 401 (`missing_api_key` or `invalid_api_key`) with `WWW-Authenticate` and the error envelope. Keys are
compared in constant time (SHA-256 digests, so that a key's length does not show either, compared against every
key without stopping at a match). A key is never logged: a caller is known by its fingerprint, the first 8 hex digits
of the key's SHA-256, which goes into the request's access-log line and `saliency_caller_requests_total`.

The keys file is re-read when its contents change (looked at no more than once a second), so a Kubernetes Secret
updated in place takes effect without a restart: the server accepts the keys the file holds now,
plus `api_keys`. A key in it that is too short is skipped (logged by line number); a file that has gone or cannot be
read gives no keys until it is back.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import ServerSettings, api_keys_in
from service.http.errors import REQUEST_ID_HEADER, ApiError
from service.http.middleware import _send_error
from service.http.observation import current_observation

log = logging.getLogger(__name__)

REALM = "saliency-server"
RELOAD_INTERVAL_S = 1.0  # the keys file is checked for changes at most this often
# Open without a key: the probes (a kubelet or load balancer has no key), the API's documentation, and the pages'
# static files and the comparison page (service/http/routes/ui.py), which asks for the key and sends it itself.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/"})
OPEN_PREFIXES = ("/v2/health/", "/static/")
METRICS_PATH = "/metrics"

# CORS: what a browser page on an allowed origin may send and read.
CORS_METHODS = ("GET", "HEAD", "POST", "DELETE")
CORS_ALLOW_HEADERS = ("Authorization", "X-API-Key", "Content-Type", REQUEST_ID_HEADER)
CORS_EXPOSE_HEADERS = (REQUEST_ID_HEADER, "Retry-After", "Location")


def fingerprint(key: str | bytes) -> str:
    """What identifies a key in logs and metrics: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()[:8]


def requires_key(path: str, metrics_require_key: bool) -> bool:
    """Whether a request for `path` must carry a key (when keys are configured)."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return False
    return metrics_require_key if path == METRICS_PATH else True


def keys_configured(settings: ServerSettings) -> bool:
    return bool(settings.api_keys) or settings.api_keys_file is not None


@dataclass(frozen=True)
class _Key:
    digest: bytes  # SHA-256 of the key
    fingerprint: str


def _key(key: str) -> _Key:
    digest = hashlib.sha256(key.encode()).digest()
    return _Key(digest, digest.hex()[:8])


class ApiKeys:
    """The keys accepted now: `keys` (from the settings) and those of `file`, re-read when it changes."""

    def __init__(self, keys: Iterable[str], file: Path | None = None) -> None:
        self._fixed = tuple(_key(k) for k in keys)
        self._file = file
        self._file_keys: tuple[_Key, ...] = ()
        self._contents: bytes | None = None  # what the file held when last read (None: it could not be read)
        self._checked = -math.inf
        if file is not None:  # validated with the settings: it can be read and its keys are usable
            self._contents = file.read_bytes()
            self._file_keys = tuple(_key(k) for k in api_keys_in(self._contents.decode("utf-8"), file))

    @property
    def fingerprints(self) -> list[str]:
        self._refresh()
        return [key.fingerprint for key in self._fixed + self._file_keys]

    def match(self, presented: bytes) -> str | None:
        """The fingerprint of the key presented, None when it is not one of the keys. Every key is compared, in
        constant time, whichever matches."""
        self._refresh()
        digest = hashlib.sha256(presented).digest()
        found = None
        for key in self._fixed + self._file_keys:
            if hmac.compare_digest(digest, key.digest):
                found = key.fingerprint
        return found

    def _read(self) -> bytes | None:
        assert self._file is not None
        try:
            return self._file.read_bytes()
        except OSError:
            return None

    def _refresh(self) -> None:
        """Take the file's keys again when its contents changed since the last look (at most one look per
        RELOAD_INTERVAL_S). The contents are compared, not the modification time, which two quick edits may leave
        unchanged."""
        now = time.monotonic()
        if self._file is None or now - self._checked < RELOAD_INTERVAL_S:
            return
        self._checked = now
        contents = self._read()
        if contents == self._contents:
            return
        self._contents = contents
        if contents is None:
            self._file_keys = ()
            log.error("api_keys_file %s cannot be read: none of its keys is accepted until it can", self._file)
            return
        skipped: list[str] = []
        try:
            keys = api_keys_in(contents.decode("utf-8"), self._file, on_invalid=skipped.append)
        except UnicodeDecodeError:
            self._file_keys = ()
            log.error("api_keys_file %s is not UTF-8 text: none of its keys is accepted until it is", self._file)
            return
        for problem in skipped:
            log.error("%s: that key is not accepted", problem)
        self._file_keys = tuple(_key(k) for k in keys)
        log.info("api_keys_file %s re-read: %d keys (fingerprints %s)", self._file, len(keys),
                 ", ".join(k.fingerprint for k in self._file_keys) or "none")


def api_keys_from(settings: ServerSettings) -> ApiKeys | None:
    """The keys the settings configure; None when they configure none (no authentication)."""
    if not keys_configured(settings):
        return None
    keys = ApiKeys((key.get_secret_value() for key in settings.api_keys), settings.api_keys_file)
    log.info("API keys required (fingerprints %s); open: %s", ", ".join(keys.fingerprints),
             ", ".join(sorted(OPEN_PATHS | {p + "*" for p in OPEN_PREFIXES}
                              | (set() if settings.metrics_require_key else {METRICS_PATH}))))
    return keys


def cors_options(origins: Sequence[str]) -> dict[str, Any]:
    """Starlette CORSMiddleware's arguments for the allowed `origins`. No credentials (cookies): keys go in headers."""
    return {"allow_origins": list(origins), "allow_methods": list(CORS_METHODS),
            "allow_headers": list(CORS_ALLOW_HEADERS), "expose_headers": list(CORS_EXPOSE_HEADERS)}


def _presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key of `Authorization: Bearer KEY` (first) or `X-API-Key: KEY`; None without either."""
    authorization = api_key = None
    for name, value in headers:
        if name == b"authorization":
            authorization = value
        elif name == b"x-api-key":
            api_key = value
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None


def _is_preflight(scope: Scope) -> bool:
    """A CORS preflight (OPTIONS with Origin and Access-Control-Request-Method): browsers send it without the key."""
    if scope.get("method") != "OPTIONS":
        return False
    names = {name for name, _ in scope.get("headers", [])}
    return b"origin" in names and b"access-control-request-method" in names


class ApiKeyMiddleware:
    """Refuses requests without a valid key (401); notes the caller's fingerprint in the request's observation."""

    def __init__(
        self,
        app: ASGIApp,
        keys: ApiKeys,
        metrics_require_key: bool = False,
        routes: Callable[[], Sequence[BaseRoute]] | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.metrics_require_key = metrics_require_key
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if scope["type"] != "http" or _is_preflight(scope) or not requires_key(path, self.metrics_require_key):
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope.get("headers", []))
        if presented is None:
            await self._refuse(scope, send, ApiError(
                401, "missing_api_key", "this endpoint needs an API key: send it as `Authorization: Bearer KEY` or "
                "`X-API-Key: KEY`", {"WWW-Authenticate": f'Bearer realm="{REALM}"'}))
            return
        caller = self.keys.match(presented)
        if caller is None:
            await self._refuse(scope, send, ApiError(
                401, "invalid_api_key", "the API key sent is not valid",
                {"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'}))
            return
        observation = current_observation()
        if observation is not None:
            observation.caller = caller
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, error: ApiError) -> None:
        # The route the request was for, so that the refusal is counted under its endpoint, not `unmatched`.
        for route in _flat_routes(self.routes() if self.routes is not None else ()):
            if route.matches(scope)[0] is Match.FULL:
                scope["route"] = route
                break
        await _send_error(send, error, scope.get("path", ""))


def _flat_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes, those of included routers too: recent FastAPI keeps a router included without a prefix (all of
    this app's) as one entry holding it, older versions copied its routes."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _flat_routes(included.routes)
        else:
            yield route
