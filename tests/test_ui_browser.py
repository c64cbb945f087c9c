"""The comparison page and the API docs in a real browser: Debian's `chromium`, driven by Playwright (never a browser
Playwright downloads), against a live uvicorn server on loopback serving a tiny random ViT and CNN. Every request
the browser makes to anything but the loopback server is blocked and recorded, and none may be made.

The test's screenshots go to pytest's temporary directory (printed); with `SALIENCY_UI_SCREENSHOT=1` the one of the
grid also replaces the README's `docs/images/ui.png` (1280x800, quantised to 256 colours)."""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from service.http.app import create_app, load_models
from tests.helpers import (
    settings_for,
    tiny_cnn_config,
    tiny_vit_config,
    uvicorn_in_thread,
)

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the `test` extra)")
expect = playwright_api.expect

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "service" / "http" / "static" / "ui" / "samples" / "chelsea.jpg"
README_SCREENSHOT = ROOT / "docs" / "images" / "ui.png"
KEY = "k-ui-test-0123456789abcdef"
VIEWPORT = {"width": 1280, "height": 800}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
TIMEOUT_MS = 15_000
# Root in a container: no sandbox; a small /dev/shm there would crash the renderer.
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def chromium_binary() -> str:
    """Debian's chromium (or SALIENCY_CHROMIUM); the test skips, saying why, where there is none."""
    configured = os.environ.get("SALIENCY_CHROMIUM")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip("no chromium binary: install Debian's `chromium` package (.ci/run installs it when apt-get is "
                "available), or point SALIENCY_CHROMIUM at a Chromium or Chrome binary")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_binary()
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def start_server(**overrides: Any) -> Any:
    settings = settings_for(tiny_vit_config(), tiny_cnn_config(), **overrides)
    return uvicorn_in_thread(create_app(settings, models=load_models(settings)))


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with start_server() as url:
        yield url


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ui-screenshots")
    print(f"screenshots in {path}")
    return path


class Offline:
    """A browser context whose requests to anything but loopback are aborted and recorded."""

    def __init__(self, browser: Any) -> None:
        self.blocked: list[str] = []
        self.context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.console_errors: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.console_errors.append(message.text))
        self.page.on("pageerror", lambda error: self.console_errors.append(f"page error: {error}"))

    def _route(self, route: Any) -> None:
        url = route.request.url
        host = urlsplit(url).hostname or ""
        if url.startswith(("data:", "blob:")) or host in LOOPBACK:
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("blockedbyclient")


@pytest.fixture
def offline(browser: Any) -> Iterator[Offline]:
    session = Offline(browser)
    try:
        yield session
    finally:
        session.context.close()
    assert session.blocked == [], f"the page tried to reach other hosts: {session.blocked}"


def open_page(session: Offline, url: str) -> Any:
    page = session.page
    page.goto(url + "/")
    # Locators, not wait_for_function: the page's Content-Security-Policy forbids the eval that one would need.
    expect(page.locator("input[name=model]")).to_have_count(2)
    expect(page.locator("input[name=method][value=saliency]")).to_have_count(1)
    page.wait_for_selector("#image-name:has-text('chelsea.jpg')")  # the default sample
    return page


def choose(page: Any, methods: list[str], evaluate: list[str] = ()) -> None:
    checked = page.locator("input[name=method]:checked")
    while checked.count():
        checked.first.uncheck()
    for name in methods:
        page.check(f"input[name=method][value={name}]")
    for name in evaluate:
        page.check(f"input[name=evaluate][value={name}]")


def run_and_wait(page: Any) -> None:
    page.click("#run")
    page.wait_for_selector("#progress-text:has-text('done in')")


def column(page: Any, model: str, method: str) -> Any:
    return page.locator(f"td.map-cell[data-model={model}][data-method={method}]")


