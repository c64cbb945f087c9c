"""The OpenAPI document: both request body forms of predict, resolvable $refs, error responses, schema docs."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

import api_schemas
from service.http import openapi as openapi_module
from service.http.app import create_app
from tests.helpers import settings_for, tiny_vit_config

PREDICT = "/v1/models/{model_id}/predict"
ERROR_STATUSES = ("400", "404", "413", "415", "422", "503", "504")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    # The document needs no loaded model: the lifespan is not entered.
    app = create_app(settings_for(tiny_vit_config()), models={})
    response = TestClient(app).get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"non-local $ref {ref!r}"
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"$ref {ref!r} does not resolve (missing {part!r})"
        node = node[part]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def schema_of(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    return resolve(document, schema["$ref"]) if "$ref" in schema else schema


def test_paths_present(document: dict[str, Any]) -> None:
    paths = document["paths"]
    for path in ("/healthz", "/readyz", "/v1/models", "/v1/models/{model_id}", "/metrics"):
        assert "get" in paths[path], path
    assert "post" in paths[PREDICT]
    assert document["info"]["title"] == "saliency-server"


def test_predict_json_request_body(document: dict[str, Any]) -> None:
    body = document["paths"][PREDICT]["post"]["requestBody"]
    # Required in fact (400 empty_body without one) but not marked so: openapi-python-client 0.29 generates code
    # that does not import for a required body with two content types (see service/http/openapi.py).
    assert "required" not in body and "Required." in body["description"]
    schema = body["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/PredictJsonRequest"}
    resolved = resolve(document, schema["$ref"])
    assert resolved["title"] == "PredictJsonRequest"
    assert set(resolved["properties"]) == {"image", "top_k"}
    assert resolved["required"] == ["image"]
    assert resolved["properties"]["image"]["type"] == "string"
    assert resolved["properties"]["image"]["examples"]
    top_k = resolved["properties"]["top_k"]
    assert (top_k["type"], top_k["minimum"], top_k["default"]) == ("integer", 1, 5)
    assert resolved.get("additionalProperties") is False


def test_predict_multipart_request_body(document: dict[str, Any]) -> None:
    content = document["paths"][PREDICT]["post"]["requestBody"]["content"]["multipart/form-data"]
    schema = schema_of(document, content["schema"])
    assert schema["type"] == "object"
    assert schema["required"] == ["file"]
    assert schema["properties"]["file"]["type"] == "string"
    assert schema["properties"]["file"]["format"] == "binary"
    top_k = schema["properties"]["top_k"]
    assert (top_k["type"], top_k["minimum"], top_k["maximum"], top_k["default"]) == ("integer", 1, 1000, 5)
    # An integer field is sent as plain text: its description is the model's own.
    assert top_k["description"] == api_schemas.PredictOptions.model_fields["top_k"].description


def test_form_fields_that_take_lists_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openapi_module, "_EXTRA_SCHEMAS", {})

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        classes: list[int] | None = Field(default=None, description="Class indices.")
        steps: int = Field(default=3, description="Steps.")

    class JsonRequest(Options):
        image: str

    body = openapi_module.image_request_body(JsonRequest, Options)["requestBody"]["content"]
    properties = body["multipart/form-data"]["schema"]["properties"]
    assert properties["steps"]["description"] == "Steps."
    assert properties["classes"]["description"].startswith("Class indices.")
    assert "JSON" in properties["classes"]["description"]


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    found = list(refs(document))
    assert len(found) > 10
    for ref in found:
        resolve(document, ref)


def test_predict_documents_errors_with_the_envelope(document: dict[str, Any]) -> None:
    responses = document["paths"][PREDICT]["post"]["responses"]
    assert "200" in responses
    assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/PredictResponse"}
    for status in ERROR_STATUSES:
        assert status in responses, status
        assert responses[status]["description"]
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, status
    envelope = resolve(document, "#/components/schemas/ErrorResponse")
    assert envelope["required"] == ["error"]
    detail = schema_of(document, envelope["properties"]["error"])
    assert set(detail["properties"]) == {"code", "message", "request_id"}
    assert set(detail["required"]) == {"code", "message"}


def test_model_info_404_documented(document: dict[str, Any]) -> None:
    responses = document["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    assert responses["404"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


def _component(document: dict[str, Any], name: str) -> dict[str, Any] | None:
    schemas = document["components"]["schemas"]
    for candidate in (name, f"{name}-Output", f"{name}-Input"):
        if candidate in schemas:
            return schemas[candidate]
    return None


def test_component_schemas_keep_model_descriptions_and_examples(document: dict[str, Any]) -> None:
    models = [getattr(api_schemas, name) for name in api_schemas.__all__]
    checked = set()
    for model in models:
        component = _component(document, model.__name__)
        if component is None:
            continue
        checked.add(model.__name__)
        expected = model.model_json_schema()
        if "description" in expected:
            assert component.get("description") == expected["description"], model.__name__
        for field, prop in expected.get("properties", {}).items():
            documented = component["properties"][field]
            for key in ("description", "examples"):
                if key in prop:
                    assert documented.get(key) == prop[key], f"{model.__name__}.{field}: {key} lost"
    assert {
        "PredictResponse", "PredictJsonRequest", "ModelInfo", "ModelListResponse", "WeightsInfo", "BatchingInfo",
        "ClassScore", "Timings", "ErrorResponse", "ErrorDetail", "HealthResponse", "ReadinessResponse",
    } <= checked


def test_predict_response_and_model_info_are_documented(document: dict[str, Any]) -> None:
    predict = _component(document, "PredictResponse")
    assert predict is not None and predict["description"]
    assert predict["properties"]["model_id"]["examples"] == ["efficientnet_lite0"]
    model_info = _component(document, "ModelInfo")
    assert model_info is not None and model_info["description"]
    assert model_info["properties"]["input_size"]["examples"] == [[3, 224, 224]]
    assert model_info["properties"]["family"]["description"]
    weights = resolve(document, "#/components/schemas/WeightsInfo")
    assert weights["properties"]["random"]["description"]


def test_operation_ids_are_camel_case_function_names_for_generated_clients(document: dict[str, Any]) -> None:
    ids = [op["operationId"] for path in document["paths"].values() for op in path.values() if "operationId" in op]
    assert len(ids) == len(set(ids))
    assert all(i[:1].islower() and "_" not in i for i in ids), ids
    operations = {(method.upper(), path): op["operationId"] for path, item in document["paths"].items()
                  for method, op in item.items()}
    assert operations[("POST", "/v1/models/{model_id}/predict")] == "predict"
    assert operations[("POST", "/v1/models/{model_id}/explain")] == "explain"
    assert operations[("GET", "/v1/models")] == "listModels"
    assert operations[("GET", "/v1/methods")] == "listMethods"
    assert operations[("POST", "/v1/models/{model_id}/visualizations")] == "startVisualization"


def test_every_422_is_documented_with_the_error_envelope(document: dict[str, Any]) -> None:
    """The server never sends FastAPI's HTTPValidationError shape: every documented 422 is the envelope."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            response = operation.get("responses", {}).get("422")
            if response is not None:
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, schema)
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_retry_after_and_location_headers_are_documented(document: dict[str, Any]) -> None:
    predict = document["paths"]["/v1/models/{model_id}/predict"]["post"]["responses"]
    assert "Retry-After" in predict["503"]["headers"]
    start = document["paths"]["/v1/models/{model_id}/visualizations"]["post"]["responses"]
    assert "Location" in start["202"]["headers"] and "Retry-After" in start["429"]["headers"]
    assert start["202"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobStatus"}
