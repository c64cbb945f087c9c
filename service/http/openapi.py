"""OpenAPI helpers: request bodies that accept JSON or multipart, with their schemas in `components`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF_TEMPLATE = "#/components/schemas/{model}"
_EXTRA_SCHEMAS: dict[str, dict[str, Any]] = {}


def _register(model: type[BaseModel]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    for name, definition in schema.pop("$defs", {}).items():
        _EXTRA_SCHEMAS[name] = definition
    _EXTRA_SCHEMAS[model.__name__] = schema
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def _takes_json_text(prop: dict[str, Any]) -> bool:
    """Whether a form field may hold a list or an object (sent as JSON text in a multipart form)."""
    if "$ref" in prop:
        prop = _EXTRA_SCHEMAS.get(prop["$ref"].rsplit("/", 1)[-1], {})
    if prop.get("type") in ("array", "object"):
        return True
    return any(_takes_json_text(option) for option in prop.get("anyOf", []) + prop.get("oneOf", []))


def image_request_body(json_model: type[BaseModel], options_model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route taking an image as JSON (base64) or multipart (`file` + option fields)."""
    json_ref = _register(json_model)
    options = options_model.model_json_schema(ref_template=REF_TEMPLATE)
    for name, definition in options.pop("$defs", {}).items():
        _EXTRA_SCHEMAS[name] = definition
    form_properties = {"file": {"type": "string", "format": "binary", "description": "The image file."}}
    for name, prop in options.get("properties", {}).items():
        if prop.get("type") == "array":
            note = "Send one field per item (an object item as JSON text), or the whole list as one JSON text field."
        elif _takes_json_text(prop):
            note = "Send an object as JSON text."
        else:
            note = ""
        form_properties[name] = {**prop, "description": f"{prop.get('description', '')} {note}".strip()}
    return {
        "requestBody": {
            # The body is required (without one the answer is 400 `empty_body`), but `required` is left unset:
            # openapi-python-client 0.29 emits code that does not import for a required body with two content types
            # (`NameError: name 'Unset' is not defined`, openapi-generators/openapi-python-client#1451).
            "description": "The image: JSON with a base64 `image`, or a multipart upload with a `file` part. Required.",
            "content": {
                "application/json": {"schema": json_ref},
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": form_properties, "required": ["file"]},
                    "encoding": {"file": {"contentType": "image/*"}},
                },
            },
        }
    }


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads and validates its JSON body itself (`uploads.read_json_request`), so
    that malformed JSON gets the documented 400 `invalid_json` rather than the framework's own answer."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _register(model)}}}}


def install_openapi(app: FastAPI, protected: Callable[[str], bool] | None = None) -> None:
    """Generate the document once, adding the schemas that request bodies refer to. With `protected` (API keys
    configured), the security schemes are declared and required by each operation whose path it accepts."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            document.setdefault("components", {}).setdefault("schemas", {}).update(_EXTRA_SCHEMAS)
            _envelope_for_fastapi_validation_errors(document)
            if protected is not None:
                _declare_api_keys(document, protected)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _envelope_for_fastapi_validation_errors(document: dict[str, Any]) -> None:
    """FastAPI documents a 422 `HTTPValidationError` for every route with parameters, but the server answers every
    422 with the error envelope (`ErrorResponse`): document what is sent, and drop the schemas nothing uses then."""
    fastapi_ref = REF_TEMPLATE.format(model="HTTPValidationError")
    for item in document.get("paths", {}).values():
        for operation in item.values():
            response = operation.get("responses", {}).get("422")
            schema = (response or {}).get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref") == fastapi_ref:
                operation["responses"]["422"] = {
                    "description": "A field failed validation; the message names it.",
                    "content": {"application/json": {"schema": {"$ref": REF_TEMPLATE.format(model="ErrorResponse")}}},
                }
    schemas = document.get("components", {}).get("schemas", {})
    if "ErrorResponse" in schemas and fastapi_ref not in repr(document.get("paths")):
        schemas.pop("HTTPValidationError", None)
        if "#/components/schemas/ValidationError" not in repr(document):
            schemas.pop("ValidationError", None)


# The two ways of sending an API key (service/http/auth.py); either is enough.
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key: `Authorization: Bearer KEY`."},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "An API key."},
}
_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def _declare_api_keys(document: dict[str, Any], protected: Callable[[str], bool]) -> None:
    """The security schemes, and on each operation that needs a key, its requirement and its 401."""
    document.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for path, item in document.get("paths", {}).items():
        if not protected(path):
            continue
        v2 = path == "/v2" or path.startswith("/v2/")
        unauthorized = {
            "description": "No API key was sent (`missing_api_key`), or not a valid one (`invalid_api_key`).",
            "headers": {"WWW-Authenticate": {"description": '`Bearer realm="saliency-server"`.',
                                             "schema": {"type": "string"}}},
            "content": {"application/json": {"schema": {
                "$ref": REF_TEMPLATE.format(model="V2ErrorResponse" if v2 else "ErrorResponse")}}},
        }
        for method, operation in item.items():
            if method in _HTTP_METHODS:
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
                operation.setdefault("responses", {})["401"] = unauthorized
