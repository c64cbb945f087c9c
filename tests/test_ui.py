"""The comparison page and the API docs without a browser: what `/`, `/docs` and `/redoc` serve, that every file
they load is this server's own (no CDN, no other host), the content types, `ui_enabled`, the pages open when API keys
are on, the sample images, and that the page calls nothing but the public API (tests/test_ui_browser.py drives it)."""

from __future__ import annotations

import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.http.app import create_app
from service.http.routes import ui
from tests.helpers import settings_for, tiny_vit_config

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "service" / "http" / "static"
KEY = "k-ui-0123456789abcdef"
URL = re.compile(r"\b(?:https?:)?//[A-Za-z0-9.-]+", re.IGNORECASE)
# XML namespaces name a vocabulary; nothing is fetched from them.
NAMESPACES = {"http://www.w3.org/2000/svg"}


class References(HTMLParser):
    """Every src and href of an HTML page, and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href", "spec-url") and value]
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.scripts.append(data)


def references(html: str) -> References:
    parser = References()
    parser.feed(html)
    return parser


def client(**overrides: Any) -> TestClient:
    # The pages need no loaded model: the lifespan is not entered.
    return TestClient(create_app(settings_for(tiny_vit_config(), **overrides), models={}))


@pytest.fixture(scope="module")
def http() -> TestClient:
    return client()


def external_urls(text: str) -> list[str]:
    return [url for url in URL.findall(text) if not any(ns.startswith(url) for ns in NAMESPACES)]


def test_the_page_is_html_whose_every_file_is_served_here(http: TestClient) -> None:
    page = http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self';" in policy and "connect-src 'self'" in policy
    found = references(page.text)
    assert not found.scripts, "no inline script (the page's policy would refuse it)"
    expected = {"static/ui/app.js": "javascript", "static/ui/style.css": "text/css",
                "static/ui/favicon.svg": "image/svg+xml", "static/ui/samples/chelsea.jpg": "image/jpeg"}
    assert set(expected) <= set(found.urls)
    for url in found.urls:
        absolute = urljoin("http://testserver/", url)
        assert urlsplit(absolute).netloc == "testserver", f"{url} is not on this server"
        response = http.get(absolute)
        assert response.status_code == 200, url
        if url in expected:
            assert expected[url] in response.headers["content-type"], (url, response.headers["content-type"])


def test_no_file_of_the_page_names_another_host(http: TestClient) -> None:
    files = sorted(path for path in (STATIC / "ui").rglob("*") if path.suffix in (".html", ".js", ".css", ".svg"))
    assert {path.name for path in files} >= {"index.html", "app.js", "style.css", "favicon.svg"}
    for path in files:
        served = http.get("/" + path.relative_to(STATIC.parent).as_posix())
        assert served.status_code == 200, path
        assert external_urls(served.text) == [], path


def test_the_page_calls_only_operations_of_the_public_api(http: TestClient) -> None:
    script = (STATIC / "ui" / "app.js").read_text(encoding="utf-8")
    calls = re.findall(r"\bapi\(\s*[`\"']([^`\"']+)", script)
    assert calls, "no API call found in app.js"
    document = http.get("/openapi.json").json()
    for call in calls:
        path = "/" + re.sub(r"\$\{[^}]*\}", "{model_id}", call)
        assert path in document["paths"], f"app.js calls {call}, not an operation of /openapi.json"
    assert {"/v1/models", "/v1/methods", "/v1/models/{model_id}/explain"} == {
        "/" + re.sub(r"\$\{[^}]*\}", "{model_id}", call) for call in calls}
    # Nothing else is fetched but the bundled samples.
    assert re.findall(r"\bfetch\(\s*[`\"']([^`\"'$]+)", script) == ["static/ui/samples/"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_and_redoc_load_their_assets_from_here(http: TestClient, page: str) -> None:
    response = http.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    found = references(response.text)
    assert external_urls(response.text) == [], "no CDN and no other host"
    assets = [url for url in found.urls if url.startswith(ui.DOCS_ASSETS_URL + "/")]
    assert len(assets) >= 2 and all(url.startswith("/") for url in found.urls), found.urls
    types = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
    for url in assets:
        asset = http.get(url)
        assert asset.status_code == 200, url
        assert types[Path(url).suffix] in asset.headers["content-type"], url
    # The document they render is this server's own.
    assert "/openapi.json" in response.text


def test_swagger_ui_asks_no_validator_elsewhere(http: TestClient) -> None:
    assert '"validatorUrl": null' in http.get("/docs").text
    assert http.get("/docs/oauth2-redirect").status_code == 200


def test_the_pages_are_not_in_the_openapi_document(http: TestClient) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert not {"/", "/docs", "/redoc", "/docs/oauth2-redirect"} & set(paths)


def test_ui_enabled_false_answers_404_at_the_root_and_keeps_the_docs() -> None:
    off = client(ui_enabled=False)
    for path in ("/", "/static/ui/app.js", "/static/ui/samples/chelsea.jpg"):
        response = off.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert off.get("/docs").status_code == 200
    assert off.get(ui.DOCS_ASSETS_URL + "/swagger-ui-bundle.js").status_code == 200


def test_with_api_keys_the_pages_and_their_files_need_none_and_the_api_does() -> None:
    with client(api_keys=[KEY]) as keyed:  # the lifespan runs (no model): /v1/models answers
        for path in ("/", "/static/ui/app.js", "/static/ui/samples/coffee.jpg", "/docs", "/redoc",
                     ui.DOCS_ASSETS_URL + "/swagger-ui-bundle.js", ui.DOCS_ASSETS_URL + "/redoc.standalone.js"):
            assert keyed.get(path).status_code == 200, path
        assert keyed.get("/v1/models").json()["error"]["code"] == "missing_api_key"
        assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_a_missing_static_file_is_a_404_in_the_envelope(http: TestClient) -> None:
    for path in ("/static/ui/nothing.js", "/static/ui/../routes/ui.py", ui.DOCS_ASSETS_URL + "/nothing.js"):
        response = http.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_the_samples_are_small_photos_with_their_licence() -> None:
    samples = sorted((STATIC / "ui" / "samples").glob("*.jpg"))
    assert [path.stem for path in samples] == ["astronaut", "chelsea", "coffee", "rocket"]
    notes = (STATIC / "ui" / "samples" / "README.md").read_text(encoding="utf-8")
    for path in samples:
        with Image.open(path) as image:
            assert image.format == "JPEG" and min(image.size) == 224, path
        assert path.stat().st_size < 40_000, path
        assert f"`{path.name}`" in notes
    assert "CC0" in notes and "public domain" in notes


def test_every_file_of_the_pages_is_package_data() -> None:
    """An installed wheel has the page: pyproject's package-data globs (relative to `service/`) match every file."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    covered = {path for pattern in patterns for path in (ROOT / "service").glob(pattern) if path.is_file()}
    files = {path for path in STATIC.rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    assert files and files <= covered, sorted(str(p.relative_to(ROOT)) for p in files - covered)
