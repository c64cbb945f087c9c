"""Pages for a browser: the comparison page (`GET /`, its files under /static/ui/) and the API documentation
(`/docs`, Swagger UI, and `/redoc`), whose JavaScript and CSS are served from this server, not a CDN.

The comparison page is plain HTML, CSS and JavaScript (`service/http/static/ui/`, no build step) that calls the
public API only (`/v1/models`, `/v1/methods`, `/v1/models/{id}/explain`), with the API key, when the server wants one,
sent by the page itself as `Authorization: Bearer`. Swagger UI and ReDoc come from the `fastapi-offline` package,
which ships their bundles (Swagger UI: Apache-2.0, ReDoc: MIT) and refreshes them with its releases.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.config import ServerSettings

UI_DIR = Path(__file__).resolve().parents[1] / "static" / "ui"
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
UI_ASSETS_URL = "/static/ui"
DOCS_ASSETS_URL = "/static/docs"
DOCS_URL = "/docs"
DOCS_OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
REDOC_URL = "/redoc"
# The files /docs and /redoc load from DOCS_ASSETS_URL (fastapi-offline's `static` folder).
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")

# The page loads nothing but this server's own files and talks to nothing else: a browser enforces it.
UI_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
UI_HEADERS = {"Content-Security-Policy": UI_CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
              "Referrer-Policy": "no-referrer"}
# /docs and /redoc: FastAPI's pages start Swagger UI with an inline script, and both UIs inject styles; nothing from
# elsewhere (ReDoc's sidebar would load its vendor's logo from a CDN).
DOCS_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'self'"
)

router = APIRouter()


@router.get("/", include_in_schema=False, name="ui")
async def ui() -> FileResponse:
    """The comparison page."""
    return FileResponse(UI_DIR / "index.html", media_type="text/html; charset=utf-8", headers=UI_HEADERS)


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _docs_router(app: FastAPI) -> APIRouter:
    docs = APIRouter()

    @docs.get(DOCS_URL, include_in_schema=False, name="swagger_ui")
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        page = get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            oauth2_redirect_url=f"{root}{DOCS_OAUTH2_REDIRECT_URL}",
            # validatorUrl None: no badge image from validator.swagger.io (Swagger UI's default for public hosts).
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None},
        )
        page.headers["Content-Security-Policy"] = DOCS_CONTENT_SECURITY_POLICY
        return page

    @docs.get(DOCS_OAUTH2_REDIRECT_URL, include_in_schema=False, name="swagger_ui_redirect")
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @docs.get(REDOC_URL, include_in_schema=False, name="redoc")
    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        page = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = DOCS_CONTENT_SECURITY_POLICY
        return page

    return docs


def install(app: FastAPI, settings: ServerSettings) -> None:
    """/docs and /redoc with their assets; the comparison page and its files when `ui_enabled` (else `/` is 404).
    The app must be created with `docs_url=None, redoc_url=None` (FastAPI's own pages load a CDN)."""
    missing = [name for name in DOCS_ASSETS if not (DOCS_ASSETS_DIR / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline ships no {', '.join(missing)} in {DOCS_ASSETS_DIR}: reinstall it")
    app.include_router(_docs_router(app))
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs_assets")
    if settings.ui_enabled:
        app.include_router(router)
        app.mount(UI_ASSETS_URL, StaticFiles(directory=UI_DIR), name="ui_assets")