def test_two_methods_on_two_models_show_four_maps_predictions_and_statistics(
    offline: Offline, server: str, artifacts: Path
) -> None:
    page = open_page(offline, server)
    page.set_input_files("#file-input", str(SAMPLE))  # an upload, replacing the default sample
    page.wait_for_selector("#image-name:has-text('chelsea.jpg')")
    choose(page, ["gradcam", "saliency"], evaluate=["deletion"])
    run_and_wait(page)

    images = page.locator("td.map-cell img.map-image")
    assert images.count() == 4
    for index in range(4):
        assert images.nth(index).get_attribute("src").startswith("data:image/png;base64,")
        assert images.nth(index).evaluate("img => img.complete && img.naturalWidth > 0")
    for model in ("tiny_vit", "tiny_cnn"):
        assert page.locator(f"td.predictions[data-model={model}] .prediction-list li").count() == 5
        assert "answered in" in page.locator(f"th.model-head[data-model={model}] .column-status").inner_text()
        for method in ("gradcam", "saliency"):
            cell = column(page, model, method)
            stats = cell.locator(".stats").inner_text()
            for name in ("spread (entropy)", "top-10% mass", "border mass", "peak"):
                assert name in stats
            assert re.search(r"deletion\s*[0-9.e-]+", cell.locator(".evaluation").inner_text())
    assert offline.console_errors == []

    # The value under the cursor comes from the raw map.
    figure = column(page, "tiny_cnn", "gradcam").locator(".map-figure")
    figure.hover(position={"x": 40, "y": 30})
    assert re.fullmatch(r"x \d+, y \d+: (-?[0-9.e+-]+|not seen by the model)",
                        column(page, "tiny_cnn", "gradcam").locator(".readout").inner_text())

    # Each map downloads as PNG and as raw .npy (the map's own size) and JSON.
    cell = column(page, "tiny_vit", "saliency")
    with page.expect_download() as download:
        cell.get_by_role("button", name=".npy").click()
    array = np.load(download.value.path())
    with page.expect_download() as download:
        cell.get_by_role("button", name="PNG").click()
    png = Image.open(download.value.path())
    assert array.dtype == np.float32 and array.shape == (png.height, png.width)
    assert np.isfinite(array).any()
    page.screenshot(path=str(artifacts / "four_maps.png"))


