"""Optional API keys (`Authorization: Bearer` or `X-API-Key`, 401 in the envelope, open probes, a keys file re-read
when it changes, keys never logged, callers counted by fingerprint) and CORS (off unless origins are configured)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from api_schemas.client import AsyncSaliencyClient, SaliencyClient, SaliencyError
from service.config import ServerSettings
from service.http import auth
from tests.helpers import (
    png_bytes,
    random_image,
    running_app,
    settings_for,
    tiny_vit_config,
)

KEY = "k-alpha-0123456789abcdef"
OTHER_KEY = "k-beta-0123456789abcdefgh"
FILE_KEY = "k-file-0123456789abcdef"
ORIGIN = "https://app.example.com"
PROTECTED = "/v1/models"  # list_models: needs no loaded model


def fp(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def keyed(**overrides: Any) -> ServerSettings:
    return settings_for(tiny_vit_config(), **{"api_keys": [KEY, OTHER_KEY], **overrides})


async def get(settings: ServerSettings, *requests: tuple[str, dict[str, str]], method: str = "GET") -> list[httpx.Response]:
    """Each (path, headers) requested in turn from one app (no model loaded: these routes need none)."""
    async with running_app(settings, models={}) as (client, _):
        return [await client.request(method, path, headers=headers) for path, headers in requests]


def assert_401(response: httpx.Response, code: str, request_id: str | None = None) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith('Bearer realm="saliency-server"')
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    if request_id is not None:
        assert error["request_id"] == request_id


# Without keys --------------------------------------------------------------------------------------------------------

def test_without_keys_everything_is_open_as_before() -> None:
    settings = settings_for(tiny_vit_config())
    assert settings.api_keys == [] and settings.api_keys_file is None
    responses = run(get(settings, (PROTECTED, {}), ("/v1/methods", {}), ("/metrics", {}), ("/healthz", {}),
                        (PROTECTED, {"Authorization": "Bearer whatever-is-sent-is-ignored"})))
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200]
    assert not any("www-authenticate" in r.headers for r in responses)


# Enforcement ---------------------------------------------------------------------------------------------------------

def test_a_request_without_a_key_gets_401_missing_api_key_with_www_authenticate_and_the_envelope() -> None:
    [response] = run(get(keyed(), (PROTECTED, {"X-Request-ID": "no-key-1"})))
    assert_401(response, "missing_api_key", request_id="no-key-1")
    assert response.headers["www-authenticate"] == 'Bearer realm="saliency-server"'
    assert "Authorization: Bearer" in response.json()["error"]["message"]


def test_a_wrong_key_gets_401_invalid_api_key_and_is_not_echoed() -> None:
    wrong = "k-wrong-0123456789abcdef"
    responses = run(get(keyed(), (PROTECTED, {"Authorization": f"Bearer {wrong}"}), (PROTECTED, {"X-API-Key": wrong}),
                        (PROTECTED, {"X-API-Key": KEY[:-1]})))
    for response in responses:
        assert_401(response, "invalid_api_key")
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
        assert wrong not in response.text and KEY[:-1] not in response.text


def test_bearer_and_x_api_key_both_work_with_every_configured_key() -> None:
    responses = run(get(keyed(), (PROTECTED, {"Authorization": f"Bearer {KEY}"}),
                        (PROTECTED, {"Authorization": f"bearer {OTHER_KEY}"}), (PROTECTED, {"X-API-Key": KEY}),
                        ("/v1/methods", {"X-API-Key": OTHER_KEY})))
    assert [r.status_code for r in responses] == [200, 200, 200, 200]


def test_another_authorization_scheme_is_not_a_key() -> None:
    [response] = run(get(keyed(), (PROTECTED, {"Authorization": f"Basic {KEY}"})))
    assert_401(response, "missing_api_key")


def test_a_keyed_prediction_is_served() -> None:
    async def go() -> tuple[int, int]:
        settings = keyed()
        async with running_app(settings) as (client, _):
            files = {"file": ("a.png", png_bytes(random_image(1)), "image/png")}
            refused = await client.post("/v1/models/tiny_vit/predict", files=files)
            served = await client.post("/v1/models/tiny_vit/predict", files=files, headers={"X-API-Key": KEY})
            return refused.status_code, served.status_code

    assert run(go()) == (401, 200)


def test_probes_and_docs_are_open_and_the_v2_protocol_refuses_in_its_own_shape() -> None:
    responses = run(get(keyed(), ("/healthz", {}), ("/readyz", {}), ("/v2/health/live", {}), ("/v2/health/ready", {}),
                        ("/openapi.json", {}), ("/docs", {}), ("/v2", {}), ("/v2/models/tiny_vit", {})))
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 200, 401, 401]
    v2 = responses[-1].json()
    assert set(v2) == {"error"} and isinstance(v2["error"], str)  # the Open Inference Protocol's error shape


def test_metrics_are_open_by_default_and_need_a_key_with_metrics_require_key() -> None:
    [open_metrics] = run(get(keyed(), ("/metrics", {})))
    assert open_metrics.status_code == 200
    closed = run(get(keyed(metrics_require_key=True), ("/metrics", {}), ("/metrics", {"X-API-Key": KEY}),
                     ("/healthz", {})))
    assert_401(closed[0], "missing_api_key")
    assert [r.status_code for r in closed[1:]] == [200, 200]


# Keys file -----------------------------------------------------------------------------------------------------------

def test_keys_are_read_from_the_file_ignoring_comments_and_blank_lines(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# the team's keys\n\n  {FILE_KEY}  \n# {OTHER_KEY}\n", encoding="utf-8")
    settings = settings_for(tiny_vit_config(), api_keys=[KEY], api_keys_file=keys_file)
    responses = run(get(settings, (PROTECTED, {"X-API-Key": FILE_KEY}), (PROTECTED, {"X-API-Key": KEY}),
                        (PROTECTED, {"X-API-Key": OTHER_KEY}), (PROTECTED, {"X-API-Key": "# the team's keys"})))
    assert [r.status_code for r in responses] == [200, 200, 401, 401]


def test_the_keys_file_is_re_read_without_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "RELOAD_INTERVAL_S", 0.0)
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{FILE_KEY}\n", encoding="utf-8")
    settings = settings_for(tiny_vit_config(), api_keys_file=keys_file)

    async def status(client: httpx.AsyncClient, key: str) -> int:
        return (await client.get(PROTECTED, headers={"X-API-Key": key})).status_code

    async def go() -> None:
        async with running_app(settings, models={}) as (client, _):
            assert (await status(client, FILE_KEY), await status(client, OTHER_KEY)) == (200, 401)
            keys_file.write_text(f"{FILE_KEY}\n{OTHER_KEY}\n", encoding="utf-8")  # edited in place: added
            assert (await status(client, FILE_KEY), await status(client, OTHER_KEY)) == (200, 200)
            replacement = tmp_path / "keys.new"  # swapped, as a Kubernetes Secret is: the first removed
            replacement.write_text(f"{OTHER_KEY}\n", encoding="utf-8")
            os.replace(replacement, keys_file)
            assert (await status(client, FILE_KEY), await status(client, OTHER_KEY)) == (401, 200)
            keys_file.write_text(f"short\n{FILE_KEY}\n", encoding="utf-8")  # a bad line skips that key only
            assert (await status(client, FILE_KEY), await status(client, OTHER_KEY)) == (200, 401)
            keys_file.unlink()  # gone: none of its keys
            assert await status(client, FILE_KEY) == 401

    run(go())


def test_the_keys_file_is_looked_at_no_more_than_once_a_second(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{FILE_KEY}\n", encoding="utf-8")
    keys = auth.ApiKeys([], keys_file)
    assert keys.match(FILE_KEY.encode()) == fp(FILE_KEY)
    keys_file.write_text(f"{OTHER_KEY}\n", encoding="utf-8")
    assert keys.match(OTHER_KEY.encode()) is None  # within the second: not looked at again yet
    keys._checked -= auth.RELOAD_INTERVAL_S
    assert keys.match(OTHER_KEY.encode()) == fp(OTHER_KEY)
    assert keys.match(FILE_KEY.encode()) is None


# Start-up validation -------------------------------------------------------------------------------------------------

def test_short_keys_are_refused_at_start_up_without_printing_them() -> None:
    short = "tooShortKey1"
    with pytest.raises(ValidationError) as raised:
        keyed(api_keys=[KEY, short])
    message = str(raised.value)
    assert "api_keys[1]" in message and "at least 16" in message
    assert short not in message


def test_keys_with_whitespace_are_refused() -> None:
    with pytest.raises(ValidationError, match="visible ASCII"):
        keyed(api_keys=["k-0123456789 abcdef"])


def test_a_missing_empty_or_bad_keys_file_fails_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot be read"):
        settings_for(tiny_vit_config(), api_keys_file=tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.write_text("# no key yet\n\n", encoding="utf-8")
    with pytest.raises(ValidationError, match="holds no key"):
        settings_for(tiny_vit_config(), api_keys_file=empty)
    bad = tmp_path / "bad"
    bad.write_text(f"{KEY}\nshort-key\n", encoding="utf-8")
    with pytest.raises(ValidationError, match="line 2: the key is 9 characters long") as raised:
        settings_for(tiny_vit_config(), api_keys_file=bad)
    assert "short-key" not in str(raised.value)


def test_keys_come_from_the_environment_as_a_json_list_and_stay_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALIENCY_API_KEYS", json.dumps([KEY]))
    monkeypatch.setenv("SALIENCY_METRICS_REQUIRE_KEY", "true")
    monkeypatch.setenv("SALIENCY_CORS_ORIGINS", json.dumps([ORIGIN]))
    settings = settings_for(tiny_vit_config())
    assert [key.get_secret_value() for key in settings.api_keys] == [KEY]
    assert settings.metrics_require_key and settings.cors_origins == [ORIGIN]
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())


def test_a_misspelt_setting_does_not_print_the_key_either() -> None:
    with pytest.raises(ValidationError) as raised:
        settings_for(tiny_vit_config(), api_key=KEY)
    assert "api_key" in str(raised.value) and KEY not in str(raised.value)


# Logs and metrics ----------------------------------------------------------------------------------------------------

def test_the_key_is_never_logged_but_its_fingerprint_is(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    run(get(keyed(), (PROTECTED, {"Authorization": f"Bearer {KEY}", "X-Request-ID": "fp-1"}),
            (PROTECTED, {"X-API-Key": OTHER_KEY, "X-Request-ID": "fp-2"}),
            (PROTECTED, {"X-API-Key": KEY + "x", "X-Request-ID": "fp-3"})))
    access = {record.request_id: record for record in caplog.records if record.name == "saliency.access"}
    assert access["fp-1"].caller == fp(KEY) and f"caller={fp(KEY)}" in access["fp-1"].getMessage()
    assert access["fp-2"].caller == fp(OTHER_KEY)
    assert access["fp-3"].caller == "" and access["fp-3"].code == "invalid_api_key"
    everything = caplog.text + "".join(repr(vars(record)) for record in caplog.records)
    for secret in (KEY, OTHER_KEY, KEY + "x"):
        assert secret not in everything
    assert fp(KEY) in caplog.text


def test_requests_are_counted_per_caller_by_fingerprint() -> None:
    responses = run(get(keyed(), (PROTECTED, {"X-API-Key": KEY}), (PROTECTED, {"Authorization": f"Bearer {KEY}"}),
                        (PROTECTED, {"X-API-Key": OTHER_KEY}), (PROTECTED, {}), ("/healthz", {}), ("/metrics", {})))
    text = responses[-1].text
    counts = {tuple(sorted(sample.labels.items())): sample.value
              for family in text_string_to_metric_families(text) if family.name == "saliency_caller_requests"
              for sample in family.samples if sample.name == "saliency_caller_requests_total"}

    def count(caller: str, endpoint: str, status: str) -> float:
        return counts.get((("caller", caller), ("endpoint", endpoint), ("status", status)), 0.0)

    assert count(fp(KEY), "list_models", "200") == 2
    assert count(fp(OTHER_KEY), "list_models", "200") == 1
    assert count("anonymous", "list_models", "401") == 1  # a refusal is counted under the route it was for
    assert count("anonymous", "healthz", "200") >= 1
    assert {dict(labels)["caller"] for labels in counts} == {fp(KEY), fp(OTHER_KEY), "anonymous"}  # bounded
    assert KEY not in text and OTHER_KEY not in text


# OpenAPI -------------------------------------------------------------------------------------------------------------

def test_the_document_declares_the_keys_only_when_they_are_configured() -> None:
    plain, with_keys = (r.json() for r in (run(get(settings_for(tiny_vit_config()), ("/openapi.json", {})))[0],
                                           run(get(keyed(), ("/openapi.json", {})))[0]))
    assert "securitySchemes" not in plain["components"] and '"security"' not in json.dumps(plain)
    assert "401" not in json.dumps(plain["paths"]["/v1/models"])
    schemes = with_keys["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"] == {**schemes["apiKeyHeader"], "type": "apiKey", "in": "header",
                                       "name": "X-API-Key"}
    predict = with_keys["paths"]["/v1/models/{model_id}/predict"]["post"]
    assert predict["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
    assert predict["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "security" not in with_keys["paths"]["/healthz"]["get"]
    assert "security" not in with_keys["paths"]["/metrics"]["get"]
    validate(with_keys)


# The shipped client --------------------------------------------------------------------------------------------------

def test_the_shipped_client_sends_the_key_as_a_bearer_token() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"status": "ok"})

    with SaliencyClient("http://server", api_key=KEY, headers={"Authorization": "Basic old"},
                        transport=httpx.MockTransport(handler)) as client:
        client.health()
    assert seen == [f"Bearer {KEY}"]

    async def go() -> tuple[int, str]:
        async with running_app(keyed(), models={}) as (http, _):
            listed = await AsyncSaliencyClient(api_key=KEY, http_client=http).list_models()
            with pytest.raises(SaliencyError) as refused:
                await AsyncSaliencyClient(http_client=http).list_models()
            return len(listed.models), refused.value.code

    assert run(go()) == (0, "missing_api_key")


# CORS ----------------------------------------------------------------------------------------------------------------

PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_is_off_by_default() -> None:
    responses = run(get(settings_for(tiny_vit_config()), (PROTECTED, {"Origin": ORIGIN})))
    responses += run(get(settings_for(tiny_vit_config()), (PROTECTED, PREFLIGHT), method="OPTIONS"))
    for response in responses:
        assert "access-control-allow-origin" not in response.headers


def test_cors_answers_preflights_from_configured_origins_only() -> None:
    settings = keyed(cors_origins=[ORIGIN])
    [allowed] = run(get(settings, ("/v1/models/tiny_vit/predict", PREFLIGHT), method="OPTIONS"))
    assert allowed.status_code == 200  # no key needed for a preflight
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    allowed_headers = allowed.headers["access-control-allow-headers"].lower()
    assert all(h in allowed_headers for h in ("authorization", "x-api-key", "content-type", "x-request-id"))
    assert "POST" in allowed.headers["access-control-allow-methods"]
    [refused] = run(get(settings, ("/v1/models/tiny_vit/predict", {**PREFLIGHT, "Origin": "https://evil.example"}),
                        method="OPTIONS"))
    assert "access-control-allow-origin" not in refused.headers


def test_cors_responses_expose_the_request_id_and_a_401_is_readable_by_the_page() -> None:
    ok, unauthorized = run(get(keyed(cors_origins=[ORIGIN]), (PROTECTED, {"Origin": ORIGIN, "X-API-Key": KEY}),
                               (PROTECTED, {"Origin": ORIGIN})))
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
    assert_401(unauthorized, "missing_api_key")
    assert unauthorized.headers["access-control-allow-origin"] == ORIGIN
