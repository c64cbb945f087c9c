"""Reading an image request: a multipart upload (`file` plus option fields) or JSON with a base64 `image`."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.errors import ApiError

O = TypeVar("O", bound=BaseModel)


@dataclass(frozen=True)
class ImageRequest(Generic[O]):
    """The encoded image bytes and the validated options that came with them."""

    image: bytes
    options: O


def validation_message(error: ValidationError) -> str:
    """One line per failing field, each naming the field."""
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{field}: {item['msg']}")
    return "; ".join(parts)


def decode_base64_image(text: str) -> bytes:
    """Decode a base64 string, accepting a `data:image/...;base64,` prefix."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", "image: not valid base64") from None


def _form_value(value: str) -> Any:
    """Form fields carrying lists, objects or integers are sent as JSON text."""
    stripped = value.strip()
    if stripped[:1] in ("[", "{") or re.fullmatch(r"-?\d+", stripped):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return value
    return value


def _validate(model: type[O], data: Any) -> O:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", validation_message(exc)) from None


async def read_image_request(
    request: Request, options_model: type[O], json_model: type[BaseModel], max_body_bytes: int
) -> ImageRequest[O]:
    """Parse the body as multipart (`file` field) or JSON (`image` field, base64)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=100, max_part_size=max_body_bytes)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid_request", "file: a multipart upload needs the image in a field named 'file'")
        data = await upload.read()
        fields = {key: _form_value(value) for key, value in form.multi_items() if key != "file" and isinstance(value, str)}
        return ImageRequest(data, _validate(options_model, fields))
    if content_type in ("application/json", ""):
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise ApiError(422, "invalid_request", "body: expected a JSON object")
        parsed = _validate(json_model, payload)
        options = options_model.model_validate(parsed.model_dump(exclude={"image"}))
        return ImageRequest(decode_base64_image(parsed.image), options)  # type: ignore[attr-defined]
    raise ApiError(
        415, "unsupported_media_type",
        f"content-type {content_type!r} is not supported; send multipart/form-data or application/json",
    )