def test_layer_strip_and_non_applicable_methods_and_the_readme_screenshot(
    offline: Offline, server: str, artifacts: Path
) -> None:
    page = open_page(offline, server)
    choose(page, ["gradcam", "attention_layers", "saliency"], evaluate=["deletion"])
    run_and_wait(page)

    assert "n/a" in column(page, "tiny_cnn", "attention_layers").inner_text()
    strip = column(page, "tiny_vit", "attention_layers").locator(".layer-thumb")
    assert strip.count() == 2  # the tiny ViT's two blocks, each with its spread
    assert re.search(r"H [0-9.]+", strip.nth(0).inner_text())
    strip.nth(1).click()
    assert "showing block 1" in column(page, "tiny_vit", "attention_layers").locator(".viewing").inner_text()
    strip.nth(1).click()
    assert page.locator("td.map-cell img.map-image").count() == 5
    page.locator(".topbar").scroll_into_view_if_needed()  # the click on Explain scrolled the page and the controls
    page.locator("#image-panel").scroll_into_view_if_needed()
    attention = column(page, "tiny_vit", "attention_layers")
    attention.locator(".map-figure").hover(position={"x": 150, "y": 60})  # the screenshot shows a value read out
    assert re.fullmatch(r"x \d+, y \d+: [0-9.e-]+", attention.locator(".readout").inner_text())
    shot = page.screenshot()
    (artifacts / "grid.png").write_bytes(shot)
    if os.environ.get("SALIENCY_UI_SCREENSHOT"):
        image = Image.open(io.BytesIO(shot)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        image.save(README_SCREENSHOT, optimize=True)


def test_a_bad_parameter_shows_the_servers_message(offline: Offline, server: str, artifacts: Path) -> None:
    page = open_page(offline, server)
    choose(page, ["rollout", "saliency"])
    page.fill("#param-rollout-discard_ratio", "1.5")  # 0 <= discard_ratio < 1
    run_and_wait(page)

    message = "methods[0].params.discard_ratio: Input should be less than 1"
    assert message in column(page, "tiny_vit", "rollout").inner_text()
    assert "422 invalid_request" in page.locator("th.model-head[data-model=tiny_vit] .column-status").inner_text()
    assert message in page.locator("td.predictions[data-model=tiny_vit]").inner_text()
    field_error = page.locator("#param-rollout-discard_ratio ~ .field-error")
    assert field_error.is_visible() and message in field_error.inner_text()
    assert page.locator("#param-rollout-discard_ratio.invalid").count() == 1
    # The CNN's request (saliency only: rollout does not apply to it) went through.
    assert "n/a" in column(page, "tiny_cnn", "rollout").inner_text()
    assert column(page, "tiny_cnn", "saliency").locator("img.map-image").count() == 1
    page.screenshot(path=str(artifacts / "bad_parameter.png"))


def test_a_503_is_retried_after_retry_after(offline: Offline, server: str) -> None:
    page = open_page(offline, server)
    refusals = []

    def busy_once(route: Any) -> None:
        if refusals:
            route.fallback()
            return
        refusals.append(route.request.url)
        route.fulfill(status=503, headers={"Retry-After": "1", "Content-Type": "application/json"},
                      body='{"error": {"code": "queue_full", "message": "the queue of tiny_cnn is full", '
                           '"request_id": "r1"}}')

    page.route("**/v1/models/tiny_cnn/explain", busy_once)
    choose(page, ["saliency"])
    page.click("#run")
    page.wait_for_selector("th.model-head[data-model=tiny_cnn] .column-status:has-text('Retrying in')")
    page.wait_for_selector("#progress-text:has-text('done in')")
    assert len(refusals) == 1
    assert column(page, "tiny_cnn", "saliency").locator("img.map-image").count() == 1


def test_with_api_keys_the_page_asks_for_one_and_sends_it(browser: Any, artifacts: Path) -> None:
    with start_server(api_keys=[KEY]) as url:
        session = Offline(browser)
        try:
            page = session.page
            page.goto(url + "/")
            page.wait_for_selector("#auth:not([hidden])")
            assert "401 missing_api_key" in page.locator("#auth-message").inner_text()
            page.fill("#api-key", KEY)
            page.click("#auth-form button[type=submit]")
            expect(page.locator("input[name=model]")).to_have_count(2)
            assert page.evaluate("sessionStorage.getItem('saliency-server.api-key')") == KEY
            page.wait_for_selector("#image-name:has-text('chelsea.jpg')")
            choose(page, ["saliency"])
            run_and_wait(page)
            assert page.locator("td.map-cell img.map-image").count() == 2
            assert session.blocked == []
        finally:
            session.context.close()


def test_docs_and_redoc_render_their_operations_offline(offline: Offline, server: str, artifacts: Path) -> None:
    page = offline.page
    page.goto(server + "/docs")
    page.wait_for_selector(".opblock")
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/v1/models/{model_id}/explain" in path.replace("\u200b", "") for path in paths), paths
    assert page.locator(".opblock").count() >= 10
    assert offline.console_errors == []
    page.screenshot(path=str(artifacts / "docs.png"))

    page.goto(server + "/redoc")
    page.wait_for_selector("[data-section-id='operation/explain']")
    assert page.locator("[data-section-id^='operation/']").count() >= 10
    page.screenshot(path=str(artifacts / "redoc.png"))
    # ReDoc's sidebar shows its vendor's logo from a CDN: the page's Content-Security-Policy stops that request before
    # it is made (and ReDoc hides the image); any other error fails.
    assert [e for e in offline.console_errors if "cdn.redoc.ly/redoc/logo-mini.svg" not in e] == []
